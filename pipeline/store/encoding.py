"""How a view's teacher logits, crop box and flip become the integers and floats a logit store
holds, and back. Every lossy or bit-level step happens here, in the project, so the store uses
only codecs of the Zarr v3 specification (bytes, blosc, zstd, crc32c, sharding_indexed) and any
Zarr v3 reader opens it; the scales live in the group's attributes.

Per view of a row, with k = top-k and C classes (shapes per row; arrays add (view, row) axes):

    topk_codes     (k,) uint16   the top-k log-probabilities (logit - logsumexp), descending, as
                                 float16, gap-coded: the bit patterns of -log p (non-negative
                                 float16s, whose bit patterns grow with their value) and their
                                 differences down the row. Lossless; small numbers compress.
    topk_classes   (k,) uint8/16/32  their class ids (smallest unsigned type holding C - 1)
    logsumexp      ()   float32  over all C logits, mantissa rounded to LOGSUMEXP_KEEPBITS bits
                                 (the dropped bits are zeros, which the compressor removes)
    tail_coefficients (r,) int8  `tail: quantized` only: every class's log-probability as a
    tail_residuals (C,) uint16       PCA approximation plus a residual rounded to 0.06 logit
                                     (pipeline/store/tail.py; the basis is stored once)
    boxes          (4,) uint16   crop (top, left, height, width) normalised to the image, in fixed
                                 point q / Q with Q = `box_scale(max_image_side)`
    flips          ()   bool

Why a quantised tail, and how: pipeline/store/tail.py.

Why top-k log-probabilities and not raw logits: float16 is precise near log p = 0, where a
confident teacher's top class sits, so the residual mass 1 - sum(top-k probs) survives; stored
raw (magnitude ~10, float16 step ~0.008) it was noise.

Decoding a batch (`teacher_logits_from_fields`) is plain torch, so it runs where the loss runs
(on the GPU when training on one); the store's reader and the student share it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from pipeline.errors import UserError
from pipeline.store.tail import TailBasis, encode_tail, tail_log_probs, unzigzag

FORMAT_VERSION = 3  # 3: spec-only codecs, gap-coded top-k, optional quantised tail, checksums
TAILS = ("none", "quantized")

# Boxes are stored in fixed point (see `box_scale`); a store is exact in pixels on images whose
# sides are at most its `max_image_side` attribute.
DEFAULT_MAX_IMAGE_SIDE = 16_000
MAX_SUPPORTED_IMAGE_SIDE = 32_704  # exact_box_side(2**15): q = 2**15 (a box value of 1) in uint16
LOGSUMEXP_KEEPBITS = 16  # float32 mantissa bits kept: relative error <= 2**-17

# Floor on the residual probability mass outside the top-k when the tail is filled evenly
# (`tail: none`): 1 - sum(top-k probs) from float16 values can come out <= 0 for a confident
# teacher; 1e-12 keeps the filled logits finite and is far below anything measurable.
MIN_RESIDUAL_MASS = 1e-12


def class_id_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds class ids 0 .. num_classes - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"num_classes={num_classes} does not fit in uint32")


# ---------------------------------------------------------------------------------------------
# Logits

def encode_logits(logits: np.ndarray, topk: int,
                  tail_basis: TailBasis | None = None) -> dict[str, np.ndarray]:
    """The stored fields of views' full teacher logits.

    logits: (..., C) float (float32 from the teacher; computed in float64 here). Returns
    topk_codes (..., k) uint16, topk_classes (..., k) class ids, logsumexp (...,) float32 and,
    with a `tail_basis` (a quantised tail), tail_coefficients (..., r) int8 and tail_residuals
    (..., C) uint16. The logits must be finite (`first_non_finite`; write_shard refuses
    others, naming the row and view).
    """
    logits = np.asarray(logits, dtype=np.float64)
    num_classes = logits.shape[-1]
    peak = logits.max(axis=-1, keepdims=True)
    logsumexp = (peak + np.log(np.exp(logits - peak).sum(-1, keepdims=True)))[..., 0]
    log_probs = logits - logsumexp[..., None]  # (..., C) float64, <= 0 up to rounding
    # top-k by a stable sort: ties keep class order, the same on every machine and rank
    classes = np.argsort(-log_probs, axis=-1, kind="stable")[..., :topk]  # (..., k)
    topk_log_probs = _to_float16_log_probs(np.take_along_axis(log_probs, classes, -1))
    fields = {"topk_codes": gap_encode(topk_log_probs),
              "topk_classes": classes.astype(class_id_dtype(num_classes)),
              "logsumexp": round_mantissa(logsumexp.astype(np.float32), LOGSUMEXP_KEEPBITS)}
    if tail_basis is not None:
        batch_shape = log_probs.shape[:-1]
        encoded = encode_tail(log_probs.reshape(-1, num_classes), tail_basis)
        fields.update({name: value.reshape(*batch_shape, -1) for name, value in encoded.items()})
    return fields


def first_non_finite(values: np.ndarray) -> tuple[int, ...] | None:
    """The index over all but the last axis of the first NaN or Inf in `values`, e.g. (view,
    row) of (V, n, C) logits, or None when all are finite: the one test of teacher logits, used
    by the dump (naming the shard file) and by write_shard (naming the global row)."""
    bad = ~np.isfinite(values).all(axis=-1)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _to_float16_log_probs(log_probs: np.ndarray) -> np.ndarray:
    """float16 log-probabilities in [float16 min, 0]: a class that far below the top has
    probability 0 either way; a rounding excess above 0 is clipped (and -0.0 becomes +0.0)."""
    clipped = np.clip(log_probs, float(np.finfo(np.float16).min), 0.0)
    return clipped.astype(np.float16) + np.float16(0.0)


def gap_encode(log_probs: np.ndarray) -> np.ndarray:
    """(..., k) float16 log-probabilities, descending and <= 0 -> (..., k) uint16 gap codes:
    the bit patterns of -log p (ascending, since non-negative float16s order like their bits),
    the first as it is, then the differences down the row. Lossless."""
    bits = (-log_probs + np.float16(0.0)).view(np.uint16)  # +0.0 turns -0.0 into +0.0
    codes = bits.copy()
    codes[..., 1:] = np.diff(bits, axis=-1)
    return codes


def gap_decode(codes: np.ndarray) -> np.ndarray:
    """Inverse of `gap_encode`: (..., k) uint16 -> (..., k) float16 log-probabilities."""
    bits = np.cumsum(codes, axis=-1, dtype=np.uint16)
    return -bits.view(np.float16) + np.float16(0.0)  # +0.0 turns -0.0 into +0.0


def round_mantissa(values: np.ndarray, keepbits: int) -> np.ndarray:
    """float32 values rounded to nearest (ties away from zero) at `keepbits` mantissa bits; the
    dropped bits become zeros. Relative error <= 2**-(keepbits + 1)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    drop = 23 - keepbits
    half = np.uint32(1 << (drop - 1))
    mask = np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    return ((bits + half) & mask).view(np.float32)


