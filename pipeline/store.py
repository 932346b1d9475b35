"""Teacher logit store: one sharded Zarr v3 group per teacher (DESIGN.md, "Logit store contract").

Layout, with V views, N train rows, top-k, C classes and WebDataset shards of S = shard_rows rows:

    topk_logits   (V, N, k) float16   top-k teacher log-probabilities (logit - logsumexp),
                                      descending along k; read back as raw logits (see below)
    topk_classes  (V, N, k) uint8/16/32  their class ids (smallest unsigned type holding C - 1)
    logsumexp     (V, N)    float32   log-sum-exp over all C logits (temperature-free store)
    boxes         (V, N, 4) float32   crop box (top, left, height, width), normalised to the source
    flips         (V, N)    bool      horizontal flip of the view
    labels        (N,)      uint8/16/32  the row's label, so the student can check the pairing
    shard_complete (num_shards,) bool  one object per shard, written after that shard's data
    class_prior/T=<t>  (C, C) float32  IKL's GI prior per temperature t: row c is the teacher's
                                       mean softmax(logits / t) over train rows labelled c

The (V, N, ...) arrays use Zarr's sharding codec: one shard object (V, S, ...) per WebDataset
shard holding all V views, made of V inner chunks (1, S, ...). Stage two reads one inner chunk
(one view of one tar shard) per tar shard per epoch; stage one writes whole shards, so parallel
dump ranks never touch the same object. `labels` has plain chunks of S rows for the same reason.
Float arrays use NaN as fill value, so a shard that was never written reads as non-finite.

Writing protocol: `create_store` (one process, e.g. rank 0, before the others start) ->
`write_shard` per WebDataset shard, from any rank, in any order -> `finalize_store` (one process,
after all ranks finish). `create_store` on an existing incomplete store with identical attributes
reopens it, so a crashed dump resumes with the shards not in `completed_shards`; any difference,
or an already complete store, raises StoreMismatchError rather than overwriting silently
(pass overwrite=True to erase and start afresh). Readers use `open_store`.

Top-k logits are stored relative to their row's logsumexp, i.e. as log-probabilities, and
`read_rows` returns raw logits again (float32: stored + logsumexp). Same information (raw =
log-probability + lse, and every loss is invariant to a per-row shift), but float16 is precise
where it matters: a confident teacher's top log-probability is near 0, where float16 resolves
1e-7, so the residual mass 1 - sum(top-k probs) that fills the tail classes survives storage.
Stored raw (magnitude ~10, float16 step ~0.008), that residual was noise: on the embedded
teacher at k = 5, 35 % of views read back a residual <= 0 (benchmarks/topk_fidelity.py).

Encodings (all chosen in `array_codecs`; readers decode whatever codecs an array's metadata
names, so stores written before still read, and readers never change with the encoding). The
filters are numcodecs codecs (zarr.codecs.numcodecs): zarr-python reads them, other Zarr v3
implementations may not. What readers get is unchanged: float16 logits descending, unsigned ids,
float32 logsumexp and boxes, bool flips.

- topk_logits, lossless (bitwise; only -0.0 reads as +0.0). From GAP_CODING_MIN_CLASSES classes
  on, the rows are gap-coded: float16 -> float32 -> int64 value * 2**24 (exact: 2**-24 is
  float16's finest step) -> Delta along the flattened rows (each row's first value, then the gaps
  down the row) -> Blosc bitshuffle with a whole row as one element (one bit plane per rank) +
  zstd 5. The top-k of many classes is dense, so its gaps are small next to the values. With few
  classes the top-k spans the whole logit range, gaps are as large as the values and fixed point
  pays for the fine float16 steps near zero: the float16 values are bitshuffled as they are.
- topk_classes, lossless, in descending-logit order as read. Sorting them by class and coding
  the gaps saves log2(k!) bits of order, which the permutation back to logit order costs again
  (benchmarks/store_size.py measures both). uint16/uint32: Blosc bitshuffle (the high bits are
  zero); uint8: zstd alone (nothing to shuffle, and no Blosc header).
- logsumexp: BitRound to LOGSUMEXP_KEEPBITS = 16 mantissa bits, relative error <= 2**-17.
  It only enters the residual mass 1 - sum(top-k probs) (unused at k = C), where a confident
  teacher (tiny residual) magnifies it: on the embedded teacher at k = 5 of 10 the IKL-KD loss
  from the read-back store differs by 0.21 % from the uncompressed top-k's (KL-KD 0.0007 %);
  12 bits gave 1.7 %, beyond the 0.5 % allowed, hence 16.
- boxes: fixed point q / Q in uint16, Q = `box_scale(max_image_side)`, the smallest power of
  two that replays exactly. Why exact: a box value is v = float32(t / H) for integers
  0 <= t <= H, so |v - t/H| <= 2**-25; the filter stores q = round(v * Q) and reads back q / Q
  exactly, so |(q / Q) * H - t| <= H / (2Q) + H * 2**-25, and `pixel_box` rounds (q / Q) * H
  (exact in float64) back to t while that is below 1/2: for H = Q always (v = t / Q, q = t); for
  H < Q when Q (Q - 1) < 2**24, i.e. every side up to Q = 4096; beyond, for
  H < Q / (1 + Q * 2**-24) (`exact_box_side`). tests/test_store.py checks every (t, H) up to
  4096 and the largest sides of larger scales exhaustively. The `max_image_side` attribute
  states the bound (default DEFAULT_MAX_IMAGE_SIDE = 16,000 px, Q = 2**14); a dump on smaller
  images states theirs (ImageNet-LT re-encoded to 512 px: Q = 512) and refuses larger images
  with `check_image_sides`, since the store cannot see image sizes.
- flips: PackBits (8 per byte) and no compressor: random bits do not compress.
- labels, prior partial sums: zstd (uint8) or Blosc bitshuffle + zstd, lossless.

Measured bytes per view at k = 5, box and flip included (benchmarks/store_size.py, full
tables in BENCHMARKS.md): 19.0 on the embedded teacher's store (C = 10), 20.4 on a synthetic
C = 1000 dump with images up to 512 px (22.9 at the default max_image_side), against 2,000 for
full float16 logits.

PADDING_CASTS: zarr pads the inner chunks of a short last shard with the fill value, NaN; the
fixed-point filters cast that padding to integers and back (numpy warns "invalid value" and
"overflow encountered in cast"). Only the padding is affected: real rows are never NaN (write_shard
refuses non-finite values) and readers slice the padding away. The store's own reads and writes
silence those warnings; a direct zarr reader of a short last shard sees them.
"""
from __future__ import annotations

