"""Shared helpers of the benchmarks; the one timing harness of every timing script.

Harness: each measurement runs in a fresh child process (`run_child`), configurations alternate
over rounds with their order rotated every round (`alternate`: load from other processes hits
all alike), figures are medians over rounds (`median`) and ratios medians of the per-round
ratios (`median_ratio`), wall and the process's CPU time, with the load average beside them
(`machine_line`, `load_line`).

Data: the embedded digits-LT shards, or a generated ImageFolder of structured synthetic JPEGs
(per class a colour layout and a shape, per image jitter, texture noise and a random size),
prepared into shards through pipeline.data.shards like any user data. Teachers: a randomly
initialised model whose BatchNorm statistics are calibrated on a few batches (so its eval-mode
logits have a realistic scale), saved in the checkpoint format that
pipeline.train.checkpoints.load_model reads.
Timing: `TimedBatches` wraps one epoch of batches and records the wall time of the whole pass
(from iter() to exhaustion: every step of the epoch, as the training loop runs it) and the part
spent waiting inside the loader's next(); `run_child` runs one measurement in a fresh process.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pipeline.stream.augment import normalize  # noqa: E402
from pipeline.train.models import build_model  # noqa: E402
from pipeline.params import DataParams, Params, check_consistency, parse  # noqa: E402
from pipeline.data.shards import prepare_shards  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Reporting


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else the machine type."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_line(threads: int | None = None) -> str:
    """torch version, CPU model and count, torch threads, load average: the context of a run."""
    threads = torch.get_num_threads() if threads is None else threads
    return (f"torch {torch.__version__}, {cpu_name()}, {os.cpu_count()} CPUs, {threads} torch "
            f"thread(s) per process, {load_line()}")


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------------------------------
# Child processes: every timed measurement runs in a fresh interpreter (own allocator, own
# oneDNN primitive cache, own page faults), so no configuration inherits another's state.


def run_child(script: str, arguments: list[str], cwd: str | Path | None = None,
              env: dict | None = None) -> dict:
    """Run `python script ...arguments` (with `env` added to the environment) and return the
    JSON its last line prints."""
    command = [sys.executable, script, *arguments]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"child {' '.join(command)} failed ({result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def alternate(rounds: int, names: Iterable[str], run: Callable[[str], dict]) -> dict:
    """{name: [run(name) of each round]}: every name once a round, `rounds` rounds, the order
    rotated by one every round."""
    names = list(names)
    runs = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(run(name))
    return runs


def median_ratio(numerators: list[dict], denominators: list[dict], key: str) -> float:
    """The median over rounds of numerator[key] / denominator[key], round by round."""
    return median(a[key] / b[key] for a, b in zip(numerators, denominators))


# ---------------------------------------------------------------------------------------------
# Timing an epoch as the training loop consumes it


class TimedBatches:
    """An iterable over `batches` that appends one record per full pass to `log`:
    wall (s, iter() to exhaustion), wait (s inside the loader: iter() and every next()),
    steps, samples, cpu (s of this process's CPU time, all its threads, over the pass: less
    sensitive than wall time to other processes on the machine; DataLoader worker processes
    are not in it), and whatever `on_end()` returns. `sync` (e.g. torch.cuda.synchronize) runs
    before the clock starts and before it stops, so queued GPU work is counted; `on_start()`
    runs just before the clock starts (e.g. to reset peak-memory statistics)."""

    def __init__(self, batches: Iterable[dict], log: list, sync: Callable[[], None] = None,
                 on_start: Callable[[], None] = None, on_end: Callable[[], dict] = None):
        self.batches, self.log = batches, log
        self.sync = sync or (lambda: None)
        self.on_start = on_start or (lambda: None)
        self.on_end = on_end or dict

    def __iter__(self):
        self.sync()
        self.on_start()
        start, cpu_start = time.perf_counter(), time.process_time()
        iterator = iter(self.batches)
        wait, steps, samples = time.perf_counter() - start, 0, 0
        while True:
            before = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                wait += time.perf_counter() - before
                break
            wait += time.perf_counter() - before
            steps, samples = steps + 1, samples + len(batch["labels"])
            yield batch
        self.sync()
        self.log.append({"wall": time.perf_counter() - start, "wait": wait, "steps": steps,
                         "samples": samples, "cpu": time.process_time() - cpu_start,
                         **self.on_end()})

    def __len__(self) -> int:  # the wrapped loader's, when it knows it
        return len(self.batches)


def time_train_loaders(log: list, sync=None, on_start=None) -> None:
    """Make every epoch of a pipeline.train.runs training stream a TimedBatches logging to `log`.

    The student's and teacher's loops get each epoch's batches from `TrainStream.epoch` (one
    stream per run, as imported into pipeline.train.runs); wrapping it there times the real
    loop (pipeline.train.loop.fit) unchanged.
    """
    import pipeline.train.runs as distill

    original = distill.TrainStream.epoch

    def timed_epoch(stream, epoch):
        return TimedBatches(original(stream, epoch), log, sync, on_start)

    distill.TrainStream.epoch = timed_epoch


# ---------------------------------------------------------------------------------------------
# Data


def write_synthetic_image_folder(root: Path, classes: int, per_class: int, *, min_side: int = 64,
                                 max_side: int = 96, quality: int = 90, seed: int = 0) -> int:
    """root/class_XXX/NNNN.jpg: `per_class` JPEGs per class, sides in [min_side, max_side].

    Random but structured, so JPEG sizes and decode times are those of small photos rather than
    of white noise or flat colour: a class-specific 4x4 colour layout (upsampled) and an ellipse
    in the class colour, jittered per image, plus texture noise. Returns the bytes written.
    """
    rng = np.random.default_rng(seed)
    written = 0
    for label in range(classes):
        layout = rng.integers(0, 256, (4, 4, 3))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        folder = root / f"class_{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            height, width = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
            jittered = np.clip(layout + rng.integers(-40, 41, layout.shape), 0, 255)
            image = Image.fromarray(jittered.astype(np.uint8)).resize(
                (width, height), Image.Resampling.BICUBIC)
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            ImageDraw.Draw(image).ellipse(
                (int(left), int(top), int(left + width // 2), int(top + height // 2)), fill=colour)
            pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
            path = folder / f"{index:04d}.jpg"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                path, format="JPEG", quality=quality)
            written += path.stat().st_size
    return written


def photo_like(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """One photo-like RGB picture: colour noise at four scales (a 3x3, 12x12, 48x48 and 160x160
    grid, bicubic-upsampled, amplitudes falling from 60 to 45 grey levels at the finest),
    luminance and colour grain, and a few solid discs (sharp edges). Tuned so that at JPEG
    quality 90 a 300..500 px picture takes about 100 KB, as ImageNet's photos do (~110 KB at
    ~400 x 350): decoding time depends on the coefficients left after quantisation, which flat
    or smooth synthetic pictures lack."""
    pixels = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 60), (12, 35), (48, 25), (160, 45)):
        grid = rng.normal(0, amplitude, (cells, cells, 3)).astype(np.float32)
        pixels += np.stack([np.asarray(Image.fromarray(grid[..., c]).resize(
            (width, height), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
    pixels += rng.normal(0, 22, (height, width, 1)).astype(np.float32)  # luminance grain
    pixels += rng.normal(0, 7, (height, width, 3)).astype(np.float32)  # colour grain
    pixels += rng.integers(60, 200, 3)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, radius = int(rng.integers(0, width)), int(rng.integers(0, height)), int(
            rng.integers(10, 80))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius),
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def write_photo_image_folder(root: Path, classes: int, per_class: int, *, min_side: int = 300,
                             max_side: int = 500, quality: int = 90, seed: int = 0) -> int:
    """root/class_XXX/NNNN.jpg: `per_class` photo-like JPEGs per class (`photo_like`), height
    and width drawn uniformly in [min_side, max_side] (ImageNet's typical 500 x 375, 400 x 350);
    returns the bytes written. Written to a `.partial` sibling and renamed when complete, so an
    interrupted run never leaves a short cache."""
    rng = np.random.default_rng(seed)
    partial = root.with_name(root.name + ".partial")
    written = 0
    for label in range(classes):
        folder = partial / f"class_{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            height, width = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
            path = folder / f"{index:04d}.jpg"
            photo_like(rng, height, width).save(path, format="JPEG", quality=quality)
            written += path.stat().st_size
    partial.rename(root)
    return written


def prepare_photos(work: Path, classes: int, train_per_class: int, *, max_side: int = 0,
                   shard_size: int = 256, seed: int = 0) -> tuple[dict, DataParams]:
    """Generate the photo-like ImageFolder under work/images once (kept across runs: it takes
    about a minute) and prepare it into work/shards-max{max_side} (0: the files' own bytes;
    else re-encoded at quality 90 to that longer side, `data.max_side`)."""
    images = work / "images"
    if not images.is_dir():
        shutil.rmtree(images.with_name(images.name + ".partial"), ignore_errors=True)
        write_photo_image_folder(images, classes, train_per_class + 2, seed=seed)
    data = DataParams(source="image_folder", root=str(images), imbalance_ratio=1.0,
                      val_per_class=1, test_per_class=1, shard_size=shard_size, workers=0,
                      max_side=max_side)
    return _prepared(data, seed, work / f"shards-max{max_side}"), data


def prepare_synthetic(work: Path, classes: int, train_per_class: int, *, shard_size: int = 256,
                      seed: int = 0) -> tuple[dict, DataParams]:
    """Generate the synthetic ImageFolder under work/images and prepare it into work/shards
    (balanced: imbalance_ratio 1, 1 val and 1 test image held out per class)."""
    images = work / "images"
    if not images.is_dir():
        write_synthetic_image_folder(images, classes, train_per_class + 2, seed=seed)
    data = DataParams(source="image_folder", root=str(images), imbalance_ratio=1.0,
                      val_per_class=1, test_per_class=1, shard_size=shard_size, workers=0)
    return _prepared(data, seed, work / "shards"), data


def prepare_digits(work: Path, seed: int = 0) -> tuple[dict, DataParams]:
    """The embedded digits-LT data on DataParams defaults (in-process encoding: same bytes)."""
    data = DataParams(workers=0)
    return _prepared(data, seed, work / "shards"), data


def _prepared(data: DataParams, seed: int, shards: Path) -> dict:
    manifest_path = shards / "manifest.json"
    if manifest_path.is_file():  # --work reuse: prepared already
        return json.loads(manifest_path.read_text())
    return prepare_shards(data, seed, shards)


def dataset_line(manifest: dict) -> str:
    counts = manifest["train_counts"]
    shards = manifest["splits"]["train"]["shards"]
    return (f"{manifest['splits']['train']['rows']} train rows in {len(shards)} shards, "
            f"{manifest['num_classes']} classes ({max(counts)} .. {min(counts)} per class)")


# ---------------------------------------------------------------------------------------------
# Models


def write_teacher_checkpoint(path: Path, arch: str, num_classes: int, image_size: int,
                             fingerprint: str, seed: int = 0) -> Path:
    """An untrained `arch` with BatchNorm statistics calibrated on random images, saved with the
    keys pipeline.train.checkpoints.load_model reads. Timing does not depend on what a teacher
    knows."""
    if path.is_file():
        return path
    torch.manual_seed(seed)
    model = build_model(arch, num_classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(4):
            images = torch.randint(0, 256, (32, 3, image_size, image_size), dtype=torch.uint8)
            model(normalize(images))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "arch": arch, "num_classes": num_classes,
                "small_input": False, "fingerprint": fingerprint, "epoch": 0,
                # the dump checks that it crops at the size the teacher was trained at
                "params": {"train": {"image_size": image_size}}}, path)
    return path


def forward_macs(arch: str, num_classes: int, image_size: int) -> int:
    """Multiply-accumulates of one image's forward pass (convolutions and linear layers)."""
    model = build_model(arch, num_classes).eval()
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * kernel * module.in_channels // module.groups
        elif isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return total


def make_params(raw: dict) -> Params:
    return check_consistency(parse(Params, raw, ""))


# ---------------------------------------------------------------------------------------------
# A teacher without images


def hierarchical_logits(num_classes: int = 1000, seed: int = 0, *, test_per_class: int = 6,
                        train_per_class: int = 20, epochs: int = 6):
    """A realistic teacher without images: (6 C, C) logits of a teacher, of a weaker student and
    the labels, for C = 10, 100 or 1000 classes in a hierarchy of tens (1000 = 10 superclasses
    x 10 groups x 10 classes). Class means add a term per level (N(0, I) in 64 dimensions,
    scaled 1.0, 0.7, 0.5 from the top); samples are their class mean + N(0, 1.3^2 I), mapped
    through a fixed random ReLU layer (64 -> 256). The teacher is a linear softmax head trained
    on 20 samples per class (Adam, 6 epochs), the weaker student a head trained on another 8
    samples per class with half the features; logits on 6 held-out samples per class. At
    C = 1000 the teacher has about 68 % top-1, a mean top probability of 0.43 and logits spread
    3 (std per sample): ImageNet teachers' range. Other C (iNaturalist's 8,142): ceil(log10 C)
    levels of tens, the first (C - 1) // 10**(depth - 1) + 1 superclasses used, the extra top
    level scaled 1.4; `test_per_class` 1 keeps its (C, C) logits in memory (265 MB at 8,142), and
    fewer `train_per_class` (the student: 2/5 of them) and `epochs` its training in minutes."""
    generator = torch.Generator().manual_seed(seed)
    dims, hidden = 64, 256
    depth = max(1, int(np.ceil(np.log10(num_classes) - 1e-9)))
    scales = (1.4, 1.0, 0.7, 0.5)[-depth:]
    levels = [torch.randn(10**(i + 1), dims, generator=generator) * s
              for i, s in enumerate(scales)]
    classes = torch.arange(num_classes)
    means = sum(level[classes // 10**(depth - 1 - i)] for i, level in enumerate(levels))
    projection = torch.randn(dims, hidden, generator=generator) / dims**0.5

    def sample(per_class: int):
        labels = classes.repeat_interleave(per_class)
        points = means[labels] + 1.3 * torch.randn(len(labels), dims, generator=generator)
        return torch.relu(points @ projection), labels

    def train_head(features, labels, epochs):
        head = torch.nn.Linear(features.shape[1], num_classes)
        optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for batch in order.split(min(num_classes, 1000)):  # steps enough at C = 8,142
                loss = torch.nn.functional.cross_entropy(head(features[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return head

    teacher_head = train_head(*sample(train_per_class), epochs=epochs)
    features, labels = sample(max(2, train_per_class * 2 // 5))
    student_head = train_head(features[:, : hidden // 2], labels, epochs=epochs)
    test_features, test_labels = sample(test_per_class)
    with torch.no_grad():
        return (teacher_head(test_features), student_head(test_features[:, : hidden // 2]),
                test_labels)


INATURALIST_CLASSES = 8142
HIERARCHICAL_CACHE = Path("/tmp/ikl-distill-cache")


def hierarchical_teacher(num_classes: int):
    """`hierarchical_logits` as the store benchmarks use it: as it is up to C = 1000; at
    iNaturalist's 8,142 one held-out view per class (8,142 views), 8 training samples per
    class and 5 epochs (about 50 % top-1, mean top probability 0.40, logit std 5.2; 6 minutes
    on 2 shared cores), cached in HIERARCHICAL_CACHE after the first run."""
    if num_classes <= 1000:
        return hierarchical_logits(num_classes)
    cache = HIERARCHICAL_CACHE / f"hierarchical-{num_classes}.pt"
    if cache.is_file():
        return torch.load(cache)
    logits = hierarchical_logits(num_classes, test_per_class=1, train_per_class=8, epochs=5)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(logits, cache)
    return logits

