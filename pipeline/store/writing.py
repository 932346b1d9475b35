"""Writing a logit store: `create_store` (one process, e.g. rank 0, before the others start) ->
`write_shard` per WebDataset shard, from any rank, in any order -> `finalize_store` (one process,
after all ranks finish).

`create_store` on an existing incomplete store with identical attributes reopens it, so a crashed
dump resumes with the shards not in `completed_shards`; any difference, or an already complete
store, raises StoreMismatchError rather than overwriting silently (the dump builds a replacement
beside it instead, see pipeline/store/dump.py). A shard is written whole: its data, its checksums, then
its completion marker, so a crash mid-write leaves it marked incomplete.
"""
from __future__ import annotations

import json

import numpy as np
import zarr
import zarr.errors

from pipeline.errors import UserError
from pipeline.store.encoding import (
    DEFAULT_MAX_IMAGE_SIDE, FORMAT_VERSION, LOGSUMEXP_KEEPBITS, TAILS, array_codecs, box_scale,
    class_id_dtype, encode_boxes, encode_logits, first_non_finite)
from pipeline.store.tail import TAIL_STEP, TailBasis, tail_components
from pipeline.store.layout import (
    ATTRIBUTES_CHECKSUM, CHECKSUMS, LABEL_CHECKSUMS, MARKERS, PRIOR_GROUP, STATE_ATTRIBUTES,
    StoreMismatchError, attributes_checksum, chunk_checksum, damaged_metadata, has_tail,
    json_normalise, num_shards_for, prior_name, read_tail_basis, row_array_specs,
    schema_problem, shard_bounds, short_repr, view_arrays)

# Attributes the caller of `create_store` must supply (the store adds the shape attributes).
REQUIRED_ATTRIBUTES = (
    "teacher_name", "teacher_arch", "teacher_sha256", "teacher_image_size", "fingerprint",
    "class_names", "augmentation", "seed",
)
# Attributes the store itself owns.
SHAPE_ATTRIBUTES = ("format_version", "rows", "views", "topk", "num_classes", "shard_rows",
                    "num_shards", "tail", "tail_components", "encoding")


def encoding_attributes(max_image_side: int) -> dict:
    """What a plain Zarr reader needs to decode the arrays (see pipeline/store/encoding.py)."""
    return {
        "topk_codes": ("top-k log-probabilities, descending, in the order of topk_classes: "
                       "-(cumsum(topk_codes, axis=-1, dtype=uint16).view(float16)); the cumsum "
                       "must stay uint16 (it wraps), then the bits are read as float16"),
        "logits": "logit = log-probability + logsumexp (float32)",
        "box_scale": box_scale(max_image_side),
        "boxes": ("crop box (top, left, height, width) as fractions of the decoded source "
                  "image's height and width = boxes / box_scale; pixels = round(fraction * "
                  "side), exact for sides up to max_image_side"),
        "logsumexp_keepbits": LOGSUMEXP_KEEPBITS,
        "logsumexp": "float32 rounded to logsumexp_keepbits mantissa bits (relative error "
                     "<= 2**-17), the dropped bits zero",
        "tail_step": TAIL_STEP,
        "tail": ("log-probability = tail_mean + (tail_coefficients * tail_scales) @ "
                 "tail_basis.T + tail_step * unzigzag(tail_residuals), where unzigzag(z) = "
                 "(z >> 1) ^ -(z & 1); the top-k classes replaced by their exact values"),
        "checksums": "crc32 (zlib) of each (shard, view, array) chunk's decoded C-order bytes",
    }


_DIMENSIONS = {"topk_codes": "topk", "topk_classes": "topk", "tail_coefficients": "component",
               "tail_residuals": "class", "boxes": "box"}


