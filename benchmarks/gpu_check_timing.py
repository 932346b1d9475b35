"""Timing of the GPU check: an epoch split into phases (EpochPhases), the first batches of a
loader (FirstBatches), and the children of parts 1-3: the step alone on in-memory batches,
fed training through train_student, and the training loader alone."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import TimedBatches, make_params, time_train_loaders
from gpu_check_data import (LEARNING_RATE, data_folder, default_device, device_sync,
                            raw_params, shards_path, store_path, teacher_path)

DISTINCT_BATCHES = 8  # cycled: enough that no batch stays in a cache between its uses


# ---------------------------------------------------------------------------------------------
# Timing an epoch in phases


class EpochPhases:
    """One epoch's batches, its wall time split into phases appended to `log` when exhausted:
    `startup` (iter() to the first batch: workers start, shuffle buffers fill), `steady`
    (the request for the second batch to the end of the last step, `sync`ed at both ends, so
    the GPU's queued work is in it) with its `steady_steps`, `steady_samples` and
    `steady_wait` (the part spent in the loader's next()), and `shutdown` (the exhausted
    loader stopping its workers). The first step is in no phase (lazy initialisations)."""

    def __init__(self, batches, log: list, sync):
        self.batches, self.log, self.sync = batches, log, sync

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        expected = len(self.batches)
        if expected < 2:
            raise ValueError(f"an epoch of {expected} batch(es): the steady state needs 2 or "
                             "more; use more images or a smaller batch")
        phases = {"steady_wait": 0.0, "steady_samples": 0, "steady_steps": expected - 1}
        start = time.perf_counter()
        iterator = iter(self.batches)
        for index in range(expected):
            if index == 1:
                self.sync()
                steady_start = time.perf_counter()
            before = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                raise RuntimeError(f"the loader ended after {index} of its {expected} batches")
            if index == 0:
                phases["startup"] = time.perf_counter() - start
            else:
                phases["steady_wait"] += time.perf_counter() - before
                phases["steady_samples"] += len(batch["labels"])
            yield batch
        self.sync()
        phases["steady"] = time.perf_counter() - steady_start
        before = time.perf_counter()
        if next(iterator, None) is not None:
            raise RuntimeError(f"the loader yielded more than its {expected} batches")
        phases["shutdown"] = time.perf_counter() - before
        self.log.append(phases)


class FirstBatches:
    """The first `count` batches of `batches` (all of them for 0); the loader is closed after
    them, so its workers stop at once."""

    def __init__(self, batches, count: int):
        self.batches, self.count = batches, count

    def __len__(self) -> int:
        return min(self.count, len(self.batches)) if self.count else len(self.batches)

    def __iter__(self):
        iterator = iter(self.batches)
        for _ in range(len(self)):
            yield next(iterator)
        if hasattr(iterator, "close"):  # a generator (EpochBatches): drops its DataLoader
            iterator.close()


def record_phases(log: list, sync) -> None:
    """Wrap every pipeline.train.runs training loader in EpochPhases logging to `log`. Call it
    before common.time_train_loaders, whose TimedBatches then wraps these."""
    import pipeline.train.runs as distill

    original = distill.TrainStream.epoch

    def phased_epoch(stream, epoch):
        return EpochPhases(original(stream, epoch), log, sync)

    distill.TrainStream.epoch = phased_epoch


# ---------------------------------------------------------------------------------------------
# 1. The step alone: fit() on in-memory batches


def tail_basis(settings: dict):
    """The quantised tail's basis of the synthetic teacher (pipeline.store.tail)."""
    from pipeline.store import fit_tail_basis
    from pipeline.store.tail import tail_components

    teacher = torch.randn(2048, settings["classes"], generator=torch.Generator().manual_seed(1))
    log_probs = torch.log_softmax(3 * teacher.double(), dim=1).numpy()
    return fit_tail_basis(log_probs, tail_components(settings["classes"]))


def synthetic_batches(settings: dict, pin: bool, basis) -> list[dict]:
    """DISTINCT_BATCHES batches shaped like pipeline.stream.loader's (CPU tensors, pinned on CUDA),
    the teacher's fields encoded by the store's own encoder with a quantised tail."""
    from pipeline.store.encoding import decode_fields, encode_logits

    generator = torch.Generator().manual_seed(0)
    size, batch, classes = settings["image_size"], settings["batch_size"], settings["classes"]
    batches = []
    for _ in range(DISTINCT_BATCHES):
        teacher = torch.randn(batch, classes, generator=generator) * 3  # (B, C)
        fields = decode_fields(encode_logits(teacher.numpy(), settings["topk"], basis))
        entry = {"images": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                                         generator=generator),
                 "labels": torch.randint(0, classes, (batch,), generator=generator),
                 "rows": torch.arange(batch),
                 **{name: torch.from_numpy(value.astype("int64") if name == "topk_classes"
                                           else value) for name, value in fields.items()}}
        batches.append({k: v.pin_memory() if pin else v for k, v in entry.items()})
    return batches


