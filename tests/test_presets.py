import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.distill import student_objective
from pipeline.params import Params, check_consistency, parse
from pipeline.presets import (BASE_PARAMS, IMAGENET_LT_ROWS, apply_overrides,
                              exp_run_command)


def load_row(name):
    raw = yaml.safe_load(BASE_PARAMS.read_text())
    return check_consistency(parse(Params, apply_overrides(raw, IMAGENET_LT_ROWS[name][1]), ""))


def test_base_preset_has_the_papers_shared_settings():
    params = check_consistency(parse(Params, yaml.safe_load(BASE_PARAMS.read_text()), ""))
    assert set(params.teachers) == {"resnext101_32x4d", "resnet50", "resnet18"}
    for settings in (*params.teachers.values(), params.student):
        assert (settings.lr, settings.batch_size, settings.momentum, settings.weight_decay,
                settings.epochs, settings.warmup_epochs, settings.image_size) == (
                    0.05, 128, 0.9, 5e-4, 90, 10, 224)
    assert params.augment.crop_scale == (0.08, 1.0) and params.augment.flip_probability == 0.5


def test_every_row_is_valid_and_matches_the_paper():
    expected = {  # name: (teacher, student, loss, alpha or kl weight, beta)
        "kl-x101-r18": ("resnext101_32x4d", "resnet18", "kl", 4.0, None),
        "kl-x101-r50": ("resnext101_32x4d", "resnet50", "kl", 3.0, None),
        "kl-r50-r50": ("resnet50", "resnet50", "kl", 1.0, None),
        "ikl-x101-r18": ("resnext101_32x4d", "resnet18", "ikl", 4.0, 4.0),
        "ikl-x101-r50": ("resnext101_32x4d", "resnet50", "ikl", 3.0, 4.0),
        "ikl-r50-r50": ("resnet50", "resnet50", "ikl", 1.0, 1.0),
        "ikl-r18-r18": ("resnet18", "resnet18", "ikl", 1.0, 0.5),
        "ikl-gi-x101-r18": ("resnext101_32x4d", "resnet18", "ikl", 4.0, 4.0),
        "ikl-gi-x101-r50": ("resnext101_32x4d", "resnet50", "ikl", 3.0, 4.0),
    }
    assert set(expected) == set(IMAGENET_LT_ROWS)
    for name, (teacher, arch, loss, first, beta) in expected.items():
        student = load_row(name).student
        objective = student_objective(student)
        assert objective.needs_teacher
        assert objective.needs_class_prior == name.startswith("ikl-gi")
        assert (student.teacher, student.arch, student.loss) == (teacher, arch, loss)
        if loss == "kl":
            assert student.kl.weight == first and student.kl.temperature == 1.0
        else:
            assert (student.ikl.alpha, student.ikl.beta) == (first, beta)
            gi = name.startswith("ikl-gi")
            assert student.ikl.weights == ("class_prior" if gi else "sample")
            assert student.ikl.weight_temperature == (1.0 if gi else 100.0)
            assert (student.ikl.gamma, student.ikl.normalize) == ((0.3, True) if gi
                                                                   else (1.0, False))


def test_exp_run_commands_are_printed():
    assert exp_run_command("ikl-r50-r50") == (
        "dvc exp run -n ikl-r50-r50 -S student.teacher=resnet50 -S student.arch=resnet50 "
        "-S student.loss=ikl -S student.ikl.alpha=1.0 -S student.ikl.beta=1.0")
    result = CliRunner().invoke(cli, ["presets"])
    assert result.exit_code == 0
    assert "paper top-1 49.22%" in result.output and "-S student.ikl.normalize=true" in result.output
