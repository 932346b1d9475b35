"""params.yaml as users and `dvc exp run -S` write it (issue 21, issue 23 item 7): numbers in
every common spelling, duplicate keys, aliases, non-finite values, and every problem of a file
reported in one run, the data set's limits included."""

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import save_image
from pipeline.data.shards import prepare_shards
from pipeline.params import ParamsError, data_problems, load_params, parse, Params
from pipeline.train.runs import train_teacher
from stages.prepare import main as prepare_stage


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def refusal(tmp_path, text) -> str:
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, text))
    return str(error.value)


@pytest.mark.parametrize("text, read", [
    ("student: {lr: 1e-05}", 1e-05),  # what `dvc exp run -S student.lr=0.00001` writes
    ("student: {lr: 1e-3}", 1e-3),  # YAML 1.1 (PyYAML) reads both as strings
    ("student: {lr: 1E-3}", 1e-3),
    ("student: {lr: 5e+2}", 500.0),
    ("student: {lr: .5}", 0.5),
    ("student: {lr: +0.1}", 0.1),
    ("student: {lr: 2}", 2.0),
])
def test_numbers_in_every_common_spelling_are_numbers(tmp_path, text, read):
    assert load_params(write(tmp_path, text)).student.lr == read


def test_integers_read_as_yaml_1_2_and_dvc_read_them(tmp_path):
    """`010` is 10 for DVC (ruamel, YAML 1.2), not octal 8 as in YAML 1.1."""
    params = load_params(write(tmp_path, "student: {batch_size: 010, epochs: 0x3}\n"
                                         "data: {shard_size: 0o10}"))
    assert (params.student.batch_size, params.student.epochs, params.data.shard_size) == (
        10, 3, 8)
    assert "got 1000.0" in refusal(tmp_path, "student: {epochs: 1e3}")  # an int stays an int


