"""Student epoch cost: plain CE vs cached IKL-KD (m = 1, m = 2) vs online IKL-KD.

    python benchmarks/epoch_cost.py --datasets small --rounds 2
    python benchmarks/epoch_cost.py --device cuda    # ResNet-50, 224 px, batch 256, bf16

The real training loop (train_student -> fit, unchanged) with its train loader wrapped
(common.time_train_loaders) to clock each epoch from the loader's creation to its exhaustion,
synchronised on CUDA; the same student, data and batch for every configuration; the epochs
after a run's first are measured, per sample (m = 2 yields two samples a decode), by wall and CPU
time, a run's figure its fastest measured epoch. The loader's share is measured twice: the
loop's wait in its next(), and the same stream alone without a model (on CUDA its pixels go
onto the GPU through batch_pixels). Setups in SETUPS and DATASETS; teachers untrained.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (TimedBatches, child_options, dataset_line, forward_macs,  # noqa: E402
                    machine_line, make_params, median, parser, prepare, raw_params, run_child,
                    setup, sync, time_train_loaders, verdict, write_teacher_checkpoint)

CACHED_GOAL, CACHED_M2_GOAL, ONLINE_GOAL = 1.05, 0.85, 2.0
WAIT_GOAL = 0.02  # on CUDA: share of a step spent waiting on the loader, at most
FKD_ANCHOR = 486.8 / 579.4  # FKD: cached soft labels vs plain training, ImageNet epoch time
CONFIGS = {"plain": {"loss": "ce"}, "cached": {"loss": "ikl"},  # changes to `student`
           "cached_m2": {"loss": "ikl", "views_per_decode": 2},
           "online": {"loss": "ikl", "online_teacher": True}}
LABELS = {"plain": "plain CE", "cached": "cached IKL-KD, m = 1",
          "cached_m2": "cached IKL-KD, m = 2", "online": "online IKL-KD"}
LOADER_CONFIGS = ("plain", "cached", "cached_m2")  # the online run reads like plain
SETUPS = {  # --device -> student, teacher, batch, workers, decode, data sets, epochs per run
    "cpu": dict(student="resnet8", teacher="resnet32", batch=64, workers=0, decode="auto",
                datasets=("digits", "small"), epochs=3),
    "cuda": dict(student="resnet50", teacher="resnet50", batch=256, workers=4, decode="gpu",
                 datasets=("photo",), epochs=3)}
WIDE = {"crop_scale": [0.08, 1.0], "crop_ratio": [0.75, 1.3333333], "flip_probability": 0.5}
DATASETS = {  # name -> kind, classes, train images per class, crop side, augment, description
    "digits": ("digits", 0, 0, 32, {"crop_scale": [0.35, 1.0], "flip_probability": 0.0},
               "embedded digits-LT, 32 px PNG"),
    "small": ("small", 100, 4, 64, WIDE, "photo-like JPEG 64..96 px, trained at 64 px"),
    "photo": ("photo", 100, 40, 224, WIDE, "photo-like JPEG 300..500 px, trained at 224 px")}
VIEWS, TOPK = 4, 10


def build_dataset(name: str, work: Path, args) -> dict:
    """Shards, teacher checkpoint, logit store and params of one data set; returns its info."""
    from pipeline.store.dump import dump_logits

    kind, classes, per_class, size, augment, what = DATASETS[name]
    manifest, data, shards = prepare(work, kind, classes, per_class)
    folder = shards.parent / f"epoch_cost-{args.device}"
    folder.mkdir(parents=True, exist_ok=True)
    train = dict(arch=args.student, image_size=size, epochs=args.epochs, lr=0.01,
                 batch_size=args.batch_size, warmup_epochs=0, workers=args.workers)
    raw = raw_params(data, student={**train, "decode": args.decode},
                     teacher={**train, "arch": args.teacher}, augment=augment,
                     # batch 64: on a CPU, 256 crops of 64 px overflow the caches
                     logits={"views": VIEWS, "topk": TOPK, "image_size": size,
                             "batch_size": 64 if args.device == "cpu" else 256,
                             "prior_temperatures": [1.0, 100.0]})
    (folder / "params.json").write_text(json.dumps({"raw": raw, "shards": str(shards)}))
    checkpoint = write_teacher_checkpoint(folder / "teacher.pt", args.teacher,
                                          manifest["num_classes"], size, manifest["fingerprint"])
    dump_seconds = None
    if not (folder / "teacher.zarr" / "zarr.json").is_file():
        start = time.perf_counter()
        dump_logits(make_params(raw), "teacher", str(shards), str(checkpoint),
                    str(folder / "teacher.zarr"))
        dump_seconds = time.perf_counter() - start
    classes = manifest["num_classes"]
    return {"name": name, "folder": folder, "manifest": manifest, "what": what,
            "dump_seconds": dump_seconds, "student_macs": forward_macs(args.student, classes, size),
            "teacher_macs": forward_macs(args.teacher, classes, size)}


# ---------------------------------------------------------------------------------------------
# Children


def child_params(folder: Path, config: str):
    saved = json.loads((folder / "params.json").read_text())
    saved["raw"]["student"].update(CONFIGS[config])
    return make_params(saved["raw"]), saved["shards"]


def train_child(folder: Path, config: str, device: torch.device) -> list:
    """Train the student with `config`; the loader-timed record of each epoch."""
    from pipeline.train.runs import train_student

    (params, shards), log = child_params(folder, config), []
    time_train_loaders(log, sync(device))
    run = Path(tempfile.mkdtemp(dir=folder, prefix=f"run-{config}-"))
    train_student(params, shards_dir=shards, store_path=str(folder / "teacher.zarr"),
                  teacher_checkpoint=str(folder / "teacher.pt"), out_dir=str(run / "model"),
                  live_dir=str(run / "live"))
    shutil.rmtree(run)
    return log


def loader_child(folder: Path, config: str, device: torch.device) -> list:
    """The same training stream alone, each batch's pixels onto `device`."""
    from pipeline.data.manifest import load_manifest
    from pipeline.store import open_store
    from pipeline.stream.augment import crop_spec
    from pipeline.stream.device_decode import batch_pixels
    from pipeline.stream.loader import TrainStream, split_shards
    from pipeline.stream.views import CachedViews, StoredViews
    from pipeline.train.runs import student_decode_path

    params, shards_dir = child_params(folder, config)
    settings = params.student
    store = None if settings.loss == "ce" else open_store(str(folder / "teacher.zarr"))
    views = (StoredViews(store, 0, params.seed, settings.views_per_decode) if store else
             CachedViews(params.seed, 0, params.seed, VIEWS, settings.views_per_decode,
                         crop_spec(params.augment)))
    stream = TrainStream(split_shards(shards_dir, load_manifest(shards_dir), "train"), views,
                         batch_size=settings.batch_size, image_size=settings.image_size,
                         workers=settings.workers, pin_memory=device.type == "cuda",
                         decode=student_decode_path(settings, device, store))
    log = []
    for epoch in range(settings.epochs):
        for batch in TimedBatches(stream.epoch(epoch), log, sync(device)):
            batch_pixels(batch, device, settings.image_size)  # (B, 3, S, S) uint8
    return log