import json
import math
import warnings
from typing import Any

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec
from zarr.codecs import numcodecs as zarr_numcodecs
from zarr.errors import ZarrUserWarning

from pipeline.errors import UserError

# The filters below are numcodecs codecs, which zarr-python reads and writes (numcodecs is a
# dependency) but, each time it parses one, warns that it is outside the Zarr v3 spec; the
# module docstring says so once instead.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3",
                        category=ZarrUserWarning)

FORMAT_VERSION = 2  # 2: top-k stored as log-probabilities (1: raw logits)

# Attributes the caller of `create_store` must supply (the store adds the shape attributes).
REQUIRED_ATTRIBUTES = (
    "teacher_name",
    "teacher_arch",
    "teacher_sha256",
    "teacher_image_size",
    "fingerprint",
    "class_names",
    "augmentation",
    "seed",
)
# Attributes the store itself owns.
SHAPE_ATTRIBUTES = (
    "format_version", "rows", "views", "topk", "num_classes", "shard_rows", "num_shards")
# Attributes that change while a store is written, so they are not part of its identity.
STATE_ATTRIBUTES = ("complete", "class_prior_temperatures")

VIEW_ARRAYS = ("topk_logits", "topk_classes", "logsumexp", "boxes", "flips")
PRIOR_GROUP = "class_prior"
MARKERS = "shard_complete"

# Boxes are stored in fixed point (see `box_scale`); a store is exact in pixels on images whose
# sides are at most its `max_image_side` attribute, or this default when the dump states none.
DEFAULT_MAX_IMAGE_SIDE = 16_000
MAX_SUPPORTED_IMAGE_SIDE = 32_704  # exact_box_side(2**15): q = 2**15 (a box value of 1) in uint16
LOGSUMEXP_KEEPBITS = 16  # float32 mantissa bits kept for logsumexp
GAP_CODING_MIN_CLASSES = 100  # top-k logits are gap-coded from this many classes on


class StoreMismatchError(UserError):
    """A store exists but is not the one asked for (wrong attribute, incomplete, complete)."""


