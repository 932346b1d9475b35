"""The `inspect` command: summarise, look into, verify and plot a teacher logit store.

The computations are plain functions (`store_summary`, `topk_mass`, `coverage_stats`,
`view_details`, `plot_store`; verification is `pipeline.store.verify_store`); `inspect_command` only formats their results.
Register it with `cli.add_command(inspect_command, name="inspect")`.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import fsspec
import numpy as np

from pipeline.errors import UserError
from pipeline.data.manifest import verify_shards
from pipeline.stream.device_decode import describe_decode
from pipeline.store import MARKERS, LogitStore, open_store, verify_store

PERCENTILES = (1, 10, 50, 90)


def _fs_and_root(path: str):
    fs, root = fsspec.core.url_to_fs(path)
    return fs, root.rstrip("/")


def _du(fs, path: str) -> int:
    return int(fs.du(path, total=True)) if fs.exists(path) else 0


def bytes_on_disk(path: str) -> int:
    """Total size of every object under the store (local path or fsspec URL)."""
    fs, root = _fs_and_root(path)
    return _du(fs, root)


def rows_written(store: LogitStore) -> int:
    """Number of rows in shards marked complete."""
    return sum(stop - start for start, stop in map(store.shard_bounds, store.completed_shards()))


def store_summary(store: LogitStore) -> dict:
    """Shapes, dtypes, sizes and identity of a store, as a plain dict.

    bytes_per_view counts the stored chunk bytes of the per-view arrays (top-k, class ids,
    logsumexp, the tail when stored, box, flip) divided by the number of views written;
    raw_bytes_per_view is the same data uncompressed, and compression_ratio their quotient.
    """
    fs, root = _fs_and_root(store.path)
    arrays = {}
    view_arrays = store.array_names
    for name in view_arrays + ("labels", MARKERS):
        array = store.group[name]
        arrays[name] = {"shape": tuple(array.shape), "dtype": str(array.dtype),
                        "chunks": tuple(array.chunks),
                        "shards": tuple(array.shards) if array.shards else None,
                        "stored_bytes": _du(fs, f"{root}/{name}/c")}
    views_written = store.views * rows_written(store)
    stored = sum(arrays[name]["stored_bytes"] for name in view_arrays)
    raw_per_view = sum(store.group[name].dtype.itemsize * int(np.prod(store.group[name].shape[2:]))
                       for name in view_arrays)
    bytes_per_view = stored / views_written if views_written else float("nan")
    attrs = store.attributes
    return {
        "path": store.path, "teacher_name": attrs.get("teacher_name"),
        "teacher_arch": attrs.get("teacher_arch"), "teacher_sha256": attrs.get("teacher_sha256"),
        "fingerprint": attrs.get("fingerprint"), "seed": attrs.get("seed"),
        "format_version": attrs.get("format_version"),
        "decode": attrs.get("decode"), "decode_device": attrs.get("decode_device"),
        "views": store.views, "rows": store.rows, "topk": store.topk, "tail": store.tail,
        "num_classes": store.num_classes, "shard_rows": store.shard_rows,
        "complete": store.complete, "shards_complete": len(store.completed_shards()),
        "num_shards": store.num_shards, "temperatures": store.temperatures, "arrays": arrays,
        "bytes_on_disk": bytes_on_disk(store.path), "bytes_per_view": bytes_per_view,
        "raw_bytes_per_view": raw_per_view, "compression_ratio": raw_per_view / bytes_per_view,
    }


def topk_mass(store: LogitStore) -> np.ndarray:
    """(V, N) float32 probability mass of the top-k, sum_j exp(topk_log_probs_j);
    NaN for rows of shards not yet complete. Reads one inner chunk per shard and view."""
    mass = np.full((store.views, store.rows), np.nan, dtype=np.float32)
    for shard_index in sorted(store.completed_shards()):
        start, stop = store.shard_bounds(shard_index)
        for view in range(store.views):
            rows = store.read_rows(view, start, stop)
            log_probs = rows["topk_log_probs"].astype(np.float32)  # (n, k)
            mass[view, start:stop] = np.exp(log_probs).sum(-1)
    return mass


def coverage_stats(mass: np.ndarray) -> dict:
    """min, percentiles 1/10/50/90 and mean of the top-k mass over all written (view, row)."""
    values = mass[np.isfinite(mass)]
    if values.size == 0:
        return {"count": 0}
    stats = {"count": int(values.size), "min": float(values.min())}
    stats.update({f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES})
    stats["mean"] = float(values.mean())
    return stats


def view_details(store: LogitStore, row: int, view: int) -> dict:
    """One view of one row: top-k classes, names, logits and probabilities (exp(logit - lse)),
    residual mass 1 - sum, crop box (top, left, height, width) and flip; with every class's
    logit in the store (`store.exact_logits`), also the tail's logits (`tail_logits`, (C,) in
    class order, from `LogitStore.teacher_logits`)."""
    rows = store.read_rows(view, row, row + 1)
    logits = store.teacher_logits(view, row, row + 1)[0]  # (C,)
    classes = [int(c) for c in rows["topk_classes"][0]]
    probabilities = np.exp(rows["topk_log_probs"][0].astype(np.float32))  # (k,)
    return {
        "row": row, "view": view, "label": int(store.labels[row]),
        "classes": classes, "class_names": [store.class_names[c] for c in classes],
        "logits": logits[classes].tolist(), "probabilities": probabilities.tolist(),
        "residual": float(1.0 - probabilities.sum()), "logsumexp": float(rows["logsumexp"][0]),
        "box": rows["boxes"][0].tolist(), "flip": bool(rows["flips"][0]),
        "tail_logits": logits.tolist() if store.exact_logits else None,
    }


def plot_store(store: LogitStore, mass: np.ndarray, file: str,
               temperature: float | None = None) -> None:
    """Save a figure: histogram of the top-k mass and the (C, C) class prior at `temperature`
    (default: 1.0 if stored, else the lowest stored temperature)."""
    from matplotlib.figure import Figure  # Agg canvas; no pyplot global state

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    coverage_axes, prior_axes = figure.subplots(1, 2)
    values = mass[np.isfinite(mass)]
    coverage_axes.hist(values, bins=50, range=(0.0, max(1.0, float(values.max(initial=1.0)))))
    coverage_axes.set(title=f"top-{store.topk} probability mass ({values.size} views)",
                      xlabel="sum of top-k probabilities", ylabel="views")
    temperatures = store.temperatures
    if temperature is None and temperatures:
        temperature = 1.0 if 1.0 in temperatures else temperatures[0]
    if temperature is None:
        prior_axes.text(0.5, 0.5, "no class prior stored", ha="center", va="center")
        prior_axes.set_axis_off()
    else:
        image = prior_axes.imshow(store.class_prior(temperature), cmap="viridis")
        figure.colorbar(image, ax=prior_axes)
        prior_axes.set(title=f"class prior at T={temperature}", xlabel="predicted class",
                       ylabel="label")
    figure.suptitle(f"{store.attributes.get('teacher_name')} logit store")
    figure.savefig(file, dpi=100)


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def _echo_summary(summary: dict, stats: dict) -> None:
    s = summary
    click.echo(f"logit store {s['path']} (format {s['format_version']})")
    click.echo(f"  teacher      {s['teacher_name']} ({s['teacher_arch']}), "
               f"sha256 {s['teacher_sha256']}")
    click.echo(f"  fingerprint  {s['fingerprint']}   seed {s['seed']}")
    device = f" on {s['decode_device']}" if s["decode_device"] else ""
    click.echo(f"  decode       {describe_decode(s['decode'])}{device}")
    click.echo(f"  V={s['views']} views  N={s['rows']} rows  k={s['topk']}  C={s['num_classes']}  "
               f"tail={s['tail']}  shard_rows={s['shard_rows']}")
    click.echo(f"  complete     {s['complete']}   "
               f"shards complete {s['shards_complete']}/{s['num_shards']}   "
               f"class prior temperatures {s['temperatures']}")
    for line in _array_table(s["arrays"]):
        click.echo("  " + line)
    click.echo(f"  bytes on disk {s['bytes_on_disk']} ({_format_bytes(s['bytes_on_disk'])})")
    click.echo(f"  bytes per view {s['bytes_per_view']:.2f} (raw {s['raw_bytes_per_view']}), "
               f"compression ratio {s['compression_ratio']:.2f}x")
    if stats.get("count"):
        click.echo(f"coverage: top-{s['topk']} probability mass over {stats['count']} views")
        click.echo("  " + "  ".join(f"{key} {stats[key]:.4f}" for key in
                                     ("min", *(f"p{q}" for q in PERCENTILES), "mean")))
    else:
        click.echo("coverage: no shard written yet")


def _array_table(arrays: dict) -> list[str]:
    """One line per array, every column as wide as its widest cell (array names run from
    `flips` to `tail_coefficients`, shapes grow with N), under a header line."""
    header = ("array", "shape", "dtype", "shards", "chunks", "stored")
    cells = [header] + [(name, str(a["shape"]), a["dtype"], str(a["shards"] or "-"),
                         str(a["chunks"]), _format_bytes(a["stored_bytes"]))
                        for name, a in arrays.items()]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    return ["  ".join(cell.rjust(width) if column == len(header) - 1 else cell.ljust(width)
                      for column, (cell, width) in enumerate(zip(row, widths))).rstrip()
            for row in cells]


def _echo_view(details: dict) -> None:
    d = details
    click.echo(f"row {d['row']} view {d['view']}  label {d['label']}  "
               f"logsumexp {d['logsumexp']:.4f}")
    ranked = zip(d["classes"], d["class_names"], d["probabilities"])
    for rank, (cls, name, prob) in enumerate(ranked):
        click.echo(f"  {rank + 1:3d}. class {cls:5d} {name:24s} p={prob:.6f}")
    click.echo(f"  residual mass {d['residual']:.6f}")
    if d["tail_logits"] is not None:
        tail = np.asarray(d["tail_logits"])
        click.echo(f"  all {tail.size} logits: min {tail.min():.3f}  median "
                   f"{np.median(tail):.3f}  max {tail.max():.3f}")
    top, left, height, width = d["box"]
    click.echo(f"  box top={top:.4f} left={left:.4f} height={height:.4f} width={width:.4f}  "
               f"flip {d['flip']}")


@click.command(name="inspect", short_help="Summarise, verify or plot a teacher logit store.")
@click.argument("store_path", metavar="STORE")
@click.option("--row", type=int, default=None,
              help="Show one row's top-k classes, probabilities, residual mass, box and flip.")
@click.option("--view", type=int, default=0, show_default=True, help="View shown with --row.")
@click.option("--verify", is_flag=True,
              help="Read every chunk of every array and check it against its recorded "
                   "checksum, and that every shard is complete and finite; exit non-zero "
                   "naming each problem.")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Dataset manifest.json; with --verify, also check the store's fingerprint "
                   "and every tar shard's sha256.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG with the coverage histogram and the class prior matrix.")
@click.option("--temperature", type=float, default=None,
              help="Class prior temperature drawn by --plot (default 1.0 if stored).")
def inspect_command(store_path: str, row: int | None, view: int, verify: bool,
                    manifest: str | None, plot_file: str | None, temperature: float | None) -> None:
    """Summarise a teacher logit store STORE (a path or fsspec URL): shapes, sizes, identity and
    the coverage of the top-k probability mass; or show one view, verify, or plot it."""
    try:
        _inspect(store_path, row, view, verify, manifest, plot_file, temperature)
    except (FileNotFoundError, UserError) as error:  # e.g. a damaged chunk: one line
        raise click.ClickException(str(error)) from None


def _inspect(store_path: str, row: int | None, view: int, verify: bool, manifest: str | None,
             plot_file: str | None, temperature: float | None) -> None:
    if verify or manifest:
        fingerprint = None
        if manifest:
            try:
                with open(manifest, encoding="utf-8") as file:
                    fingerprint = json.load(file).get("fingerprint")
            except ValueError as error:  # truncated or not JSON: one line, not a traceback
                raise click.ClickException(f"manifest {manifest} is not valid JSON ({error}); "
                                           "rerun prepare") from None
            if fingerprint is None:
                raise click.ClickException(f"manifest {manifest} has no 'fingerprint' key")
        problems = verify_store(store_path, fingerprint=fingerprint, progress=True)
        if manifest:  # the tar shards too, against the manifest's sha256
            try:
                problems += verify_shards(str(Path(manifest).parent))
            except UserError as error:
                problems.append(str(error))
        if problems:
            raise click.ClickException("verify failed for " + store_path + ":\n  "
                                       + "\n  ".join(problems))
        store = open_store(store_path)
        checked = (" and matches the manifest fingerprint; every tar shard matches its sha256"
                   if manifest else "")
        click.echo(f"OK {store_path}: {store.num_shards} shards, {store.rows} rows x "
                   f"{store.views} views complete, every chunk matches its checksum{checked}")
        return
    store = open_store(store_path, require_complete=False)
    if row is not None:
        if not 0 <= row < store.rows or not 0 <= view < store.views:
            raise click.BadParameter(f"--row must be in [0, {store.rows}) and --view in "
                                     f"[0, {store.views})")
        if row // store.shard_rows not in store.completed_shards():
            raise click.ClickException(f"row {row} is in shard {row // store.shard_rows}, "
                                       "which is not written yet")
        _echo_view(view_details(store, row, view))
    mass = topk_mass(store) if row is None or plot_file else None
    if row is None:
        _echo_summary(store_summary(store), coverage_stats(mass))
    if plot_file:
        plot_store(store, mass, plot_file, temperature)
        click.echo(f"wrote {plot_file}")
