"""Presets: the official DKL ImageNet-LT rows, and every params file a user copies over params.yaml."""

import re
import yaml
from click.testing import CliRunner

from pipeline.tools.cli import cli
from pipeline.train.losses import DistillationObjective
from pipeline.params import Params, check_consistency, load_params, parse
from pipeline.tools.presets import (BASE_PARAMS, IMAGENET_LT_ROWS, OFFICIAL_REPOSITORY,
                              apply_overrides, exp_run_command)

X101 = "resnext101_32x4d"
# Every script of the official repository's sh/Distill that trains on ImageNet-LT: its flags
# (-a/--arch, --teacher_arch, --distill_loss, --distill_w or --alpha/--beta, GKL's --gamma 0.3
# --T2 1.0 --GI), the paper's top-1 and the official README's top-1 (None: not reported).
V1, V2 = "DKLv1/Imbalanced_KD-dkl/sh/Distill/", "DKLv2/Imbalanced_KD-dkl/sh/Distill/"
OFFICIAL = {  # name: (script, teacher, student, loss, weight or alpha, beta, paper, README)
    "ce-r18": (V1 + "ImageNetLT_train_R18_baseline.sh", None, "resnet18", "ce", None, None,
               41.150, 41.150),
    "ce-r50": (V1 + "ImageNetLT_train_R50_baseline.sh", None, "resnet50", "ce", None, None,
               45.476, 45.476),
    "ce-x101": (V1 + "ImageNetLT_train_X101_baseline.sh", None, X101, "ce", None, None,
                48.024, 48.024),
    "kl-x101-r18": (V1 + "ImageNetLT_train_X101R18_distill.sh", X101, "resnet18", "kl", 4.0,
                    None, 43.974, 44.318),
    "kl-x101-r50": (V1 + "ImageNetLT_train_X101R50_distill.sh", X101, "resnet50", "kl", 3.0,
                    None, 48.310, 48.310),
    "kl-r50-r50": (V1 + "ImageNetLT_train_R50R50_distill.sh", "resnet50", "resnet50", "kl",
                   1.0, None, 47.036, 47.036),
    "kl-r18-r18": (V1 + "ImageNetLT_train_R18R18_distill.sh", "resnet18", "resnet18", "kl",
                   4.0, None, None, 42.732),
    "ikl-x101-r18": (V1 + "ImageNetLT_train_X101R18_distill_dkl.sh", X101, "resnet18", "ikl",
                     4.0, 4.0, 44.880, 45.208),
    "ikl-x101-r50": (V1 + "ImageNetLT_train_X101R50_distill_dkl.sh", X101, "resnet50", "ikl",
                     3.0, 4.0, 49.224, 49.224),
    "ikl-r50-r50": (V1 + "ImageNetLT_train_R50R50_distill_dkl.sh", "resnet50", "resnet50",
                    "ikl", 1.0, 1.0, 47.504, 47.504),
    "ikl-r18-r18": (V1 + "ImageNetLT_train_R18R18_distill_dkl.sh", "resnet18", "resnet18",
                    "ikl", 1.0, 0.5, None, 43.062),
    "gkl-x101-r18": (V2 + "ImageNetLT_train_X101R18_distill_dkl.sh", X101, "resnet18", "gkl",
                     4.0, 4.0, None, 45.40),
    "gkl-x101-r50": (V2 + "ImageNetLT_train_X101R50_distill_dkl.sh", X101, "resnet50", "gkl",
                     3.0, 4.0, None, 49.40),
    "gkl-r50-r50": (V2 + "ImageNetLT_train_R50R50_distill_dkl.sh", "resnet50", "resnet50",
                    "gkl", 1.0, 1.0, None, None),
}


def base_raw():
    return yaml.safe_load(BASE_PARAMS.read_text())


def load_row(name):
    return check_consistency(parse(Params, apply_overrides(base_raw(),
                                                           IMAGENET_LT_ROWS[name].overrides), ""))


def test_base_preset_has_the_official_shared_settings():
    params = check_consistency(parse(Params, base_raw(), ""))
    assert set(params.teachers) == {"resnext101_32x4d", "resnet50", "resnet18"}
    for settings in (*params.teachers.values(), params.student):
        assert (settings.lr, settings.batch_size, settings.momentum, settings.weight_decay,
                settings.epochs, settings.warmup_epochs, settings.image_size) == (
                    0.05, 128, 0.9, 5e-4, 90, 10, 224)
        # -b 128 is the global batch; DataLoader(drop_last=True); adjust_learning_rate per
        # epoch; no --fp16 in any script
        assert (settings.drop_last, settings.schedule, settings.precision) == (
            True, "per_epoch", "fp32")
    assert params.augment.crop_scale == (0.08, 1.0) and params.augment.flip_probability == 0.5
    assert params.student.seed is None and params.evaluate.every_epoch_on_test is False