class ClassPriorNotFoundError(KeyError):
    """No class prior stored for the requested temperature."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def class_id_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds class ids 0 .. num_classes - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"num_classes={num_classes} does not fit in uint32")


def box_scale(max_image_side: int) -> int:
    """Fixed-point scale Q (a power of two) of the stored boxes: box values are kept as q / Q,
    q = round(value * Q) in uint16, and `pipeline.augment.pixel_box` recovers the exact integer
    box from them on every image whose sides are at most `max_image_side` (module docstring)."""
    if not isinstance(max_image_side, (int, np.integer)) or not (
            1 <= max_image_side <= MAX_SUPPORTED_IMAGE_SIDE):
        raise ValueError(f"max_image_side must be an integer in [1, {MAX_SUPPORTED_IMAGE_SIDE}], "
                         f"got {max_image_side!r}")
    scale = 1
    while exact_box_side(scale) < max_image_side:
        scale *= 2
    return scale


def exact_box_side(scale: int) -> int:
    """Largest image side on which every box stored at fixed-point `scale` (a power of two)
    replays to the exact pixel box (proof in the module docstring)."""
    if scale * (scale - 1) < 2**24:
        return scale
    return math.ceil(scale / (1 + scale * 2.0**-24)) - 1


def check_image_sides(attributes: dict, rows: Any, heights: Any, widths: Any) -> None:
    """Refuse images on which a store's boxes would not replay exactly: a side above its
    `max_image_side` attribute. rows, heights, widths: (n,) per image, rows for the message."""
    limit = attributes.get("max_image_side", DEFAULT_MAX_IMAGE_SIDE)
    heights, widths = np.asarray(heights), np.asarray(widths)
    bad = np.flatnonzero(np.maximum(heights, widths) > limit)
    if bad.size:
        first = bad[0]
        raise UserError(
            f"the image of row {np.asarray(rows)[first]} is {heights[first]}x{widths[first]} px, "
            f"above the logit store's max_image_side of {limit} px, so its crop boxes would not "
            f"replay exactly; set data.max_side to at most {limit} (prepare re-encodes larger "
            f"images) or dump with a larger max_image_side (at most {MAX_SUPPORTED_IMAGE_SIDE})")


def array_codecs(name: str, dtype: np.dtype, *, topk: int = 1, num_classes: int = 1,
                 max_image_side: int = DEFAULT_MAX_IMAGE_SIDE) -> dict[str, list | None]:
    """`filters` and `compressors` of one array: every encoding choice of the store is made here
    (what and why: module docstring, "Encodings"). Readers need none of this: zarr decodes
    whatever codecs an array's metadata names."""
    dtype = np.dtype(dtype)

    def blosc(shuffle: BloscShuffle, typesize: int) -> list:
        return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle, typesize=typesize)]

    if name == "topk_logits" and num_classes >= GAP_CODING_MIN_CLASSES:
        # lossless: float16 -> exact int64 fixed point (2**24 is float16's finest step), then
        # the gaps down each row; bitshuffle a whole row as one element (a bit plane per rank)
        filters = [zarr_numcodecs.AsType(encode_dtype="<f4", decode_dtype="<f2"),
                   zarr_numcodecs.FixedScaleOffset(offset=0, scale=2**24, dtype="<f4",
                                                   astype="<i8"),
                   zarr_numcodecs.Delta(dtype="<i8")]
        return {"filters": filters,
                "compressors": blosc(BloscShuffle.bitshuffle, 8 * topk if 8 * topk <= 255 else 8)}
    if name == "topk_logits":  # few classes: the float16 values as they are, a row per element
        return {"filters": None,
                "compressors": blosc(BloscShuffle.bitshuffle, 2 * topk if 2 * topk <= 255 else 2)}
    if name == "logsumexp":  # LOGSUMEXP_KEEPBITS mantissa bits: relative error <= 2**-17
        return {"filters": [zarr_numcodecs.BitRound(keepbits=LOGSUMEXP_KEEPBITS)],
                "compressors": blosc(BloscShuffle.bitshuffle, 4)}
    if name == "boxes":  # fixed point q / Q in uint16, exact in pixels up to max_image_side
        fixed = zarr_numcodecs.FixedScaleOffset(offset=0, scale=box_scale(max_image_side),
                                                dtype="<f4", astype="<u2")
        return {"filters": [fixed], "compressors": blosc(BloscShuffle.bitshuffle, 8)}  # a box
    if name == "flips":  # 8 flips per byte; random bits do not compress further
        return {"filters": [zarr_numcodecs.PackBits()], "compressors": None}
    if dtype.itemsize == 1:  # uint8 class ids and labels: nothing to shuffle; no Blosc header
        return {"filters": None, "compressors": [ZstdCodec(level=5)]}
    # wider class ids and labels (high bits zero), prior partial sums
    return {"filters": None, "compressors": blosc(BloscShuffle.bitshuffle, dtype.itemsize)}


