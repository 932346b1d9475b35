import pytest
import yaml

from pipeline.params import Params, ParamsError, check_consistency, load_params, parse


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_parse():
    params = load_params("params.yaml")
    assert params.data.source == "digits_lt"
    assert params.student.teacher in params.teachers


def test_defaults_fill_missing_sections():
    params = parse(Params, {}, "")
    assert params.seed == 0 and params.student.ikl.weight_temperature == 100.0


@pytest.mark.parametrize("text, message", [
    ("data: {foo: 1}", "data.foo: unknown key"),
    ("bogus: 1", "bogus: unknown key"),
    ("student: {ikl: {alpha: x}}", "student.ikl.alpha: expected a number >= 0, got 'x'"),
    ("student: {ikl: {alpha: -1}}", "student.ikl.alpha: expected a number >= 0, got -1"),
    ("data: {shard_size: 0}", "data.shard_size: expected an integer >= 1, got 0"),
    ("data: {shard_size: 2.5}", "data.shard_size: expected an integer >= 1, got 2.5"),
    ("data: {source: imagenet}", "data.source: expected one of digits_lt"),
    ("data: {skip_bad_images: 1}", "data.skip_bad_images: expected true or false, got 1"),
    ("teachers: {t: {epochs: -1}}\nstudent: {teacher: t}",
     "teachers.t.epochs: expected an integer >= 0, got -1"),
    ("teachers: {t: {epochs: 0}}\nstudent: {teacher: t}",
     "teachers.t.epochs: 0 uses the weights file as it is, but teachers.t.weights is empty"),
    ("student: {reset_head: true}", "student.reset_head: true needs student.weights"),
    ("teachers: {t: {epochs: 0, weights: w.pt, reset_head: true}}\nstudent: {teacher: t}",
     "teachers.t.reset_head: a re-initialised head needs training"),
    ("teachers: {}", "teachers: expected a non-empty mapping"),
    ("student: {teacher: nobody}", "student.teacher: 'nobody' is not a key of teachers"),
    ("augment: {crop_scale: [0.5]}", "augment.crop_scale: expected a list of 2 numbers"),
    ("augment: {crop_scale: [0.9, 0.1]}", "augment.crop_scale: expected [low, high]"),
    ("student: {ikl: {weights: class_prior, weight_temperature: 3}}",
     "student.ikl.weight_temperature: 3 has no stored class prior"),
    ("data: 5", "data: expected a mapping, got 5"),
    ("student: {online_teacher: true, ikl: {weights: class_prior, weight_temperature: 1}}",
     "student.online_teacher: the live teacher has no stored GI prior"),
    ("student: {seed: -1}", "student.seed: expected an integer >= 0, got -1"),
    ("student: {ikl: {prior: epoch}}", "student.ikl.prior: expected one of store"),
    ("teachers: {t: {schedule: cosine}}\nstudent: {teacher: t}",
     "teachers.t.schedule: expected one of per_step, per_epoch, got"),
    ("student: {decode: nvjpeg}", "student.decode: expected one of auto, cpu, gpu, got 'nvjpeg'"),
    ("student: {precision: fp16}", "student.precision: expected one of bf16, fp32, got"),
    ("logits: {views: 2}\nstudent: {views_per_decode: 3}",
     "student.views_per_decode: 3 exceeds the 2 cached views"),
])
def test_bad_params_name_the_key(tmp_path, text, message):
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, text))
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_new_keys_parse_with_their_defaults():
    params = parse(Params, {}, "")
    student = params.student
    assert (student.seed, student.drop_last, student.schedule, student.precision) == (
        None, True, "per_step", "bf16")
    assert student.ikl.prior == "store" and params.evaluate.every_epoch_on_test is False
    params = parse(Params, yaml.safe_load(
        "student: {seed: 7, drop_last: false, schedule: per_epoch, precision: fp32, "
        "ikl: {prior: previous_epoch}}\nevaluate: {every_epoch_on_test: true}"), "")
    assert (params.student.seed, params.student.drop_last, params.student.schedule,
            params.student.precision, params.student.ikl.prior) == (
        7, False, "per_epoch", "fp32", "previous_epoch")
    # The previous epoch's prior needs no stored prior, and works with a live teacher.
    check_consistency(parse(Params, yaml.safe_load(
        "student: {online_teacher: true, ikl: {weights: class_prior, weight_temperature: 3, "
        "prior: previous_epoch}}"), ""))


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_params_are_frozen():
    params = parse(Params, yaml.safe_load("seed: 3"), "")
    with pytest.raises(AttributeError):
        params.seed = 4


def test_an_ikl_student_on_a_top_k_only_store_is_refused_before_any_dump(tmp_path):
    """With the number of classes known from the source, the refusal comes at params time,
    not after a dump."""
    path = tmp_path / "params.yaml"
    path.write_text("logits:\n  topk: 5\n  tail: none\nstudent:\n  loss: ikl\n")
    with pytest.raises(ParamsError, match="logits.tail: none keeps only the top-5 of 10"):
        load_params(path)
    path.write_text("logits:\n  topk: 5\n  tail: none\nstudent:\n  loss: ikl\n  ikl:\n"
                    "    approximate_tail: true\n")
    assert load_params(path).logits.tail == "none"
    path.write_text("logits:\n  topk: 10\n  tail: none\nstudent:\n  loss: ikl\n")
    assert load_params(path).logits.topk == 10  # k = C: every logit is kept