def _create_arrays(group: zarr.Group, attrs: dict) -> None:
    """Create whichever store arrays `group` lacks (all of them for a new store)."""
    views, rows, shard_rows = attrs["views"], attrs["rows"], attrs["shard_rows"]
    existing = set(group.array_keys())
    for name, (shape, dtype) in row_array_specs(attrs).items():
        if name in existing:
            continue
        group.create_array(
            name, shape=shape, dtype=dtype,
            shards=(views, shard_rows) + shape[2:],  # one object per WebDataset shard, all views
            chunks=(1, shard_rows) + shape[2:],  # one inner chunk per view
            filters=None, **array_codecs(name, dtype, row_items=int(np.prod(shape[2:]))),
            fill_value=0, dimension_names=("view", "row", _DIMENSIONS.get(name))[:len(shape)])
    num_shards = attrs["num_shards"]
    small = {  # name -> (shape, chunks, dtype, dimension names)
        "labels": ((rows,), (shard_rows,), class_id_dtype(attrs["num_classes"]), ("row",)),
        CHECKSUMS: ((num_shards, views, len(view_arrays(attrs))),
                    (1, views, len(view_arrays(attrs))), np.dtype(np.uint32),
                    ("shard", "view", "array")),
        LABEL_CHECKSUMS: ((num_shards,), (1,), np.dtype(np.uint32), ("shard",)),
        MARKERS: ((num_shards,), (1,), np.dtype(bool), ("shard",)),
    }
    for name, (shape, chunks, dtype, dimensions) in small.items():
        if name not in existing:
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, filters=None,
                               **array_codecs(name, dtype), fill_value=0,
                               dimension_names=dimensions)


def identity(attrs: dict) -> dict:
    """The attributes that make a store what it is (all but the write state)."""
    return {key: value for key, value in attrs.items() if key not in STATE_ATTRIBUTES}


def store_identity(*, rows: int, views: int, topk: int, num_classes: int, shard_rows: int,
                   tail: str, attributes: dict) -> dict:
    """The full attributes (minus write state) of a store created with these arguments; the
    dump compares them with an existing store's `identity` to decide to resume, keep or rebuild.
    Raises ValueError on bad arguments (see `create_store`), and on attributes the store's
    schema (pipeline/store/layout.py, checked again on every open) refuses, e.g. topk > C."""
    for name, value in dict(rows=rows, views=views, topk=topk, num_classes=num_classes,
                            shard_rows=shard_rows).items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    missing = [key for key in REQUIRED_ATTRIBUTES if key not in attributes]
    if missing:
        raise ValueError(f"store attributes lack {missing}; required: {list(REQUIRED_ATTRIBUTES)}")
    reserved = [key for key in attributes
                if key in SHAPE_ATTRIBUTES + STATE_ATTRIBUTES + (ATTRIBUTES_CHECKSUM,)]
    if reserved:
        raise ValueError(f"attributes {reserved} are set by the store itself; do not pass them")
    max_image_side = attributes.get("max_image_side", DEFAULT_MAX_IMAGE_SIDE)
    try:
        box_scale(max_image_side)
    except ValueError as error:
        raise ValueError(f"attribute 'max_image_side': {error}") from None
    wanted = json_normalise({
        **attributes, "max_image_side": max_image_side, "format_version": FORMAT_VERSION,
        "rows": int(rows), "views": int(views), "topk": int(topk),
        "num_classes": int(num_classes), "shard_rows": int(shard_rows),
        "num_shards": num_shards_for(rows, shard_rows), "tail": tail,
        "tail_components": (tail_components(num_classes)
                            if tail == "quantized" and topk < num_classes else 0),
        "encoding": encoding_attributes(max_image_side)})
    if problem := schema_problem(wanted):
        raise ValueError(f"cannot create the logit store: {problem}")
    return {**wanted, ATTRIBUTES_CHECKSUM: attributes_checksum(wanted)}