def num_shards_for(rows: int, shard_rows: int) -> int:
    return math.ceil(rows / shard_rows)


def shard_bounds(rows: int, shard_rows: int, shard_index: int) -> tuple[int, int]:
    """Global row range [start, stop) of one WebDataset shard."""
    if not 0 <= shard_index < num_shards_for(rows, shard_rows):
        raise IndexError(f"shard {shard_index} out of range: the store has "
                         f"{num_shards_for(rows, shard_rows)} shards")
    start = shard_index * shard_rows
    return start, min(start + shard_rows, rows)


def _json_normalise(value: Any) -> Any:
    """What `value` becomes after a JSON round trip (tuples -> lists, numpy scalars -> Python)."""
    def default(obj: Any) -> Any:
        if isinstance(obj, (np.generic, np.ndarray)):
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")
    return json.loads(json.dumps(value, default=default))


def _row_array_specs(views: int, rows: int, topk: int, num_classes: int) -> dict:
    """name -> (shape, dtype) of the (view, row, ...) arrays."""
    ids = class_id_dtype(num_classes)
    return {
        "topk_logits": ((views, rows, topk), np.dtype(np.float16)),
        "topk_classes": ((views, rows, topk), ids),
        "logsumexp": ((views, rows), np.dtype(np.float32)),
        "boxes": ((views, rows, 4), np.dtype(np.float32)),
        "flips": ((views, rows), np.dtype(bool)),
    }


def _create_arrays(group: zarr.Group, attrs: dict) -> None:
    """Create whichever store arrays `group` lacks (all of them for a new store)."""
    views, rows, shard_rows = attrs["views"], attrs["rows"], attrs["shard_rows"]
    existing = set(group.array_keys())
    specs = _row_array_specs(views, rows, attrs["topk"], attrs["num_classes"])
    max_image_side = attrs.get("max_image_side", DEFAULT_MAX_IMAGE_SIDE)
    for name, (shape, dtype) in specs.items():
        if name in existing:
            continue
        group.create_array(
            name, shape=shape, dtype=dtype,
            shards=(views, shard_rows) + shape[2:],  # one object per WebDataset shard, all views
            chunks=(1, shard_rows) + shape[2:],  # one inner chunk per view
            **array_codecs(name, dtype, topk=attrs["topk"], num_classes=attrs["num_classes"],
                           max_image_side=max_image_side),
            fill_value=np.nan if dtype.kind == "f" else 0,
            dimension_names=("view", "row", "topk" if "topk" in name else "box")[:len(shape)],
        )
    if "labels" not in existing:
        ids = class_id_dtype(attrs["num_classes"])
        group.create_array("labels", shape=(rows,), dtype=ids, chunks=(shard_rows,),
                           **array_codecs("labels", ids), fill_value=0,
                           dimension_names=("row",))
    if MARKERS not in existing:
        group.create_array(MARKERS, shape=(attrs["num_shards"],), dtype=bool, chunks=(1,),
                           compressors=None, fill_value=False, dimension_names=("shard",))


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _identity(attrs: dict) -> dict:
    return {key: value for key, value in attrs.items() if key not in STATE_ATTRIBUTES}


