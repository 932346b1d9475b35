"""Loader throughput: the paired stream (images + cached logits) vs the same stream without
logits vs torchvision's ImageFolder reading individual files, all with the same decode and crop,
beside the decode-only bound.

    python benchmarks/loader.py                         # photo-like JPEGs, 224 px, 3 rounds
    python benchmarks/loader.py --data synthetic        # small synthetic JPEGs, 64 px
    python benchmarks/loader.py --max-side 0 --rounds 5 # only the files' own bytes
    python benchmarks/loader.py --profile               # also: where a worker's time goes

Data (--data):
- photo (default): photo-like JPEGs with ImageNet's sizes (common.photo_like: sides 300..500 px,
  quality 90, multi-scale texture, about 100 KB each; 40 classes x 25 train images), generated
  once into --work (default /tmp/ikl-distill-loader-photo, kept across runs), crops of 224 px.
  Each --max-side (default 0 256 320) is its own prepare of the same files: 0 keeps the files'
  bytes, 256 / 320 re-encode them to that longer side (`data.max_side`, quality 90).
- synthetic: structured synthetic JPEGs (100 classes, 64..96 px), crops of 64 px.
Shards of 256 rows by pipeline.data.shards; batch 64.
- paired: pipeline.stream.loader.train_loader with the logit store (pipeline.store.dump.dump_logits, V = 2,
  top-10; a small teacher at 16 px, since only the store's format matters here): stored boxes
  and flips replayed, logits attached to each sample;
- without logits: the same train_loader with no store (views drawn from the seed per segment);
- ImageFolder: torchvision.datasets.ImageFolder over the same train images, extracted from the
  shards byte for byte into root/class/row.jpg, decoded by Pillow (as users have it) and
  cropped by torchvision's v2 RandomResizedCrop (bilinear, antialias: apply_view's op) and
  RandomHorizontalFlip, in a DataLoader with shuffle and the default collate;
- decode-only bounds: every train image's bytes held in memory, then the stream's own
  per-sample work (pipeline.stream.loader's header read, decode + crop + resize of one view) in
  a tight loop in one process, times --workers: the most a CPU path with that many workers can
  deliver on this machine; "Pillow" with the decode before simplejpeg (SourceImage(...,
  turbo=False): the goal's bound, issue 24), the other with today's.
The two streams: one TrainStream per run, as a training run keeps (persistent workers, started
in the first epoch); ImageFolder: a new DataLoader per epoch (its default, worker start
included). CPU time counts the main process and its workers (live ones from /proc).
Each run, in a fresh subprocess, reads --epochs epochs; the first (warm page cache) is
not counted; samples per second are medians over the other epochs, then over rounds, with the
loaders and the bound alternating (order rotating) in each round. Ratios: medians of per-round
ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (dataset_line, machine_line, make_params, median,  # noqa: E402
                    prepare_photos, prepare_synthetic, run_child, verdict,
                    write_teacher_checkpoint)

# paired / other, at least (issue 15: realistic JPEGs at 224 px, 2 workers)
GOALS = {"no_logits": 0.97, "image_folder": 1.3, "pil_bound": 0.8}
LOADERS = ("paired", "no_logits", "image_folder")
KINDS = LOADERS + ("pil_bound", "decode_bound")
LABELS = {"paired": "paired stream (images + logits)", "no_logits": "same stream, no logits",
          "image_folder": "torchvision ImageFolder, files",
          "pil_bound": "Pillow decode-only bound x workers",
          "decode_bound": "decode-only bound x workers"}
BOUNDS = ("pil_bound", "decode_bound")
VIEWS, TOPK = 2, 10
PHOTO_CACHE = "/tmp/ikl-distill-loader-photo"
DEFAULTS = {  # per --data: classes, train images per class, crop side
    "photo": {"classes": 40, "per_class": 25, "image_size": 224},
    "synthetic": {"classes": 100, "per_class": 30, "image_size": 64},
}
AUGMENT = {"crop_scale": [0.08, 1.0], "crop_ratio": [0.75, 1.3333333], "flip_probability": 0.5}


def build(work: Path, args, max_side: int = 0) -> Path:
    """Shards, a logit store, the extracted ImageFolder tree and the run's params of one data
    set (for photos: one `data.max_side`)."""
    from pipeline.store.dump import dump_logits

    data_folder = work / f"{args.data}-{args.classes}x{args.per_class}"
    if args.data == "photo":
        manifest, data = prepare_photos(data_folder, args.classes, args.per_class,
                                        max_side=max_side)
        shards = data_folder / f"shards-max{max_side}"
    else:
        manifest, data = prepare_synthetic(data_folder, args.classes, args.per_class)
        shards = data_folder / "shards"
    folder = data_folder / f"loader-max{max_side}-{args.image_size}px"
    folder.mkdir(parents=True, exist_ok=True)
    train = dict(arch="resnet8", image_size=args.image_size, epochs=1,
                 batch_size=args.batch_size, workers=args.workers)
    raw = {"seed": 0,
           "data": {"source": data.source, "root": data.root,
                    "imbalance_ratio": data.imbalance_ratio, "val_per_class": data.val_per_class,
                    "test_per_class": data.test_per_class, "shard_size": data.shard_size,
                    "workers": data.workers, "max_side": data.max_side},
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
    print(f"data ({describe(args.data, max_side)}): {dataset_line(manifest)}; "
          f"{image_line(folder / 'image_folder')}; "
          f"{sum(s.stat().st_size for s in shards.glob('train-*.tar')) / 2**20:.1f} MiB of "
          f"train shards; crops {args.image_size} px, batch {args.batch_size}, store "
          f"V = {VIEWS}, top-{TOPK}")
    return folder


def describe(data: str, max_side: int) -> str:
    if data == "synthetic":
        return "synthetic JPEG 64..96 px"
    return "photo-like JPEG 300..500 px, " + (
        f"re-encoded to max side {max_side}" if max_side else "files' own bytes")


def image_line(root: Path) -> str:
    """Mean file size and mean pixel size of the extracted train images."""
    from PIL import Image

    files = sorted(root.glob("*/*.*"))
    sizes = [Image.open(path).size for path in files]
    return (f"mean {sum(p.stat().st_size for p in files) / len(files) / 1e3:.0f} KB, "
            f"{sum(w for w, _ in sizes) / len(sizes):.0f} x "
            f"{sum(h for _, h in sizes) / len(sizes):.0f} px")


def extract_image_folder(shards: Path, manifest: dict, root: Path) -> None:
    """root/class_LLLL/RRRRRRRRR.ext: every train sample's encoded bytes, unchanged."""
    import webdataset as wds

    from pipeline.stream.loader import split_shards

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
    params' DataLoader workers. The streams: a TrainStream whose `epoch(e)` gives epoch e, as
    a training run keeps one (its workers start once)."""
    from pipeline.train.runs import crop_spec
    from pipeline.data.manifest import load_manifest
    from pipeline.store import open_store
    from pipeline.stream.loader import TrainStream, split_shards
    from pipeline.stream.views import ViewSource

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
    return TrainStream(shards, views, batch_size=settings.batch_size,
                       image_size=settings.image_size, workers=settings.workers)


class DecodeFile:
    """ImageFolder's loader as users have it: Pillow's decode of the file, as a (3, H, W)
    uint8 tensor for the v2 transforms (a class, not a lambda, so DataLoader workers can
    pickle it)."""

    def __call__(self, path: str) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


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


def decode_bound_child(folder: Path, epochs: int, turbo: bool = True) -> dict:
    """Samples per second of the stream's own decode + crop + resize stage (view 0 of every
    train image, bytes already in memory) in this one process, per pass over the data;
    `turbo=False`: with Pillow's decode, as before simplejpeg (the goal's bound)."""
    from pipeline.stream.augment import draw_views
    from pipeline.train.runs import crop_spec
    from pipeline.data.manifest import load_manifest
    from pipeline.stream.decode import SourceImage
    from pipeline.stream.loader import _training_samples, read_shard, split_shards

    saved = json.loads((folder / "params.json").read_text())
    params = make_params(saved["raw"])
    samples = []
    for shard in split_shards(saved["shards"], load_manifest(saved["shards"]), "train"):
        samples += list(read_shard(shard))
    for sample in samples:
        sample["image"] = SourceImage(sample, turbo=turbo)  # decoded anew each pass below
    heights, widths = zip(*((s["image"].height, s["image"].width) for s in samples))
    boxes, flips = draw_views(params.seed, 1, [s["meta"]["row"] for s in samples], heights,
                              widths, spec=crop_spec(params.augment))
    for i, sample in enumerate(samples):
        sample["views"] = [{"box": boxes[0, i], "flip": flips[0, i]}]
    stage = _training_samples(params.student.image_size)
    rates, cpu = [], []
    for _ in range(epochs):
        start, cpu_start = time.perf_counter(), process_cpu()
        for sample in samples:
            sample["image"] = SourceImage(sample, turbo=turbo)  # header read: a worker's too
        count = sum(1 for _ in stage(iter(samples)))
        rates.append(count / (time.perf_counter() - start))
        cpu.append((process_cpu() - cpu_start) / count)
    return {"rates": rates, "cpu": cpu, "samples": count}


def process_cpu() -> float:
    """CPU seconds of this process and of its children: the waited-for ones (DataLoader
    workers, once an epoch's loader has shut them down) from getrusage, the live ones
    (persistent workers) from /proc; load on the machine does not inflate it."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
            + live_children_cpu())


