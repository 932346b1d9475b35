"""Loader throughput: the paired stream (images + cached logits) vs the same stream without
logits vs torchvision's ImageFolder reading files, beside the decode-only bounds.

    python benchmarks/loader.py --rounds 2              # photo-like JPEGs, 224 px
    python benchmarks/loader.py --data small            # small JPEGs, 64 px
    python benchmarks/loader.py --device cuda --workers 4 --classes 100 --per-class 40

Data: photo-like JPEGs with ImageNet's sizes (40 classes x 25), crops of 224 px, one prepare per
--max-side (0: the files' own bytes); or small ones (64..96 px), crops of 64 px. The kinds
(LABELS): the paired stream replaying a logit store (V = 2, top-10); the same stream drawing
the views a store would hold; torchvision's ImageFolder over the same files (Pillow, v2
RandomResizedCrop + flip, a new DataLoader an epoch, its default); the stream's own decode +
crop of one view per image in a tight loop, times --workers (with Pillow's decode: the goal's
bound, issue 24; and today's). The streams are kept for the run (persistent workers). With
--device cuda every batch goes onto the GPU through batch_pixels, and the paired stream also
runs with `student.decode: gpu` (nvJPEG). Each run, in a fresh child, reads --epochs epochs,
the first a warm-up; CPU time counts the main process and its workers; goals judged by CPU time.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (PHOTO_CACHE, child_options, cpu_seconds, dataset_line,  # noqa: E402
                    machine_line, make_params, median, parser, prepare, raw_params, run_child,
                    setup, sync, verdict, write_teacher_checkpoint)

GOALS = {"no_logits": 0.97, "image_folder": 1.3, "pil_bound": 0.8}  # paired / other, at least
GPU_GOAL = 2500  # crops/s of the GPU decode path, at least
LABELS = {"paired": "paired stream (images + logits)", "no_logits": "same stream, no logits",
          "image_folder": "torchvision ImageFolder, files",
          "pil_bound": "Pillow decode-only bound x workers",
          "decode_bound": "decode-only bound x workers", "paired_gpu": "paired, GPU decode"}
BOUNDS = ("pil_bound", "decode_bound")
VIEWS, TOPK = 2, 10
DEFAULTS = {"photo": (40, 25, 224), "small": (100, 30, 64)}  # classes, per class, crop
AUGMENT = {"crop_scale": [0.08, 1.0], "crop_ratio": [0.75, 1.3333333], "flip_probability": 0.5}


def build(work: Path, args, max_side: int) -> Path:
    """Shards, a logit store, the extracted ImageFolder tree and the params of one data set."""
    from PIL import Image

    from pipeline.store.dump import dump_logits

    manifest, data, shards = prepare(work, args.data, args.classes, args.per_class,
                                     max_side=max_side)
    folder = shards.parent / f"loader-max{max_side}-{args.image_size}px"
    folder.mkdir(parents=True, exist_ok=True)
    train = dict(arch="resnet8", image_size=args.image_size, epochs=1,
                 batch_size=args.batch_size, workers=args.workers)
    raw = raw_params(data, student=train, teacher={**train, "image_size": 16},
                     logits={"views": VIEWS, "topk": min(TOPK, args.classes - 1), "image_size": 16,
                             "batch_size": 256},
                     augment=AUGMENT)
    (folder / "params.json").write_text(json.dumps({"raw": raw, "shards": str(shards)}))
    checkpoint = write_teacher_checkpoint(folder / "teacher.pt", "resnet8",
                                          manifest["num_classes"], 16, manifest["fingerprint"])
    if not (folder / "teacher.zarr" / "zarr.json").is_file():
        dump_logits(make_params(raw), "teacher", str(shards), str(checkpoint),
                    str(folder / "teacher.zarr"))
    files = extract_image_folder(shards, manifest, folder / "image_folder")
    sizes = np.array([Image.open(path).size for path in files])
    print(f"data ({describe(args.data, max_side)}): {dataset_line(manifest)}; mean "
          f"{np.mean([path.stat().st_size for path in files]) / 1e3:.0f} KB, "
          f"{sizes[:, 0].mean():.0f} x {sizes[:, 1].mean():.0f} px; "
          f"{sum(s.stat().st_size for s in shards.glob('train-*.tar')) / 2**20:.1f} MiB of "
          f"train shards; crops {args.image_size} px, batch {args.batch_size}, store "
          f"V = {VIEWS}, top-{TOPK}")
    return folder


def describe(data: str, max_side: int) -> str:
    if data == "small":
        return "photo-like JPEG 64..96 px"
    return "photo-like JPEG 300..500 px, " + (
        f"re-encoded to max side {max_side}" if max_side else "files' own bytes")


def extract_image_folder(shards: Path, manifest: dict, root: Path) -> list[Path]:
    """root/class_LLLL/RRRRRRRRR.ext: every train sample's encoded bytes, unchanged."""
    from pipeline.stream.loader import read_shard, split_shards

    if not root.is_dir():
        for shard in split_shards(str(shards), manifest, "train"):
            for sample in read_shard(shard):
                extension = "jpg" if "jpg" in sample else "png"
                path = root / f"class_{sample['meta']['label']:04d}"
                path.mkdir(parents=True, exist_ok=True)
                (path / f"{sample['meta']['row']:09d}.{extension}").write_bytes(sample[extension])
    return sorted(root.glob("*/*.*"))


