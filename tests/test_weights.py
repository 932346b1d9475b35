"""Bring your own teacher: weights files (torchvision, timm, this project; common wrappers),
`epochs: 0` (used as it is: dumped, evaluated), `reset_head` and the refusal of a wrong head."""

import argparse
import json

import pytest
import torch
import torchvision
from click.testing import CliRunner

from helpers import params_from, with_changes, write_params_file
from pipeline.train.runs import load_model, train_teacher
from pipeline.store.dump import dump_logits
from pipeline.errors import UserError
from pipeline.train.evaluate import evaluate_checkpoint, predict
from pipeline.train.models import build_model, classifier_head, load_weights, read_state_dict
from pipeline.data.manifest import file_sha256
from pipeline.store import open_store
from pipeline.stream.loader import eval_loader, split_shards
from pipeline.train.loop import load_checkpoint
from stages.train_teacher import main as train_teacher_stage

NUM_CLASSES = 3  # the image folder of helpers (CLASS_IMAGES)


def torchvision_weights(path, num_classes=NUM_CLASSES, seed=1):
    """A torchvision resnet18 state_dict saved as torchvision users do; returns its tensors."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet18(weights=None, num_classes=num_classes).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def assert_same_tensors(model, state, skip=()):
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith(skip):
            assert torch.equal(own[key], value), key


def test_torchvision_teacher_with_epochs_0_is_checkpointed_dumped_and_evaluated(
        stage_one_data, tmp_path):
    data = stage_one_data
    weights = tmp_path / "weights" / "resnet18.pth"
    state = torchvision_weights(weights)
    raw = with_changes(data.raw, "teachers.teacher", arch="resnet18", epochs=0,
                       weights=str(weights))
    params = params_from(raw)
    out, live = tmp_path / "models" / "teacher", tmp_path / "results" / "teacher" / "train"

    metrics = train_teacher(params, "teacher", str(data.shards_dir), str(out), str(live))
    checkpoint = out / "checkpoint.pt"
    saved = load_checkpoint(checkpoint)
    assert saved["weights_sha256"] == file_sha256(weights) and saved["epoch"] == -1
    assert_same_tensors(load_model(checkpoint)[0], state)  # used as it is, not trained
    assert json.loads((live / "metrics.json").read_text())["val"]["top1"] == metrics["val/top1"]

    store_path = tmp_path / "logits" / "teacher.zarr"
    dump_logits(params, "teacher", str(data.shards_dir), str(checkpoint), str(store_path))
    store = open_store(str(store_path), fingerprint=data.manifest["fingerprint"],
                       seed=params.seed, teacher_sha256=file_sha256(checkpoint))
    assert (store.views, store.rows, store.topk) == (3, 26, 2)
    assert store.attributes["teacher_arch"] == "resnet18"

    results = tmp_path / "results" / "teacher"
    report = evaluate_checkpoint(params.evaluate, str(data.shards_dir), str(checkpoint),
                                 str(results / "test.json"), str(results / "per_class.csv"),
                                 str(results / "per_class.png"), "teacher")
    # The same top-1 as the torchvision model straight from the file.
    model = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(weights, weights_only=True))
    batches = eval_loader(split_shards(str(data.shards_dir), data.manifest, "test"),
                          batch_size=16, image_size=16, workers=0)
    logits, labels = predict(model, batches, torch.device("cpu"))
    assert report["top1"] == pytest.approx(
        100.0 * (logits.argmax(1) == labels).float().mean().item())
    assert (results / "per_class.png").read_bytes().startswith(b"\x89PNG")


def test_fine_tuning_starts_from_the_weights(stage_one_data, tmp_path):
    data = stage_one_data
    weights = tmp_path / "weights" / "resnet8.pth"
    torch.manual_seed(11)  # not the seed the run initialises with
    file_state = build_model("resnet8", NUM_CLASSES).state_dict()
    torch.save(file_state, weights.parent.mkdir(parents=True) or weights)
    torch.manual_seed(data.params.seed)
    scratch = build_model("resnet8", NUM_CLASSES).state_dict()
    raw = with_changes(data.raw, "teachers.teacher", epochs=1, weights=str(weights))
    out = tmp_path / "teacher"
    train_teacher(params_from(raw), "teacher", str(data.shards_dir), str(out), str(tmp_path))
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["epoch"] == 0 and saved["weights_sha256"] == file_sha256(weights)
    # Four SGD steps move the weights a little from the file's, nowhere near a fresh init.
    for key in ("conv1.weight", "layer3.0.conv2.weight", "fc.weight"):
        moved = (saved["model"][key] - file_state[key]).norm()
        assert 0 < moved < 0.2 * (saved["model"][key] - scratch[key]).norm(), key


def test_wrong_head_is_refused_in_one_line_unless_reset_head(tmp_path):
    weights = tmp_path / "imagenet_r18.pth"
    state = torchvision_weights(weights, num_classes=7)
    model = build_model("resnet18", NUM_CLASSES)
    with pytest.raises(UserError) as error:
        load_weights(model, weights)
    message = str(error.value)
    assert "\n" not in message and str(weights) in message
    assert "(7, 512)" in message and "C = 3" in message and "reset_head: true" in message

    torch.manual_seed(5)
    model = build_model("resnet18", NUM_CLASSES)
    fresh_head = model.fc.weight.detach().clone()
    load_weights(model, weights, reset_head=True)
    assert_same_tensors(model, state, skip=("fc.",))
    assert torch.equal(model.fc.weight, fresh_head) and model.fc.out_features == NUM_CLASSES


def test_reset_head_through_the_params(stage_one_data, tmp_path):
    data = stage_one_data
    weights = tmp_path / "weights" / "seven_classes.pth"
    torch.save(build_model("resnet8", 7).state_dict(), weights.parent.mkdir() or weights)
    raw = with_changes(data.raw, "teachers.teacher", epochs=1, weights=str(weights))
    with pytest.raises(UserError, match=r"head fc.weight has shape \(7, 64\)"):
        train_teacher(params_from(raw), "teacher", str(data.shards_dir), str(tmp_path / "a"),
                      str(tmp_path / "live_a"))
    raw = with_changes(raw, "teachers.teacher", reset_head=True)
    train_teacher(params_from(raw), "teacher", str(data.shards_dir), str(tmp_path / "b"),
                  str(tmp_path / "live_b"))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]["fc.weight"].shape == (
        NUM_CLASSES, 64)


def test_common_wrappers_and_prefixes(tmp_path):
    torch.manual_seed(2)
    state = build_model("resnet8", NUM_CLASSES).state_dict()
    files = {
        "plain.pth": state,
        "lightning.ckpt": {"state_dict": state, "epoch": 3},
        "ddp.pth": {"model": {f"module.{key}": value for key, value in state.items()}},
        "compiled.pth": {f"_orig_mod.{key}": value for key, value in state.items()},
        # this project's checkpoint: model + optimizer + identity
        "checkpoint.pt": {"model": state, "optimizer": {"state": {}}, "arch": "resnet8"},
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        model = load_weights(build_model("resnet8", NUM_CLASSES), tmp_path / name)
        assert_same_tensors(model, state)
    from safetensors.torch import save_file  # installed with timm, in the test extra
    save_file(state, tmp_path / "model.safetensors")
    assert read_state_dict(tmp_path / "model.safetensors").keys() == state.keys()


def test_unreadable_or_unfitting_files_are_refused_by_name(tmp_path):
    pickled = tmp_path / "timm_train_checkpoint.pth.tar"  # holds an argparse.Namespace
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(UserError, match="cannot read it as weights .*save a state_dict"):
        read_state_dict(pickled)  # weights_only=True refuses arbitrary objects
    with pytest.raises(UserError, match="weights file not found"):
        read_state_dict(tmp_path / "absent.pth")
    torch.save({"optimizer": {"lr": torch.tensor(0.1)}, "epoch": 3}, tmp_path / "opt.pth")
    with pytest.raises(UserError, match="no state_dict in it"):
        read_state_dict(tmp_path / "opt.pth")
    torch.save(build_model("resnet8", NUM_CLASSES).state_dict(), tmp_path / "resnet8.pth")
    with pytest.raises(UserError,
                       match=r"does not fit ResNet \(46 mis-shaped tensors, e.g. conv1.weight"):
        load_weights(build_model("resnet18", NUM_CLASSES), tmp_path / "resnet8.pth")


def test_classifier_heads():
    assert classifier_head(build_model("resnet8", 3)) == "fc"
    assert classifier_head(build_model("mobilenet_v3_small", 3)) == "classifier.3"
    assert classifier_head(build_model("squeezenet1_0", 3)) == "classifier.1"  # a 1x1 conv


def test_train_stage_refuses_weights_outside_the_tracked_folder(stage_one_data, tmp_path):
    weights = tmp_path / "elsewhere.pth"
    torchvision_weights(weights)
    raw = with_changes(stage_one_data.raw, "teachers.teacher", arch="resnet18",
                       weights=str(weights))
    params_file = write_params_file(tmp_path / "params.yaml", raw)
    result = CliRunner().invoke(train_teacher_stage, [
        "--params", str(params_file), "--name", "teacher",
        "--shards", str(stage_one_data.shards_dir), "--out", str(tmp_path / "out"),
        "--live", str(tmp_path / "live"), "--weights-dir", str(tmp_path / "weights")])
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert result.output.strip() == (
        f"Error: teachers.teacher.weights: {weights} is outside {tmp_path / 'weights'}/, the "
        "folder DVC tracks for this stage; move the file (or a symlink to it) there")