def create_store(path: str, *, rows: int, views: int, topk: int, num_classes: int, shard_rows: int,
                 attributes: dict, overwrite: bool = False) -> zarr.Group:
    """Create a logit store at `path` (a local path or fsspec URL), or reopen one to resume.

    `attributes` must hold REQUIRED_ATTRIBUTES (JSON-serialisable; class_names of length C,
    augmentation a dict) and may hold more. An existing *incomplete* store created with the same
    attributes and shape is reopened as is, so a crashed dump resumes: `completed_shards` says
    what is left. An existing store that differs in any attribute, or is already complete, is
    never silently replaced: StoreMismatchError names the attribute; delete the path or pass
    overwrite=True (which erases it and starts afresh).

    The optional attribute `max_image_side` (default DEFAULT_MAX_IMAGE_SIDE, always recorded)
    promises that no source image has a side above it: boxes are stored in fixed point just fine
    enough to replay exactly in pixels on such images (`box_scale`); the dump must refuse larger
    images, since the store cannot see image sizes.

    Returns the writable zarr group to pass to `write_shard` and `finalize_store`.
    """
    for name, value in dict(rows=rows, views=views, topk=topk, num_classes=num_classes,
                            shard_rows=shard_rows).items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if topk > num_classes:
        raise ValueError(f"topk={topk} exceeds num_classes={num_classes}")
    missing = [key for key in REQUIRED_ATTRIBUTES if key not in attributes]
    if missing:
        raise ValueError(f"store attributes lack {missing}; required: {list(REQUIRED_ATTRIBUTES)}")
    reserved = [key for key in attributes if key in SHAPE_ATTRIBUTES + STATE_ATTRIBUTES]
    if reserved:
        raise ValueError(f"attributes {reserved} are set by the store itself; do not pass them")
    if len(attributes["class_names"]) != num_classes:
        raise ValueError(f"class_names has {len(attributes['class_names'])} names "
                         f"but num_classes={num_classes}")
    if not isinstance(attributes["augmentation"], dict):
        raise ValueError("attribute 'augmentation' must be a dict (the augmentation spec)")
    max_image_side = attributes.get("max_image_side", DEFAULT_MAX_IMAGE_SIDE)
    try:
        box_scale(max_image_side)
    except ValueError as error:
        raise ValueError(f"attribute 'max_image_side': {error}") from None
    identity = _json_normalise({
        **attributes, "max_image_side": max_image_side, "format_version": FORMAT_VERSION,
        "rows": int(rows), "views": int(views), "topk": int(topk),
        "num_classes": int(num_classes), "shard_rows": int(shard_rows),
        "num_shards": num_shards_for(rows, shard_rows)})

    group = None if overwrite else _open_existing(path)
    if group is None:
        try:
            group = zarr.open_group(path, mode="w" if overwrite else "w-",
                                    attributes={**identity, "complete": False})
        except FileExistsError as error:
            raise StoreMismatchError(f"{path} exists but is not a logit store; delete it or pass "
                                     "overwrite=True") from error
    else:
        found = _identity(dict(group.attrs))
        for key in sorted(set(found) | set(identity)):
            if found.get(key) != identity.get(key):
                raise StoreMismatchError(
                    f"logit store {path} exists with a different {key!r}: it has "
                    f"{_short(found.get(key))}, this dump asks for {_short(identity.get(key))}. "
                    f"Delete {path} "
                    "(or pass overwrite=True) to dump again from scratch.")
        if group.attrs.get("complete"):
            raise StoreMismatchError(
                f"logit store {path} is already complete with these attributes; delete it "
                "(or pass overwrite=True) to dump again.")
    _create_arrays(group, identity)  # also finishes a creation that crashed half way
    return group


