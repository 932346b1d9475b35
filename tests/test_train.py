"""The shared training loop (pipeline/train/loop.py) through the teacher stage on a tiny real
dataset: checkpoints, resume after a crash to the same bits, no resume across a changed
identity, the warm-up + cosine schedule, and the train_teacher stage CLI."""

import dataclasses
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

import pipeline.train.runs
import pipeline.train.loop
from helpers import TRAIN_ROWS, params_from, with_changes, write_params_file
from pipeline.train.runs import load_model, train_teacher
from pipeline.train.evaluate import evaluate_checkpoint
from pipeline.params import TrainParams, to_dict
from pipeline.train.loop import CHECKPOINT, _warmup_cosine, epoch_lr_factor, lr_factor
from pipeline.train.checkpoints import save_checkpoint
from stages.train_teacher import main as train_main

EPOCHS, BATCH_SIZE, LR = 2, 8, 0.05  # toy teachers.teacher
STEPS_PER_EPOCH = TRAIN_ROWS // BATCH_SIZE  # 3: 8 + 8 + 8 rows, drop_last drops the last 2


class Crashed(Exception):
    """Stands in for a crash of the training process."""


class TrainingSpy:
    """Wraps `fit` as the teacher stage calls it: records the epochs whose batches it asks for
    and, when `crash_in_epoch` is set, raises once after that epoch's first step."""

    def __init__(self, real_fit):
        self.real_fit = real_fit
        self.epochs: list[int] = []
        self.crash_in_epoch: int | None = None

    def fit(self, model, run, out_dir, live_dir):
        return self.real_fit(model, dataclasses.replace(run, train_batches=self._batches(run)),
                             out_dir, live_dir)

    def _batches(self, run):
        def batches(epoch):
            self.epochs.append(epoch)
            return self._crashing(run.train_batches(epoch), epoch)
        return batches

    def _crashing(self, batches, epoch):
        for step, batch in enumerate(batches):
            if step == 1 and epoch == self.crash_in_epoch:  # step 0 already moved the weights
                self.crash_in_epoch = None
                raise Crashed(f"crashed in epoch {epoch}")
            yield batch


@pytest.fixture
def spy(monkeypatch):
    spy = TrainingSpy(pipeline.train.loop.fit)
    monkeypatch.setattr(pipeline.train.runs, "fit", spy.fit)
    return spy


def train(data, out, params=None):
    return train_teacher(params or data.params, "teacher", str(data.shards_dir), str(out),
                         str(out.parent / f"{out.name}_live"))


@pytest.fixture(scope="module")
def uninterrupted(stage_one_data):
    """(checkpoint path, returned metrics) of a 2-epoch run that never crashed."""
    out = stage_one_data.root / "uninterrupted"
    metrics = train(stage_one_data, out)
    return out / CHECKPOINT, metrics


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(actual: dict, expected: dict, what: str):
    assert actual.keys() == expected.keys(), what
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), f"{what}: {name} differs"


def lr_log(live_dir):
    return (live_dir / "plots" / "metrics" / "train" / "lr.tsv").read_text().split()


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume


def test_checkpoint_holds_model_optimizer_scheduler_epoch_and_identity(stage_one_data,
                                                                        uninterrupted):
    path, metrics = uninterrupted
    state = load(path)  # weights_only: tensors and plain data only
    for key in ("model", "optimizer", "scheduler", "epoch", "params", "fingerprint", "arch",
                "num_classes", "small_input", "metrics"):
        assert key in state, key
    assert state["epoch"] == EPOCHS - 1
    assert state["fingerprint"] == stage_one_data.manifest["fingerprint"]
    assert state["arch"] == "resnet8" and state["num_classes"] == 3
    assert state["params"] == {"seed": 3, "augment": to_dict(stage_one_data.params.augment),
                               "train": to_dict(stage_one_data.params.teachers["teacher"])}
    assert state["scheduler"]["last_epoch"] == EPOCHS * STEPS_PER_EPOCH
    assert state["metrics"] == metrics
    last_step = EPOCHS * STEPS_PER_EPOCH - 1  # the rate of the last step, just above zero
    assert metrics["train/lr"] == pytest.approx(
        LR * _warmup_cosine(last_step, STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH))
    assert state["optimizer"]["state"]  # momentum buffers, so a resume continues exactly
    model, _ = load_model(path)
    assert not model.training
    assert_same_tensors(model.state_dict(), state["model"], "load_model")


