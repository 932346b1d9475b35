"""Dump overhead: pipeline.store.dump.dump_logits vs the teacher's inference alone on the same views.

    python benchmarks/dump_overhead.py                    # both data sets, 3 rounds
    python benchmarks/dump_overhead.py --profile          # also: cProfile of one dump

The dump reads every train shard, decodes each image once, draws its V views, crops them,
runs the teacher (eval, no gradients, float32), keeps top-k, log-sum-exp and the class-prior
sums, and writes the Zarr shards. "Inference alone" is the teacher's forward passes on exactly
the batches the dump builds (per shard, per view, `logits.batch_size` rows at a time, the same
crops), with the images decoded and cropped beforehand, outside the clock; that child also
times its decoding and cropping, so the dump's time splits into inference, decode, crop and the
rest (top-k, log-sum-exp, priors, store writes, bookkeeping).

Each measurement runs in a fresh subprocess, dump and inference alternating over --rounds
rounds; figures are medians over rounds (wall and the process's CPU time), the ratio is the
median of the per-round ratios. Teachers are untrained (BatchNorm calibrated): the cost of a
forward pass does not depend on the weights.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (alternate, dataset_line, forward_macs, machine_line,  # noqa: E402
                    make_params, median, median_ratio, prepare_digits, prepare_synthetic,
                    run_child, verdict, write_teacher_checkpoint)

OVERHEAD_GOAL = 1.15  # dump time / teacher inference time, at most
DATASETS = {  # name -> teacher arch, image size, views, top-k, augmentation
    # params.yaml's teacher and logits sections on the embedded data
    "digits": ("resnet20", 32, 8, 10, {"crop_scale": [0.35, 1.0], "flip_probability": 0.0}),
    "synthetic": ("resnet32", 64, 4, 10, {"crop_scale": [0.08, 1.0], "flip_probability": 0.5}),
}


def build_dataset(name: str, work: Path, args) -> dict:
    data_folder = work / (name if name == "digits" else
                          f"synthetic-{args.classes}x{args.per_class}")
    folder = data_folder / "dump_overhead"
    folder.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        manifest, data = prepare_digits(data_folder)
        what = "embedded digits-LT, 32 px PNG"
    else:
        manifest, data = prepare_synthetic(data_folder, args.classes, args.per_class)
        what = "synthetic JPEG 64..96 px"
    arch, image_size, views, topk, augment = DATASETS[name]
    teacher = dict(arch=arch, image_size=image_size, epochs=1, batch_size=64, workers=0)
    raw = {"seed": 0,
           "data": {"source": data.source, "root": data.root,
                    "imbalance_ratio": data.imbalance_ratio, "val_per_class": data.val_per_class,
                    "test_per_class": data.test_per_class, "shard_size": data.shard_size,
                    "workers": data.workers},
           "teachers": {"teacher": teacher}, "augment": augment,
           "logits": {"views": views, "topk": topk, "image_size": image_size,
                      "batch_size": args.batch_size, "prior_temperatures": [1.0, 100.0]},
           "student": {**teacher, "arch": "resnet8", "teacher": "teacher"}}
    make_params(raw)  # validate here, once
    (folder / "params.json").write_text(json.dumps({"raw": raw,
                                                    "shards": str(data_folder / "shards")}))
    write_teacher_checkpoint(folder / "teacher.pt", arch, manifest["num_classes"], image_size,
                             manifest["fingerprint"])
    return {"name": name, "folder": folder, "manifest": manifest, "what": what, "arch": arch,
            "image_size": image_size, "views": views, "topk": topk,
            "macs": forward_macs(arch, manifest["num_classes"], image_size)}


# ---------------------------------------------------------------------------------------------
# Children


def load(folder: Path):
    """The run's params and its shards folder."""
    saved = json.loads((folder / "params.json").read_text())
    return make_params(saved["raw"]), saved["shards"]


def dump_child(folder: Path) -> dict:
    """One full dump_logits into a fresh store."""
    from pipeline.store.dump import dump_logits

    params, shards = load(folder)
    store = Path(tempfile.mkdtemp(dir=folder, prefix="store-")) / "teacher.zarr"
    start, cpu = time.perf_counter(), time.process_time()
    dump_logits(params, "teacher", shards, str(folder / "teacher.pt"), str(store))
    result = {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}
    shutil.rmtree(store.parent)
    return result


class Clock:
    """Accumulates wall and CPU seconds per named phase."""

    def __init__(self):
        self.totals: dict[str, dict[str, float]] = {}
        self.name, self.start = None, None

    def __call__(self, name: str):
        self.name = name
        return self

    def __enter__(self):
        self.start = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc):
        total = self.totals.setdefault(self.name, {"wall": 0.0, "cpu": 0.0})
        total["wall"] += time.perf_counter() - self.start[0]
        total["cpu"] += time.process_time() - self.start[1]