def _open_existing(path: str) -> zarr.Group | None:
    try:
        return zarr.open_group(path, mode="r+")
    except FileNotFoundError:  # includes zarr's GroupNotFoundError
        return None
    except zarr.errors.ContainsArrayError as error:
        raise StoreMismatchError(f"{path} holds a zarr array, not a logit store; delete it or "
                                 "pass overwrite=True") from error


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def write_shard(group: zarr.Group, shard_index: int, *, topk_logits: np.ndarray,
                topk_classes: np.ndarray, logsumexp: np.ndarray, boxes: np.ndarray,
                flips: np.ndarray, labels: np.ndarray) -> None:
    """Write all V views of one WebDataset shard's n rows, then mark the shard complete.

    Inputs: topk_logits (V, n, k) float raw logits, descending along k (pass float32: they are
    stored as float16 log-probabilities, topk_logits - logsumexp, see the module docstring),
    topk_classes (V, n, k) integer in [0, C), logsumexp (V, n) float, boxes (V, n, 4) float in
    [0, 1], flips (V, n) bool, labels (n,) integer in [0, C). n is `shard_rows` except for a
    short last shard. Non-finite logits or logsumexp (after the cast to the stored dtype) are
    refused naming the global row and view. The completion marker is cleared first and set
    last, so a crash mid-write leaves the shard marked incomplete.
    """
    attrs = group.attrs
    if attrs.get("complete"):
        raise ValueError("the store is finalized (complete); it can no longer be written")
    views, topk, num_classes = attrs["views"], attrs["topk"], attrs["num_classes"]
    start, stop = shard_bounds(attrs["rows"], attrs["shard_rows"], shard_index)
    n = stop - start
    specs = _row_array_specs(views, n, topk, num_classes)
    given = {name: np.asarray(array) for name, array in dict(
        topk_logits=topk_logits, topk_classes=topk_classes, logsumexp=logsumexp, boxes=boxes,
        flips=flips).items()}
    if given["topk_logits"].shape[:2] == given["logsumexp"].shape:
        # Store log-probabilities (module docstring), floored at float16's most negative
        # finite value: a top-k class that far below the top has probability 0 either way.
        given["topk_logits"] = np.maximum(
            given["topk_logits"].astype(np.float64) - given["logsumexp"][..., None],
            float(np.finfo(np.float16).min))
    data = {}
    for name, (shape, dtype) in specs.items():
        array = given[name]
        if array.shape != shape:
            raise ValueError(f"shard {shard_index}: {name} has shape {array.shape}, expected "
                             f"{shape} (views, rows {start}..{stop - 1}, ...)")
        kind_ok = {"f": "f", "u": "iu", "b": "b"}[dtype.kind]
        if array.dtype.kind not in kind_ok:
            raise ValueError(f"shard {shard_index}: {name} has dtype {array.dtype}, "
                             f"expected {dtype}")
        with np.errstate(over="ignore"):  # float16 overflow is reported by _check_values
            data[name] = array.astype(dtype)
    labels = np.asarray(labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ValueError(f"shard {shard_index}: labels must be integers of shape {(n,)}, "
                         f"got {labels.dtype} {labels.shape}")
    _check_values(shard_index, start, num_classes, data, labels, given)

    markers = group[MARKERS]
    markers[shard_index] = False
    region = slice(start, stop)
    with np.errstate(invalid="ignore", over="ignore"):  # see PADDING_CASTS (module docstring)
        for name, array in data.items():
            group[name][:, region] = array  # one whole shard object per array
    group["labels"][region] = labels.astype(class_id_dtype(num_classes))
    markers[shard_index] = True


def _check_values(shard_index: int, start: int, num_classes: int, data: dict,
                  labels: np.ndarray, given: dict) -> None:
    """Refuse values that would poison training; messages name the global row and view."""
    for name in ("topk_logits", "logsumexp", "boxes"):
        bad = ~np.isfinite(data[name])
        if bad.any():
            view, row = _first_bad(bad)[:2]
            overflow = (f" (overflows {data[name].dtype})"
                        if np.isfinite(given[name][view, row]).all() else "")
            raise ValueError(f"shard {shard_index}: non-finite {name}{overflow} at global row "
                             f"{start + row}, view {view}; check the teacher's outputs")
    bad = np.diff(data["topk_logits"].astype(np.float32), axis=-1) > 0
    if bad.any():
        view, row = _first_bad(bad)[:2]
        raise ValueError(f"shard {shard_index}: topk_logits not descending at global row "
                         f"{start + row}, view {view}")
    classes = given["topk_classes"]
    bad = (classes < 0) | (classes >= num_classes)
    if bad.any():
        view, row = _first_bad(bad)[:2]
        raise ValueError(f"shard {shard_index}: class id outside [0, {num_classes}) at global row "
                         f"{start + row}, view {view}")
    bad = (np.diff(np.sort(classes, axis=-1), axis=-1) == 0).any(-1)
    if bad.any():
        view, row = _first_bad(bad)
        raise ValueError(f"shard {shard_index}: repeated class id in the top-k at global row "
                         f"{start + row}, view {view}")
    if ((labels < 0) | (labels >= num_classes)).any():
        row = _first_bad((labels < 0) | (labels >= num_classes))[0]
        raise ValueError(f"shard {shard_index}: label outside [0, {num_classes}) at global row "
                         f"{start + row}")
    boxes = data["boxes"]
    if ((boxes < 0) | (boxes > 1)).any():
        view, row = _first_bad(((boxes < 0) | (boxes > 1)).any(-1))
        raise ValueError(f"shard {shard_index}: crop box outside [0, 1] at global row "
                         f"{start + row}, view {view}; boxes are normalised "
                         "(top, left, height, width)")


def completed_shards(group: zarr.Group) -> set[int]:
    """Indices of the shards whose data is fully written."""
    return {int(i) for i in np.flatnonzero(group[MARKERS][:])}


def prior_name(temperature: float) -> str:
    """Array name of the class prior at `temperature`, e.g. 'T=4.0' (inside group class_prior)."""
    return f"T={float(temperature)!r}"


def finalize_store(group: zarr.Group, class_priors: dict[float, np.ndarray]) -> None:
    """Check every shard is complete, write the class priors, then set `complete` = True last.

    class_priors maps temperature -> (C, C) prior, row c = the teacher's mean softmax(logits / T)
    over the train rows labelled c (IKL's GI weights), computed from the full logits at dump time.
    """
    attrs = dict(group.attrs)
    missing = sorted(set(range(attrs["num_shards"])) - completed_shards(group))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"cannot finalize: {len(missing)} of {attrs['num_shards']} shards are "
                         f"not written (shards {shown}); rerun dump_logits, it resumes where it "
                         "stopped")
    if not class_priors:
        raise ValueError("finalize_store needs at least one class prior (temperature -> (C, C))")
    num_classes = attrs["num_classes"]
    priors = group.require_group(PRIOR_GROUP)
    for temperature, prior in class_priors.items():
        prior = np.asarray(prior, dtype=np.float32)
        if prior.shape != (num_classes, num_classes) or not np.isfinite(prior).all():
            raise ValueError(f"class prior at T={temperature} must be a finite "
                             f"({num_classes}, {num_classes}) array, got shape {prior.shape}")
        priors.create_array(prior_name(temperature), data=prior, chunks=prior.shape,
                            overwrite=True)
    temperatures = sorted(float(t) for t in class_priors)
    group.update_attributes({"class_prior_temperatures": temperatures})
    group.update_attributes({"complete": True})  # last: readers trust a complete store