# ---------------------------------------------------------------------------------------------
# Children


def stream(folder: Path, kind: str, device: torch.device):
    """The run's TrainStream of `kind`: "paired" / "paired_gpu" replay the store, "no_logits"
    draws the views a store would hold."""
    from pipeline.data.manifest import load_manifest
    from pipeline.store import open_store
    from pipeline.stream.augment import DECODE, crop_spec
    from pipeline.stream.device_decode import DEVICE_DECODE
    from pipeline.stream.loader import TrainStream, split_shards
    from pipeline.stream.views import CachedViews, StoredViews

    saved = json.loads((folder / "params.json").read_text())
    params = make_params(saved["raw"])
    views = (CachedViews(params.seed, 0, params.seed, VIEWS, crop=crop_spec(params.augment))
             if kind == "no_logits" else
             StoredViews(open_store(str(folder / "teacher.zarr")), 0, params.seed))
    shards = split_shards(saved["shards"], load_manifest(saved["shards"]), "train")
    return TrainStream(shards, views, batch_size=params.student.batch_size,
                       image_size=params.student.image_size, workers=params.student.workers,
                       pin_memory=device.type == "cuda",
                       decode=DEVICE_DECODE if kind == "paired_gpu" else DECODE)


class DecodeFile:
    """ImageFolder's loader as users have it: Pillow's decode, as a (3, H, W) uint8 tensor for
    the v2 transforms (a class, so that DataLoader workers can pickle it)."""

    def __call__(self, path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def image_folder_loader(folder: Path, epoch: int):
    import torchvision
    from torchvision.transforms import v2

    params = make_params(json.loads((folder / "params.json").read_text())["raw"])
    augment, student = params.augment, params.student
    transform = v2.Compose([
        v2.RandomResizedCrop(student.image_size, scale=augment.crop_scale,
                             ratio=augment.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(augment.flip_probability)])
    dataset = torchvision.datasets.ImageFolder(str(folder / "image_folder"), loader=DecodeFile(),
                                               transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=student.batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(epoch),
                                       num_workers=student.workers)


def decode_bound_child(folder: Path, epochs: int, turbo: bool) -> dict:
    """The stream's own decode + crop + resize (view 0 of every train image, bytes in memory)
    in this process, per pass; `turbo=False`: Pillow's decode, as before simplejpeg."""
    from pipeline.data.manifest import load_manifest
    from pipeline.stream.augment import crop_spec, draw_views
    from pipeline.stream.decode import SourceImage
    from pipeline.stream.loader import _training_samples, read_shard, split_shards

    saved = json.loads((folder / "params.json").read_text())
    params = make_params(saved["raw"])
    samples = [sample for shard in split_shards(saved["shards"], load_manifest(saved["shards"]),
                                                "train") for sample in read_shard(shard)]
    sources = [SourceImage(sample, turbo=turbo) for sample in samples]
    boxes, flips = draw_views(params.seed, 1, [s["meta"]["row"] for s in samples],
                              [s.height for s in sources], [s.width for s in sources],
                              spec=crop_spec(params.augment))
    for i, sample in enumerate(samples):
        sample["views"] = [{"box": boxes[0, i], "flip": flips[0, i]}]
    stage = _training_samples(params.student.image_size)
    rates, cpu = [], []
    for _ in range(epochs):
        start, cpu_start = time.perf_counter(), cpu_seconds()
        for sample in samples:
            sample["image"] = SourceImage(sample, turbo=turbo)  # the header read: a worker's too
        count = sum(1 for _ in stage(iter(samples)))
        rates.append(count / (time.perf_counter() - start))
        cpu.append((cpu_seconds() - cpu_start) / count)
    return {"rates": rates, "cpu": cpu}


def time_child(folder: Path, kind: str, epochs: int, device: torch.device) -> dict:
    """Samples per second and CPU seconds per sample of each epoch."""
    from pipeline.stream.device_decode import batch_pixels

    if kind in BOUNDS:
        return decode_bound_child(folder, epochs, turbo=kind == "decode_bound")
    train = None if kind == "image_folder" else stream(folder, kind, device)
    size = json.loads((folder / "params.json").read_text())["raw"]["student"]["image_size"]
    rates, cpu = [], []
    for epoch in range(epochs):
        start, cpu_start, samples = time.perf_counter(), cpu_seconds(), 0
        loader = image_folder_loader(folder, epoch) if train is None else train.epoch(epoch)
        for batch in loader:
            if train is None:
                samples += len(batch[1])
            else:
                samples += len(batch["labels"])
                if device.type == "cuda":
                    batch_pixels(batch, device, size)  # (B, 3, S, S) uint8 on the GPU
        sync(device)()
        if train is None:
            del loader, batch  # shuts its workers down, so that their CPU time is counted
            gc.collect()
        rates.append(samples / (time.perf_counter() - start))
        cpu.append((cpu_seconds() - cpu_start) / samples)
    return {"rates": rates, "cpu": cpu}


# ---------------------------------------------------------------------------------------------
# Parent


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", choices=tuple(DEFAULTS), default="photo")
    p.add_argument("--max-side", type=int, nargs="+", help="photo: data.max_side of each "
                   "variant (default 0 256 320)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the first is warm-up")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--classes", type=int, help="default: 40 photo, 100 small")
    p.add_argument("--per-class", type=int, help="train images per class (25 / 30)")
    p.add_argument("--image-size", type=int, help="crop side (224 photo, 64 small)")
    args = p.parse_args()
    for key, value in zip(("classes", "per_class", "image_size"), DEFAULTS[args.data]):
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = setup(args)
    if args.child:
        folder, kind = args.child
        print(json.dumps(time_child(Path(folder), kind, args.epochs, device)))
        return

    print(f"loader throughput, {machine_line(args.device)}")
    sides = (args.max_side or [0, 256, 320]) if args.data == "photo" else [0]
    kinds = ("paired", "no_logits", "image_folder", *BOUNDS) + (
        ("paired_gpu",) if args.device == "cuda" else ())
    with tempfile.TemporaryDirectory(prefix="loader-") as scratch:
        work = Path(args.work or (PHOTO_CACHE if args.data == "photo" else scratch))
        folders = {side: build(work, args, side) for side in sides}
        runs = {side: {kind: [] for kind in kinds} for side in sides}
        for round_index in range(args.rounds):
            for side in sides:
                for kind in kinds[round_index % len(kinds):] + kinds[:round_index % len(kinds)]:
                    result = run_child(__file__, ["--child", str(folders[side]), kind,
                                                  *child_options(args, "epochs")])
                    scale = args.workers if kind in BOUNDS else 1
                    runs[side][kind].append({"rate": scale * median(result["rates"][1:]),
                                             "cpu": 1e3 * median(result["cpu"][1:])})
        print(f"{args.workers} DataLoader workers; samples/s: median over {args.epochs - 1} "
              f"epochs per run, then over {args.rounds} rounds (one fresh process per run, "
              "loaders alternating); bound: one process x workers")
        for side in sides:
            report(describe(args.data, side), runs[side])
    print(machine_line(args.device) + " (at the end)")


def report(title: str, runs: dict) -> None:
    """Samples/s and CPU ms per sample of each kind; the paired stream's ratios to the others
    by wall and by CPU time (samples/s = workers / CPU time per sample once the workers are
    the bottleneck, and CPU time is not inflated by other jobs)."""
    print(f" {title}:")
    for kind, records in runs.items():
        print(f"  {LABELS[kind]:<33} {median(r['rate'] for r in records):8.0f} samples/s   "
              f"(rounds: {', '.join(str(round(r['rate'])) for r in records)});  CPU "
              f"{median(r['cpu'] for r in records):6.2f} ms/sample"
              + (" (one process)" if kind in BOUNDS else " (all processes)"))

    def ratio(other, key, base="paired"):  # how many times better `base` is than `other`
        flip = key == "cpu"  # less CPU per sample is better
        return median((o[key] / p[key]) if flip else (p[key] / o[key])
                      for p, o in zip(runs[base], runs[other]))

    for other, goal in GOALS.items():
        wall, cpu = ratio(other, "rate"), ratio(other, "cpu")
        print(f"  paired / {LABELS[other]:<33} {wall:6.3f}x wall, {cpu:6.3f}x by CPU time "
              f"(goal >= {goal}: {verdict(cpu >= goal)} by CPU)")
    print(f"  paired / {LABELS['decode_bound']:<33} {ratio('decode_bound', 'cpu'):6.3f}x by "
          "CPU time (today's bound)")
    print(f"  decode-only bound: simplejpeg / Pillow     "
          f"{ratio('pil_bound', 'cpu', 'decode_bound'):6.3f}x less CPU per sample")
    if "paired_gpu" in runs:
        rate = median(r["rate"] for r in runs["paired_gpu"])
        print(f"  GPU decode path: {rate:.0f} crops/s (goal >= {GPU_GOAL}: "
              f"{verdict(rate >= GPU_GOAL)}); / the CPU path into the GPU "
              f"{ratio('paired', 'rate', 'paired_gpu'):.3f}x wall")


if __name__ == "__main__":
    main()