def inference_child(folder: Path) -> dict:
    """The dump's batches, built the dump's way, each phase clocked on its own."""
    import webdataset as wds

    from pipeline.stream.augment import apply_view, draw_views, normalize
    from pipeline.stream.augment import crop_spec
    from pipeline.train.checkpoints import load_model
    from pipeline.data.manifest import load_manifest
    from pipeline.stream.decode import decode
    from pipeline.stream.loader import split_shards

    params, shards_dir = load(folder)
    settings = params.logits
    teacher, _ = load_model(folder / "teacher.pt")
    shards = split_shards(shards_dir, load_manifest(shards_dir), "train")
    clock = Clock()
    with torch.no_grad():
        for shard in shards:
            with clock("read + decode"):
                samples = list(wds.WebDataset(shard.url, shardshuffle=False))
                images = [decode(sample) for sample in samples]
                rows = [json.loads(sample["json"])["row"] for sample in samples]
            with clock("draw views"):
                boxes, flips = draw_views(params.seed, settings.views, rows,
                                          [i.shape[1] for i in images],
                                          [i.shape[2] for i in images],
                                          spec=crop_spec(params.augment))
            for view in range(settings.views):
                for start in range(0, len(images), settings.batch_size):
                    stop = start + settings.batch_size
                    with clock("crop"):
                        crops = torch.stack([apply_view(image, box, bool(flip),
                                                        settings.image_size)
                                             for image, box, flip in zip(
                                                 images[start:stop], boxes[view, start:stop],
                                                 flips[view, start:stop])])
                    with clock("inference"):
                        teacher(normalize(crops)).float()
    return clock.totals


def profile_child(folder: Path) -> dict:
    """cProfile of one dump: the functions with the most time of their own."""
    from pipeline.store.dump import dump_logits

    params, shards = load(folder)
    store = Path(tempfile.mkdtemp(dir=folder, prefix="store-")) / "teacher.zarr"
    profiler = cProfile.Profile()
    profiler.runcall(dump_logits, params, "teacher", shards, str(folder / "teacher.pt"),
                     str(store))
    shutil.rmtree(store.parent)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    return {"profile": text.getvalue()}


# ---------------------------------------------------------------------------------------------
# Parent


def measure(info: dict, args) -> dict:
    return alternate(args.rounds, ("dump", "inference"), lambda mode: run_child(
        __file__, ["--child", mode, str(info["folder"]), "--threads", str(args.threads)],
        cwd=info["folder"]))


def report(info: dict, runs: dict, args) -> None:
    manifest = info["manifest"]
    rows = manifest["splits"]["train"]["rows"]
    dumps, inferences = runs["dump"], runs["inference"]
    crops = rows * info["views"]
    print(f"\n== {info['name']}: {info['what']}; {dataset_line(manifest)}")
    print(f"   teacher {info['arch']} at {info['image_size']} px ({info['macs'] / 1e6:.1f} "
          f"MMAC/image), V = {info['views']} views, top-{info['topk']}, batch {args.batch_size}: "
          f"{crops} teacher forward passes per dump")
    for key, what in (("wall", "wall"), ("cpu", "CPU")):
        dump = median(r[key] for r in dumps)
        phases = {name: median(r[name][key] for r in inferences) for name in inferences[0]}
        rest = dump - sum(phases.values())
        ratio = median_ratio(dumps, [i["inference"] for i in inferences], key)
        parts = ", ".join(f"{name} {seconds:.2f} s ({100 * seconds / dump:.1f}%)"
                          for name, seconds in phases.items())
        print(f"   {what:>4}: dump {dump:.2f} s = {parts}, rest {rest:.2f} s "
              f"({100 * rest / dump:.1f}%: top-k, log-sum-exp, priors, store writes; the dump "
              "minus the phases, so noise when negative)")
        print(f"   {what:>4}: dump / teacher inference alone: {ratio:.3f}x  "
              f"(goal <= {OVERHEAD_GOAL}: {verdict(ratio <= OVERHEAD_GOAL)}); inference "
              f"{1e3 * phases['inference'] / crops:.3f} ms/view, dump {1e3 * dump / crops:.3f} "
              f"ms/view")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--batch-size", type=int, default=256, help="logits.batch_size")
    parser.add_argument("--classes", type=int, default=100, help="synthetic classes")
    parser.add_argument("--per-class", type=int, default=6, help="synthetic train images/class")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one dump")
    parser.add_argument("--work", help="keep data and stores here (default: a temp dir)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        mode, folder = args.child
        child = {"dump": dump_child, "inference": inference_child,
                 "profile": profile_child}[mode]
        print(json.dumps(child(Path(folder))))
        return

    print(f"dump overhead, {machine_line()}")
    print(f"each figure: median over {args.rounds} rounds, one fresh process per run, dump and "
          "inference alternating")
    with tempfile.TemporaryDirectory(prefix="dump_overhead-") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        for name in args.datasets:
            info = build_dataset(name, work, args)
            report(info, measure(info, args), args)
            if args.profile:
                result = run_child(__file__, ["--child", "profile", str(info["folder"]),
                                              "--threads", str(args.threads)],
                                   cwd=info["folder"])
                print("   profile of one dump (top 12 by own time):")
                print("\n".join("     " + line for line in result["profile"].splitlines()
                                if line.strip()))
    print(f"\n{machine_line()} (at the end)")


if __name__ == "__main__":
    main()
