"""The one timing harness of the benchmarks, and what their scripts share.

Harness: every measurement runs in a fresh child process (`run_child`: the script again with
`--child ...`, its JSON result on its last line), so no configuration inherits another's
allocator, kernel caches or page faults; configurations alternate over rounds, their order
rotated every round (`alternate`), so load from other jobs hits all alike; figures are medians
over rounds, ratios medians of the per-round ratios (`median_ratio`); wall time beside CPU time
(`cpu_seconds`: this process and its DataLoader workers, which load does not inflate), and the
load average at the start and the end (`machine_line`). `--device cuda` runs a script's
measurement on a GPU, synchronised at both ends of every clock (`sync`).

Data: generated ImageFolders of photo-like JPEGs (ImageNet's sizes and bytes, or small ones),
prepared into shards by pipeline.data.shards like any user data, or the embedded digits-LT.
Teachers: untrained, BatchNorm calibrated (a forward pass costs the same whatever the weights).
The hierarchical teacher: realistic logits without images, for the store benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pipeline.data.shards import prepare_shards  # noqa: E402
from pipeline.params import DataParams, Params, check_consistency, parse  # noqa: E402
from pipeline.stream.augment import normalize  # noqa: E402
from pipeline.train.models import build_model  # noqa: E402

PHOTO_CACHE = Path("/tmp/ikl-distill-photos")  # kept across runs: 1,000 photos take a minute

# ---------------------------------------------------------------------------------------------
# Reporting


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def median_ratio(numerators: list[dict], denominators: list[dict], key: str) -> float:
    """The median over rounds of numerator[key] / denominator[key], round by round."""
    return median(a[key] / b[key] for a, b in zip(numerators, denominators))


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def machine_line(device: str = "cpu") -> str:
    """torch, the CPU (and GPU), torch threads, load average: the context of a run."""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.machine()
    gpu = f"{torch.cuda.get_device_name()}, " if device == "cuda" else ""
    return (f"torch {torch.__version__}, {gpu}{cpu}, {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch thread(s) per process, {load_line()}")


# ---------------------------------------------------------------------------------------------
# Arguments and child processes


def parser(doc: str, rounds: int = 3, threads: int = 1) -> argparse.ArgumentParser:
    """The options every timing script takes; `setup` applies them."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--rounds", type=int, default=rounds, help="alternating rounds")
    # One thread by default: with other jobs on the CPUs, OpenMP spin-waits inflate small ops.
    p.add_argument("--threads", type=int, default=threads, help="torch threads per process")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--work", help="keep data, teachers and stores here (default: a temp dir)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return p


def setup(args) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{sys.argv[0]}: --device cuda, but torch sees no CUDA device here")
    torch.set_num_threads(args.threads)
    return torch.device(args.device)


