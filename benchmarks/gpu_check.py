"""GPU check: a ResNet-50 student at 224 px, global batch 256, bf16, cached IKL-KD (quantised
tail, dequantised on the GPU) vs plain CE, fed by the GPU decode path.

    python benchmarks/gpu_check.py                # on a CUDA machine: ~5 min (estimated)
    python benchmarks/gpu_check.py --rounds 1     # one round per configuration: ~1.5 min less
    python benchmarks/gpu_check.py --smoke        # tiny CPU run of every code path (1-2 min)
    python benchmarks/gpu_check.py --teacher-weights resnet50.pth   # a real teacher for 4.

One command prints every figure beside its goal, in four parts, then the goals' verdicts
together; each timed configuration runs in a fresh subprocess (common.run_child), and a part
whose child fails is reported and skipped. Nothing is downloaded.

Data (cached in --work, default $TMPDIR/gpu_check, reused by later runs): 1000 classes x 13
photo-like JPEGs (common.photo_like: 300-500 px sides, quality 90, ~100 KB, as ImageNet's),
written by all CPUs, each class from its own generator default_rng([0, label]); prepared into
shards of 256 by pipeline.shards.prepare_shards (11 train rows per class: 11,000 rows, 42 steps
of 256; 1 val and 1 test image per class). C = 1000 is ImageNet's, so the loss and the store's
tail cost what they would there. Teacher: an untrained ResNet-50 with calibrated BatchNorm
(common.write_teacher_checkpoint); its store: pipeline.dump.dump_logits with student.decode: gpu,
1 view, top-5, logits.tail: quantized (wall time printed).

1. The step alone: pipeline.train.fit on in-memory batches (random uint8 images, labels and the
   store's fields of random teacher logits, encoded by the store's own encoder), --warmup steps
   then --steps timed steps, CUDA-synchronised at both ends, CE and IKL alternating over
   --rounds rounds; figures are medians. Then the loss alone on the student's (B, C) logits
   (CachedTeacher's copies and dequantisation + IKL-KD + CE, forward and backward) as a share
   of the IKL step. Goals: IKL / CE throughput >= 0.95; loss + dequantisation < 2 % of the step.
2. Fed training: pipeline.distill.train_student as a stage runs it (resnet50, 224 px, batch
   256, bf16, decode gpu, 4 DataLoader workers; IKL replays the store), 2 epochs; epoch 1 warms
   up, epoch 2 is timed by wrapping its train loader (common.time_train_loaders and EpochPhases
   below) from its creation to its exhaustion. An epoch's wall time splits into start-up
   (workers start, shuffle buffers fill, up to the first batch), the first step, the steady
   state (the second batch's request to the end of the last step, CUDA-synchronised at both
   ends) and shut-down (the exhausted loader stopping its workers). Start-up and shut-down are
   per-epoch constants, under a second against an ImageNet epoch's 5000 steps, so the goals are
   judged on the steady state; whole-epoch figures are printed beside them. Peak GPU memory:
   torch.cuda.max_memory_allocated from the start of the timed epoch to the end of the run;
   the train loss (at a learning rate too low to diverge, a NaN would point to corrupted
   batches: see 4.).
   Goals: steady IKL / CE throughput >= 0.95. "Not waiting on the loader": the steady state
   spends < 2 % of its time in the loader's next(), and its step (with the GPU decode and crop,
   which the in-memory step has not) is <= 1.05x the in-memory step of the same loss.
3. The loader alone: the training loader of the IKL student (shards + store, 4 workers), its
   first --loader-batches batches, each through pipeline.device_decode.batch_pixels on the GPU
   and synchronised, no model; steady crops/s (the first batch left out). Goal: the GPU path
   >= 2500 crops/s. The CPU path (decode: cpu, 4 workers) beside it for comparison.
4. Decoder difference: on --check-images train JPEGs, nvJPEG (decode_on_device on CUDA) vs
   Pillow (SourceImage.full, the CPU path's decode; torchvision's CPU decode gives the same
   bits, tests/test_device_decode.py): max and mean |difference| and the share of differing
   values, on the full images and on the stored 224 px views (cut on the CPU from both
   decodes: the decoder alone; and cut on the GPU from nvJPEG's, as the device path trains,
   against the CPU path's: the GPU resizes in float, the CPU in uint8). Then
   the teacher's fp32 eval-mode logits on both sets of views against the store's quantisation
   error on the same logits (encode_logits with a tail basis fitted on them, decode_logits).
   Verdict: the decoder's row-centred rms |delta logit| (what softmax and IKL's pairwise
   differences see) below the store's. The untrained teacher's logit scale is arbitrary, so
   its fc layer is rescaled to a per-row logit std of 3; --teacher-weights loads a real one.
   Also printed: TF32 convolutions (cuDNN's default; the dump turns it off) against fp32, and
   whether decode_on_device overwrites memory that kernels queued on the caller's stream
   have still to read (`decode_overwrites`).

--smoke runs the same code on the CPU (resnet18, 32 px crops of 48-80 px photos, 6 classes,
batch 8, 1 worker, a few steps; nvJPEG's place is taken by torchvision's CPU decode). Its
numbers say nothing about the goals. Never imported by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (TimedBatches, load_line, make_params, median, photo_like,  # noqa: E402
                    run_child, time_train_loaders, verdict, write_teacher_checkpoint)

THROUGHPUT_GOAL, LOSS_SHARE_GOAL = 0.95, 0.02
WAIT_SHARE_GOAL, FED_STEP_GOAL = 0.02, 1.05  # "not waiting on the loader"
LOADER_GOAL = 2500  # crops/s of the GPU path alone
TEACHER_LOGIT_STD = 3.0  # an ImageNet teacher's spread of logits per row
SEED = 0
LEARNING_RATE = 0.01  # timing does not depend on it; low, so that no run diverges to NaN
FULL = dict(arch="resnet50", teacher_arch="resnet50", image_size=224, batch_size=256,
            classes=1000, per_class=11, min_side=300, max_side=500, shard_size=256, workers=4,
            views=1, topk=5, steps=60, warmup=15, rounds=2, loss_repeats=100,
            loader_batches=20, check_images=256)
SMOKE = dict(arch="resnet18", teacher_arch="resnet18", image_size=32, batch_size=8,
             classes=6, per_class=6, min_side=48, max_side=80, shard_size=16, workers=1,
             views=1, topk=5, steps=4, warmup=2, rounds=1, loss_repeats=5,
             loader_batches=4, check_images=8)
DISTINCT_BATCHES = 8  # cycled: enough that no batch stays in a cache between its uses
HELD_OUT = 2  # images per class beyond the train rows: 1 val, 1 test
HAZARD_IMAGES, HAZARD_TRIALS = 16, 10  # decode_overwrites


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_sync():
    """torch.cuda.synchronize on CUDA, else nothing to wait for."""
    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


# ---------------------------------------------------------------------------------------------
# Data: photo-like JPEGs -> shards -> teacher -> logit store, cached under --work


def data_folder(work: Path, settings: dict) -> Path:
    return work / (f"photos-{settings['classes']}x{settings['per_class'] + HELD_OUT}-"
                   f"{settings['min_side']}-{settings['max_side']}")


def teacher_path(folder: Path, settings: dict) -> Path:
    return folder / f"teacher-{settings['teacher_arch']}-{settings['image_size']}.pt"


def shards_path(folder: Path, settings: dict) -> Path:
    return folder / f"shards-{settings['shard_size']}"


def store_path(folder: Path, settings: dict) -> Path:
    return folder / (f"teacher-{settings['teacher_arch']}-{settings['image_size']}-"
                     f"shards{settings['shard_size']}-v{settings['views']}-"
                     f"top{settings['topk']}.zarr")


def write_photo_class(root: Path, label: int, count: int, min_side: int, max_side: int) -> int:
    """root/class_LLLL/NNNN.jpg: `count` photo-like JPEGs at quality 90, sides drawn in
    [min_side, max_side], all from the class's own generator default_rng([SEED, label]); the
    bytes written."""
    rng = np.random.default_rng([SEED, label])
    folder = root / f"class_{label:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(count):
        height, width = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        path = folder / f"{index:04d}.jpg"
        photo_like(rng, height, width).save(path, format="JPEG", quality=90)
        written += path.stat().st_size
    return written


def write_photo_jpegs(root: Path, settings: dict, processes: int) -> int:
    """Every class's JPEGs (`write_photo_class`) by `processes` processes, the same files for
    any number; into a `.partial` sibling renamed when complete. Returns the bytes written."""
    unfinished = root.with_name(root.name + ".partial")
    shutil.rmtree(unfinished, ignore_errors=True)
    write = partial(write_photo_class, unfinished, count=settings["per_class"] + HELD_OUT,
                    min_side=settings["min_side"], max_side=settings["max_side"])
    labels = range(settings["classes"])
    if processes <= 1:
        written = sum(map(write, labels))
    else:  # fork: called before this process starts CUDA; spawn would re-import torch
        with ProcessPoolExecutor(processes, mp_context=get_context("fork")) as pool:
            written = sum(pool.map(write, labels, chunksize=4))
    unfinished.rename(root)
    return written


def raw_params(settings: dict, folder: Path, loss: str) -> dict:
    """params.yaml's content for this data: the student trains with `loss`, decode gpu."""
    train = dict(arch=settings["arch"], image_size=settings["image_size"], epochs=2,
                 batch_size=settings["batch_size"], lr=LEARNING_RATE, warmup_epochs=0,
                 workers=settings["workers"], precision="bf16")
    return {
        "seed": SEED,
        "data": {"source": "image_folder", "root": str(folder / "images"),
                 "imbalance_ratio": 1.0, "val_per_class": 1, "test_per_class": 1,
                 "shard_size": settings["shard_size"]},
        "teachers": {"teacher": {**train, "arch": settings["teacher_arch"]}},
        "logits": {"views": settings["views"], "topk": settings["topk"], "tail": "quantized",
                   "image_size": settings["image_size"], "batch_size": settings["batch_size"]},
        "student": {**train, "teacher": "teacher", "loss": loss, "decode": "gpu"},
        "evaluate": {"batch_size": settings["batch_size"]},
    }