def open_store(path: str, *, fingerprint: str | None = None, seed: int | None = None,
               teacher_sha256: str | None = None, require_complete: bool = True) -> "LogitStore":
    """Open a store for reading, refusing one that is not the expected, finished dump.

    Each of fingerprint / seed / teacher_sha256 that is given must equal the stored attribute;
    otherwise (or when the store is incomplete and require_complete) StoreMismatchError names
    the attribute, the expected and found values.
    """
    try:
        group = zarr.open_group(path, mode="r")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no logit store at {path}; run the dump_logits stage") from error
    attrs = dict(group.attrs)
    expected = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "seed": seed,
                "teacher_sha256": teacher_sha256}
    for key, value in expected.items():
        if value is not None and attrs.get(key) != _json_normalise(value):
            raise StoreMismatchError(
                f"logit store {path} does not match: {key} expected {value!r}, found "
                f"{_short(attrs.get(key))}. The store was dumped for another dataset, seed or "
                "teacher; rerun dump_logits (dvc repro) to rebuild it.")
    if require_complete and not attrs.get("complete"):
        done = len(completed_shards(group))
        raise StoreMismatchError(
            f"logit store {path} is incomplete (complete expected True, found False; "
            f"{done}/{attrs.get('num_shards')} shards written); rerun dump_logits to finish it.")
    return LogitStore(path, group)