# ---------------------------------------------------------------------------------------------
# Parent


def per_sample(epochs: list[dict]) -> dict:
    """Seconds per sample (wall, CPU) and the loader-wait share of one run's least disturbed
    measured epoch (other processes only ever add time)."""
    best = min(epochs, key=lambda e: e["wall"] / e["samples"])
    return {"wall": best["wall"] / best["samples"], "wait": best["wait"] / best["wall"],
            "cpu": min(e["cpu"] / e["samples"] for e in epochs)}


def measure(info: dict, args) -> dict:
    """Rounds of training and loader children, configurations alternating."""
    train, loader = {name: [] for name in CONFIGS}, {name: [] for name in LOADER_CONFIGS}
    options = child_options(args, "epochs", "student", "teacher", "batch_size", "workers",
                            "decode")
    for index in range(args.rounds):
        for name in list(CONFIGS)[index % 4:] + list(CONFIGS)[:index % 4]:
            for mode, runs in (("train", train), ("loader", loader)):
                if name in runs:
                    log = run_child(__file__, ["--child", mode, str(info["folder"]), name,
                                               *options], cwd=info["folder"])
                    runs[name].append(per_sample(log[1:]))
    loader["online"] = loader["plain"]
    return {"train": train, "loader": loader}


def report(info: dict, runs: dict, args) -> None:
    manifest, train, loader = info["manifest"], runs["train"], runs["loader"]
    rows = manifest["splits"]["train"]["rows"]

    def figure(records, key):  # median over rounds
        return median(r[key] for r in records)

    def ratio(name, base, key):  # median of the per-round ratios
        return median(a[key] / b[key] for a, b in zip(train[name], train[base]))

    def spread(records):  # (max - min) / median of the rounds' wall figures
        values = [r["wall"] for r in records]
        return 100 * (max(values) - min(values)) / median(values)

    print(f"\n== {info['name']}: {info['what']}; {dataset_line(manifest)}; {args.epochs} "
          f"epochs per run, {args.epochs - 1} measured")
    print(f"   student {args.student} {info['student_macs'] / 1e6:.1f} MMAC/image, teacher "
          f"{args.teacher} {info['teacher_macs'] / 1e6:.1f} MMAC/image = "
          f"{info['teacher_macs'] / info['student_macs']:.1f}x the student's forward FLOPs; "
          f"batch {args.batch_size}; epoch = {rows} samples = {-(-rows // args.batch_size)} "
          f"optimizer steps; V = {VIEWS}, top-{min(TOPK, manifest['num_classes'])}"
          + (f"; dump took {info['dump_seconds']:.1f} s" if info["dump_seconds"] else ""))
    print(f"   {'configuration':<21} {'s/epoch':>7} {'ms/sample':>9} {'vs plain':>8} "
          f"{'CPU ms/sample':>13} {'vs plain':>8} {'loader wait':>11} {'loader alone':>12} "
          f"{'spread':>6}")
    for name in CONFIGS:
        print(f"   {LABELS[name]:<21} {figure(train[name], 'wall') * rows:7.2f} "
              f"{figure(train[name], 'wall') * 1e3:9.3f} {ratio(name, 'plain', 'wall'):7.3f}x "
              f"{figure(train[name], 'cpu') * 1e3:13.3f} {ratio(name, 'plain', 'cpu'):7.3f}x "
              f"{figure(train[name], 'wait') * 100:10.1f}% "
              f"{figure(loader[name], 'cpu') * 1e3:9.3f} ms {spread(train[name]):5.0f}%")
    print("   (s/epoch, ms/sample: wall; CPU: this process and its workers; loader wait: share "
          "of the loop's wall time in the loader's next(); loader alone: CPU ms/sample of the "
          "same loader without a model; spread: (max - min) / median of the rounds' wall)")
    for key in ("wall", "cpu"):
        cached, cached_m2 = ratio("cached", "plain", key), ratio("cached_m2", "plain", key)
        online = ratio("online", "cached", key)
        share = figure(loader["plain"], key) / figure(train["plain"], key)
        print(f"   {key:<4}: cached / plain m = 1: {cached:5.3f}x (goal <= {CACHED_GOAL}: "
              f"{verdict(cached <= CACHED_GOAL)}); m = 2: {cached_m2:5.3f}x (goal <= "
              f"{CACHED_M2_GOAL}: {verdict(cached_m2 <= CACHED_M2_GOAL)}; FKD {FKD_ANCHOR:.2f}x); "
              f"online / cached: {online:5.3f}x (goal >= {ONLINE_GOAL}: "
              f"{verdict(online >= ONLINE_GOAL)}); the loader alone / a plain step: "
              f"{share * 100:.1f}%")
    if args.device == "cuda":  # a GPU step must not wait on its loader (the GPU check's goal)
        wait = max(figure(train[name], "wait") for name in LOADER_CONFIGS)
        print(f"   loader wait, the largest of plain and cached: {100 * wait:.1f}% (goal < "
              f"{100 * WAIT_GOAL:g}%: {verdict(wait < WAIT_GOAL)})")
    alone = {name: figure(loader[name], "cpu") for name in LOADER_CONFIGS}
    print(f"   loader alone (CPU per sample; the bound when the model step is free): cached "
          f"m = 1 / plain {alone['cached'] / alone['plain']:.3f}x, m = 2 / plain "
          f"{alone['cached_m2'] / alone['plain']:.3f}x")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--datasets", nargs="+", choices=tuple(DATASETS))
    for key in ("student", "teacher", "decode"):
        p.add_argument(f"--{key}")
    for key in ("batch_size", "workers", "epochs"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int,
                       help="default: " + ", ".join(f"{SETUPS[d][key.split('_')[0]]} on {d}"
                                                    for d in SETUPS))
    args = p.parse_args()
    for key, value in SETUPS[args.device].items():
        name = {"batch": "batch_size"}.get(key, key)
        if getattr(args, name) is None:
            setattr(args, name, value)
    device = setup(args)
    if args.child:
        mode, folder, config = args.child
        child = train_child if mode == "train" else loader_child
        print(json.dumps(child(Path(folder), config, device)))
        return
    print(f"epoch cost, {machine_line(args.device)}")
    print(f"DataLoader workers {args.workers}, student.decode {args.decode}; each figure: median "
          f"over {args.rounds} rounds, one fresh process per run, configurations alternating")
    with tempfile.TemporaryDirectory(prefix="epoch_cost-") as scratch:
        work = Path(args.work or scratch)
        for name in args.datasets:
            info = build_dataset(name, work, args)
            report(info, measure(info, args), args)
    print(f"\n{machine_line(args.device)} (at the end)")


if __name__ == "__main__":
    main()