def child_options(args, *names: str) -> list[str]:
    """`--name value` of the parent's options, for its children."""
    return [part for name in ("threads", "device", *names)
            for part in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


def run_child(script: str, arguments: list[str], cwd: str | Path | None = None) -> dict:
    """Run `python script ...arguments` in a fresh process; the JSON its last line prints."""
    command = [sys.executable, script, *arguments]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"child {' '.join(command)} failed ({result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def alternate(rounds: int, names: Iterable[str], run: Callable[[str], dict]) -> dict:
    """{name: [run(name) of each round]}: every name once a round, the order rotated by one
    every round."""
    names = list(names)
    runs = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(run(name))
    return runs


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children: the waited-for ones from getrusage,
    the live ones (persistent DataLoader workers) from /proc."""
    own, done = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    ticks, live, me = os.sysconf("SC_CLK_TCK"), 0, os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            if int(fields[1]) == me:  # its parent; utime and stime are stat's fields 14, 15
                live += int(fields[11]) + int(fields[12])
    return own.ru_utime + own.ru_stime + done.ru_utime + done.ru_stime + live / ticks


def sync(device: torch.device) -> Callable[[], None]:
    """What waits for a device's queued work: torch.cuda.synchronize on CUDA, else nothing."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ---------------------------------------------------------------------------------------------
# Timing an epoch as the training loop consumes it


class TimedBatches:
    """An iterable over `batches` that appends one record per full pass to `log`: wall (s,
    iter() to exhaustion, `sync`ed at both ends so queued GPU work counts), wait (s inside the
    loader: iter() and every next()), steps, samples, cpu (s of this process and its workers)."""

    def __init__(self, batches, log: list, sync: Callable[[], None] = lambda: None):
        self.batches, self.log, self.sync = batches, log, sync

    def __len__(self) -> int:  # the wrapped loader's: fit() asks
        return len(self.batches)

    def __iter__(self):
        self.sync()
        start, cpu = time.perf_counter(), cpu_seconds()
        iterator = iter(self.batches)
        wait, steps, samples = time.perf_counter() - start, 0, 0
        while True:
            before = time.perf_counter()
            batch = next(iterator, None)
            wait += time.perf_counter() - before
            if batch is None:
                break
            steps, samples = steps + 1, samples + len(batch["labels"])
            yield batch
        self.sync()
        self.log.append({"wall": time.perf_counter() - start, "wait": wait, "steps": steps,
                         "samples": samples, "cpu": cpu_seconds() - cpu})


def time_train_loaders(log: list, sync: Callable[[], None] = lambda: None) -> None:
    """Make every epoch of a pipeline.train.runs training stream a TimedBatches logging to
    `log`: the real loop (pipeline.train.loop.fit) is timed unchanged."""
    import pipeline.train.runs as runs

    original = runs.TrainStream.epoch
    runs.TrainStream.epoch = lambda stream, epoch: TimedBatches(original(stream, epoch), log,
                                                                sync)


# ---------------------------------------------------------------------------------------------
# Data


def photo_like(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A photo-like picture: colour noise at four scales (3x3 .. 160x160 grids, bicubic), grain
    and a few sharp discs. At quality 90 a 300..500 px one takes about 100 KB, as ImageNet's
    photos do: decode time depends on the coefficients left after quantisation, which smooth
    synthetic pictures lack."""
    pixels = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 60), (12, 35), (48, 25), (160, 45)):
        grid = rng.normal(0, amplitude, (cells, cells, 3)).astype(np.float32)
        pixels += np.stack([np.asarray(Image.fromarray(grid[..., c]).resize(
            (width, height), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
    pixels += rng.normal(0, 22, (height, width, 1)) + rng.normal(0, 7, (height, width, 3))
    image = Image.fromarray(np.clip(pixels + rng.integers(60, 200, 3), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = (int(v) for v in (rng.integers(0, width), rng.integers(0, height),
                                    rng.integers(10, 80)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return image


SIDES = {"photo": (300, 500), "small": (64, 96)}  # ImageNet's photos; small ones


def _write_class(root: Path, count: int, sides: tuple, label: int) -> None:
    rng = np.random.default_rng([0, label])  # per class: the same files for any process count
    folder = root / f"class_{label:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        height, width = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        photo_like(rng, height, width).save(folder / f"{index:04d}.jpg", quality=90)


def prepare(work: Path, kind: str, classes: int = 0, per_class: int = 0, *, max_side: int = 0,
            sides: tuple | None = None, shard_size: int = 256) -> tuple[dict, DataParams, Path]:
    """Shards of one data set under `work`, made once (a later run reuses them): "digits" (the
    embedded digits-LT), or `classes` x (`per_class` train + 1 val + 1 test) photo-like JPEGs
    with sides in `sides` (default SIDES[kind]: "photo" or "small"), prepared with
    `data.max_side` `max_side` (0 keeps the files' bytes). (manifest, DataParams, shards)."""
    if kind == "digits":
        data, shards = DataParams(workers=0), work / "digits" / "shards"
    else:
        sides = sides or SIDES[kind]
        folder = work / f"{kind}-{classes}x{per_class}-{sides[0]}-{sides[1]}"
        images, shards = folder / "images", folder / f"shards-max{max_side}"
        if not images.is_dir():
            partial_dir = folder / "images.partial"  # renamed when complete: never short
            shutil.rmtree(partial_dir, ignore_errors=True)
            write = partial(_write_class, partial_dir, per_class + 2, sides)
            # fork, before this process starts threads or CUDA
            with ProcessPoolExecutor(os.cpu_count(), mp_context=get_context("fork")) as pool:
                list(pool.map(write, range(classes)))
            partial_dir.rename(images)
        data = DataParams(source="image_folder", root=str(images), imbalance_ratio=1.0,
                          val_per_class=1, test_per_class=1, shard_size=shard_size, workers=0,
                          max_side=max_side)
    if not (shards / "manifest.json").is_file():  # written last
        prepare_shards(data, 0, shards)
    return json.loads((shards / "manifest.json").read_text()), data, shards


def dataset_line(manifest: dict) -> str:
    counts, train = manifest["train_counts"], manifest["splits"]["train"]
    return (f"{train['rows']} train rows in {len(train['shards'])} shards, "
            f"{manifest['num_classes']} classes ({max(counts)} .. {min(counts)} per class)")


def raw_params(data: DataParams, student: dict, teacher: dict, logits: dict,
               augment: dict | None = None) -> dict:
    """params.yaml's content for a benchmark: `data`, one teacher named "teacher", its logits
    and the student (each section's keys as params.yaml spells them)."""
    raw = {"seed": 0, "data": asdict(data), "teachers": {"teacher": teacher}, "logits": logits,
           "student": {"teacher": "teacher", **student}}
    return {**raw, "augment": augment} if augment else raw


def make_params(raw: dict) -> Params:
    return check_consistency(parse(Params, raw, ""))


# ---------------------------------------------------------------------------------------------
# Models


def write_teacher_checkpoint(path: Path, arch: str, num_classes: int, image_size: int,
                             fingerprint: str) -> Path:
    """An untrained `arch` with BatchNorm statistics calibrated on random images (so its
    eval-mode logits have a realistic scale), saved as pipeline.train.checkpoints reads it."""
    if path.is_file():
        return path
    torch.manual_seed(0)
    model = build_model(arch, num_classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        for _ in range(4):
            model(normalize(torch.randint(0, 256, (32, 3, image_size, image_size),
                                          dtype=torch.uint8)))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "arch": arch, "num_classes": num_classes,
                "small_input": False, "fingerprint": fingerprint, "epoch": 0,
                # the dump checks that it crops at the size the teacher was trained at
                "params": {"train": {"image_size": image_size}}}, path)
    return path


def forward_macs(arch: str, num_classes: int, image_size: int) -> int:
    """Multiply-accumulates of one image's forward pass (convolutions and linear layers)."""
    model, total = build_model(arch, num_classes).eval(), 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            total += (output.numel() * module.kernel_size[0] * module.kernel_size[1]
                      * module.in_channels // module.groups)
        else:
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return total


# ---------------------------------------------------------------------------------------------
# A teacher without images

INATURALIST_CLASSES = 8142
HIERARCHICAL_CACHE = Path("/tmp/ikl-distill-cache")


def hierarchical_logits(num_classes: int, *, test_per_class: int = 6,
                        train_per_class: int = 20, epochs: int = 6):
    """(n, C) logits of a teacher and of a weaker student, and the labels, of C classes in a
    hierarchy of tens (1000 = 10 superclasses x 10 groups x 10 classes). Class means add a
    term per level (N(0, I) in 64 dimensions, scaled 1.0, 0.7, 0.5 from the top; at 8,142 a
    fourth level, 1.4); samples are their class mean + N(0, 1.3^2 I) through a fixed random ReLU
    layer (64 -> 256). The teacher is a linear head trained (Adam) on `train_per_class` samples
    a class, the student one on 2/5 as many with half the features; logits on
    `test_per_class` held-out samples a class. At C = 1000: 68 % top-1, mean top probability
    0.43, logit std 3 per sample, an ImageNet teacher's range."""
    generator = torch.Generator().manual_seed(0)
    dims, hidden = 64, 256
    depth = max(1, int(np.ceil(np.log10(num_classes) - 1e-9)))
    levels = [torch.randn(10**(i + 1), dims, generator=generator) * s
              for i, s in enumerate((1.4, 1.0, 0.7, 0.5)[-depth:])]
    classes = torch.arange(num_classes)
    means = sum(level[classes // 10**(depth - 1 - i)] for i, level in enumerate(levels))
    projection = torch.randn(dims, hidden, generator=generator) / dims**0.5

    def sample(per_class: int):
        labels = classes.repeat_interleave(per_class)
        points = means[labels] + 1.3 * torch.randn(len(labels), dims, generator=generator)
        return torch.relu(points @ projection), labels

    def train_head(features, labels):
        head = torch.nn.Linear(features.shape[1], num_classes)
        optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
        for _ in range(epochs):
            for batch in torch.randperm(len(labels), generator=generator).split(
                    min(num_classes, 1000)):  # enough steps at C = 8,142 too
                loss = torch.nn.functional.cross_entropy(head(features[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return head

    teacher_head = train_head(*sample(train_per_class))
    features, labels = sample(max(2, train_per_class * 2 // 5))
    student_head = train_head(features[:, : hidden // 2], labels)
    test_features, test_labels = sample(test_per_class)
    with torch.no_grad():
        return (teacher_head(test_features), student_head(test_features[:, : hidden // 2]),
                test_labels)


def hierarchical_teacher(num_classes: int):
    """`hierarchical_logits` as the store benchmarks use it; at iNaturalist's 8,142 one view
    a class, 8 training samples a class, 5 epochs (50 % top-1, logit std 5.2; 6 minutes on 2
    cores), cached in HIERARCHICAL_CACHE."""
    if num_classes <= 1000:
        return hierarchical_logits(num_classes)
    cache = HIERARCHICAL_CACHE / f"hierarchical-{num_classes}.pt"
    if not cache.is_file():
        logits = hierarchical_logits(num_classes, test_per_class=1, train_per_class=8, epochs=5)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(logits, cache)
    return torch.load(cache)