def test_resume_after_a_crash_matches_an_uninterrupted_run(stage_one_data, uninterrupted, spy,
                                                           tmp_path):
    reference_path, reference_metrics = uninterrupted
    out = tmp_path / "crashed"
    spy.crash_in_epoch = 1
    with pytest.raises(Crashed):
        train(stage_one_data, out)
    assert spy.epochs == [0, 1]
    assert load(out / CHECKPOINT)["epoch"] == 0  # the last finished epoch

    spy.epochs.clear()
    metrics = train(stage_one_data, out)
    assert spy.epochs == [1]  # epoch 0 is not trained again
    resumed, reference = load(out / CHECKPOINT), load(reference_path)
    assert resumed["epoch"] == reference["epoch"] == EPOCHS - 1
    # CPU kernels are deterministic for a given batch shape and thread count, and every
    # random choice (views, shard order, shuffle buffer) is seeded per epoch: the same bits.
    assert_same_tensors(resumed["model"], reference["model"], "model")
    for buffers, expected in zip(resumed["optimizer"]["state"].values(),
                                 reference["optimizer"]["state"].values()):
        assert_same_tensors(buffers, expected, "optimizer state")
    assert resumed["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"]
    assert resumed["scheduler"] == reference["scheduler"]
    assert metrics == reference_metrics
    # dvclive picked up where it stopped: one row per epoch, none repeated
    assert lr_log(out.parent / "crashed_live") == lr_log(reference_path.parent.parent
                                                         / "uninterrupted_live")

    spy.epochs.clear()  # a finished run resumes to its end and reports its last metrics
    assert train(stage_one_data, out) == reference_metrics
    assert spy.epochs == []


def _other_fingerprint(out):
    state = load(out / CHECKPOINT)
    state["fingerprint"] = "0" * 64  # as if the shards had been rebuilt from other data
    save_checkpoint(out / CHECKPOINT, state)  # with its integrity record: not damaged


@pytest.mark.parametrize("change", [
    ("teachers.teacher", {"lr": 0.02}),
    ("augment", {"flip_probability": 0.0}),
    ("", {"seed": 4}),
    "fingerprint",
], ids=["lr", "augment", "seed", "fingerprint"])
def test_a_changed_identity_trains_from_scratch(stage_one_data, uninterrupted, spy, tmp_path,
                                                change):
    out = tmp_path / "stale"
    shutil.copytree(uninterrupted[0].parent, out)
    raw = stage_one_data.raw
    if change == "fingerprint":
        _other_fingerprint(out)
    else:
        raw = with_changes(raw, change[0], **change[1])
    params = params_from(raw)
    train(stage_one_data, out, params)
    assert spy.epochs == [0, 1]  # from epoch 0, not "resumed" past the end
    state = load(out / CHECKPOINT)
    assert state["epoch"] == EPOCHS - 1
    assert state["fingerprint"] == stage_one_data.manifest["fingerprint"]
    assert state["params"]["seed"] == params.seed
    assert state["params"]["augment"] == to_dict(params.augment)
    assert state["params"]["train"] == to_dict(params.teachers["teacher"])


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule


def test_warmup_cosine_schedule_values():
    cosine = lambda progress: 0.5 * (1 + math.cos(math.pi * progress))  # noqa: E731
    # 4 warm-up steps of 8: linear 1/4 .. 1, then cosine from 1 down to 0 at the last step.
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, cosine(0.25), cosine(0.5), cosine(0.75), 0.0]
    assert [_warmup_cosine(step, 4, 8) for step in range(9)] == pytest.approx(expected, abs=1e-15)
    assert _warmup_cosine(100, 4, 8) == 0.0  # past the end it stays at zero
    assert [_warmup_cosine(step, 0, 4) for step in range(5)] == pytest.approx(
        [1.0, cosine(0.25), 0.5, cosine(0.75), 0.0], abs=1e-15)  # no warm-up


def test_fit_applies_the_schedule_per_step(uninterrupted):
    # lr.tsv logs the rate of each epoch's last step: 1 warm-up epoch of 3 steps, then the
    # cosine over the remaining 3 steps.
    path, _ = uninterrupted
    log = lr_log(path.parent.parent / "uninterrupted_live")
    assert log[:2] == ["step", "lr"]
    total = 2 * STEPS_PER_EPOCH
    assert [float(v) for v in log[3::2]] == pytest.approx(
        [LR * _warmup_cosine(STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH, total),
         LR * _warmup_cosine(total - 1, STEPS_PER_EPOCH, total)])
    assert float(log[3]) == pytest.approx(LR)


def official_lr(epoch, lr=0.05, warmup=10, epochs=90):
    """The issue's statement of the official per-epoch rate for 90 epochs, 10 warm-up."""
    if epoch < warmup:
        return lr * (epoch + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 9) / 81))


def test_per_epoch_schedule_is_the_official_one():
    settings = TrainParams(lr=0.05, epochs=90, warmup_epochs=10, schedule="per_epoch")
    steps = 7  # any steps per epoch: the rate is constant within an epoch
    for epoch in (0, 9, 10, 50, 89):
        for step in (epoch * steps, epoch * steps + steps - 1):
            assert 0.05 * lr_factor(settings, step, steps) == pytest.approx(
                official_lr(epoch), rel=1e-12, abs=0), (epoch, step)
    assert [round(0.05 * epoch_lr_factor(e, 10, 90), 6) for e in (0, 9, 10, 50, 89)] == [
        0.005, 0.05, round(0.025 * (1 + math.cos(math.pi / 81)), 6),
        round(0.025 * (1 + math.cos(math.pi * 41 / 81)), 6),
        round(0.025 * (1 + math.cos(math.pi * 80 / 81)), 6)]
    assert epoch_lr_factor(89, 10, 90) > 0  # never reaches zero
    # per_step keeps warming up and decaying within epochs
    per_step = TrainParams(lr=0.05, epochs=90, warmup_epochs=10)
    assert lr_factor(per_step, 0, steps) == pytest.approx(1 / 70)


