"""Store size: bytes per view of the teacher logit store, per array, at k = 5, 10, 100 and C.

    python benchmarks/store_size.py            # about a minute on 2 CPU cores

Every store is written and read through the real functions (`create_store`, `write_shard`,
`open_store(...).read_rows`) and measured as `pipeline.inspect.store_summary` does: the bytes
of the stored shard objects of each per-view array, divided by the number of views.

Encodings compared:
- `v1`: the previous encoding, Blosc zstd 5 with byte or bit shuffle and no filter (patched in
  for the measurement; `pipeline.store.array_codecs` no longer makes it);
- `chosen`: `pipeline.store.array_codecs` as the dump uses it, with the default stated image side
  (boxes exact in pixels on images up to 16,000 px);
- `chosen, side <= S`: the same with the `max_image_side` attribute the data allows (512 for the
  ImageNet-LT preset's re-encoded images, 32 for the embedded digits), which coarsens the
  fixed-point boxes to what such images can resolve.

Data:
- digits: the embedded teacher's store `data/logits/teacher.zarr` (C = 10, k = 10 = C), read and
  rewritten at k = 5 (its first 5 logits) and k = 10;
- synthetic, C = 1000: N(0, 2) logits with the label's boosted by 8 in 80 % of views, top-k
  sorted descending, exact logsumexp; boxes and flips from `pipeline.augment.draw_views` on
  images with heights and widths uniform in 200..500 px (ImageNet-like), default
  RandomResizedCrop scale/ratio and flip probability 0.5; V = 4, N = 4000, shards of 1000 rows.

Lossy parts, checked on every view: (1) boxes: `pixel_box` of the read-back box equals
`pixel_box` of the written one on its image (count of mismatches; must be 0); (2) logsumexp
(16 mantissa bits): relative error of the IKL-KD and KL-KD loss computed from the read-back
store vs from the written (uncompressed) top-k, both expanded with `expand_topk`. The student
is the teacher's full logits plus N(0, 1) noise (a fixed seed); IKL-KD with alpha = beta = 1,
T = 1, T2 = 100 (params.yaml's student), KL-KD at T = 1. Top-k logits, class ids and flips are
stored losslessly (bitwise; -0.0 would read as +0.0).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_name  # noqa: E402  (it also puts the checkout on the path)

import pipeline.store as store_module  # noqa: E402
from pipeline.augment import draw_views, pixel_box  # noqa: E402
from pipeline.inspect import store_summary  # noqa: E402
from pipeline.losses import expand_topk, ikl_kd_loss, kl_kd_loss  # noqa: E402
from pipeline.store import (  # noqa: E402
    VIEW_ARRAYS, class_id_dtype, create_store, finalize_store, open_store, shard_bounds,
    write_shard)

GOAL_BYTES = 20.0  # per view at k = 5, box and flip included
FKD_BYTES = 29.0  # FKD: top-5 fp16 probabilities + indices per crop, plus the box
LOSS_ERROR_GOAL = 0.5  # percent, compressed vs uncompressed top-k
DIGITS_STORE = Path(__file__).resolve().parents[1] / "data" / "logits" / "teacher.zarr"
IKL_OPTIONS = {"alpha": 1.0, "beta": 1.0, "temperature": 1.0, "weight_temperature": 100.0}
SHORT = {"topk_logits": "logits", "topk_classes": "ids", "logsumexp": "lse", "boxes": "boxes",
         "flips": "flips"}


def v1_codecs(name: str, dtype: np.dtype, **_: object) -> dict:
    """The encoding before this one: Blosc zstd 5 only (pipeline.store at format 1, first cut)."""
    dtype = np.dtype(dtype)
    byte_shuffled = name in ("topk_logits", "boxes") or (
        name == "topk_classes" and dtype.itemsize == 1)
    shuffle = BloscShuffle.shuffle if byte_shuffled else BloscShuffle.bitshuffle
    return {"filters": None, "compressors": [
        BloscCodec(cname="zstd", clevel=5, shuffle=shuffle, typesize=dtype.itemsize)]}


def synthetic_dump(views: int, rows: int, num_classes: int, seed: int = 0) -> dict:
    """Full logits (V, N, C) float32, labels, image sizes, boxes and flips (see module doc)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, rows)
    full = rng.normal(0.0, 2.0, (views, rows, num_classes)).astype(np.float32)  # (V, N, C)
    boosted = rng.random((views, rows)) < 0.8
    full[:, np.arange(rows), labels] += 8.0 * boosted
    heights = rng.integers(200, 501, rows)
    widths = rng.integers(200, 501, rows)
    boxes, flips = draw_views(seed, views, np.arange(rows), heights, widths)  # (V, N, 4), (V, N)
    return dict(full=full, labels=labels, heights=heights, widths=widths, boxes=boxes,
                flips=flips)