def decode_logits(stored: Mapping[str, np.ndarray], num_classes: int,
                  tail_basis: TailBasis | None = None) -> np.ndarray:
    """(..., C) float32 teacher logits from `encode_logits`'s fields (as stored): the inverse
    of the encoding up to its rounding, through `teacher_logits_from_fields`."""
    fields = decode_fields(stored)
    batch_shape = fields["logsumexp"].shape
    tensors = {name: torch.from_numpy(np.ascontiguousarray(value).reshape(
        -1, *value.shape[len(batch_shape):])) for name, value in fields.items()}
    logits = teacher_logits_from_fields(tensors, num_classes, tail_basis)  # (n, C)
    return logits.numpy().reshape(*batch_shape, num_classes)


def decode_fields(stored: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored integers -> the fields `teacher_logits_from_fields` takes (LOGIT_FIELDS): gap
    codes -> float16 log-probabilities, zigzag residuals -> int16 steps; the rest as stored."""
    fields = {"topk_log_probs": gap_decode(stored["topk_codes"])}
    fields.update({name: stored[name] for name in ("topk_classes", "logsumexp",
                                                    "tail_coefficients") if name in stored})
    if "tail_residuals" in stored:
        fields["tail_residuals"] = unzigzag(stored["tail_residuals"])
    return fields


def teacher_logits_from_fields(fields: Mapping[str, torch.Tensor], num_classes: int,
                               tail_basis: TailBasis | None = None) -> torch.Tensor:
    """(n, C) float32 teacher logits from a batch's fields (on their device; `tail_basis` on
    the same device).

    fields: topk_log_probs (n, k) float16/32, descending; topk_classes (n, k) integer;
    logsumexp (n,) float32; for a quantised tail tail_coefficients (n, r) int8 and
    tail_residuals (n, C) int16 (steps). With the tail: every class within TAIL_STEP / 2 of its
    log-probability (`pipeline.store.tail`), the top-k replaced by their exact values. Without:
    the top-k exact and the other classes sharing the residual mass evenly,
    logit = lse + log(residual / (C - k)) with residual = 1 - sum(top-k probs) clamped to
    [MIN_RESIDUAL_MASS, (C - k) * smallest top-k prob]. With k = C: exact to float16.
    """
    top = fields["topk_log_probs"].float()  # (n, k)
    classes = fields["topk_classes"].long()  # scatter needs int64
    lse = fields["logsumexp"].float().unsqueeze(1)  # (n, 1)
    batch, topk = top.shape
    if "tail_residuals" in fields:
        if tail_basis is None:
            raise ValueError("the fields hold a quantised tail: pass the store's tail_basis")
        log_probs = tail_log_probs(fields["tail_coefficients"], fields["tail_residuals"],
                                   tail_basis)  # (n, C)
    elif topk < num_classes:
        residual = 1.0 - top.exp().sum(dim=1, keepdim=True)  # (n, 1)
        tail_count = num_classes - topk
        residual = torch.minimum(residual, tail_count * top[:, -1:].exp())
        residual = residual.clamp_min(MIN_RESIDUAL_MASS)
        log_probs = torch.log(residual / tail_count).expand(batch, num_classes).clone()
    else:
        log_probs = top.new_empty(batch, num_classes)
    log_probs.scatter_(1, classes, top)
    return log_probs.add_(lse)


# ---------------------------------------------------------------------------------------------
# Boxes

def box_scale(max_image_side: int) -> int:
    """Fixed-point scale Q (a power of two) of the stored boxes: a box value v is kept as
    q = round(v * Q) in uint16, and `pipeline.stream.augment.pixel_box` recovers the exact integer box
    from q / Q on every image whose sides are at most `max_image_side`.

    Why exact: v = float32(t / H) for integers 0 <= t <= H, so |v - t/H| <= 2**-25, and q / Q is
    within 1 / (2Q) of v; pixel_box rounds (q / Q) * H back to t while H / (2Q) + H * 2**-25 is
    below 1/2: for H = Q always (q = t); for H < Q when Q (Q - 1) < 2**24, i.e. every side up to
    Q = 4096; beyond, for H < Q / (1 + Q * 2**-24) (`exact_box_side`). tests/test_store.py
    checks every (t, H) up to 4096 and the largest sides of larger scales exhaustively."""
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
    replays to the exact pixel box (see `box_scale`)."""
    if scale * (scale - 1) < 2**24:
        return scale
    return math.ceil(scale / (1 + scale * 2.0**-24)) - 1