def live_children_cpu() -> float:
    """CPU seconds (user + system) of this process's children still running."""
    import os

    ticks, total = os.sysconf("SC_CLK_TCK"), 0
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == me:  # ppid; utime, stime are fields 14, 15 of stat
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def time_child(folder: Path, kind: str, epochs: int) -> dict:
    """Samples per second of each epoch: the streams from one TrainStream (workers started
    once, in the first epoch), ImageFolder from a fresh DataLoader each epoch (its default:
    worker start included). CPU time: this process and its workers (`worker_cpu`)."""
    if kind in BOUNDS:
        return decode_bound_child(folder, epochs, turbo=kind == "decode_bound")
    rates, cpu = [], []
    stream = make_loader(folder, kind, 0) if kind != "image_folder" else None
    for epoch in range(epochs):
        start, cpu_start, samples = time.perf_counter(), process_cpu(), 0
        loader = make_loader(folder, kind, epoch) if stream is None else stream.epoch(epoch)
        for batch in loader:
            samples += samples_in(batch)
        if stream is None:
            del loader, batch  # shuts the workers down, so their CPU time is counted
            gc.collect()
        rates.append(samples / (time.perf_counter() - start))
        cpu.append((process_cpu() - cpu_start) / samples)
    return {"rates": rates, "cpu": cpu, "samples": samples}


