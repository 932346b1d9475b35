"""Dump overhead: pipeline.store.dump.dump_logits vs the teacher's inference alone.

    python benchmarks/dump_overhead.py --rounds 3     # digits-LT and small JPEGs

The dump reads every train shard, decodes each image once, draws its V views, crops them, runs
the teacher (eval, no gradients, float32), keeps top-k, log-sum-exp and the class-prior sums,
and writes the Zarr shards. "Inference alone" is the teacher's forward passes on exactly the
batches the dump builds (per shard, per view, `logits.batch_size` rows at a time, the same
crops), decoded and cropped beforehand, each phase clocked on its own, so the dump's time
splits into read + decode, view drawing, crop, inference and the rest (top-k, log-sum-exp,
priors, store writes). Dump and inference alternate in fresh children (common's harness);
medians over rounds, the ratio the median of per-round ratios.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (alternate, child_options, dataset_line, forward_macs,  # noqa: E402
                    machine_line, make_params, median, median_ratio, parser, prepare,
                    raw_params, run_child, setup, verdict, write_teacher_checkpoint)

OVERHEAD_GOAL = 1.15  # dump time / teacher inference time, at most
DATASETS = {  # name -> data kind, classes, per class, teacher, crop side, V, top-k, augment
    # params.yaml's teacher and logits sections on the embedded data
    "digits": ("digits", 0, 0, "resnet20", 32, 8, 10,
               {"crop_scale": [0.35, 1.0], "flip_probability": 0.0}),
    "small": ("small", 100, 6, "resnet32", 64, 4, 10,
                  {"crop_scale": [0.08, 1.0], "flip_probability": 0.5}),
}


def build_dataset(name: str, work: Path, args) -> dict:
    kind, classes, per_class, arch, size, views, topk, augment = DATASETS[name]
    manifest, data, shards = prepare(work, kind, classes, per_class)
    folder = shards.parent / "dump_overhead"
    folder.mkdir(parents=True, exist_ok=True)
    teacher = dict(arch=arch, image_size=size, epochs=1, batch_size=64, workers=0)
    raw = raw_params(data, student={**teacher, "arch": "resnet8"}, teacher=teacher,
                     logits={"views": views, "topk": topk, "image_size": size,
                             "batch_size": args.batch_size, "prior_temperatures": [1.0, 100.0]},
                     augment=augment)
    make_params(raw)  # validated here, once
    (folder / "params.json").write_text(json.dumps({"raw": raw, "shards": str(shards)}))
    write_teacher_checkpoint(folder / "teacher.pt", arch, manifest["num_classes"], size,
                             manifest["fingerprint"])
    return {"name": name, "folder": folder, "manifest": manifest, "arch": arch,
            "size": size, "views": views, "topk": topk,
            "macs": forward_macs(arch, manifest["num_classes"], size)}


# ---------------------------------------------------------------------------------------------
# Children


def load(folder: Path):
    saved = json.loads((folder / "params.json").read_text())
    return make_params(saved["raw"]), saved["shards"]


def dump_child(folder: Path) -> dict:
    """One full dump_logits into a fresh store."""
    from pipeline.store.dump import dump_logits

    params, shards = load(folder)
    store = Path(tempfile.mkdtemp(dir=folder, prefix="store-"))
    start, cpu = time.perf_counter(), time.process_time()
    dump_logits(params, "teacher", shards, str(folder / "teacher.pt"), str(store / "t.zarr"))
    result = {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}
    shutil.rmtree(store)
    return result


def inference_child(folder: Path, device: torch.device) -> dict:
    """The dump's batches, built the dump's way, each phase clocked on its own (the teacher
    on `device`, where the dump runs it): phase -> {"wall": s, "cpu": s}."""
    from pipeline.data.manifest import load_manifest
    from pipeline.stream.augment import apply_view, crop_spec, draw_views, normalize
    from pipeline.stream.decode import decode
    from pipeline.stream.loader import read_shard, split_shards
    from pipeline.train.checkpoints import load_model

    params, shards_dir = load(folder)
    settings = params.logits
    teacher, _ = load_model(folder / "teacher.pt")
    teacher = teacher.to(device)
    totals = defaultdict(lambda: {"wall": 0.0, "cpu": 0.0})

    @contextmanager
    def clock(phase: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        totals[phase]["wall"] += time.perf_counter() - wall
        totals[phase]["cpu"] += time.process_time() - cpu

    with torch.no_grad():
        for shard in split_shards(shards_dir, load_manifest(shards_dir), "train"):
            with clock("read + decode"):
                samples = list(read_shard(shard))
                images = [decode(sample) for sample in samples]  # (3, H, W) uint8 each
            with clock("draw views"):
                boxes, flips = draw_views(params.seed, settings.views,
                                          [s["meta"]["row"] for s in samples],
                                          [i.shape[1] for i in images],
                                          [i.shape[2] for i in images],
                                          spec=crop_spec(params.augment))
            for view in range(settings.views):
                for start in range(0, len(images), settings.batch_size):
                    rows = slice(start, start + settings.batch_size)
                    with clock("crop"):
                        crops = torch.stack([
                            apply_view(image, box, bool(flip), settings.image_size)
                            for image, box, flip in zip(images[rows], boxes[view, rows],
                                                        flips[view, rows])])
                    with clock("inference"):
                        teacher(normalize(crops.to(device))).float().cpu()  # waits on CUDA
    return dict(totals)


# ---------------------------------------------------------------------------------------------
# Parent


def report(info: dict, runs: dict, args) -> None:
    manifest, dumps, inferences = info["manifest"], runs["dump"], runs["inference"]
    crops = manifest["splits"]["train"]["rows"] * info["views"]
    print(f"\n== {info['name']}: {dataset_line(manifest)}")
    print(f"   teacher {info['arch']} at {info['size']} px ({info['macs'] / 1e6:.1f} "
          f"MMAC/image), V = {info['views']} views, top-{info['topk']}, batch {args.batch_size}: "
          f"{crops} teacher forward passes per dump")
    for key in ("wall", "cpu"):
        dump = median(r[key] for r in dumps)
        phases = {name: median(r[name][key] for r in inferences) for name in inferences[0]}
        rest = dump - sum(phases.values())
        ratio = median_ratio(dumps, [i["inference"] for i in inferences], key)
        parts = ", ".join(f"{name} {seconds:.2f} s ({100 * seconds / dump:.1f}%)"
                          for name, seconds in phases.items())
        print(f"   {key:>4}: dump {dump:.2f} s = {parts}, rest {rest:.2f} s "
              f"({100 * rest / dump:.1f}%: top-k, log-sum-exp, priors, store writes; the dump "
              "minus the phases, so noise when negative)")
        print(f"   {key:>4}: dump / teacher inference alone: {ratio:.3f}x  (goal <= "
              f"{OVERHEAD_GOAL}: {verdict(ratio <= OVERHEAD_GOAL)}); inference "
              f"{1e3 * phases['inference'] / crops:.3f} ms/view, dump {1e3 * dump / crops:.3f} "
              "ms/view")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--batch-size", type=int, default=256, help="logits.batch_size")
    args = p.parse_args()
    device = setup(args)
    if args.child:
        mode, folder = args.child
        print(json.dumps(dump_child(Path(folder)) if mode == "dump"
                         else inference_child(Path(folder), device)))
        return
    print(f"dump overhead, {machine_line(args.device)}")
    print(f"each figure: median over {args.rounds} rounds, one fresh process per run, dump and "
          "inference alternating")
    with tempfile.TemporaryDirectory(prefix="dump_overhead-") as scratch:
        for name in args.datasets:
            info = build_dataset(name, Path(args.work or scratch), args)
            runs = alternate(args.rounds, ("dump", "inference"), lambda mode: run_child(
                __file__, ["--child", mode, str(info["folder"]), *child_options(args)],
                cwd=info["folder"]))
            report(info, runs, args)
    print(f"\n{machine_line(args.device)} (at the end)")


if __name__ == "__main__":
    main()
