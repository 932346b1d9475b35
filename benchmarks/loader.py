"""Loader throughput: the paired stream (images + cached logits) vs the same stream without
logits vs torchvision's ImageFolder reading individual files, all with the same decode and crop.

    python benchmarks/loader.py                         # 5 rounds, 2 workers
    python benchmarks/loader.py --profile               # also: where a worker's time goes

Data: a generated ImageFolder of structured synthetic JPEGs (100 classes, 64..96 px), prepared
into WebDataset shards of 256 rows by pipeline.shards; crops of 64 px, batch 64.
- paired: pipeline.stream.train_loader with the logit store (pipeline.dump.dump_logits, V = 2,
  top-10; a small teacher at 16 px, since only the store's format matters here): stored boxes
  and flips replayed, logits attached to each sample;
- without logits: the same train_loader with no store (views drawn from the seed per sample);
- ImageFolder: torchvision.datasets.ImageFolder over the same train images, extracted from the
  shards byte for byte into root/class/row.jpg, decoded by the stream's own decode (PIL) and
  cropped by torchvision's v2 RandomResizedCrop (bilinear, antialias: apply_view's op) and
  RandomHorizontalFlip, in a DataLoader with shuffle and the default collate.
All three: --workers DataLoader workers (2), a new DataLoader per epoch (the stream makes one
per epoch; ImageFolder's workers restart per epoch unless persistent, here not), worker start
included. Each run, in a fresh subprocess, reads --epochs epochs; the first (warm page cache) is
not counted; samples per second are medians over the other epochs, then over rounds, with the
three loaders alternating (order rotating) in each round. Ratios: medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (dataset_line, machine_line, make_params, median,  # noqa: E402
                    prepare_synthetic, run_child, verdict, write_teacher_checkpoint)

UNPAIRED_GOAL, IMAGEFOLDER_GOAL = 0.9, 1.0  # paired / other, at least
LOADERS = ("paired", "no_logits", "image_folder")
LABELS = {"paired": "paired stream (images + logits)", "no_logits": "same stream, no logits",
          "image_folder": "torchvision ImageFolder, files"}
IMAGE_SIZE, VIEWS, TOPK = 64, 2, 10
AUGMENT = {"crop_scale": [0.08, 1.0], "crop_ratio": [0.75, 1.3333333], "flip_probability": 0.5}


def build(work: Path, args) -> Path:
    """Shards, a logit store, the extracted ImageFolder tree and the run's params."""
    from pipeline.dump import dump_logits

    data_folder = work / f"synthetic-{args.classes}x{args.per_class}"
    folder = data_folder / "loader"
    folder.mkdir(parents=True, exist_ok=True)
    manifest, data = prepare_synthetic(data_folder, args.classes, args.per_class)
    shards = data_folder / "shards"
    train = dict(arch="resnet8", image_size=IMAGE_SIZE, epochs=1, batch_size=args.batch_size,
                 workers=args.workers)
    raw = {"seed": 0,
           "data": {"source": data.source, "root": data.root,
                    "imbalance_ratio": data.imbalance_ratio, "val_per_class": data.val_per_class,
                    "test_per_class": data.test_per_class, "shard_size": data.shard_size,
                    "workers": data.workers},
           "teachers": {"teacher": {**train, "image_size": 16}}, "augment": AUGMENT,
           "logits": {"views": VIEWS, "topk": TOPK, "image_size": 16, "batch_size": 256},
           "student": {**train, "teacher": "teacher"}}
    params = make_params(raw)
    (folder / "params.json").write_text(json.dumps({"raw": raw, "shards": str(shards)}))
    checkpoint = write_teacher_checkpoint(folder / "teacher.pt", "resnet8",
                                          manifest["num_classes"], 16, manifest["fingerprint"])
    store = folder / "teacher.zarr"
    if not (store / "zarr.json").is_file():
        dump_logits(params, "teacher", str(shards), str(checkpoint), str(store))
    extract_image_folder(shards, manifest, folder / "image_folder")
    print(f"data: {dataset_line(manifest)}; synthetic JPEG 64..96 px, "
          f"{sum(s.stat().st_size for s in shards.glob('train-*.tar')) / 2**20:.1f} MiB of "
          f"train shards; crops {IMAGE_SIZE} px, batch {args.batch_size}, store V = {VIEWS}, "
          f"top-{TOPK}")
    return folder


def extract_image_folder(shards: Path, manifest: dict, root: Path) -> None:
    """root/class_LLLL/RRRRRRRRR.ext: every train sample's encoded bytes, unchanged."""
    import webdataset as wds

    from pipeline.stream import split_shards

    if root.is_dir():
        return
    for shard in split_shards(str(shards), manifest, "train"):
        for sample in wds.WebDataset(shard.url, shardshuffle=False):
            meta = json.loads(sample["json"])
            extension = "jpg" if "jpg" in sample else "png"
            folder = root / f"class_{meta['label']:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{meta['row']:09d}.{extension}").write_bytes(sample[extension])


# ---------------------------------------------------------------------------------------------
# Children