def digits_dump(path: Path) -> dict:
    """The embedded store's arrays, its 10 logits put back in class order as the full logits."""
    group = zarr.open_group(str(path), mode="r")
    logits = group["topk_logits"][:].astype(np.float32)  # (V, N, C), descending
    classes = group["topk_classes"][:].astype(np.int64)
    full = np.empty_like(logits)
    np.put_along_axis(full, classes, logits, axis=-1)
    views, rows, _ = logits.shape
    side = int(group.attrs["teacher_image_size"])  # digits images are side x side
    return dict(full=full, labels=group["labels"][:].astype(np.int64),
                heights=np.full(rows, side), widths=np.full(rows, side),
                boxes=group["boxes"][:], flips=group["flips"][:],
                logsumexp=group["logsumexp"][:], attributes=dict(group.attrs),
                shard_rows=int(group.attrs["shard_rows"]))


def topk_arrays(data: dict, topk: int) -> dict:
    """The arrays write_shard takes, at top-k, from a dump's full logits."""
    full = data["full"]
    order = np.argsort(-full, axis=-1, kind="stable")[..., :topk]  # (V, N, k)
    logsumexp = data.get("logsumexp")
    if logsumexp is None:
        logsumexp = np.log(np.exp(full.astype(np.float64)).sum(-1)).astype(np.float32)
    return dict(topk_logits=np.take_along_axis(full, order, -1).astype(np.float16),
                topk_classes=order.astype(class_id_dtype(full.shape[-1])),
                logsumexp=logsumexp, boxes=data["boxes"], flips=data["flips"])


def write_store(path: str, arrays: dict, labels: np.ndarray, shard_rows: int,
                attributes: dict) -> None:
    views, rows, topk = arrays["topk_logits"].shape
    num_classes = len(attributes["class_names"])
    group = create_store(path, rows=rows, views=views, topk=topk, num_classes=num_classes,
                         shard_rows=shard_rows, attributes=attributes)
    for index in range(math.ceil(rows / shard_rows)):
        start, stop = shard_bounds(rows, shard_rows, index)
        write_shard(group, index, **{name: array[:, start:stop] for name, array in arrays.items()},
                    labels=labels[start:stop])
    finalize_store(group, {1.0: np.full((num_classes, num_classes), 1 / num_classes, np.float32)})


def read_back(path: str, repeats: int = 3) -> tuple[dict, float]:
    """Every view of a store through read_rows, and the least seconds one pass took."""
    store = open_store(path)
    passes = []
    for _ in range(repeats):
        began = time.perf_counter()
        views = [store.read_rows(view, 0, store.rows) for view in range(store.views)]
        passes.append(time.perf_counter() - began)
    return {name: np.stack([view[name] for view in views]) for name in VIEW_ARRAYS}, min(passes)


def shard_index_bytes(summary: dict) -> float:
    """Bytes per view spent on the sharding codec's indexes: 16 B per inner chunk (offset and
    length) + a 4 B checksum, per stored shard object of each per-view array."""
    views, rows = summary["views"], summary["rows"]
    stored = sum(1 for name in VIEW_ARRAYS if summary["arrays"][name]["stored_bytes"])
    return stored * summary["num_shards"] * (16 * views + 4) / (views * rows)


def box_mismatches(written: np.ndarray, read: np.ndarray, heights, widths) -> int:
    """Views whose read-back box replays to another pixel box than the written one."""
    bad = 0
    for view in range(written.shape[0]):
        for row in range(written.shape[1]):
            size = (int(heights[row]), int(widths[row]))
            bad += pixel_box(written[view, row], *size) != pixel_box(read[view, row], *size)
    return bad