def step_child(loss: str, settings: dict) -> dict:
    """fit() the student for warmup + steps steps with `loss` ("ce" or "ikl")."""
    from pipeline.train.losses import DistillationObjective
    from pipeline.train.runs import CachedTeacher
    from pipeline.train.models import build_model
    from pipeline.params import StudentParams
    from pipeline.train.loop import TrainRun, fit

    cuda = torch.cuda.is_available()  # fit picks the same device for itself
    device = default_device()
    student = StudentParams(arch=settings["arch"], image_size=settings["image_size"], epochs=2,
                            batch_size=settings["batch_size"], lr=LEARNING_RATE, warmup_epochs=0,
                            workers=0, loss=loss)
    objective = DistillationObjective(student)
    basis = tail_basis(settings)
    targets = (CachedTeacher(settings["classes"], None, device, basis)
               if objective.needs_teacher else None)
    batches = synthetic_batches(settings, pin=cuda, basis=basis)
    sync = device_sync()
    log = []

    def on_start():
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def on_end():
        return {"peak_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss()}

    def train_batches(epoch: int):
        count = settings["warmup"] if epoch == 0 else settings["steps"]
        return TimedBatches([batches[i % len(batches)] for i in range(count)], log, sync,
                            on_start, on_end)

    tiny = {k: v[:2] for k, v in batches[0].items()}
    run = TrainRun(settings=student, objective=objective, train_batches=train_batches,
                   val_batches=lambda: [tiny], steps_per_epoch=settings["steps"],
                   identity={"benchmark": "gpu_check", "loss": loss},
                   teacher_targets=targets, description=f"gpu_check {loss}")
    torch.manual_seed(0)
    model = build_model(settings["arch"], settings["classes"])
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        fit(model, run, out_dir=str(scratch / "model"), live_dir=str(scratch / "live"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    timed = log[-1]
    return {"step": timed["wall"] / timed["steps"], "samples_per_s": timed["samples"] /
            timed["wall"], "peak_bytes": timed["peak_bytes"],
            "loss": loss_alone(objective, targets, batches, settings, device, sync)}


def loss_alone(objective, targets, batches, settings, device, sync) -> float:
    """Seconds per (copy + decoding +) objective forward + backward on (B, C) logits."""
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(settings["batch_size"], settings["classes"], generator=generator)
              .to(device).requires_grad_(True))  # (B, C) float32, as fit passes them

    def once(batch):
        labels = batch["labels"].to(device, non_blocking=True)
        teacher_logits, weights = targets(batch, None) if targets else (None, None)
        logits.grad = None
        objective(logits, labels, teacher_logits, weights)["loss"].backward()

    for i in range(5):
        once(batches[i % len(batches)])
    sync()
    start = time.perf_counter()
    for i in range(settings["loss_repeats"]):
        once(batches[i % len(batches)])
    sync()
    return (time.perf_counter() - start) / settings["loss_repeats"]


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------
# 2. Fed training: train_student through the real loader, GPU decode


def fed_child(loss: str, settings: dict, work: Path) -> dict:
    """train_student for 2 epochs with `loss`; epoch 2's TimedBatches record and phases, the
    peak memory from its start to the end of the run, and its mean train loss."""
    from pipeline.train.runs import train_student

    cuda, sync = torch.cuda.is_available(), device_sync()
    folder = data_folder(work, settings)
    params = make_params(raw_params(settings, folder, loss))
    log, phases = [], []
    record_phases(phases, sync)
    time_train_loaders(log, sync, on_start=torch.cuda.reset_peak_memory_stats if cuda else None)
    scratch = Path(tempfile.mkdtemp(dir=folder, prefix=f"run-{loss}-"))
    try:
        metrics = train_student(params, shards_dir=str(shards_path(folder, settings)),
                                store_path=str(store_path(folder, settings)),
                                teacher_checkpoint=str(teacher_path(folder, settings)),
                                out_dir=str(scratch / "model"), live_dir=str(scratch / "live"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {**log[-1], **phases[-1], "peak_bytes": peak, "train_loss": metrics["train/loss"]}


# ---------------------------------------------------------------------------------------------
# 3. The loader alone


def loader_child(decode: str, settings: dict, work: Path) -> dict:
    """The IKL student's training loader with `decode` ("gpu" or "cpu"), each batch through
    batch_pixels on the device and synchronised, no model: its phases."""
    from pipeline.stream.augment import DECODE
    from pipeline.stream.device_decode import DEVICE_DECODE, batch_pixels
    from pipeline.data.manifest import load_manifest
    from pipeline.store import open_store
    from pipeline.stream.views import StoredViews
    from pipeline.stream.loader import split_shards, train_loader

    folder, device, sync = data_folder(work, settings), default_device(), device_sync()
    params = make_params(raw_params(settings, folder, "ikl"))
    shards_dir = str(shards_path(folder, settings))
    shards = split_shards(shards_dir, load_manifest(shards_dir), "train")
    views = StoredViews(open_store(str(store_path(folder, settings))), 0, params.seed)
    loader = train_loader(shards, views, batch_size=settings["batch_size"],
                          image_size=settings["image_size"], workers=settings["workers"],
                          pin_memory=device.type == "cuda", drop_last=True,
                          decode=DEVICE_DECODE if decode == "gpu" else DECODE)
    phases = []
    for batch in EpochPhases(FirstBatches(loader, settings["loader_batches"]), phases, sync):
        batch_pixels(batch, device, settings["image_size"])  # (B, 3, S, S) uint8
        sync()
    return phases[-1]