def make_loader(folder: Path, kind: str, epoch: int, workers: int | None = None):
    """One epoch's DataLoader of `kind` (see the module docstring); `workers` overrides the
    params' DataLoader workers."""
    from pipeline.distill import crop_spec
    from pipeline.shards import load_manifest
    from pipeline.store import open_store
    from pipeline.stream import ViewSource, split_shards, train_loader

    saved = json.loads((folder / "params.json").read_text())
    if workers is not None:
        saved["raw"]["student"]["workers"] = workers
    params = make_params(saved["raw"])
    settings = params.student
    if kind == "image_folder":
        return image_folder_loader(folder / "image_folder", params, epoch)
    store = open_store(str(folder / "teacher.zarr")) if kind == "paired" else None
    views = ViewSource(params.seed, epoch, 1, crop_spec(params.augment), store,
                       cached_views=params.logits.views)
    shards = split_shards(saved["shards"], load_manifest(saved["shards"]), "train")
    return train_loader(shards, views, batch_size=settings.batch_size,
                        image_size=settings.image_size, workers=settings.workers)


class DecodeFile:
    """ImageFolder's loader: the file's bytes through the stream's own decode (a class, not a
    lambda, so DataLoader workers can pickle it)."""

    def __call__(self, path: str) -> torch.Tensor:
        from pipeline.stream import decode

        extension = "jpg" if path.endswith(".jpg") else "png"
        with open(path, "rb") as stream:
            return decode({extension: stream.read(), "__key__": path})


def image_folder_loader(root: Path, params, epoch: int):
    import torchvision
    from torchvision.transforms import v2

    augment = params.augment
    transform = v2.Compose([
        v2.RandomResizedCrop(params.student.image_size, scale=augment.crop_scale,
                             ratio=augment.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(augment.flip_probability),
    ])
    dataset = torchvision.datasets.ImageFolder(str(root), loader=DecodeFile(),
                                               transform=transform)
    generator = torch.Generator().manual_seed(epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=params.student.batch_size,
                                       shuffle=True, generator=generator,
                                       num_workers=params.student.workers)


def samples_in(batch) -> int:
    return len(batch["labels"]) if isinstance(batch, dict) else len(batch[1])


def time_child(folder: Path, kind: str, epochs: int) -> dict:
    """Samples per second of each epoch (a fresh DataLoader each, worker start included)."""
    rates = []
    for epoch in range(epochs):
        start, samples = time.perf_counter(), 0
        for batch in make_loader(folder, kind, epoch):
            samples += samples_in(batch)
        rates.append(samples / (time.perf_counter() - start))
    return {"rates": rates, "samples": samples}


def profile_child(folder: Path, kind: str) -> dict:
    """cProfile of one epoch read in this process (workers 0): a worker's work."""
    import pipeline.distill  # noqa: F401  (imports outside the profile)

    for _ in make_loader(folder, kind, 0, workers=0):  # warm page cache and imports
        pass
    profiler = cProfile.Profile()
    profiler.enable()
    samples = sum(samples_in(batch) for batch in make_loader(folder, kind, 1, workers=0))
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(10)
    return {"profile": text.getvalue(), "samples": samples,
            "total": stats.total_tt}


# ---------------------------------------------------------------------------------------------
# Parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per run; the first is warm-up")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=30, help="train images per class")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of one epoch of each loader, in-process")
    parser.add_argument("--work", help="keep data and store here (default: a temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "LOADER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        mode, folder, kind = args.child
        result = (time_child(Path(folder), kind, args.epochs) if mode == "time"
                  else profile_child(Path(folder), kind))
        print(json.dumps(result))
        return

    print(f"loader throughput, {machine_line()}")
    with tempfile.TemporaryDirectory(prefix="loader-") as scratch:
        folder = build(Path(args.work) if args.work else Path(scratch), args)
        rates = {kind: [] for kind in LOADERS}
        for round_index in range(args.rounds):
            order = LOADERS[round_index % 3:] + LOADERS[:round_index % 3]
            for kind in order:
                result = run_child(__file__, ["--child", "time", str(folder), kind, "--epochs",
                                              str(args.epochs)], cwd=folder)
                rates[kind].append(median(result["rates"][1:]))
        print(f"{args.workers} DataLoader workers; samples/s: median over {args.epochs - 1} "
              f"epochs per run, then over {args.rounds} rounds (one fresh process per run, "
              "loaders alternating)")
        for kind in LOADERS:
            values = rates[kind]
            print(f"  {LABELS[kind]:<32} {median(values):8.0f} samples/s   (rounds: "
                  f"{', '.join(f'{v:.0f}' for v in values)})")
        for other, goal in (("no_logits", UNPAIRED_GOAL), ("image_folder", IMAGEFOLDER_GOAL)):
            ratio = median(p / o for p, o in zip(rates["paired"], rates[other]))
            print(f"  paired / {LABELS[other]:<31} {ratio:6.3f}x  (goal >= {goal}: "
                  f"{verdict(ratio >= goal)})")
        if args.profile:
            for kind in LOADERS:
                result = run_child(__file__, ["--child", "profile", str(folder), kind],
                                   cwd=folder)
                print(f"  profile, {LABELS[kind]}, one epoch in-process: "
                      f"{1e3 * result['total'] / result['samples']:.3f} ms/sample "
                      "(profiled), top 10 by own time:")
                print("\n".join("     " + line for line in result["profile"].splitlines()
                                if line.strip() and not line.lstrip().startswith(
                                    ("Ordered", "List reduced"))))
    print(machine_line() + " (at the end)")


if __name__ == "__main__":
    main()
