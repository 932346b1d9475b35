"""What a logit store holds: its array names, its attribute schema, its checksums and errors.
Shared by the writer, the reader and `verify_store`; see pipeline/store/__init__.py for the
layout as a whole."""
from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.store.encoding import class_id_dtype
from pipeline.store.tail import coefficient_dtype

MARKERS = "shard_complete"  # (num_shards,) bool, one object per shard, set after its data
CHECKSUMS = "checksums"  # (num_shards, V, A) uint32: crc32 of each view chunk of each array
LABEL_CHECKSUMS = "label_checksums"  # (num_shards,) uint32
PRIOR_GROUP = "class_prior"
TAIL_BASIS_ARRAYS = ("tail_mean", "tail_basis", "tail_scales")  # per store, quantised tail only
MAX_VIEWS = 2**20  # views drawn fresh for teachers start above the cached ones (stream.py)


class StoreMismatchError(UserError):
    """A store exists but is not the one asked for (wrong attribute, incomplete, complete)."""


class StoreCorruptError(UserError):
    """A chunk of a store is missing or damaged, or its attributes are invalid."""


class ClassPriorNotFoundError(KeyError):
    """No class prior stored for the requested temperature."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def has_tail(attrs: dict) -> bool:
    """Whether the store keeps every class's logit beyond the top-k (a quantised tail)."""
    return attrs.get("tail") == "quantized" and attrs["topk"] < attrs["num_classes"]


def view_arrays(attrs: dict) -> tuple[str, ...]:
    """Names of the (view, row, ...) arrays of a store with these attributes, in checksum order."""
    tail = ("tail_coefficients", "tail_residuals") if has_tail(attrs) else ()
    return ("topk_codes", "topk_classes", "logsumexp", *tail, "boxes", "flips")


def row_array_specs(attrs: dict, rows: int | None = None) -> dict[str, tuple[tuple, np.dtype]]:
    """name -> (shape, dtype) of the (view, row, ...) arrays of a store with these attributes
    (rows: override the row count, e.g. one shard's)."""
    views, topk, num_classes = attrs["views"], attrs["topk"], attrs["num_classes"]
    rows = attrs["rows"] if rows is None else rows
    ids = class_id_dtype(num_classes)
    specs = {
        "topk_codes": ((views, rows, topk), np.dtype(np.uint16)),
        "topk_classes": ((views, rows, topk), ids),
        "logsumexp": ((views, rows), np.dtype(np.float32)),
        "tail_coefficients": ((views, rows, attrs.get("tail_components", 0)),
                              coefficient_dtype(attrs["num_classes"])),
        "tail_residuals": ((views, rows, num_classes), np.dtype(np.uint16)),
        "boxes": ((views, rows, 4), np.dtype(np.uint16)),
        "flips": ((views, rows), np.dtype(bool)),
    }
    return {name: specs[name] for name in view_arrays(attrs)}


def prior_name(temperature: float) -> str:
    """Array name of the class prior at `temperature`, e.g. 'T=4.0' (inside group class_prior)."""
    return f"T={float(temperature)!r}"


def chunk_checksum(array: np.ndarray) -> int:
    """crc32 of an array's values (C-order bytes): recorded per (shard, view, array) when a
    shard is written and compared on every read, so a missing chunk (read back as the fill
    value) or a damaged one is an error, never training data."""
    return zlib.crc32(np.ascontiguousarray(array).tobytes())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# attribute -> (what a good value is, test); checked in this order, so later tests may rely on
# earlier attributes being valid
_SCHEMA: list[tuple[str, str, Any]] = [
    ("rows", "an integer >= 1", lambda v, a: _is_int(v) and v >= 1),
    ("views", f"an integer in [1, {MAX_VIEWS}]", lambda v, a: _is_int(v) and 1 <= v <= MAX_VIEWS),
    ("num_classes", "an integer in [1, 2**32]",
     lambda v, a: _is_int(v) and 1 <= v <= 2**32),
    ("topk", "an integer in [1, num_classes]",
     lambda v, a: _is_int(v) and 1 <= v <= a["num_classes"]),
    ("shard_rows", "an integer >= 1", lambda v, a: _is_int(v) and v >= 1),
    ("num_shards", "ceil(rows / shard_rows)",
     lambda v, a: v == math.ceil(a["rows"] / a["shard_rows"])),
    ("tail", "'none' or 'quantized'", lambda v, a: v in ("none", "quantized")),
    ("tail_components", "an integer in [0, num_classes]",
     lambda v, a: _is_int(v) and 0 <= v <= a["num_classes"] and (v > 0) == has_tail(a)),
    ("class_names", "a list of num_classes names",
     lambda v, a: isinstance(v, list) and len(v) == a["num_classes"]),
    ("seed", "an integer >= 0", lambda v, a: _is_int(v) and v >= 0),
    ("fingerprint", "a string", lambda v, a: isinstance(v, str)),
    ("teacher_sha256", "a string", lambda v, a: isinstance(v, str)),
    ("augmentation", "a mapping", lambda v, a: isinstance(v, dict)),
    ("encoding", "a mapping with an integer box_scale",
     lambda v, a: isinstance(v, dict) and _is_int(v.get("box_scale")) and v["box_scale"] >= 1),
]


def validate_attributes(path: str, attrs: dict, group) -> None:
    """Refuse a store whose attributes break the schema or disagree with its arrays' shapes,
    naming the attribute and what was expected (StoreCorruptError)."""
    for key, wanted, test in _SCHEMA:
        if key not in attrs or not test(attrs[key], attrs):
            raise StoreCorruptError(
                f"logit store {path}: attribute {key!r} should be {wanted}, found "
                f"{attrs.get(key, 'nothing')!r}; the store is damaged: delete it and rerun "
                "dump_logits")
    expected = {name: shape for name, (shape, _) in row_array_specs(attrs).items()}
    if has_tail(attrs) and (attrs.get("complete") or "tail_mean" in group):
        expected.update({"tail_mean": (attrs["num_classes"],),
                         "tail_basis": (attrs["num_classes"], attrs["tail_components"]),
                         "tail_scales": (attrs["tail_components"],)})
    expected.update({"labels": (attrs["rows"],), MARKERS: (attrs["num_shards"],),
                     CHECKSUMS: (attrs["num_shards"], attrs["views"], len(view_arrays(attrs))),
                     LABEL_CHECKSUMS: (attrs["num_shards"],)})
    present = set(group.array_keys())
    for name, shape in expected.items():
        if name not in present:
            raise StoreCorruptError(f"logit store {path}: array {name!r} is missing; delete the "
                                    "store and rerun dump_logits")
        if tuple(group[name].shape) != shape:
            raise StoreCorruptError(
                f"logit store {path}: array {name!r} has shape {tuple(group[name].shape)}, the "
                f"attributes say {shape}; delete the store and rerun dump_logits")