def test_fit_sets_the_per_epoch_rate(stage_one_data, tmp_path):
    raw = with_changes(stage_one_data.raw, "teachers.teacher", schedule="per_epoch")
    out = tmp_path / "per_epoch"
    train(stage_one_data, out, params_from(raw))
    log = [float(v) for v in lr_log(tmp_path / "per_epoch_live")[3::2]]
    # 2 epochs, 1 warm-up: epoch 0 at lr, epoch 1 at lr * 0.5 * (1 + cos(pi / 2))
    assert log == pytest.approx([LR, LR * 0.5])


def test_every_epoch_on_test_logs_test_top1_as_an_extra_metric(stage_one_data, uninterrupted,
                                                              tmp_path):
    raw = with_changes(stage_one_data.raw, "evaluate", every_epoch_on_test=True)
    out = tmp_path / "tested"
    metrics = train(stage_one_data, out, params_from(raw))
    logged = (tmp_path / "tested_live" / "plots" / "metrics" / "test" / "top1.tsv").read_text()
    assert len(logged.split()) == 2 + 2 * EPOCHS  # header, then one row per epoch
    # The last epoch's figure is the final model's test top-1, as the evaluate stage reports it
    report = evaluate_checkpoint(stage_one_data.params.evaluate, str(stage_one_data.shards_dir),
                                 str(out / CHECKPOINT), str(tmp_path / "m.json"),
                                 str(tmp_path / "c.csv"))
    assert metrics["test/top1"] == pytest.approx(report["top1"])
    # Nothing else changes: the same weights as the run that did not test every epoch.
    assert_same_tensors(load(out / CHECKPOINT)["model"], load(uninterrupted[0])["model"], "model")
    assert "test/top1" not in uninterrupted[1]


# ---------------------------------------------------------------------------------------------
# The train_teacher stage CLI


def test_train_teacher_stage_cli(stage_one_data, tmp_path):
    runner = CliRunner()
    raw = with_changes(stage_one_data.raw, "teachers.teacher", epochs=1)
    params_file = write_params_file(tmp_path / "params.yaml", raw)
    out = tmp_path / "models" / "teacher"
    args = ["--params", str(params_file), "--shards", str(stage_one_data.shards_dir),
            "--out", str(out), "--live", str(tmp_path / "results" / "teacher")]

    result = runner.invoke(train_main, ["--help"])
    assert result.exit_code == 0
    for text in ["--params", "--name", "--shards", "--out", "--live", "Train teacher NAME"]:
        assert text in result.output, text

    result = runner.invoke(train_main, args + ["--name", "nope"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    # click's usage error: the usage line, then the reason in one line naming the option
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--name" in errors[0], result.output
    assert errors[0].endswith("'nope' is not a key of teachers (known: teacher)")
    assert not out.exists()

    result = runner.invoke(train_main, args + ["--params", str(tmp_path / "missing.yaml"),
                                               "--name", "teacher"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'missing.yaml'}: params file not found; pass --params with its "
        "path"]

    result = runner.invoke(train_main, args + ["--name", "teacher"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # tqdm's bar goes to stderr
    assert len(lines) == 2 and lines[0].startswith("teacher: epoch 1/1 train loss "), lines
    assert lines[1].startswith("teacher teacher: val top-1 "), lines
    state = load(out / CHECKPOINT)
    assert state["epoch"] == 0 and state["params"]["train"]["epochs"] == 1
    assert (tmp_path / "results" / "teacher" / "metrics.json").is_file()


def test_checkpoint_bytes_depend_on_the_values_only(tmp_path):
    """Equal states save to the same bytes whichever equal strings are one object in memory
    (pickle writes a repeated object as a back-reference): the sha256 that stores and
    evaluations record must not change with how the params were parsed."""
    from pipeline.train.checkpoints import save_checkpoint

    model = torch.nn.Linear(3, 2)
    shared = "per_step"
    first = {"model": model.state_dict(), "params": {"a": shared, "b": shared}}
    second = {"model": model.state_dict(),
              "params": {"a": "".join(["per_", "step"]), "b": "".join(["per", "_step"])}}
    assert first["params"]["a"] is first["params"]["b"]
    assert second["params"]["a"] is not second["params"]["b"]
    # the same file name: torch.save names the archive's folder after it
    save_checkpoint(tmp_path / "first" / "checkpoint.pt", first)
    save_checkpoint(tmp_path / "second" / "checkpoint.pt", second)
    assert ((tmp_path / "first" / "checkpoint.pt").read_bytes()
            == (tmp_path / "second" / "checkpoint.pt").read_bytes())
