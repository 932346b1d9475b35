"""Swapping a finished replacement store in for the old one, on a local disk or object storage.

A local disk (and fsspec's local filesystem) renames folders atomically: the old store moves
aside, the new one moves in, the old one is deleted. Object storage (S3, GCS, ...) has no
rename: fsspec's `mv` copies every object and then deletes the sources, so a kill in between
leaves two half stores, and a listing cached by one fsspec instance can miss objects another
wrote (tests/test_s3.py met both). There the swap is a sequence of single-object operations,
ordered so that every prefix of it, interrupted, leaves a state the rerun recognises:

1. the old store's root metadata (`zarr.json`, which holds `complete`) is deleted first, so a
   half-deleted old store is never a store; then its other objects;
2. the replacement's objects are copied to the store's prefix, its root metadata last, so a
   half-copied store is never a store either;
3. the replacement's root metadata is deleted first, then its other objects.

Until step 2 ends, the replacement is complete and the store's prefix holds no store: the
rerun (`pipeline.store.dump`) finishes the swap. After it, the store is complete and the
replacement is no store: the rerun keeps the store and clears the replacement's leftovers.
"""

from __future__ import annotations

import fsspec
from fsspec.implementations.local import LocalFileSystem

ROOT_METADATA = "zarr.json"  # the group's metadata and attributes, `complete` among them


def swap_in(replacement: str, store_path: str) -> None:
    """Put the complete store at `replacement` (a path or fsspec URL) in place of `store_path`
    (absent, or an old store, or a swap interrupted at any point), and remove the replacement."""
    fs, path = fsspec.core.url_to_fs(store_path)
    _, new = fsspec.core.url_to_fs(replacement)
    if isinstance(fs, LocalFileSystem):
        _rename_in(fs, new, path)
    else:
        _copy_in(fs, new, path)


def remove_store(store_path: str) -> None:
    """Delete the store (or its leftovers) at `store_path`, root metadata first; nothing there
    is fine."""
    fs, path = fsspec.core.url_to_fs(store_path)
    if isinstance(fs, LocalFileSystem):
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        _delete_objects(fs, path)


def leftovers(store_path: str) -> bool:
    """True when anything is stored under `store_path` (one listing request on object
    storage)."""
    fs, path = fsspec.core.url_to_fs(store_path)
    fs.invalidate_cache(path)
    return bool(fs.exists(path))


def _rename_in(fs, new: str, path: str) -> None:
    old = path + ".old"
    if fs.exists(path):
        if fs.exists(old):
            fs.rm(old, recursive=True)
        fs.mv(path, old, recursive=True)
    fs.mv(new, path, recursive=True)
    if fs.exists(old):
        fs.rm(old, recursive=True)


def _copy_in(fs, new: str, path: str) -> None:
    _delete_objects(fs, path)  # 1.
    sources = _objects(fs, new)  # 2.
    root = f"{new}/{ROOT_METADATA}"
    for source in sorted(sources, key=lambda name: name == root):  # the root last
        fs.copy(source, path + source[len(new):])
    _delete_objects(fs, new)  # 3.


def _objects(fs, prefix: str) -> list[str]:
    """Every object under `prefix`, listed afresh: fsspec caches listings per instance, and
    this instance's cache knows nothing of what zarr's own instance wrote."""
    fs.invalidate_cache(prefix)
    return [name for name in fs.find(prefix) if name.startswith(prefix + "/")]


def _delete_objects(fs, prefix: str) -> None:
    objects = _objects(fs, prefix)
    root = f"{prefix}/{ROOT_METADATA}"
    if root in objects:  # first: what is left is no longer a store
        fs.rm_file(root)
        objects.remove(root)
    if objects:
        fs.rm(objects)
    fs.invalidate_cache(prefix)
