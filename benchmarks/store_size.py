"""Store size: bytes per view of a logit store, per tail encoding and number of classes.

    python benchmarks/store_size.py                       # about a minute on 2 CPU cores
    python benchmarks/store_size.py --workspace DIR       # also a dumped store's own figures

Stores written by the project's own writer (Zarr v3 on disk, shards of 1,000 rows) from the
hierarchical teacher's logits (common.hierarchical_teacher) at C = 10, 100, 1000 and 8,142, with
RandomResizedCrop boxes and flips of 200..500 px images (max_image_side 512). Bytes per view:
every stored chunk of the per-view arrays, shard indexes included, divided by the views; the
tail basis is printed apart (it does not grow with the data).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from common import INATURALIST_CLASSES, hierarchical_teacher, machine_line  # noqa: E402
from pipeline.stream.augment import draw_views  # noqa: E402
from pipeline.tools.inspect import bytes_on_disk, store_summary  # noqa: E402
from pipeline.store import (  # noqa: E402
    TAIL_FIT_ROWS, create_store, finalize_store, fit_tail_basis, open_store, shard_bounds,
    write_shard, write_tail_basis)
from pipeline.store.tail import tail_components  # noqa: E402

GOALS = {("quantized", 100): 100.0, ("quantized", 1000): 850.0, ("none", 1000): 20.0,
         ("quantized", INATURALIST_CLASSES): 2000.0}
STRETCH = {("quantized", 1000): 700.0}
SHARD_ROWS = 1000


def write_store(path: str, logits: np.ndarray, labels: np.ndarray, topk: int, tail: str) -> None:
    rows, num_classes = logits.shape
    rng = np.random.default_rng(0)
    boxes, flips = draw_views(0, 1, np.arange(rows), rng.integers(200, 501, rows),
                              rng.integers(200, 501, rows))
    attributes = dict(teacher_name="t", teacher_arch="linear", teacher_sha256="0" * 64,
                      teacher_image_size=224, fingerprint="f", seed=0, augmentation={},
                      class_names=[str(c) for c in range(num_classes)], max_image_side=512)
    group = create_store(path, rows=rows, views=1, topk=topk, num_classes=num_classes,
                         shard_rows=SHARD_ROWS, tail=tail, attributes=attributes)
    if tail == "quantized":
        log_probs = torch.log_softmax(torch.from_numpy(logits[:TAIL_FIT_ROWS]).double(), 1)
        write_tail_basis(group, fit_tail_basis(log_probs.numpy(), tail_components(num_classes)))
    for index in range(-(-rows // SHARD_ROWS)):
        start, stop = shard_bounds(rows, SHARD_ROWS, index)
        write_shard(group, index, logits=logits[None, start:stop], boxes=boxes[:, start:stop],
                    flips=flips[:, start:stop], labels=labels[start:stop])
    finalize_store(group, {1.0: np.full((num_classes, num_classes), 1 / num_classes,
                                        np.float32)})


def report(path: str) -> tuple[float, dict, int]:
    """bytes per view, per array, and the tail basis' bytes."""
    summary = store_summary(open_store(path))
    views = summary["views"] * summary["rows"]
    per_array = {name: array["stored_bytes"] / views for name, array in summary["arrays"].items()
                 if name not in ("labels", "shard_complete")}
    basis = sum(bytes_on_disk(f"{path}/{name}") for name in
                ("tail_mean", "tail_basis", "tail_scales"))
    return summary["bytes_per_view"], per_array, basis


def print_row(label: str, per_view: float, per_array: dict, basis: int, goal: str) -> None:
    parts = " ".join(f"{name} {value:.1f}" for name, value in per_array.items())
    print(f"  {label:<24} {per_view:8.1f} B/view  ({parts}; basis {basis / 1024:.0f} KiB) {goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=None,
                        help="also report DIR/data/logits/*.zarr as dumped")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(machine_line())
    print("goals: quantized <= 100 B/view at C = 100, <= 850 at C = 1000 (stretch 700), "
          "<= 2000 at C = 8142; none at k = 5 <= 20; box and flip included")
    with tempfile.TemporaryDirectory() as work:
        for num_classes in (10, 100, 1000, INATURALIST_CLASSES):
            logits, _, labels = hierarchical_teacher(num_classes)
            logits, labels = logits.numpy(), labels.numpy()
            order = np.random.default_rng(1).permutation(len(labels))  # prepare shuffles rows
            logits, labels = logits[order], labels[order]
            print(f"\nC = {num_classes}: {len(labels)} views of the hierarchical teacher")
            for tail, topk in (("none", 5), ("quantized", 5), ("none", num_classes)):
                if topk > num_classes or (tail == "quantized" and topk >= num_classes) or (
                        topk == num_classes > 1000):  # k = C at 8,142: 265 MB, not a choice
                    continue
                path = f"{work}/c{num_classes}-{tail}-{topk}.zarr"
                write_store(path, logits, labels, topk, tail)
                per_view, per_array, basis = report(path)
                goal = GOALS.get((tail, num_classes if topk == 5 else -1))
                verdict = ""
                if goal is not None:
                    verdict = f"goal <= {goal:.0f}: {'met' if per_view <= goal else 'MISSED'}"
                    stretch = STRETCH.get((tail, num_classes))
                    if stretch:
                        verdict += (f"; stretch <= {stretch:.0f}: "
                                    f"{'met' if per_view <= stretch else 'missed'}")
                label = f"tail {tail}, k = {topk}" + (" (= C)" if topk == num_classes else "")
                print_row(label, per_view, per_array, basis, verdict)
    if args.workspace:
        print(f"\nstores of {args.workspace}")
        for path in sorted((args.workspace / "data" / "logits").glob("*.zarr")):
            store = open_store(str(path))
            per_view, per_array, basis = report(str(path))
            print_row(f"{path.name} (C = {store.num_classes}, k = {store.topk}, "
                      f"{store.tail})", per_view, per_array, basis, "")


if __name__ == "__main__":
    main()
