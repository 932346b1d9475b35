"""WebDataset shard writing and the dataset manifest.

`prepare_shards` encodes a source's items (in worker processes), writes `train-%06d.tar`,
`val-...`, `test-...` with fixed tar metadata (same params -> byte-identical shards) and
`manifest.json`, whose content hash is the dataset fingerprint. Everything is written into a
`.partial` sibling folder that replaces the output folder only once complete, so a crash
never leaves a folder a later stage could mistake for finished; one prepare at a time writes
to a folder (pipeline.locks).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import fsspec
import webdataset as wds
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.locks import exclusive_writer
from pipeline.params import DataParams
from pipeline.storage import is_remote, storage_errors
from pipeline.data.manifest import MANIFEST, file_sha256
from pipeline.data.sources import Encoded, Item, SourceData, SourceError, encode_item, load_source

FORMAT_VERSION = 1


def prepare_shards(params: DataParams, seed: int, out_dir: str | Path) -> dict:
    """Source -> shards + manifest in `out_dir` (a folder, or an fsspec URL); returns the
    manifest. A second prepare into the same folder is refused while this one runs."""
    if is_remote(out_dir):
        return _prepare_to_url(params, seed, str(out_dir).rstrip("/"))
    out_dir = Path(out_dir)
    with exclusive_writer(out_dir, "prepare"):
        source = load_source(params, seed)
        partial_dir = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial_dir, ignore_errors=True)
        try:
            partial_dir.mkdir(parents=True)
            manifest = _write_all(source, params, partial_dir)
        except BaseException as error:  # leave nothing that looks like output, then re-raise
            shutil.rmtree(partial_dir, ignore_errors=True)
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                raise UserError(f"{partial_dir}: no space left on the device (disk full) while "
                                "writing the shards; free space there or pass an --out on a "
                                "larger disk, then rerun prepare") from None
            raise
        _replace_dir(partial_dir, out_dir)
    return manifest


def _prepare_to_url(params: DataParams, seed: int, url: str) -> dict:
    """Object storage has no folder rename: the shards are written in a local scratch folder,
    then uploaded, the old manifest deleted first and the new one put last, so no reader
    finds a manifest naming shards that are not all there."""
    with exclusive_writer(url, "prepare"), storage_errors(url), tempfile.TemporaryDirectory(
            prefix="prepare-") as scratch:
        local = Path(scratch) / "shards"
        manifest = prepare_shards(params, seed, local)
        fs, root = fsspec.core.url_to_fs(url)
        fs.invalidate_cache(root)
        if fs.exists(f"{root}/{MANIFEST}"):
            fs.rm_file(f"{root}/{MANIFEST}")
        files = sorted(path.name for path in local.iterdir() if path.name != MANIFEST)
        for name in files:
            fs.put_file(str(local / name), f"{root}/{name}")
        fs.invalidate_cache(root)
        stale = [key for key in fs.find(root) if key.startswith(f"{root}/")
                 and key.rsplit("/", 1)[-1] not in files and key != f"{root}/{MANIFEST}"]
        if stale:  # shards of an earlier, larger prepare
            fs.rm(stale)
        fs.put_file(str(local / MANIFEST), f"{root}/{MANIFEST}")
    return manifest


def _write_all(source: SourceData, params: DataParams, partial_dir: Path) -> dict:
    splits, skipped = {}, []
    for split, items in source.splits.items():
        splits[split], split_skipped, labels = _write_split(split, items, partial_dir, params)
        skipped += split_skipped
        if split == "train":
            train_counts = [labels.count(c) for c in range(len(source.class_names))]
    empty = [name for name, count in zip(source.class_names, train_counts) if not count]
    if empty:
        raise SourceError(f"class {empty[0]!r} has no train images left after skipping "
                          f"unreadable ones ({len(empty)} classes are empty)")
    manifest = _manifest(params.source, source, splits, train_counts, skipped)
    (partial_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write_split(split: str, items: list[Item], out_dir: Path, params: DataParams):
    """Encode and write one split's shards; rows are contiguous over the written samples."""
    shards, skipped, labels = [], [], []
    writer, shard_path, shard_start = None, None, 0
    max_side = 0  # the logit store sizes its exact box encoding by it
    try:
        for item, encoded in _encode_all(items, params, desc=f"encode {split}"):
            if isinstance(encoded, str):
                if not params.skip_bad_images:
                    raise SourceError(f"{encoded} (set data.skip_bad_images: true to skip and "
                                      "record such images)")
                skipped.append(item.path)
                continue
            row = len(labels)
            if row % params.shard_size == 0:
                if writer:
                    shards.append(_close_shard(writer, shard_path, shard_start, row))
                shard_start, shard_path = row, out_dir / f"{split}-{len(shards):06d}.tar"
                # Fixed user, group and mtime: same input -> byte-identical tar files.
                writer = wds.TarWriter(str(shard_path), user="", group="", mtime=0,
                                       encoder=False)
            writer.write(_sample(item, encoded, row))
            labels.append(item.label)
            max_side = max(max_side, encoded.stored_side)
    except BaseException:  # close the open shard file before the error propagates
        if writer:
            writer.close()
        raise
    if labels:
        shards.append(_close_shard(writer, shard_path, shard_start, len(labels)))
    info = {"rows": len(labels), "shards": shards, "max_image_side": max_side}
    return info, skipped, labels


def _encode_all(items: list[Item], params: DataParams, desc: str) -> Iterator[tuple]:
    """(item, Encoded or error string) in order, encoded by `params.workers` processes."""
    encode = partial(encode_item, max_side=params.max_side, jpeg_quality=params.jpeg_quality)
    progress = partial(tqdm, total=len(items), desc=desc, unit="img", mininterval=1.0)
    if params.workers == 0:
        yield from progress(zip(items, map(encode, items)))
        return
    with ProcessPoolExecutor(params.workers, mp_context=get_context("spawn")) as pool:
        yield from progress(zip(items, pool.map(encode, items, chunksize=64)))


def _sample(item: Item, encoded: Encoded, row: int) -> dict:
    meta = {"row": row, "label": item.label, "path": item.path,
            "width": encoded.width, "height": encoded.height}
    return {"__key__": f"{row:09d}", encoded.extension: encoded.data,
            "cls": str(item.label).encode(), "json": json.dumps(meta, sort_keys=True).encode()}


def _close_shard(writer: wds.TarWriter, path: Path, start: int, stop: int) -> dict:
    writer.close()
    return {"file": path.name, "rows": [start, stop], "sha256": file_sha256(path)}


def _manifest(source_name, source: SourceData, splits, train_counts, skipped) -> dict:
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": source_name,
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "train_counts": train_counts,
        "splits": splits,
        "skipped": {"count": len(skipped), "paths": skipped},
    }
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest["fingerprint"] = hashlib.sha256(canonical).hexdigest()
    # Recorded, but outside the fingerprint: deleting a .DS_Store changes no data.
    manifest["ignored"] = {"count": len(source.ignored), "paths": source.ignored}
    return manifest


def _replace_dir(new: Path, target: Path) -> None:
    """Swap `new` in for `target` (rename is atomic; the old folder is removed after)."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