class LogitStore:
    """Read side of a logit store; open it with `open_store`."""

    def __init__(self, path: str, group: zarr.Group):
        self.path = path
        self.group = group
        self.attributes: dict = dict(group.attrs)
        self.views: int = self.attributes["views"]
        self.rows: int = self.attributes["rows"]
        self.topk: int = self.attributes["topk"]
        self.num_classes: int = self.attributes["num_classes"]
        self.shard_rows: int = self.attributes["shard_rows"]
        self.num_shards: int = self.attributes["num_shards"]
        self.class_names: list[str] = list(self.attributes["class_names"])
        self.complete: bool = bool(self.attributes.get("complete"))
        self._arrays = {name: group[name] for name in VIEW_ARRAYS}
        self._labels: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        """(N,) label of every row (read once, then cached)."""
        if self._labels is None:
            self._labels = self.group["labels"][:]
        return self._labels

    @property
    def temperatures(self) -> list[float]:
        """Temperatures with a stored class prior."""
        return list(self.attributes.get("class_prior_temperatures", []))

    def shard_bounds(self, shard_index: int) -> tuple[int, int]:
        """Global row range [start, stop) of WebDataset shard `shard_index`."""
        return shard_bounds(self.rows, self.shard_rows, shard_index)

    def completed_shards(self) -> set[int]:
        return completed_shards(self.group)

    def read_rows(self, view: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of one view: one read per array (one inner chunk per array when
        the range is a WebDataset shard).

        Returns topk_logits (n, k) float32 raw logits (float16 log-probabilities + logsumexp),
        topk_classes (n, k) uint, logsumexp (n,) float32, boxes (n, 4) float32, flips (n,) bool.
        """
        if not 0 <= view < self.views:
            raise IndexError(f"view {view} out of range: the store has {self.views} views")
        if not 0 <= start < stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) out of range: the store has {self.rows} rows")
        with np.errstate(invalid="ignore", over="ignore"):  # see PADDING_CASTS (module docstring)
            rows = {name: array[view, start:stop] for name, array in self._arrays.items()}
        # Stored as log-probabilities (module docstring): raw logits = stored + logsumexp.
        rows["topk_logits"] = rows["topk_logits"].astype(np.float32) + rows["logsumexp"][:, None]
        return rows

    def class_prior(self, temperature: float) -> np.ndarray:
        """(C, C) float32 class prior at `temperature` (row c: mean prediction for label c)."""
        for stored in self.temperatures:
            if math.isclose(stored, float(temperature), rel_tol=1e-9):
                return self.group[PRIOR_GROUP][prior_name(stored)][:]
        raise ClassPriorNotFoundError(
            f"logit store {self.path} has no class prior at temperature {temperature}; stored "
            f"temperatures: {self.temperatures or 'none'}. Set the IKL GI temperature to one of "
            "them or add it to dump_logits' prior temperatures and rerun it.")


# ---------------------------------------------------------------------------------------------
# Class-prior partial sums: one object per shard, so a resumed or multi-rank dump still gets
# the exact prior over all rows without rerunning the teacher on completed shards.

PARTIALS_GROUP = "class_prior_partials"


def create_prior_partials(group: zarr.Group, temperatures) -> None:
    """Create (where missing) the per-shard partial-sum arrays of the class priors at
    `temperatures`. One process, before any rank writes: parallel creation races on the
    arrays' metadata."""
    partials = group.require_group(PARTIALS_GROUP)
    num_shards, num_classes = group.attrs["num_shards"], group.attrs["num_classes"]
    specs = {"counts": ((num_classes,), np.dtype(np.int64))}
    specs.update({prior_name(t): ((num_classes, num_classes), np.dtype(np.float64))
                  for t in temperatures})
    for name, (shape, dtype) in specs.items():
        if name not in partials:
            partials.create_array(name, shape=(num_shards,) + shape, chunks=(1,) + shape,
                                  dtype=dtype, fill_value=0, **array_codecs(name, dtype))


def write_prior_partials(group: zarr.Group, shard_index: int, sums: dict[float, np.ndarray],
                         counts: np.ndarray) -> None:
    """Store one shard's float64 prior sums (C, C) per temperature and class counts (C,), into
    arrays made by `create_prior_partials`. Call before `write_shard`, whose marker then also
    vouches for these."""
    partials = group[PARTIALS_GROUP]
    partials["counts"][shard_index] = np.asarray(counts, dtype=np.int64)
    for temperature, values in sums.items():
        partials[prior_name(temperature)][shard_index] = np.asarray(values, dtype=np.float64)


def reduce_prior_partials(group: zarr.Group) -> dict[float, np.ndarray]:
    """(C, C) float32 priors per temperature from all shards' partial sums, summed in shard
    order (the same bits however many ranks wrote them); empty classes get a uniform row."""
    partials = group[PARTIALS_GROUP]
    counts = partials["counts"][:].sum(axis=0)  # (C,)
    priors = {}
    for name in partials.array_keys():
        if name == "counts":
            continue
        sums = partials[name][:].sum(axis=0)  # (C, C) float64
        rows = sums / np.maximum(counts, 1)[:, None]
        rows[counts == 0] = 1.0 / len(counts)
        priors[float(name.split("=", 1)[1])] = (rows / rows.sum(1, keepdims=True)).astype(
            np.float32)
    return priors


def drop_prior_partials(group: zarr.Group) -> None:
    """Free the partial sums once the priors are final."""
    if PARTIALS_GROUP in group:
        del group[PARTIALS_GROUP]
