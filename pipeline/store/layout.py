"""What a logit store holds: its array names, its attribute schema, its checksums and errors.
Shared by the writer, the reader and `verify_store`; see pipeline/store/__init__.py for the
layout as a whole."""
from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.store.encoding import TAILS, class_id_dtype
from pipeline.store.tail import TailBasis, coefficient_dtype

MARKERS = "shard_complete"  # (num_shards,) bool, one object per shard, set after its data
CHECKSUMS = "checksums"  # (num_shards, V, A) uint32: crc32 of each view chunk of each array
LABEL_CHECKSUMS = "label_checksums"  # (num_shards,) uint32
PRIOR_GROUP = "class_prior"
TAIL_BASIS_ARRAYS = ("tail_mean", "tail_basis", "tail_scales")  # per store, quantised tail only
MAX_VIEWS = 2**20  # views a store may cache; a teacher's fresh views start past them (loader.py)
# sha256 of every attribute but the write state (box_scale, tail_step, k, C, seed, ...: what
# the stored integers mean), recorded at creation and checked on every open: an edited
# zarr.json is refused like a damaged chunk (the chunk checksums cannot see it).
ATTRIBUTES_CHECKSUM = "attributes_sha256"
# Attributes that change while a store is written (each a checksum itself, or checked against
# the shard markers), so they are not part of its identity.
STATE_ATTRIBUTES = ("complete", "class_prior_temperatures", "class_prior_checksums",
                    "tail_basis_checksums")


class StoreMismatchError(UserError):
    """A store exists but is not the one asked for (wrong attribute, incomplete, complete)."""


class StoreCorruptError(UserError):
    """A chunk of a store is missing or damaged, or its attributes are invalid."""


