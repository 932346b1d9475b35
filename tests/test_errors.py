"""One-line errors instead of tracebacks, and refusals of silent nonsense (issue 13, items 7,
12, 13): params that fail before any work (arch typos, YAML tags, all-zero objectives, top-k
beyond the classes), a full disk in prepare, damaged manifests and checkpoints met by stages.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner

from helpers import save_image
from pipeline.train.runs import train_teacher
from pipeline.errors import UserError
from pipeline.params import Params, ParamsError, load_params, parse
from pipeline.data.shards import prepare_shards
from pipeline.train.loop import load_checkpoint
from stages.evaluate import main as evaluate_stage
from stages.prepare import main as prepare_stage

TRAIN = {"arch": "resnet8", "image_size": 8, "epochs": 1, "batch_size": 4, "workers": 0}


def params_file(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def one_line(message: str) -> str:
    assert "\n" not in message.strip() and "Traceback" not in message
    return message


def stage_error(result) -> str:
    """The error line of a stage run through CliRunner (progress bars may come before it)."""
    assert result.exit_code == 1 and "Traceback" not in result.output
    return result.output.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Params: refused when validated, naming the keys

@pytest.mark.parametrize("text, message", [
    # 13: a typo in arch, with the close names
    ("teachers: {teacher: {arch: resnet21}}",
     "teachers.teacher.arch: unknown architecture 'resnet21'. Did you mean resnet32, resnet20, "
     "resnet18? Known: resnet18"),
    ("student: {arch: resnet_8}", "student.arch: unknown architecture 'resnet_8'. Did you mean"),
    # 13: YAML tags (safe_load refuses them) and broken YAML
    ("seed: !!python/object/apply:os.system ['echo pwned']",
     "line 1, column 7: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'; params.yaml holds plain values only"),
    ("data: {source: digits_lt", "line 1, column 25: not valid YAML (expected ',' or '}'"),
    # 12: objectives whose every weight is 0
    ("student: {loss: ce, ce_weight: 0}",
     "student.ce_weight: all 0 with student.loss: ce; the loss would be constantly 0"),
    ("student: {loss: kl, ce_weight: 0, kl: {weight: 0}}",
     "student.ce_weight, student.kl.weight: all 0 with student.loss: kl"),
    ("student: {loss: ikl, ce_weight: 0, ikl: {alpha: 0, beta: 0}}",
     "student.ce_weight, student.ikl.alpha, student.ikl.beta: all 0 with student.loss: ikl"),
    # 13: top-k beyond the classes, when the source fixes them
    ("logits: {topk: 11}",
     "logits.topk: 11 exceeds the 10 classes of data.source digits_lt; set logits.topk <= 10"),
    ("data: {source: cifar100_lt}\nlogits: {topk: 101}",
     "logits.topk: 101 exceeds the 100 classes of data.source cifar100_lt"),
    ("data: {source: split_lists, num_classes: 3}\nlogits: {topk: 5}",
     "logits.topk: 5 exceeds the 3 classes of data.source split_lists"),
])
def test_bad_params_are_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(ParamsError) as error:
        load_params(params_file(tmp_path, text))
    assert str(error.value).startswith(message) or str(error.value).startswith(
        f"{tmp_path}/params.yaml: {message}")
    one_line(str(error.value))


@pytest.mark.parametrize("text", [
    "student: {loss: ikl, ce_weight: 0, ikl: {alpha: 0, beta: 1}}",  # wMSE alone
    "student: {loss: ikl, ce_weight: 1, ikl: {alpha: 0, beta: 0}}",  # CE alone
    "student: {loss: kl, ce_weight: 0}",
    "data: {source: cifar100_lt}\nlogits: {topk: 100}",
    "data: {source: image_folder}\nlogits: {topk: 1000}",  # classes known after prepare
    "teachers: {t: {arch: mobilenet_v3_small}}\nstudent: {teacher: t, arch: resnet8}",
])
def test_sensible_params_still_pass(tmp_path, text):
    load_params(params_file(tmp_path, text))


def test_arch_typo_stops_prepare_before_it_runs(tmp_path):
    path = params_file(tmp_path, "teachers: {teacher: {arch: resnet21}}\n"
                                 "data: {workers: 0}\n")
    result = CliRunner().invoke(prepare_stage, ["--params", str(path), "--out",
                                                str(tmp_path / "shards")])
    assert result.exit_code == 1
    assert "teachers.teacher.arch: unknown architecture 'resnet21'" in one_line(result.output)
    assert not (tmp_path / "shards").exists()


# ---------------------------------------------------------------------------------------------
# Stages meeting a full disk, a damaged manifest, a checkpoint that is not one

@pytest.fixture
def tiny_shards(tmp_path):
    """3 classes of 8 px images: 4 train, 1 test each."""
    rng = np.random.default_rng(0)
    for name in "abc":
        for i in range(5):
            save_image(tmp_path / "folder" / name / f"{i}.png", rng, size=(8, 8), fmt="PNG")
    out = tmp_path / "shards"
    prepare_shards(parse(Params, {"data": {"source": "image_folder",
                                           "root": str(tmp_path / "folder"),
                                           "val_per_class": 0, "test_per_class": 1,
                                           "imbalance_ratio": 1, "workers": 0}}, "").data,
                   0, out)
    return out


def test_disk_full_in_prepare_is_one_line(tmp_path, monkeypatch):
    real_writer = wds.TarWriter
    # Every shard goes to /dev/full: the kernel answers ENOSPC, as on a full disk.
    monkeypatch.setattr(wds, "TarWriter", lambda path, **options: real_writer("/dev/full",
                                                                             **options))
    path = params_file(tmp_path, "data: {workers: 0, shard_size: 64}\n")
    result = CliRunner().invoke(prepare_stage, ["--params", str(path), "--out",
                                                str(tmp_path / "shards")])
    assert stage_error(result) == (
        f"Error: {tmp_path}/shards.partial: no space left on the device (disk full) while "
        "writing the shards; free space there or pass an --out on a larger disk, then rerun "
        "prepare")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing left


def evaluate(tmp_path, shards, checkpoint):
    path = params_file(tmp_path, "evaluate: {batch_size: 4}\n")
    return CliRunner().invoke(evaluate_stage, [
        "--params", str(path), "--shards", str(shards), "--checkpoint", str(checkpoint),
        "--metrics", str(tmp_path / "test.json"), "--per-class", str(tmp_path / "pc.csv")])


def test_damaged_manifest_stops_a_stage_in_one_line(tmp_path, tiny_shards):
    manifest = tiny_shards / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])
    result = evaluate(tmp_path, tiny_shards, tmp_path / "any.pt")
    assert result.exit_code == 1
    assert f"{manifest}: not valid JSON (" in one_line(result.output)
    assert "rerun prepare" in result.output


class NotWeights:
    """A class torch.load(weights_only=True) refuses to rebuild (it could be code)."""


@pytest.mark.parametrize("make, message", [
    (lambda path: torch.save({"model": NotWeights()}, path),
     "not a checkpoint this project wrote, or unsafe to load (torch.load(weights_only=True) "
     "refused it: Unsupported global: GLOBAL test_errors.NotWeights"),
    (lambda path: path.write_bytes(Path(__file__).read_bytes()),  # not a torch file at all
     "not a checkpoint this project wrote, or unsafe to load"),
    (lambda path: (torch.save({"model": {}}, path),
                   path.write_bytes(path.read_bytes()[:200])),
     "damaged or not a PyTorch checkpoint (PytorchStreamReader failed reading zip archive"),
    (lambda path: torch.save({"weights": torch.zeros(2)}, path),
     "not a checkpoint this project wrote (no 'model' entry)"),
])
def test_checkpoint_that_is_not_ours_is_one_line(tmp_path, tiny_shards, make, message):
    checkpoint = tmp_path / "checkpoint.pt"
    make(checkpoint)
    with pytest.raises(UserError) as error:
        load_checkpoint(checkpoint)
    assert one_line(str(error.value)).startswith(f"{checkpoint}: {message}")
    result = evaluate(tmp_path, tiny_shards, checkpoint)  # the same through a stage
    assert result.exit_code == 1 and message in one_line(result.output)
    assert not (tmp_path / "test.json").exists()


def test_topk_beyond_the_classes_stops_the_teacher_before_training(tmp_path, tiny_shards):
    """image_folder: the class count is known only after prepare; the teacher stage checks
    it against the manifest first, instead of training for the dump to fail after."""
    params = parse(Params, {"data": {"source": "image_folder"}, "logits": {"topk": 5},
                            "teachers": {"teacher": TRAIN}, "student": TRAIN}, "")
    out = tmp_path / "models" / "teacher"
    with pytest.raises(UserError) as error:
        train_teacher(params, "teacher", str(tiny_shards), str(out), str(tmp_path / "live"))
    assert one_line(str(error.value)).startswith(
        f"logits.topk: 5 exceeds the 3 classes of {tiny_shards}; set logits.topk <= 3")
    assert not out.exists() and not (tmp_path / "live").exists()
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert manifest["num_classes"] == 3