def prepare_child(settings: dict, work: Path, smoke: bool) -> dict:
    """Images, shards, teacher checkpoint and logit store, each made unless a complete one is
    cached; the seconds each step took (absent: cached) and what the data is."""
    folder, seconds = data_folder(work, settings), {}
    processes = 1 if smoke else len(os.sched_getaffinity(0))
    images, shards = folder / "images", shards_path(folder, settings)
    teacher, store = teacher_path(folder, settings), store_path(folder, settings)

    def step(name: str, done: bool, make) -> None:
        if not done:
            start = time.perf_counter()
            make()
            seconds[name] = time.perf_counter() - start

    # First, before anything starts threads or CUDA: the generator forks its processes.
    step("generate", images.is_dir(), lambda: write_photo_jpegs(images, settings, processes))

    from pipeline.dump import dump_logits
    from pipeline.params import DataParams
    from pipeline.shards import prepare_shards
    from pipeline.store import open_existing

    data = DataParams(source="image_folder", root=str(images), imbalance_ratio=1.0,
                      val_per_class=1, test_per_class=1, shard_size=settings["shard_size"],
                      workers=0 if smoke else processes)
    step("prepare", (shards / "manifest.json").is_file(),  # written last, by a rename
         lambda: prepare_shards(data, SEED, shards))
    manifest = json.loads((shards / "manifest.json").read_text())
    step("teacher", teacher.is_file(), lambda: write_teacher_checkpoint(
        teacher, settings["teacher_arch"], manifest["num_classes"], settings["image_size"],
        manifest["fingerprint"]))
    existing = open_existing(str(store), mode="r")
    step("dump", existing is not None and bool(existing.attrs.get("complete")),
         lambda: dump_logits(make_params(raw_params(settings, folder, "ikl")), "teacher",
                             str(shards), str(teacher), str(store)))
    files = list(images.glob("*/*.jpg"))
    return {"seconds": seconds, "processes": processes, "folder": str(folder),
            "rows": manifest["splits"]["train"]["rows"],
            "shards": len(manifest["splits"]["train"]["shards"]),
            "classes": manifest["num_classes"],
            "jpeg_bytes": sum(f.stat().st_size for f in files) / len(files),
            "device": str(default_device())}


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
    """Wrap every pipeline.distill training loader in EpochPhases logging to `log`. Call it
    before common.time_train_loaders, whose TimedBatches then wraps these."""
    import pipeline.distill as distill

    original = distill.train_loader

    def phased_train_loader(*args, **kwargs):
        return EpochPhases(original(*args, **kwargs), log, sync)

    distill.train_loader = phased_train_loader


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
    """DISTINCT_BATCHES batches shaped like pipeline.stream's (CPU tensors, pinned on CUDA),
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
    from pipeline.distill import CachedTeacher, student_objective
    from pipeline.models import build_model
    from pipeline.params import StudentParams
    from pipeline.train import TrainRun, fit

    cuda = torch.cuda.is_available()  # fit picks the same device for itself
    device = default_device()
    student = StudentParams(arch=settings["arch"], image_size=settings["image_size"], epochs=2,
                            batch_size=settings["batch_size"], lr=LEARNING_RATE, warmup_epochs=0,
                            workers=0, loss=loss)
    objective = student_objective(student)
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
    from pipeline.distill import train_student

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
    from pipeline.augment import DECODE
    from pipeline.device_decode import DEVICE_DECODE, batch_pixels
    from pipeline.distill import crop_spec
    from pipeline.shards import load_manifest
    from pipeline.store import open_store
    from pipeline.stream import ViewSource, split_shards, train_loader

    folder, device, sync = data_folder(work, settings), default_device(), device_sync()
    params = make_params(raw_params(settings, folder, "ikl"))
    shards_dir = str(shards_path(folder, settings))
    shards = split_shards(shards_dir, load_manifest(shards_dir), "train")
    views = ViewSource(params.seed, 0, 1, crop_spec(params.augment),
                       open_store(str(store_path(folder, settings))),
                       cached_views=params.logits.views)
    loader = train_loader(shards, views, batch_size=settings["batch_size"],
                          image_size=settings["image_size"], workers=settings["workers"],
                          pin_memory=device.type == "cuda", drop_last=True,
                          decode=DEVICE_DECODE if decode == "gpu" else DECODE)
    phases = []
    for batch in EpochPhases(FirstBatches(loader, settings["loader_batches"]), phases, sync):
        batch_pixels(batch, device, settings["image_size"])  # (B, 3, S, S) uint8
        sync()
    return phases[-1]


# ---------------------------------------------------------------------------------------------
# 4. Decoder difference: nvJPEG vs Pillow, in pixels and in the teacher's logits


def first_train_images(shards_dir: str, store, count: int) -> tuple[list, np.ndarray, np.ndarray]:
    """The first `count` train rows' SourceImages with their stored view 0: boxes (n, 4),
    flips (n,)."""
    from pipeline.shards import load_manifest
    from pipeline.stream import SourceImage, read_shard, split_shards

    images, boxes, flips = [], [], []
    for shard in split_shards(shards_dir, load_manifest(shards_dir), "train"):
        stored = store.read_rows(0, shard.start, shard.stop)
        for sample in read_shard(shard):
            row = sample["meta"]["row"] - shard.start
            images.append(SourceImage(sample))
            boxes.append(stored["boxes"][row])
            flips.append(stored["flips"][row])
            if len(images) == count:
                return images, np.stack(boxes), np.array(flips)
    return images, np.stack(boxes), np.array(flips)


def pixel_difference(first, second) -> dict:
    """Max and mean |first - second| (grey levels) and the share of differing values over
    two lists (or batches) of uint8 images of equal shapes."""
    largest, total, differing, count = 0, 0, 0, 0
    for a, b in zip(first, second):
        difference = (a.cpu().int() - b.cpu().int()).abs()
        largest = max(largest, int(difference.max()))
        total += int(difference.sum())
        differing += int((difference > 0).sum())
        count += difference.numel()
    return {"max": largest, "mean": total / count, "differing": differing / count}


def logit_difference(first: torch.Tensor, second: torch.Tensor) -> dict:
    """Max and mean |first - second| over (n, C) logits, and the rms of the difference
    centred per row (a row's common shift changes neither its softmax nor any pairwise
    difference, which is all IKL-KD reads)."""
    difference = first.double() - second.double()
    centred = difference - difference.mean(dim=1, keepdim=True)
    return {"max": float(difference.abs().max()), "mean": float(difference.abs().mean()),
            "centred_rms": float(centred.pow(2).mean().sqrt())}


def store_round_trip(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """(n, C) logits as a store with a quantised tail gives them back: encode_logits with a
    tail basis fitted on them (as the dump fits one on its teacher), then decode_logits."""
    from pipeline.store import encode_logits, fit_tail_basis
    from pipeline.store.encoding import decode_logits
    from pipeline.store.tail import tail_components

    num_classes = logits.shape[1]
    basis = fit_tail_basis(torch.log_softmax(logits.double(), dim=1).numpy(),
                           tail_components(num_classes))
    stored = encode_logits(logits.numpy(), topk, basis)
    return torch.from_numpy(decode_logits(stored, num_classes, basis))


def set_tf32_convolutions(enabled: bool) -> None:
    """cuDNN convolutions in TF32 (PyTorch's default) or in full fp32."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = enabled


@torch.no_grad()
def teacher_logits(teacher, views: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(n, C) float32 logits (on the CPU) of (n, 3, S, S) uint8 views, eval mode, no autocast."""
    from pipeline.augment import normalize

    return torch.cat([teacher(normalize(chunk.to(device))).float().cpu()
                      for chunk in views.split(64)])


def check_teacher(settings: dict, folder: Path, weights: str | None, device: torch.device,
                  views: torch.Tensor) -> tuple[torch.nn.Module, str]:
    """The teacher of the check, in eval mode on `device`, and what it is: the ImageNet
    weights in `weights`, else the dump's untrained teacher with its head rescaled so that
    its logits on `views` spread TEACHER_LOGIT_STD per row."""
    from pipeline.checkpoints import load_model
    from pipeline.models import build_model, classifier_head, load_weights

    arch = settings["teacher_arch"]
    if weights:
        model = load_weights(build_model(arch, 1000), weights)  # torchvision's ImageNet head
        return model.eval().to(device), f"{arch} from {weights}"
    model, _ = load_model(teacher_path(folder, settings))
    model = model.to(device)
    spread = float(teacher_logits(model, views, device).std(dim=1).mean())
    factor = TEACHER_LOGIT_STD / spread
    head = model.get_submodule(classifier_head(model))
    with torch.no_grad():
        head.weight.mul_(factor)
        head.bias.mul_(factor)
    return model, (f"untrained {arch} (BatchNorm calibrated), its {classifier_head(model)} "
                   f"layer rescaled x{factor:.3g} to a per-row logit std of "
                   f"{TEACHER_LOGIT_STD:g} (was {spread:.3g})")


def decode_overwrites(payloads: list, device: torch.device) -> int | None:
    """Of HAZARD_TRIALS decode_on_device calls, how many wrote into memory that kernels queued
    on the caller's stream had still to read (None off CUDA). Each trial fills uint8 blocks of
    the decoded images' shapes, queues a long kernel then a sum of each block and frees the
    blocks (the caching allocator hands them out again at once: their last use is ordered on
    this stream), then decodes: a sum that is not its block's count of ones was read after
    the decoder overwrote it (torchvision's nvJPEG decode does not wait for the caller's
    stream: pytorch/vision#9606). fit() queues steps ahead, so a decode in training can."""
    from pipeline.device_decode import decode_on_device

    if device.type != "cuda" or not hasattr(torch.cuda, "_sleep"):
        return None
    shapes = [image.shape for image in decode_on_device(payloads, device)]
    corrupted = 0
    for _ in range(HAZARD_TRIALS):
        blocks = [torch.ones(shape, dtype=torch.uint8, device=device) for shape in shapes]
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time queued before the sums
        sums = [block.sum() for block in blocks]
        del blocks
        decode_on_device(payloads, device)
        torch.cuda.synchronize()
        corrupted += any(int(total) != shape.numel() for total, shape in zip(sums, shapes))
    return corrupted


def decoder_child(settings: dict, work: Path, weights: str | None) -> dict:
    """Pixels and teacher logits of the device decode (nvJPEG on CUDA) against the CPU path's
    decode (Pillow), and the store's quantisation error on the same logits."""
    from pipeline.device_decode import cut_views, decode_on_device, worker_payload
    from pipeline.store import open_store

    device, size = default_device(), settings["image_size"]
    folder = data_folder(work, settings)
    store = open_store(str(store_path(folder, settings)))
    images, boxes, flips = first_train_images(str(shards_path(folder, settings)), store,
                                              settings["check_images"])
    pillow = [image.full() for image in images]  # (3, H, W) uint8 each, the CPU path's decode
    on_device = decode_on_device([worker_payload(image) for image in images], device)
    pillow_views = cut_views(pillow, boxes, flips, size)  # (n, 3, S, S): the CPU path's
    decoder_views = cut_views([image.cpu() for image in on_device], boxes, flips, size)
    trained_views = cut_views(on_device, boxes, flips, size).cpu()  # as the device path trains
    set_tf32_convolutions(False)
    teacher, described = check_teacher(settings, folder, weights, device, pillow_views)
    logits = {name: teacher_logits(teacher, views, device) for name, views in
              (("pillow", pillow_views), ("decoder", decoder_views),
               ("trained", trained_views))}
    set_tf32_convolutions(True)
    tf32 = teacher_logits(teacher, trained_views, device)
    payloads = [worker_payload(image) for image in images[:HAZARD_IMAGES]]
    return {
        "overwrites": decode_overwrites(payloads, device),
        "images": len(images), "device": str(device), "teacher": described,
        "megapixels": sum(image.shape[1] * image.shape[2] for image in pillow) / 1e6 / len(images),
        "pixels": {"full": pixel_difference(on_device, pillow),
                   "decoder": pixel_difference(decoder_views, pillow_views),
                   "trained": pixel_difference(trained_views, pillow_views)},
        "logits": {"decoder": logit_difference(logits["decoder"], logits["pillow"]),
                   "trained": logit_difference(logits["trained"], logits["pillow"]),
                   "store": logit_difference(store_round_trip(logits["pillow"],
                                                              settings["topk"]),
                                             logits["pillow"]),
                   "tf32": logit_difference(tf32, logits["trained"])},
        "logit_std": float(logits["pillow"].std(dim=1).mean()),
    }


# ---------------------------------------------------------------------------------------------
# Parent: run the children, print every figure beside its goal


def data_section(settings: dict, command: list[str]) -> dict:
    """Make (or find cached) the images, shards, teacher and store; print what they are."""
    info = run_child(__file__, ["--child", "prepare", "-", *command])
    seconds = info["seconds"]

    def took(step: str) -> str:
        return f"{seconds[step]:.1f} s" if step in seconds else "cached"

    print(f"\ndata ({info['folder']}): {info['classes']} classes x {settings['per_class']} "
          f"train + {HELD_OUT} held-out photo-like JPEGs of {settings['min_side']}.."
          f"{settings['max_side']} px, quality 90, mean {info['jpeg_bytes'] / 1e3:.0f} KB; "
          f"{info['rows']} train rows in {info['shards']} shards")
    print(f"  generated {took('generate')} (processes: {info['processes']}), prepared "
          f"{took('prepare')}, teacher {settings['teacher_arch']} checkpoint {took('teacher')}; "
          f"dump_logits on {info['device']} (decode gpu, {settings['views']} view, "
          f"top-{settings['topk']}, quantized tail): {took('dump')}")
    return info


def step_section(settings: dict, command: list[str], memory: str) -> dict:
    print(f"\n1. the step alone: pipeline.train.fit on in-memory batches, {settings['steps']} "
          f"timed steps after {settings['warmup']} warm-up steps, median over "
          f"{settings['rounds']} round(s) (CE and IKL alternating, fresh processes)")
    runs = alternate(settings["rounds"], lambda loss: run_child(
        __file__, ["--child", "step", loss, *command]))
    for loss, label in (("ce", "plain CE"), ("ikl", "cached IKL-KD")):
        print(f"  {label:<14} {median(r['samples_per_s'] for r in runs[loss]):9.1f} samples/s"
              f"   step {1e3 * median(r['step'] for r in runs[loss]):8.2f} ms   {memory} "
              f"{median(r['peak_bytes'] for r in runs[loss]) / 2**30:6.2f} GiB   loss alone "
              f"{1e3 * median(r['loss'] for r in runs[loss]):7.3f} ms")
    throughput = median(i["samples_per_s"] / c["samples_per_s"]
                        for i, c in zip(runs["ikl"], runs["ce"]))
    share = median(r["loss"] / r["step"] for r in runs["ikl"])
    marginal = median((i["step"] - c["step"]) / i["step"] for i, c in zip(runs["ikl"], runs["ce"]))
    print(f"  throughput cached IKL-KD / plain CE: {throughput:.3f}x (goal >= "
          f"{THROUGHPUT_GOAL}: {verdict(throughput >= THROUGHPUT_GOAL)})")
    print(f"  loss + dequantisation (copies, teacher_logits_from_fields, IKL-KD + CE, forward + "
          f"backward) share of the IKL step: {100 * share:.2f}% (goal < "
          f"{100 * LOSS_SHARE_GOAL:g}%: {verdict(share < LOSS_SHARE_GOAL)}); marginal "
          f"(IKL step - CE step) / IKL step: {100 * marginal:.2f}%")
    return {"step": {loss: median(r["step"] for r in runs[loss]) for loss in runs},
            "goals": [("step alone: IKL / CE throughput", f"{throughput:.3f}x",
                       throughput >= THROUGHPUT_GOAL),
                      ("loss + dequantisation share of the step", f"{100 * share:.2f}%",
                       share < LOSS_SHARE_GOAL)]}


def fed_section(settings: dict, command: list[str], memory: str, alone: dict | None) -> list:
    print(f"\n2. fed training: pipeline.distill.train_student, decode gpu, "
          f"DataLoader workers {settings['workers']}, 2 epochs, epoch 2 timed; median over "
          f"{settings['rounds']} round(s)")
    runs = alternate(settings["rounds"], lambda loss: run_child(
        __file__, ["--child", "fed", loss, *command]))
    figures = {loss: fed_figures(records) for loss, records in runs.items()}
    for loss, label in (("ce", "plain CE"), ("ikl", "cached IKL-KD")):
        f = figures[loss]
        print(f"  {label:<14} steady state: {f['rate']:8.1f} samples/s, step "
              f"{1e3 * f['step']:7.2f} ms, {100 * f['wait']:5.2f}% of it in the loader; "
              f"{memory} {f['peak'] / 2**30:.2f} GiB")
        print(f"  {'':<14} whole epoch:  {f['epoch_rate']:8.1f} samples/s, "
              f"{100 * f['epoch_wait']:5.2f}% in the loader (start-up {f['startup']:.2f} s, "
              f"shut-down {f['shutdown']:.2f} s); train loss {f['train_loss']:.4g}")
    throughput = median(fed_figures([i])["rate"] / fed_figures([c])["rate"]
                        for i, c in zip(runs["ikl"], runs["ce"]))
    epoch_throughput = median(fed_figures([i])["epoch_rate"] / fed_figures([c])["epoch_rate"]
                              for i, c in zip(runs["ikl"], runs["ce"]))
    print(f"  throughput cached IKL-KD / plain CE, steady: {throughput:.3f}x (goal >= "
          f"{THROUGHPUT_GOAL}: {verdict(throughput >= THROUGHPUT_GOAL)}); whole epoch: "
          f"{epoch_throughput:.3f}x")
    wait = max(f["wait"] for f in figures.values())
    goals = [("fed: IKL / CE throughput (steady)", f"{throughput:.3f}x",
              throughput >= THROUGHPUT_GOAL),
             ("fed: loader wait, steady", f"{100 * wait:.2f}%", wait < WAIT_SHARE_GOAL)]
    line = (f"  not waiting on the loader: steady loader wait, the larger of the two "
            f"{100 * wait:.2f}% (goal < {100 * WAIT_SHARE_GOAL:g}%: "
            f"{verdict(wait < WAIT_SHARE_GOAL)})")
    if alone:
        ratios = {loss: figures[loss]["step"] / alone["step"][loss] for loss in figures}
        worst = max(ratios.values())
        line += (f"; fed step / in-memory step: CE {ratios['ce']:.3f}x, IKL "
                 f"{ratios['ikl']:.3f}x (goal <= {FED_STEP_GOAL}: "
                 f"{verdict(worst <= FED_STEP_GOAL)})")
        goals.append(("fed step / in-memory step", f"{worst:.3f}x", worst <= FED_STEP_GOAL))
    print(line)
    return goals


def fed_figures(records: list[dict]) -> dict:
    """Medians over rounds of a fed configuration's figures."""
    def figure(value):
        return median(value(r) for r in records)

    return {"rate": figure(lambda r: r["steady_samples"] / r["steady"]),
            "step": figure(lambda r: r["steady"] / r["steady_steps"]),
            "wait": figure(lambda r: r["steady_wait"] / r["steady"]),
            "epoch_rate": figure(lambda r: r["samples"] / r["wall"]),
            "epoch_wait": figure(lambda r: r["wait"] / r["wall"]),
            "startup": figure(lambda r: r["startup"]),
            "shutdown": figure(lambda r: r["shutdown"]),
            "peak": figure(lambda r: r["peak_bytes"]),
            "train_loss": worst_loss(r["train_loss"] for r in records)}


def worst_loss(losses) -> float:
    """A NaN or infinite loss if there is one, else the largest."""
    losses = list(losses)
    return next((loss for loss in losses if not math.isfinite(loss)), max(losses))


def loader_section(settings: dict, command: list[str], device: str,
                   alone: dict | None) -> list:
    print(f"\n3. the loader alone: the IKL student's train_loader (shards + store, "
          f"workers {settings['workers']}), its first {settings['loader_batches'] or 'all'} "
          f"batches of {settings['batch_size']}, each through batch_pixels on {device} and "
          "synchronised, no model; steady state (the first batch left out)")
    goals = []
    for decode, label in (("gpu", "GPU path (decode gpu)"), ("cpu", "CPU path (decode cpu)")):
        phases = run_child(__file__, ["--child", "loader", decode, *command])
        rate = phases["steady_samples"] / phases["steady"]
        batch_ms = 1e3 * phases["steady"] / phases["steady_steps"]
        line = (f"  {label:<22} {rate:8.1f} crops/s ({batch_ms:.1f} ms a batch, "
                f"{100 * phases['steady_wait'] / phases['steady']:.1f}% of it waiting for "
                f"the workers; start-up {phases['startup']:.2f} s)")
        if decode == "gpu":
            line += f" (goal >= {LOADER_GOAL}: {verdict(rate >= LOADER_GOAL)})"
            if alone:
                share = batch_ms / 1e3 / alone["step"]["ce"]
                line += f"; a batch of it takes {share:.2f}x the in-memory CE step"
            goals.append(("loader alone, GPU path", f"{rate:.0f} crops/s", rate >= LOADER_GOAL))
        else:
            line += " (for comparison)"
        print(line)
    return goals


def decoder_section(settings: dict, command: list[str], smoke: bool) -> list:
    result = run_child(__file__, ["--child", "decoder", "-", *command])
    where = ("nvJPEG on " + result["device"] if not smoke else
             "torchvision's CPU decode (smoke: no nvJPEG, the same code on the CPU)")
    print(f"\n4. decoder difference: {result['images']} train JPEGs "
          f"({result['megapixels']:.3g} Mpx each on average), {where} vs Pillow (the CPU "
          "path's decode)")
    for key, label in (("full", "full images"),
                       ("decoder", f"{settings['image_size']} px views, decoder alone (both cut "
                                   "on the CPU)"),
                       ("trained", f"{settings['image_size']} px views as trained (decoded and "
                                   f"cut on {result['device']} vs the CPU path)")):
        p = result["pixels"][key]
        print(f"  pixels, {label}: max |diff| {p['max']} levels, mean {p['mean']:.4f}, "
              f"{100 * p['differing']:.2f}% of values differ")
    print(f"  teacher: {result['teacher']}; fp32 (TF32 off), eval mode; logits spread "
          f"{result['logit_std']:.2f} per row")
    logits = result["logits"]
    for key, label in (("decoder", "decoder alone"), ("trained", "views as trained"),
                       ("store", f"store quantisation (top-{settings['topk']} float16 + "
                                 "quantised tail)"),
                       ("tf32", "TF32 convolutions (cuDNN's default; off in the dump) vs fp32")):
        d = logits[key]
        print(f"  |delta logit|, {label}: max {d['max']:.2e}, mean {d['mean']:.2e}, "
              f"row-centred rms {d['centred_rms']:.2e}")
    overwrites = result["overwrites"]
    print("  decode_on_device with reads of freed memory still queued on the caller's stream: "
          + ("not applicable on the CPU" if overwrites is None else
             f"{overwrites} of {HAZARD_TRIALS} trials overwrote them "
             f"({'safe' if overwrites == 0 else 'UNSAFE: training can read corrupted memory'})"))
    below = logits["trained"]["centred_rms"] < logits["store"]["centred_rms"]
    print(f"  decoder difference below the store's quantisation error: "
          f"{'yes' if below else 'no'} (row-centred rms, views as trained: "
          f"{logits['trained']['centred_rms']:.2e} vs {logits['store']['centred_rms']:.2e}; "
          f"max {logits['trained']['max']:.2e} vs {logits['store']['max']:.2e})")
    return [("decoder difference below the store's quantisation error",
             f"{logits['trained']['centred_rms']:.2e} vs {logits['store']['centred_rms']:.2e}",
             below)]


def alternate(rounds: int, run) -> dict:
    """run("ce") and run("ikl") `rounds` times, their order swapped every round."""
    runs = {"ce": [], "ikl": []}
    for round_index in range(rounds):
        for loss in (("ce", "ikl") if round_index % 2 == 0 else ("ikl", "ce")):
            runs[loss].append(run(loss))
    return runs


def guarded(title: str, section, *args):
    """section(*args), or None after printing why a child failed (the other parts still run:
    one device session should not be lost to one failure)."""
    start = time.perf_counter()
    try:
        result = section(*args)
    except RuntimeError as error:
        print(f"\n{title}: FAILED, not measured\n  " + str(error)[-3000:].replace("\n", "\n  "))
        return None
    print(f"  ({title}: {time.perf_counter() - start:.0f} s)")
    return result


def child_main(args, settings: dict) -> None:
    mode, what = args.child
    work = Path(args.work)
    if mode == "prepare":
        result = prepare_child(settings, work, args.smoke)
    elif mode == "step":
        result = step_child(what, settings)
    elif mode == "fed":
        result = fed_child(what, settings, work)
    elif mode == "loader":
        result = loader_child(what, settings, work)
    elif mode == "decoder":
        result = decoder_child(settings, work, args.teacher_weights)
    else:
        raise ValueError(f"unknown child mode {mode!r}")
    print(json.dumps(result))


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU run of every code path (resnet18, 32 px, a few steps)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gpu_check"),
                        help="data, teacher and store are kept here and reused")
    parser.add_argument("--teacher-weights",
                        help="a torchvision resnet50 state_dict (ImageNet head) for part 4")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                            help=f"default {value} ({SMOKE[key]} with --smoke)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = SMOKE if args.smoke else FULL
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value
                for key, value in defaults.items()}
    return args, settings


def main() -> None:
    args, settings = parse_arguments()
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA starts: every part on the CPU
        # One thread: with other processes on the CPUs, OpenMP spin-waits inflate steps 100-fold.
        torch.set_num_threads(1)
    if args.child:
        torch.manual_seed(0)
        child_main(args, settings)
        return
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("gpu_check: no CUDA device here. This check measures ResNet-50 training steps "
                 "on a GPU; run it on a CUDA machine, or pass --smoke for a tiny CPU run of the "
                 "same code path (its numbers say nothing about the goals).")
    started = time.perf_counter()
    import torchvision

    device = (torch.cuda.get_device_name() if not args.smoke
              else "CPU (smoke: the numbers say nothing about the goals)")
    print(f"GPU check on {device}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, {load_line()}")
    print(f"student {settings['arch']} at {settings['image_size']} px, batch "
          f"{settings['batch_size']}, {'CPU fp32' if args.smoke else 'bf16, channels_last'}"
          f"; teacher {settings['teacher_arch']}; C = {settings['classes']}, "
          f"top-{settings['topk']} + quantised tail")
    command = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    command += [f"--work={Path(args.work).resolve()}"] + (["--smoke"] if args.smoke else [])
    if args.teacher_weights:
        command.append(f"--teacher-weights={Path(args.teacher_weights).resolve()}")
    memory = "peak GPU memory" if not args.smoke else "peak host RSS"
    info = guarded("data", data_section, settings, command)
    goals = []
    alone = guarded("1. the step alone", step_section, settings, command, memory)
    if alone:
        goals += alone["goals"]
    if info:
        goals += guarded("2. fed training", fed_section, settings, command, memory, alone) or []
        goals += guarded("3. the loader alone", loader_section, settings, command,
                         "the CPU" if args.smoke else "the GPU", alone) or []
        goals += guarded("4. decoder difference", decoder_section, settings, command,
                         args.smoke) or []
    print("\ngoals:")
    for name, figure, met in goals:
        print(f"  {name}: {figure}: {verdict(met)}")
    print(f"total {time.perf_counter() - started:.0f} s; {load_line()} (at the end)")


if __name__ == "__main__":
    main()