class ClassPriorNotFoundError(KeyError):
    """No class prior stored for the requested temperature."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def damaged_metadata(path: str, error: Exception) -> StoreCorruptError:
    """The one line for a zarr.json that is not valid JSON (truncated by a full disk or an
    interrupted copy), naming the file where the store is a local folder."""
    name = "a zarr.json"
    if "://" not in str(path) and os.path.isdir(path):
        for folder, _, files in sorted(os.walk(path)):
            file = os.path.join(folder, "zarr.json")
            if "zarr.json" in files and not _parses(file):
                name = file
                break
    return StoreCorruptError(f"logit store {path}: {name} is not valid JSON ({error}); the "
                             "store is damaged: delete it and rerun dump_logits")


def _parses(file: str) -> bool:
    try:
        with open(file, encoding="utf-8") as stream:
            json.load(stream)
        return True
    except (OSError, ValueError):
        return False


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


def attributes_checksum(attrs: dict) -> str:
    """sha256 of the canonical JSON of `attrs` less the write state and the checksum itself."""
    protected = {key: value for key, value in attrs.items()
                 if key not in STATE_ATTRIBUTES and key != ATTRIBUTES_CHECKSUM}
    text = json.dumps(protected, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


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
    ("tail", "'none' or 'quantized'", lambda v, a: v in TAILS),
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


def schema_problem(attrs: dict) -> str | None:
    """The first attribute that breaks the schema, in words, or None: checked when a store is
    created (`store_identity`) and on every open (`validate_attributes`), so a store made by
    any writer, or edited since, is held to the same rules (topk <= num_classes, ...)."""
    for key, wanted, test in _SCHEMA:
        if key not in attrs or not test(attrs[key], attrs):
            found = short_repr(attrs.get(key, "nothing"))
            return f"attribute {key!r} should be {wanted}, found {found}"
    return None


def validate_attributes(path: str, attrs: dict, group) -> None:
    """Refuse a store whose attributes break the schema, disagree with its arrays' shapes or
    dtypes, or were edited after the dump, naming what is wrong (StoreCorruptError)."""
    if problem := schema_problem(attrs):
        raise StoreCorruptError(f"logit store {path}: {problem}; the store is damaged: delete it "
                                "and rerun dump_logits")
    expected = {name: shape for name, (shape, _) in row_array_specs(attrs).items()}
    if has_tail(attrs) and (attrs.get("complete") or "tail_mean" in group):
        expected.update({"tail_mean": (attrs["num_classes"],),
                         "tail_basis": (attrs["num_classes"], attrs["tail_components"]),
                         "tail_scales": (attrs["tail_components"],)})
    expected.update({"labels": (attrs["rows"],), MARKERS: (attrs["num_shards"],),
                     CHECKSUMS: (attrs["num_shards"], attrs["views"], len(view_arrays(attrs))),
                     LABEL_CHECKSUMS: (attrs["num_shards"],)})
    dtypes = {name: dtype for name, (_, dtype) in row_array_specs(attrs).items()}
    dtypes.update({"labels": class_id_dtype(attrs["num_classes"]), MARKERS: np.dtype(bool),
                   CHECKSUMS: np.dtype(np.uint32), LABEL_CHECKSUMS: np.dtype(np.uint32)})
    present = set(group.array_keys())
    for name, shape in expected.items():
        if name not in present:
            raise StoreCorruptError(f"logit store {path}: array {name!r} is missing; delete the "
                                    "store and rerun dump_logits")
        if tuple(group[name].shape) != shape:
            raise StoreCorruptError(
                f"logit store {path}: array {name!r} has shape {tuple(group[name].shape)}, the "
                f"attributes say {shape}; delete the store and rerun dump_logits")
        # A dtype (or byte order) edited in the array's zarr.json reinterprets the same bytes:
        # the chunk checksums would still match, the values would not.
        wanted = dtypes.get(name, np.dtype(np.float32))  # the tail basis arrays: float32
        if group[name].dtype != wanted:
            raise StoreCorruptError(
                f"logit store {path}: array {name!r} has data type {group[name].dtype}, the "
                f"store writes {wanted}; its zarr.json was edited or damaged: delete the store "
                "and rerun dump_logits")
    recorded = attrs.get(ATTRIBUTES_CHECKSUM)
    if recorded != attributes_checksum(attrs):
        change = ("has none (written by an older version, or edited)" if recorded is None
                  else "no longer matches them (an edit of its zarr.json?)")
        raise StoreCorruptError(
            f"logit store {path}: the attributes' sha256 ({ATTRIBUTES_CHECKSUM}) {change}; "
            "what its stored integers mean (box_scale, tail_step, k, ...) cannot be trusted: "
            "delete the store and rerun dump_logits")


def num_shards_for(rows: int, shard_rows: int) -> int:
    return math.ceil(rows / shard_rows)


def shard_bounds(rows: int, shard_rows: int, shard_index: int) -> tuple[int, int]:
    """Global row range [start, stop) of one WebDataset shard."""
    if not 0 <= shard_index < num_shards_for(rows, shard_rows):
        raise IndexError(f"shard {shard_index} out of range: the store has "
                         f"{num_shards_for(rows, shard_rows)} shards")
    start = shard_index * shard_rows
    return start, min(start + shard_rows, rows)


def json_normalise(value: Any) -> Any:
    """What `value` becomes after a JSON round trip (tuples -> lists, numpy scalars -> Python):
    how attributes compare with what a writer or reader asks for."""
    def default(obj: Any) -> Any:
        if isinstance(obj, (np.generic, np.ndarray)):
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")
    return json.loads(json.dumps(value, default=default))


def short_repr(value: Any, limit: int = 120) -> str:
    """repr(value), cut at `limit` characters: attribute values in one-line errors."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_tail_basis(group, path: str) -> TailBasis:
    """The tail basis of the store `group` (a zarr.Group) at `path`, checked against its
    checksums (StoreCorruptError if not)."""
    recorded = group.attrs.get("tail_basis_checksums") or {}
    arrays = []
    for name in TAIL_BASIS_ARRAYS:
        try:
            values = group[name][...]
        except Exception as error:  # noqa: BLE001 (missing, or bytes that do not decode)
            raise StoreCorruptError(f"logit store {path}: array {name!r} is missing or damaged; "
                                    "delete the store and rerun dump_logits") from error
        if chunk_checksum(values) != recorded.get(name):
            raise StoreCorruptError(f"logit store {path}: array {name!r} is missing or damaged "
                                    "(checksum mismatch); delete the store and rerun dump_logits")
        arrays.append(values)
    return TailBasis.from_arrays(*arrays)