def encode_boxes(boxes: np.ndarray, scale: int) -> np.ndarray:
    """(..., 4) float boxes in [0, 1] -> (..., 4) uint16 fixed point q = round(v * scale)."""
    return np.rint(np.asarray(boxes, dtype=np.float64) * scale).astype(np.uint16)


def decode_boxes(codes: np.ndarray, scale: int) -> np.ndarray:
    """(..., 4) uint16 -> (..., 4) float32 boxes q / scale (exact: scale is a power of two)."""
    return (codes.astype(np.float32) / np.float32(scale)).astype(np.float32)


def check_image_sides(attributes: Mapping[str, Any], rows: Any, heights: Any,
                      widths: Any) -> None:
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


# ---------------------------------------------------------------------------------------------
# Zarr codecs: only the v3 specification's and its registered extensions'

def array_codecs(name: str, dtype: np.dtype, *, row_items: int = 1) -> dict[str, list]:
    """`compressors` of one array (no filters: the project did the rest), ending in crc32c so
    every stored chunk carries a checksum and a damaged one is an error, never wrong values.
    row_items: values per (view, row), the element Blosc shuffles as one (a row's bit planes)."""
    dtype = np.dtype(dtype)

    def blosc(shuffle: BloscShuffle, typesize: int) -> BloscCodec:
        return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle,
                          typesize=typesize if typesize <= 255 else dtype.itemsize)

    if name == "tail_residuals":  # zigzag uint16: byte planes; the high one is nearly all 0
        return {"compressors": [BloscCodec(cname="zstd", clevel=7, shuffle=BloscShuffle.shuffle,
                                           typesize=2), Crc32cCodec()]}
    if dtype.itemsize == 1 and dtype.kind != "b":  # uint8 ids, labels: nothing to shuffle
        return {"compressors": [ZstdCodec(level=5), Crc32cCodec()]}
    # gap codes and ids (high bits zero), logsumexp (low bits zero), boxes, flips (one bit of
    # each byte), checksums: bit planes of a whole row
    return {"compressors": [blosc(BloscShuffle.bitshuffle, dtype.itemsize * row_items),
                            Crc32cCodec()]}