def loss_errors(data: dict, written: dict, read: dict) -> tuple[float, float]:
    """Percent relative error of IKL-KD and KL-KD, read-back vs written top-k (module doc)."""
    full = torch.from_numpy(data["full"].reshape(-1, data["full"].shape[-1]))  # (V*N, C)
    noise = torch.from_numpy(np.random.default_rng(5).normal(0.0, 1.0, full.shape))
    student = full + noise.float()

    def expanded(arrays: dict) -> torch.Tensor:
        def flat(name: str) -> torch.Tensor:
            array = arrays[name]
            return torch.from_numpy(array.reshape((-1,) + array.shape[2:]).astype(
                np.int64 if name == "topk_classes" else array.dtype))
        return expand_topk(flat("topk_logits"), flat("topk_classes"), flat("logsumexp"),
                           full.shape[1])

    teacher_written, teacher_read = expanded(written), expanded(read)
    errors = []
    for loss in (lambda t: ikl_kd_loss(student, t, **IKL_OPTIONS),
                 lambda t: kl_kd_loss(student, t, temperature=1.0)):
        reference = float(loss(teacher_written))
        errors.append(100.0 * abs(float(loss(teacher_read)) - reference) / abs(reference))
    return errors[0], errors[1]


def measure(data: dict, topk: int, encodings: dict, shard_rows: int, attributes: dict,
            workdir: str) -> list[dict]:
    written = topk_arrays(data, topk)
    results = []
    for label, (codecs, extra) in encodings.items():
        path = os.path.join(workdir, f"{attributes['teacher_name']}-k{topk}-{len(results)}.zarr")
        with mock.patch.object(store_module, "array_codecs", codecs):
            write_store(path, written, data["labels"], shard_rows, {**attributes, **extra})
        summary = store_summary(open_store(path))
        views = summary["views"] * summary["rows"]
        read, seconds = read_back(path)
        result = {"label": label, "seconds_per_view": seconds / views,
                  "index": shard_index_bytes(summary),
                  "raw": summary["raw_bytes_per_view"], "total": summary["bytes_per_view"],
                  **{name: summary["arrays"][name]["stored_bytes"] / views
                     for name in VIEW_ARRAYS}}
        exact = {name: read[name].tobytes() == written[name].tobytes() for name in VIEW_ARRAYS}
        result["lossless"] = [SHORT[name] for name in VIEW_ARRAYS if exact[name]]
        result["box_mismatches"] = box_mismatches(written["boxes"], read["boxes"],
                                                  data["heights"], data["widths"])
        result["lse_error"] = float(np.max(np.abs(read["logsumexp"] - written["logsumexp"])
                                           / np.abs(written["logsumexp"])))
        result["ikl_error"], result["kl_error"] = loss_errors(data, written, read)
        results.append(result)
    return results


def sorted_ids_bytes(written_ids: np.ndarray, shard_rows: int) -> float:
    """Bytes per view of the class ids in class order with delta coding (bitshuffle + zstd):
    what storing ids sorted would cost before the permutation back to logit order."""
    from zarr.codecs import numcodecs as zarr_numcodecs
    ids = np.sort(written_ids, axis=-1)
    views, rows, topk = ids.shape
    array = zarr.create_array(
        store=zarr.storage.MemoryStore(), shape=ids.shape, dtype=ids.dtype,
        shards=(views, shard_rows, topk), chunks=(1, shard_rows, topk),
        filters=[zarr_numcodecs.Delta(dtype=ids.dtype.str)],
        compressors=[BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle,
                                typesize=ids.dtype.itemsize)])
    array[:] = ids
    stored = sum(len(value.to_bytes()) for key, value in array.store._store_dict.items()
                 if key.startswith("c/"))
    return stored / (views * rows)


def print_table(title: str, rows_by_k: dict[int, list[dict]], notes: dict[int, str]) -> None:
    print(f"\n{title}")
    names = [SHORT[name] for name in VIEW_ARRAYS]
    print(f"  {'k':>5} {'encoding':<22}" + "".join(f"{n:>8}" for n in names)
          + f"{'total':>9}{'index':>7}{'raw':>7}{'ratio':>7}  {'read us/view':>12}")
    for topk, results in rows_by_k.items():
        for result in results:
            print(f"  {topk:>5} {result['label']:<22}"
                  + "".join(f"{result[name]:8.2f}" for name in VIEW_ARRAYS)
                  + f"{result['total']:9.2f}{result['index']:7.2f}{result['raw']:7d}"
                  f"{result['raw'] / result['total']:6.2f}x"
                  f"  {result['seconds_per_view'] * 1e6:12.2f}")
        if topk in notes:
            print(f"  {'':>5} {notes[topk]}")
    print("  (B per view; index: the part of total spent on shard indexes; read: least of 3 passes "
          "of read_rows over every view)")
    print("  lossy parts, every view checked (read-back vs written):")
    for topk, results in rows_by_k.items():
        for result in results:
            lossy = [n for n in names if n not in result["lossless"]]
            print(f"  {topk:>5} {result['label']:<22} lossy: {', '.join(lossy) or 'none':<12} "
                  f"box replay mismatches {result['box_mismatches']}, logsumexp max rel. error "
                  f"{result['lse_error']:.1e}; loss error IKL {result['ikl_error']:.4f} %, "
                  f"KL {result['kl_error']:.4f} %")


