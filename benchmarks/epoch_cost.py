"""Student epoch cost: plain CE vs cached IKL-KD (m = 1, m = 2) vs online IKL-KD.

    python benchmarks/epoch_cost.py                      # both data sets, 3 rounds
    python benchmarks/epoch_cost.py --datasets digits --rounds 5

Same student (resnet8), same data, same batch size, same number of optimizer steps per epoch.
An *epoch* is N training samples, N = the train rows, i.e. ceil(N / B) optimizer steps, for every
configuration. With m = 2 views per decode one pass over the data yields 2N samples (each
decoded image gives two crops), i.e. two such epochs: its pass is timed and halved. The online
teacher (resnet32, >= 4x the student's forward FLOPs; printed) runs on the student's crops.

What is timed: the real training loop, pipeline.train.runs.train_student -> pipeline.train.loop.fit,
unchanged; its train loader is wrapped (common.TimedBatches) to clock each epoch from the
loader's creation to its exhaustion, so validation and checkpointing are left out. Each run
trains --epochs epochs in a fresh subprocess; the epochs after the first are measured (the first
warms up allocators and oneDNN kernels), per sample, as wall time and as the process's CPU time
(less sensitive to other processes on a shared machine); a run's figure is its fastest measured
epoch (other processes only add time). Configurations alternate within each round (their
order rotates from round to round); figures are medians over rounds, ratios medians of the
per-round ratios. The loader's own share is measured twice: as the time the loop waits inside
the loader's next() (DataLoader workers = 0: reading, decoding and cropping run in the loop's
process, serially with the model), and by iterating the same loader alone, without a model.

Data: the embedded digits-LT (DataParams defaults, 32 px PNG) and a generated set of 100
classes (4 train images each) of structured synthetic JPEGs of 64..96 px, trained at 64 px.
Teachers are untrained (BatchNorm calibrated): timing does not depend on what they know. Logit
stores come from pipeline.store.dump.dump_logits with V = 4 views, top-10.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (TimedBatches, dataset_line, forward_macs,  # noqa: E402
                    machine_line, make_params, median, prepare_digits, prepare_synthetic,
                    run_child, time_train_loaders, verdict, write_teacher_checkpoint)

CACHED_GOAL, CACHED_M2_GOAL, ONLINE_GOAL = 1.05, 0.85, 2.0
FKD_ANCHOR = 486.8 / 579.4  # FKD: cached soft labels vs plain training, ImageNet epoch time
CONFIGS = {  # name -> changes to the student section
    "plain": {"loss": "ce"},
    "cached": {"loss": "ikl"},
    "cached_m2": {"loss": "ikl", "views_per_decode": 2},
    "online": {"loss": "ikl", "online_teacher": True},
}
LABELS = {"plain": "plain CE", "cached": "cached IKL-KD, m = 1",
          "cached_m2": "cached IKL-KD, m = 2", "online": "online IKL-KD"}
LOADER_CONFIGS = ("plain", "cached", "cached_m2")  # the online run reads like plain
STUDENT, TEACHER = "resnet8", "resnet32"
VIEWS, TOPK = 4, 10


def raw_params(data, image_size: int, augment: dict, args) -> dict:
    train = dict(arch=STUDENT, image_size=image_size, epochs=args.epochs,
                 batch_size=args.batch_size, lr=0.05, warmup_epochs=0, workers=args.workers)
    return {
        "seed": 0,
        "data": {"source": data.source, "root": data.root, "imbalance_ratio": data.imbalance_ratio,
                 "val_per_class": data.val_per_class, "test_per_class": data.test_per_class,
                 "shard_size": data.shard_size, "workers": data.workers},
        "teachers": {"teacher": {**train, "arch": TEACHER}},
        "augment": augment,
        # batch 64: on a CPU, 256 crops of 64 px overflow the caches (twice the time per view)
        "logits": {"views": VIEWS, "topk": TOPK, "image_size": image_size, "batch_size": 64,
                   "prior_temperatures": [1.0, 100.0]},
        "student": {**train, "teacher": "teacher"},
        "evaluate": {"batch_size": 256},
    }


def build_dataset(name: str, work: Path, args) -> dict:
    """Shards, teacher checkpoint, logit store and params of one data set; returns its info."""
    from pipeline.store.dump import dump_logits

    data_folder = work / (name if name == "digits" else
                          f"synthetic-{args.classes}x{args.per_class}")
    folder = data_folder / "epoch_cost"
    folder.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        manifest, data = prepare_digits(data_folder)
        image_size, what = 32, "embedded digits-LT, 32 px PNG"
        augment = {"crop_scale": [0.35, 1.0], "crop_ratio": [0.75, 1.3333333],
                   "flip_probability": 0.0}  # params.yaml's
    else:
        manifest, data = prepare_synthetic(data_folder, args.classes, args.per_class)
        image_size, what = 64, "synthetic JPEG 64..96 px, trained at 64 px"
        augment = {"crop_scale": [0.08, 1.0], "crop_ratio": [0.75, 1.3333333],
                   "flip_probability": 0.5}
    raw = raw_params(data, image_size, augment, args)
    params = make_params(raw)
    (folder / "params.json").write_text(json.dumps({"raw": raw,
                                                    "shards": str(data_folder / "shards")}))
    checkpoint = write_teacher_checkpoint(folder / "teacher.pt", TEACHER,
                                          manifest["num_classes"], image_size,
                                          manifest["fingerprint"])
    store = folder / "teacher.zarr"
    dump_seconds = None
    if not (store / "zarr.json").is_file():
        start = time.perf_counter()
        dump_logits(params, "teacher", str(data_folder / "shards"), str(checkpoint), str(store))
        dump_seconds = time.perf_counter() - start
    classes = manifest["num_classes"]
    return {"name": name, "folder": folder, "manifest": manifest, "what": what,
            "image_size": image_size, "dump_seconds": dump_seconds,
            "student_macs": forward_macs(STUDENT, classes, image_size),
            "teacher_macs": forward_macs(TEACHER, classes, image_size)}


# ---------------------------------------------------------------------------------------------
# Children


def child_params(folder: Path, config: str, **changes):
    """The run's params with `config`'s student changes, and its shards folder."""
    saved = json.loads((folder / "params.json").read_text())
    saved["raw"]["student"].update(CONFIGS[config], **changes)
    return make_params(saved["raw"]), saved["shards"]


def train_child(folder: Path, config: str, epochs: int) -> dict:
    """Train the student `epochs` epochs with `config`; the loader-timed record of each."""
    from pipeline.train.runs import train_student

    (params, shards), log = child_params(folder, config, epochs=epochs), []
    time_train_loaders(log)
    run = Path(tempfile.mkdtemp(dir=folder, prefix=f"run-{config}-"))
    train_student(params, shards_dir=shards,
                  store_path=str(folder / "teacher.zarr"),
                  teacher_checkpoint=str(folder / "teacher.pt"), out_dir=str(run / "model"),
                  live_dir=str(run / "live"))
    shutil.rmtree(run)
    return {"epochs": log}


def loader_child(folder: Path, config: str, epochs: int) -> dict:
    """The same training loader alone, epochs 0 .. epochs - 1, as the student reads them."""
    from pipeline.train.runs import crop_spec
    from pipeline.data.manifest import load_manifest
    from pipeline.store import open_store
    from pipeline.stream.views import ViewSource
    from pipeline.stream.loader import split_shards, train_loader

    params, shards_dir = child_params(folder, config)
    settings = params.student
    shards = split_shards(shards_dir, load_manifest(shards_dir), "train")
    store = None if settings.loss == "ce" else open_store(str(folder / "teacher.zarr"))
    log = []
    for epoch in range(epochs):
        views = ViewSource(params.seed, epoch, settings.views_per_decode,
                           crop_spec(params.augment), store, cached_views=params.logits.views)
        for _ in TimedBatches(train_loader(shards, views, batch_size=settings.batch_size,
                                           image_size=settings.image_size,
                                           workers=settings.workers), log):
            pass
    return {"epochs": log}


# ---------------------------------------------------------------------------------------------
# Parent


def measure(info: dict, args) -> dict:
    """rounds x configs of training children and loader children, alternating; per run, the
    per-sample figures are medians over its epochs after the first."""
    names = list(CONFIGS)
    train_runs = {name: [] for name in names}
    loader_runs = {name: [] for name in LOADER_CONFIGS}
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            result = run_child(__file__, child_arguments(args, "train", info, name),
                               cwd=info["folder"])
            train_runs[name].append(per_sample(result["epochs"][1:]))
            if name in loader_runs:
                result = run_child(__file__, child_arguments(args, "loader", info, name),
                                   cwd=info["folder"])
                loader_runs[name].append(per_sample(result["epochs"][1:]))
    return {"train": train_runs, "loader": loader_runs}


def per_sample(epochs: list[dict]) -> dict:
    """Seconds per training sample (wall, CPU) and the loader-wait share of one run: its least
    disturbed measured epoch (the minimum; other processes only ever add time)."""
    best = min(epochs, key=lambda e: e["wall"] / e["samples"])
    return {"wall": best["wall"] / best["samples"],
            "cpu": min(e["cpu"] / e["samples"] for e in epochs),
            "wait": best["wait"] / best["wall"]}


def child_arguments(args, mode: str, info: dict, config: str) -> list[str]:
    return ["--child", mode, str(info["folder"]), config, "--threads", str(args.threads),
            "--epochs", str(args.epochs)]


def report(info: dict, runs: dict, args) -> None:
    manifest = info["manifest"]
    rows = manifest["splits"]["train"]["rows"]
    train, loader = runs["train"], runs["loader"]

    def figure(records, key):  # median over rounds
        return median(r[key] for r in records)

    def ratio(name, base, key):  # median of the per-round ratios
        return median(a[key] / b[key] for a, b in zip(train[name], train[base]))

    def spread(records):  # (max - min) / median of the wall figures: how noisy the rounds were
        values = [r["wall"] for r in records]
        return 100 * (max(values) - min(values)) / median(values)

    loader["online"] = loader["plain"]
    steps = -(-rows // args.batch_size)
    print(f"\n== {info['name']}: {info['what']}; {dataset_line(manifest)}; {args.epochs} "
          f"epochs per run, {args.epochs - 1} measured")
    print(f"   student {STUDENT} {info['student_macs'] / 1e6:.1f} MMAC/image, teacher {TEACHER} "
          f"{info['teacher_macs'] / 1e6:.1f} MMAC/image = "
          f"{info['teacher_macs'] / info['student_macs']:.1f}x the student's forward FLOPs; "
          f"batch {args.batch_size}; epoch = {rows} samples = {steps} optimizer steps; "
          f"V = {VIEWS}, top-{min(TOPK, manifest['num_classes'])}"
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
    print("   (s/epoch, ms/sample: wall; CPU: this process's CPU time; loader wait: share of the "
          "loop's wall time spent in the loader's next(); loader alone: CPU ms/sample of the "
          "same loader without a model; spread: (max - min) / median of the rounds' wall)")
    for key, what in (("wall", "wall"), ("cpu", "CPU ")):
        plain_share = figure(loader["plain"], key) / figure(train["plain"], key)
        cached, cached_m2 = ratio("cached", "plain", key), ratio("cached_m2", "plain", key)
        online = ratio("online", "cached", key)
        print(f"   {what}: cached / plain m = 1: {cached:5.3f}x (goal <= {CACHED_GOAL}: "
              f"{verdict(cached <= CACHED_GOAL)}); m = 2: {cached_m2:5.3f}x (goal <= "
              f"{CACHED_M2_GOAL}: {verdict(cached_m2 <= CACHED_M2_GOAL)}; FKD {FKD_ANCHOR:.2f}x); "
              f"online / cached: {online:5.3f}x (goal >= {ONLINE_GOAL}: "
              f"{verdict(online >= ONLINE_GOAL)}); plain step reading + decoding + cropping: "
              f"{plain_share * 100:.1f}%")
    alone = {name: figure(loader[name], "cpu") for name in LOADER_CONFIGS}
    print(f"   loader alone (CPU per sample; the bound when the model step is free, e.g. a GPU "
          f"fed by this loader): cached m = 1 / plain {alone['cached'] / alone['plain']:.3f}x, "
          f"cached m = 2 / plain {alone['cached_m2'] / alone['plain']:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "synthetic"],
                        choices=["digits", "synthetic"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers (0: the loader runs in the loop's process)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per run; the first is warm-up, the rest are measured "
                             "(default: 4 on digits, 3 on synthetic)")
    parser.add_argument("--classes", type=int, default=100, help="synthetic classes")
    parser.add_argument("--per-class", type=int, default=4, help="synthetic train images/class")
    parser.add_argument("--work", help="keep data, stores and runs here (default: a temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "CONFIG"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        mode, folder, config = args.child
        child = train_child if mode == "train" else loader_child
        print(json.dumps(child(Path(folder), config, args.epochs)))
        return

    print(f"epoch cost, {machine_line()}")
    print(f"DataLoader workers {args.workers}; each figure: median over {args.rounds} rounds, "
          "one fresh process per run, configurations alternating")
    with tempfile.TemporaryDirectory(prefix="epoch_cost-") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        for name in args.datasets:
            run_args = argparse.Namespace(**vars(args))
            run_args.epochs = args.epochs or {"digits": 4, "synthetic": 3}[name]
            info = build_dataset(name, work, run_args)
            report(info, measure(info, run_args), run_args)
    print(f"\n{machine_line()} (at the end)")


if __name__ == "__main__":
    main()