def create_store(path: str, *, rows: int, views: int, topk: int, num_classes: int,
                 shard_rows: int, attributes: dict, tail: str = "none",
                 overwrite: bool = False) -> zarr.Group:
    """Create a logit store at `path` (a local path or fsspec URL), or reopen one to resume.

    `attributes` must hold REQUIRED_ATTRIBUTES (JSON-serialisable; class_names of length C,
    augmentation a dict) and may hold more. tail: "none" (top-k only) or "quantized" (every
    class, see pipeline/store/encoding.py). An existing *incomplete* store created with the same
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
    wanted = store_identity(rows=rows, views=views, topk=topk, num_classes=num_classes,
                            shard_rows=shard_rows, tail=tail, attributes=attributes)
    try:
        return _create_or_reopen(path, wanted, overwrite)
    except json.JSONDecodeError as error:  # an array's zarr.json truncated
        raise damaged_metadata(path, error) from None


def _create_or_reopen(path: str, wanted: dict, overwrite: bool) -> zarr.Group:
    group = None if overwrite else open_existing(path)
    if group is None:
        try:
            group = zarr.open_group(path, mode="w" if overwrite else "w-",
                                    attributes={**wanted, "complete": False})
        except FileExistsError as error:
            raise StoreMismatchError(f"{path} exists but is not a logit store; delete it or pass "
                                     "overwrite=True") from error
    else:
        found = identity(dict(group.attrs))
        # the checksum last: name the attribute that differs, not the digest of them all
        for key in sorted(set(found) | set(wanted), key=lambda k: (k == ATTRIBUTES_CHECKSUM, k)):
            if found.get(key) != wanted.get(key):
                raise StoreMismatchError(
                    f"logit store {path} exists with a different {key!r}: it has "
                    f"{short_repr(found.get(key))}, this dump asks for {short_repr(wanted.get(key))}. "
                    f"Delete {path} (or pass overwrite=True) to dump again from scratch.")
        if group.attrs.get("complete"):
            raise StoreMismatchError(
                f"logit store {path} is already complete with these attributes; delete it "
                "(or pass overwrite=True) to dump again.")
    _create_arrays(group, wanted)  # also finishes a creation that crashed half way
    return group


def open_existing(path: str, mode: str = "r+") -> zarr.Group | None:
    """The zarr group at `path`, or None when there is nothing there."""
    try:
        return zarr.open_group(path, mode=mode)
    except FileNotFoundError:  # includes zarr's GroupNotFoundError
        return None
    except zarr.errors.ContainsArrayError as error:
        raise StoreMismatchError(f"{path} holds a zarr array, not a logit store; delete it or "
                                 "pass overwrite=True") from error
    except json.JSONDecodeError as error:  # truncated by a full disk or a killed copy
        raise damaged_metadata(path, error) from None


def write_tail_basis(group: zarr.Group, basis: TailBasis) -> None:
    """Store the quantised tail's PCA basis (`pipeline.store.tail.fit_tail_basis`), once per
    store, before any shard: every shard is encoded with it. One process (rank 0)."""
    attrs = dict(group.attrs)
    if not has_tail(attrs):
        raise ValueError("this store keeps no quantised tail; it takes no tail basis")
    components, num_classes = attrs["tail_components"], attrs["num_classes"]
    arrays = {"tail_mean": basis.mean.numpy(), "tail_basis": basis.basis.numpy(),
              "tail_scales": basis.scales.numpy()}
    shapes = {"tail_mean": (num_classes,), "tail_basis": (num_classes, components),
              "tail_scales": (components,)}
    checksums = {}
    for name, values in arrays.items():
        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.shape != shapes[name] or not np.isfinite(values).all():
            raise ValueError(f"{name} must be a finite {shapes[name]} array, got {values.shape}")
        group.create_array(name, data=values, chunks=values.shape, overwrite=True, filters=None,
                           **array_codecs(name, values.dtype))
        checksums[name] = chunk_checksum(values)
    group.update_attributes({"tail_basis_checksums": checksums})


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def write_shard(group: zarr.Group, shard_index: int, *, logits: np.ndarray, boxes: np.ndarray,
                flips: np.ndarray, labels: np.ndarray) -> None:
    """Encode and write all V views of one WebDataset shard's n rows, then mark it complete.

    Inputs: logits (V, n, C) float, the teacher's full logits of every view (float32 from the
    teacher; V * n * C * 4 bytes, e.g. 370 MB for 90 views of 1,024 rows and 1,000 classes);
    boxes (V, n, 4) float in [0, 1]; flips (V, n) bool; labels (n,) integer in [0, C). n is
    `shard_rows` except for a short last shard. Non-finite logits are refused naming the global
    row and view. The completion marker is cleared first and set last, so a crash mid-write
    leaves the shard marked incomplete; the per-chunk checksums are written before it.
    """
    attrs = group.attrs
    if attrs.get("complete"):
        raise ValueError("the store is finalized (complete); it can no longer be written")
    views, num_classes = attrs["views"], attrs["num_classes"]
    start, stop = shard_bounds(attrs["rows"], attrs["shard_rows"], shard_index)
    n = stop - start
    logits, boxes, flips, labels = map(np.asarray, (logits, boxes, flips, labels))
    for name, array, shape, kinds in (("logits", logits, (views, n, num_classes), "fiu"),
                                      ("boxes", boxes, (views, n, 4), "fiu"),
                                      ("flips", flips, (views, n), "b"),
                                      ("labels", labels, (n,), "iu")):
        if array.shape != shape:
            raise ValueError(f"shard {shard_index}: {name} has shape {array.shape}, expected "
                             f"{shape} (views, rows {start}..{stop - 1}, ...)")
        if array.dtype.kind not in kinds:
            raise ValueError(f"shard {shard_index}: {name} has dtype {array.dtype}")
    _check_values(shard_index, start, num_classes, logits, boxes, labels)
    basis = read_tail_basis(group, str(group.store_path)) if has_tail(attrs) else None
    data = encode_logits(logits, attrs["topk"], basis)
    data["boxes"] = encode_boxes(boxes, attrs["encoding"]["box_scale"])
    data["flips"] = flips
    names = view_arrays(attrs)
    checksums = np.array([[chunk_checksum(data[name][view]) for name in names]
                          for view in range(views)], dtype=np.uint32)  # (V, A)
    labels = labels.astype(class_id_dtype(num_classes))

    markers = group[MARKERS]
    markers[shard_index] = False
    region = slice(start, stop)
    for name in names:
        group[name][:, region] = data[name]  # one whole shard object per array
    group["labels"][region] = labels
    group[CHECKSUMS][shard_index] = checksums
    group[LABEL_CHECKSUMS][shard_index] = chunk_checksum(labels)
    markers[shard_index] = True


def _check_values(shard_index: int, start: int, num_classes: int, logits: np.ndarray,
                  boxes: np.ndarray, labels: np.ndarray) -> None:
    """Refuse values that would poison training; messages name the global row and view."""
    for name, array in (("logits", logits), ("boxes", boxes)):
        if (where := first_non_finite(array)) is not None:  # (V, n, C) logits, (V, n, 4) boxes
            view, row = where
            raise ValueError(f"shard {shard_index}: non-finite {name} at global row "
                             f"{start + row}, view {view}; check the teacher's outputs")
    if ((labels < 0) | (labels >= num_classes)).any():
        row = _first_bad((labels < 0) | (labels >= num_classes))[0]
        raise ValueError(f"shard {shard_index}: label outside [0, {num_classes}) at global row "
                         f"{start + row}")
    if ((boxes < 0) | (boxes > 1)).any():
        view, row = _first_bad(((boxes < 0) | (boxes > 1)).any(-1))
        raise ValueError(f"shard {shard_index}: crop box outside [0, 1] at global row "
                         f"{start + row}, view {view}; boxes are normalised "
                         "(top, left, height, width)")


def completed_shards(group: zarr.Group) -> set[int]:
    """Indices of the shards whose data is fully written."""
    return {int(i) for i in np.flatnonzero(group[MARKERS][:])}


def finalize_store(group: zarr.Group, class_priors: dict[float, np.ndarray]) -> None:
    """Check every shard is complete, write the class priors and their checksums, then set
    `complete` = True last.

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
    checksums = {}
    for temperature, prior in sorted(class_priors.items()):  # the same bytes on every rebuild
        prior = np.asarray(prior, dtype=np.float32)
        if prior.shape != (num_classes, num_classes) or not np.isfinite(prior).all():
            raise ValueError(f"class prior at T={temperature} must be a finite "
                             f"({num_classes}, {num_classes}) array, got shape {prior.shape}")
        name = prior_name(temperature)
        priors.create_array(name, data=prior, chunks=prior.shape, overwrite=True, filters=None,
                            **array_codecs(name, prior.dtype))
        checksums[name] = chunk_checksum(prior)
    group.update_attributes({"class_prior_temperatures": sorted(map(float, class_priors)),
                             "class_prior_checksums": checksums})
    group.update_attributes({"complete": True})  # last: readers trust a complete store


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
                                  dtype=dtype, fill_value=0, filters=None,
                                  **array_codecs(name, dtype))


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
    if counts.sum() != group.attrs["rows"] * group.attrs["views"]:
        raise UserError(f"the class-prior partial sums count {counts.sum()} views, expected "
                        f"{group.attrs['rows'] * group.attrs['views']}: a partial-sum chunk is "
                        "missing or damaged; delete the store and rerun dump_logits")
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