def machine_line() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
            f"zarr {zarr.__version__}, numpy {np.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000, help="synthetic rows N")
    parser.add_argument("--views", type=int, default=4, help="synthetic views V")
    parser.add_argument("--shard-rows", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=1000, help="synthetic classes C")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"machine: {machine_line()}")
    print(f"goal: <= {GOAL_BYTES:.0f} B per view at k = 5, box and flip included; lossy parts "
          f"within {LOSS_ERROR_GOAL} % of the uncompressed top-k loss and exact pixel boxes")
    print(f"anchors: FKD ~{FKD_BYTES:.0f} B per crop (top-5 fp16 + indices, plus the box); "
          "full 1000-class fp16 logits 2000 B")
    chosen = store_module.array_codecs
    totals_at_5 = {}
    with tempfile.TemporaryDirectory() as workdir:
        if DIGITS_STORE.exists():
            data = digits_dump(DIGITS_STORE)
            attributes = {key: value for key, value in data["attributes"].items()
                          if key not in store_module.SHAPE_ATTRIBUTES
                          + store_module.STATE_ATTRIBUTES + ("max_image_side",)}
            side = int(data["heights"].max())
            encodings = {"v1": (v1_codecs, {}), "chosen": (chosen, {}),
                         f"chosen, side <= {side}": (chosen, {"max_image_side": side})}
            num_classes = data["full"].shape[-1]
            rows_by_k = {k: measure(data, k, encodings, data["shard_rows"], attributes, workdir)
                         for k in sorted({5, num_classes})}
            views, rows = data["boxes"].shape[:2]
            print_table(f"digits: the embedded teacher's store (C = {num_classes}, V = {views}, "
                        f"N = {rows}, shards of {data['shard_rows']} rows, {side} px images)",
                        rows_by_k, {})
            totals_at_5["digits"] = (rows_by_k[5], num_classes)
        else:
            print(f"\ndigits: {DIGITS_STORE} not found (run `dvc repro dump_logits@teacher`)")

        data = synthetic_dump(args.views, args.rows, args.classes)
        attributes = dict(teacher_name="synthetic", teacher_arch="none", teacher_sha256="0" * 64,
                          teacher_image_size=224, fingerprint="synthetic",
                          class_names=[f"c{c}" for c in range(args.classes)],
                          augmentation={"generator": "synthetic"}, seed=0)
        encodings = {"v1": (v1_codecs, {}), "chosen": (chosen, {}),
                     "chosen, side <= 512": (chosen, {"max_image_side": 512})}
        rows_by_k, notes = {}, {}
        for topk in sorted({5, 10, 100, args.classes}):
            rows_by_k[topk] = measure(data, topk, encodings, args.shard_rows, attributes, workdir)
            if topk < args.classes:
                ids = topk_arrays(data, topk)["topk_classes"]
                in_order = rows_by_k[topk][1]["topk_classes"]
                sorted_bytes = sorted_ids_bytes(ids, args.shard_rows)
                permutation = math.log2(math.factorial(topk)) / 8
                notes[topk] = (f"ids in class order + delta: {sorted_bytes:.2f} B, + their "
                               f"permutation >= log2(k!)/8 = {permutation:.2f} B, = "
                               f"{sorted_bytes + permutation:.2f} B vs {in_order:.2f} B in "
                               "logit order (kept)")
        print_table(f"synthetic (C = {args.classes}, V = {args.views}, N = {args.rows}, shards "
                    f"of {args.shard_rows} rows, images 200..500 px)", rows_by_k, notes)
        totals_at_5["synthetic"] = (rows_by_k[5], args.classes)

    print("\nat k = 5 against the goal and anchors (full fp16 logits: 2 B per class):")
    for name, (results, num_classes) in totals_at_5.items():
        for result in results:
            ok = result["total"] <= GOAL_BYTES
            print(f"  {name:<10} {result['label']:<22} {result['total']:6.2f} B per view: "
                  f"goal <= {GOAL_BYTES:.0f} B {'met' if ok else 'MISSED'}; FKD ~{FKD_BYTES:.0f} B"
                  f" / this = {FKD_BYTES / result['total']:.2f}; {num_classes}-class fp16 "
                  f"logits ({2 * num_classes} B) / this = {2 * num_classes / result['total']:.1f}")


if __name__ == "__main__":
    main()