def test_a_duplicated_key_is_refused_naming_it_and_its_lines(tmp_path):
    message = refusal(tmp_path, "seed: 0\ndata: {workers: 0}\nseed: 1\n")
    assert message == (f"{tmp_path}/params.yaml: line 3, column 1: key 'seed' appears twice "
                       "(first on line 1); YAML readers keep one silently: delete one")
    nested = refusal(tmp_path, "student:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    assert "line 4, column 3: key 'lr' appears twice (first on line 2)" in nested


@pytest.mark.parametrize("text, alias", [
    ("teachers:\n  teacher: {lr: &lr 0.1}\nstudent: {lr: *lr}\n", "*lr"),
    ("base: &b {lr: 0.1}\n", None),  # an anchor alone is harmless (but base is unknown)
    ("teachers:\n  teacher: &t {lr: 0.1}\n  baseline:\n    <<: *t\n", "*t"),
])
def test_aliases_are_refused_because_dvc_de_links_them(tmp_path, text, alias):
    message = refusal(tmp_path, text)
    if alias is None:
        assert message.startswith("base: unknown key")
        return
    assert (f"alias {alias}: `dvc exp run -S` changes only the key it names and silently "
            "de-links the others (dvc#10984); write the value out at each key") in message


@pytest.mark.parametrize("text, message", [
    ("student: {lr: .inf}", "student.lr: expected a finite number > 0, got inf"),
    ("student: {ikl: {beta: .Inf}}", "student.ikl.beta: expected a finite number >= 0, got inf"),
    ("student: {momentum: .nan}", "student.momentum: expected a finite number in [0, 1], got nan"),
    ("student: {weight_decay: -.inf}", "student.weight_decay: expected a finite number >= 0"),
    ("augment: {crop_scale: [.nan, 1.0]}", "augment.crop_scale: expected a list of 2 numbers"),
    ("logits: {prior_temperatures: [1.0, .inf]}", "logits.prior_temperatures: expected a list"),
    ("student: {lr: 1e999}", "student.lr: expected a finite number > 0, got inf"),
])
def test_non_finite_values_are_refused(tmp_path, text, message):
    assert refusal(tmp_path, text).startswith(message)


def test_every_problem_of_a_file_is_listed_at_once(tmp_path):
    text = ("seed: 1\nseed: 2\n"
            "data: {shard_size: 0, bogus: 1}\n"
            "student: {lr: .inf, arch: resnet_8, ce_weight: 0, loss: ce}\n"
            "logits: {topk: 11}\n")
    message = refusal(tmp_path, text)
    lines = message.split("\n")
    assert lines[0] == (f"{tmp_path}/params.yaml: 7 problems in the params; fix them all, then "
                        "rerun:")
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "line 2, column 1", "data.bogus", "data.shard_size", "student.lr",
        "student.ce_weight", "logits.topk", "student.arch"]
    # Through a stage: the same list, after `Error:`, one problem a line.
    result = CliRunner().invoke(prepare_stage, ["--params", str(tmp_path / "params.yaml"),
                                                "--out", str(tmp_path / "shards")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().split("\n") == [f"Error: {lines[0]}"] + lines[1:]
    assert not (tmp_path / "shards").exists()


def test_a_refused_key_adds_no_noise_from_its_default(tmp_path):
    """student.teacher: 5 is refused once; its default is not then checked against teachers."""
    assert refusal(tmp_path, "teachers: {t: {lr: 0.1}}\nstudent: {teacher: 5}") == (
        "student.teacher: expected a string, got 5")


# ---------------------------------------------------------------------------------------------
# The data set's limits, known after prepare, all at once

@pytest.fixture
def tiny_folder_shards(tmp_path):
    """3 classes x 5 images: 4 train each (12 train rows), 1 test."""
    rng = np.random.default_rng(0)
    for name in "abc":
        for i in range(5):
            save_image(tmp_path / "folder" / name / f"{i}.png", rng, size=(8, 8), fmt="PNG")
    out = tmp_path / "shards"
    data = {"source": "image_folder", "root": str(tmp_path / "folder"), "val_per_class": 0,
            "test_per_class": 1, "imbalance_ratio": 1, "workers": 0}
    return out, prepare_shards(parse(Params, {"data": data}, "").data, 0, out)


TRAIN = {"arch": "resnet8", "image_size": 8, "epochs": 1, "batch_size": 4, "workers": 0}


def test_the_data_set_limits_are_reported_together_before_training(tmp_path,
                                                                     tiny_folder_shards):
    shards, manifest = tiny_folder_shards
    params = parse(Params, {
        "data": {"source": "image_folder"}, "logits": {"topk": 5},
        "teachers": {"teacher": TRAIN,
                     "big": {**TRAIN, "batch_size": 64},
                     # trains nothing: no batch limit (its weights are used as they are)
                     "frozen": {**TRAIN, "batch_size": 64, "epochs": 0, "weights": "w.pt"},
                     "short_last": {**TRAIN, "batch_size": 64, "drop_last": False}},
        "student": {**TRAIN, "batch_size": 13, "views_per_decode": 1}}, "")
    out = tmp_path / "models" / "teacher"
    with pytest.raises(ParamsError) as error:
        train_teacher(params, "teacher", str(shards), str(out), str(tmp_path / "live"))
    assert str(error.value).split("\n") == [
        "3 problems in the params; fix them all, then rerun:",
        f"  logits.topk: 5 exceeds the 3 classes of {shards}; set logits.topk <= 3",
        f"  teachers.big.batch_size: 64 is more than the 12 training samples of an epoch of "
        f"{shards} and teachers.big.drop_last is set: no step would be taken; set it <= 12 or "
        "drop_last: false",
        f"  student.batch_size: 13 is more than the 12 training samples of an epoch of {shards} "
        "and student.drop_last is set: no step would be taken; set it <= 12 or drop_last: "
        "false"]
    assert not out.exists()
    fixed = parse(Params, {"data": {"source": "image_folder"}, "logits": {"topk": 3},
                           "teachers": {"teacher": TRAIN}, "student": {**TRAIN, "batch_size": 12}},
                  "")
    assert data_problems(fixed, manifest, str(shards)) == []