def profile_child(folder: Path, kind: str) -> dict:
    """cProfile of one epoch read in this process (workers 0): a worker's work."""
    import pipeline.train.runs  # noqa: F401  (imports outside the profile)

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
    parser.add_argument("--data", choices=tuple(DEFAULTS), default="photo")
    parser.add_argument("--max-side", type=int, nargs="+", default=None,
                        help="photo: data.max_side of each variant (default 0 256 320)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs per run; the first is warm-up")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, help="default: 40 photo, 100 synthetic")
    parser.add_argument("--per-class", type=int, help="train images per class (25 / 30)")
    parser.add_argument("--image-size", type=int, help="crop side (224 photo, 64 synthetic)")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of one epoch of each loader, in-process")
    parser.add_argument("--work", help="keep data and store here (default: photo "
                        f"{PHOTO_CACHE}, synthetic a temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "LOADER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(1)
    if args.child:
        mode, folder, kind = args.child
        result = (time_child(Path(folder), kind, args.epochs) if mode == "time"
                  else profile_child(Path(folder), kind))
        print(json.dumps(result))
        return

    print(f"loader throughput, {machine_line()}")
    sides = (args.max_side or [0, 256, 320]) if args.data == "photo" else [0]
    work = args.work or (PHOTO_CACHE if args.data == "photo" else None)
    with tempfile.TemporaryDirectory(prefix="loader-") as scratch:
        folders = {side: build(Path(work or scratch), args, side) for side in sides}
        rates = {side: {kind: [] for kind in KINDS} for side in sides}
        cpu = {side: {kind: [] for kind in KINDS} for side in sides}
        for round_index in range(args.rounds):
            for side in sides:
                order = (KINDS[round_index % len(KINDS):]
                         + KINDS[:round_index % len(KINDS)])
                for kind in order:
                    result = run_child(__file__, [
                        "--child", "time", str(folders[side]), kind, "--epochs",
                        str(args.epochs), "--data", args.data], cwd=folders[side])
                    scale = args.workers if kind in BOUNDS else 1
                    rates[side][kind].append(scale * median(result["rates"][1:]))
                    cpu[side][kind].append(1e3 * median(result["cpu"][1:]))
        print(f"{args.workers} DataLoader workers; samples/s: median over {args.epochs - 1} "
              f"epochs per run, then over {args.rounds} rounds (one fresh process per run, "
              "loaders alternating); bound: one process x workers")
        for side in sides:
            report(describe(args.data, side), rates[side], cpu[side])
        if args.profile:
            for side in sides:
                print_profiles(folders[side], describe(args.data, side))
    print(machine_line() + " (at the end)")


def report(title: str, rates: dict, cpu: dict) -> None:
    """Wall-clock samples/s and their ratios, then the same ratios from CPU time per sample
    (all processes of a loader: main and workers), which other jobs on a shared machine do not
    inflate: samples/s = workers / CPU time per sample once the workers are the bottleneck."""
    print(f" {title}:")
    for kind in KINDS:
        print(f"  {LABELS[kind]:<32} {median(rates[kind]):8.0f} samples/s   (rounds: "
              f"{', '.join(f'{v:.0f}' for v in rates[kind])});  CPU {median(cpu[kind]):6.2f} "
              "ms/sample" + (" (one process)" if kind in BOUNDS else " (all processes)"))
    for other, goal in GOALS.items():
        ratio = median(p / o for p, o in zip(rates["paired"], rates[other]))
        by_cpu = median(o / p for p, o in zip(cpu["paired"], cpu[other]))
        print(f"  paired / {LABELS[other]:<31} {ratio:6.3f}x wall, {by_cpu:6.3f}x by CPU time "
              f"(goal >= {goal}: {verdict(ratio >= goal)} wall, {verdict(by_cpu >= goal)} CPU)")
    by_cpu = median(o / p for p, o in zip(cpu["paired"], cpu["decode_bound"]))
    print(f"  paired / {LABELS['decode_bound']:<31} {by_cpu:6.3f}x by CPU time (the new bound)")
    by_cpu = median(p / o for p, o in zip(cpu["pil_bound"], cpu["decode_bound"]))
    print(f"  decode-only bound: simplejpeg / Pillow  {by_cpu:6.3f}x less CPU per sample")


def print_profiles(folder: Path, title: str) -> None:
    for kind in LOADERS:
        result = run_child(__file__, ["--child", "profile", str(folder), kind], cwd=folder)
        print(f"  profile ({title}), {LABELS[kind]}, one epoch in-process: "
              f"{1e3 * result['total'] / result['samples']:.3f} ms/sample "
              "(profiled), top 10 by own time:")
        print("\n".join("     " + line for line in result["profile"].splitlines()
                        if line.strip() and not line.lstrip().startswith(
                            ("Ordered", "List reduced"))))


if __name__ == "__main__":
    main()