def test_every_official_script_has_a_row_with_its_settings():
    assert set(OFFICIAL) == set(IMAGENET_LT_ROWS)
    assert len({script for script, *_ in OFFICIAL.values()}) == len(OFFICIAL)
    for name, (script, teacher, arch, loss, first, beta, paper, readme) in OFFICIAL.items():
        row = IMAGENET_LT_ROWS[name]
        assert (row.script, row.paper_top1, row.readme_top1) == (script, paper, readme), name
        if loss == "ce":
            assert row.baseline == arch and not row.overrides
            assert load_row(name).teachers[arch].arch == arch
            continue
        student = load_row(name).student
        objective = DistillationObjective(student)
        assert objective.needs_teacher
        assert (student.teacher, student.arch) == (teacher, arch), name
        assert student.loss == ("kl" if loss == "kl" else "ikl"), name
        if loss == "kl":
            assert (student.kl.weight, student.kl.temperature) == (first, 1.0), name
            continue
        ikl = student.ikl
        assert (ikl.alpha, ikl.beta, ikl.temperature) == (first, beta, 1.0), name
        assert objective.needs_class_prior == (loss == "gkl"), name
        if loss == "ikl":  # DKLv1 defaults: sample-wise weights, --T2 100, no gamma
            assert (ikl.weights, ikl.weight_temperature, ikl.gamma, ikl.normalize) == (
                "sample", 100.0, 1.0, False), name
        else:  # --gamma 0.3 --T2 1.0 --GI: the previous epoch's prior, batch-total normaliser
            assert (ikl.weights, ikl.prior, ikl.weight_temperature, ikl.gamma,
                    ikl.normalize) == ("class_prior", "previous_epoch", 1.0, 0.3, True), name


def test_presets_prints_a_row_for_every_official_script():
    assert exp_run_command("ikl-r50-r50") == (
        "dvc exp run -n ikl-r50-r50 -S student.teacher=resnet50 -S student.arch=resnet50 "
        "-S student.loss=ikl -S student.ikl.alpha=1.0 -S student.ikl.beta=1.0")
    assert exp_run_command("ce-x101") == "dvc repro evaluate_teacher@resnext101_32x4d"
    result = CliRunner().invoke(cli, ["presets"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for name, (script, *_, paper, readme) in OFFICIAL.items():
        described = [line for line in lines if line.startswith(f"# {name}: ")]
        assert len(described) == 1, name
        assert f"{OFFICIAL_REPOSITORY}/{script}" in described[0]
        assert f"paper top-1 {'-' if paper is None else f'{paper:.3f}%'}" in described[0]
        assert f"official README top-1 {'-' if readme is None else f'{readme:.3f}%'}" in (
            described[0])
        assert lines[lines.index(described[0]) + 1] == exp_run_command(name)
    assert "-S student.ikl.prior=previous_epoch" in result.output


def test_every_params_file_has_every_key_a_stage_lists():
    """DVC refuses to run a stage whose listed param is missing from params.yaml, so every
    preset (applied by copying it over params.yaml) and params.yaml itself must hold each key
    dvc.yaml lists (`teachers.${key}`: each of the file's own teachers)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    listed = {key for stage in stages.values() for key in stage.get("do", stage).get("params", [])}
    # and every key dvc.yaml templates (`${data.root}` in prepare's deps, ...): DVC cannot parse
    # dvc.yaml without them
    templated = set(re.findall(r"\$\{([\w.]+)\}", (root / "dvc.yaml").read_text())) - {"key"}
    assert "data.train_list" in templated
    listed |= templated
    assert "student.decode" in listed  # the dump decodes the way its student will
    files = sorted((root / "pipeline" / "tools" / "presets").glob("*.yaml"))
    assert {path.name for path in files} >= {"smoke.yaml", "glyphs_lt.yaml", "imagenet_lt.yaml",
                                              "image_folder.yaml"}  # a moved folder fails here
    for path in files + [root / "params.yaml"]:
        params = yaml.safe_load(path.read_text())
        keys = {key.replace("${key}", name) for key in listed for name in params["teachers"]}
        missing = []
        for key in sorted(keys):
            node = params
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(key)
                    break
                node = node[part]
        assert not missing, f"{path.name} lacks {missing}"


def test_every_preset_parses_and_the_image_folder_one_reads_a_folder():
    """Each preset is a complete params file (applied by copying it over params.yaml)."""
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[1] / "pipeline" / "tools" / "presets")
                     .glob("*.yaml"))
    # load_params: the stages' own loader (YAML 1.2, refuses aliases and duplicate keys)
    parsed = {path.stem: load_params(path) for path in presets}
    image_folder = parsed["image_folder"]
    assert image_folder.data.source == "image_folder" and image_folder.data.root
    assert image_folder.student.teacher in image_folder.teachers
