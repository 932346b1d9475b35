"""Data of the GPU check: the photo-like JPEGs, their shards, the teacher checkpoint and its
logit store, each made once under --work and reused (the `prepare` child); where they lie,
the params a stage would read for them, and the device every child runs on."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from common import make_params, photo_like, write_teacher_checkpoint

SEED = 0
LEARNING_RATE = 0.01  # timing does not depend on it; low, so that no run diverges to NaN
HELD_OUT = 2  # images per class beyond the train rows: 1 val, 1 test


# ---------------------------------------------------------------------------------------------
# The device every child runs on


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

    from pipeline.store.dump import dump_logits
    from pipeline.params import DataParams
    from pipeline.data.shards import prepare_shards
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
