"""Seeded augmentation: views drawn as a pure function of (seed, view, row), replayed anywhere.

Contract (docs/views-and-seeding.md): a view's crop box and flip depend only on
(seed, view, row) and the source image size. Each (seed, view, row) owns one fixed block of
`WORDS_PER_VIEW` 64-bit words of a Philox4x64 counter-based generator keyed on (seed, view),
with the row selecting the counter range. No RNG state is carried between draws or touched
globally, so every process, DataLoader worker, machine and run draws the same views, and a
batch of contiguous rows is one generator call.

The crop is torchvision's `RandomResizedCrop.get_params` step for step (10 attempts, then a
central crop clamped to the ratio range), with its uniforms and integers taken from that
block. Boxes are stored normalised to the source image as float32 (top, left, height, width);
`pixel_box` recovers the exact integer box for any side below 2**22 px, and the same box can be
applied at any output size (the teacher may see a larger crop than the student).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline.params import CROP_RANGE

GENERATOR = "philox4x64-rrc-v1"  # recorded with the spec: names the block layout below
WORDS_PER_VIEW = 24  # 10 area + 10 log-ratio uniforms, top, left, flip, 1 spare
_AREA, _RATIO, _TOP, _LEFT, _FLIP = slice(0, 10), slice(10, 20), 20, 21, 22
_COUNTER_STEPS = WORDS_PER_VIEW // 4  # Philox4x64 emits 4 words per counter increment
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 random boxes before falling back
_MAX_ROW = 2**60  # keeps row * _COUNTER_STEPS inside one 64-bit counter word
_MAX_SIDE = 2**22  # float32 boxes replay exactly below this side (see pixel_box)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # standard ImageNet eval: resize shorter side to size/0.875, crop


@dataclass(frozen=True)
class CropSpec:
    """RandomResizedCrop + horizontal flip parameters, recorded in the logit store attributes.

    scale: range of the crop's area as a fraction of the image; ratio: range of its aspect
    ratio (width / height); flip_probability: chance of a horizontal flip.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5

    def __post_init__(self) -> None:
        # Coerce lists (from YAML / JSON attributes) to tuples so specs compare equal.
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "ratio", tuple(float(v) for v in self.ratio))
        object.__setattr__(self, "flip_probability", float(self.flip_probability))
        wanted, is_range = CROP_RANGE  # the rule params checks augment.crop_* against
        for name, value in (("scale", self.scale), ("ratio", self.ratio)):
            if not is_range(value):
                raise ValueError(f"CropSpec.{name}: expected {wanted}, got {list(value)}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"CropSpec.flip_probability: expected a value in [0, 1], "
                             f"got {self.flip_probability}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples) including the generator layout name."""
        spec = asdict(self)
        return {"scale": list(spec["scale"]), "ratio": list(spec["ratio"]),
                "flip_probability": spec["flip_probability"], "generator": GENERATOR}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> CropSpec:
        """Inverse of `as_dict`; refuses a spec drawn with another generator layout."""
        generator = spec.get("generator", GENERATOR)
        if generator != GENERATOR:
            raise ValueError(f"crop spec was drawn with generator {generator!r}; this code "
                             f"draws {GENERATOR!r}: re-dump the logits with this version")
        return cls(scale=spec["scale"], ratio=spec["ratio"],
                   flip_probability=spec["flip_probability"])


def crop_spec(augment) -> CropSpec:
    """The crops params' `augment` section (pipeline.params.AugmentParams) asks for."""
    return CropSpec(scale=augment.crop_scale, ratio=augment.crop_ratio,
                    flip_probability=augment.flip_probability)


class View(NamedTuple):
    """One drawn view: `box` = (top, left, height, width) / source size, float32 values."""

    box: tuple[float, float, float, float]
    flip: bool


def draw_view(seed: int, view: int, row: int, height: int, width: int, *,
              spec: CropSpec = CropSpec()) -> View:
    """The view `view` of dataset row `row` (a `height` x `width` image) under `seed`."""
    boxes, flips = draw_views(seed, [view], np.array([row]), height, width, spec=spec)
    return View(box=tuple(float(v) for v in boxes[0, 0]), flip=bool(flips[0, 0]))


def draw_views(seed: int, views: int | Sequence[int], rows: np.ndarray, heights: Any,
               widths: Any, *, spec: CropSpec = CropSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Views for many rows at once, bit-identical to `draw_view` element by element.

    views: a count V (views 0..V-1) or a sequence of V view indices; rows: (N,) row indices;
    heights, widths: (N,) or scalars, the source image sizes.
    Returns boxes (V, N, 4) float32 (top, left, height, width normalised) and flips (V, N) bool.
    """
    view_ids = np.arange(views) if isinstance(views, (int, np.integer)) else np.asarray(views)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    heights = np.broadcast_to(np.asarray(heights, dtype=np.int64), rows.shape)
    widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), rows.shape)
    _check_counters(seed, view_ids, rows)
    if rows.size and (min(heights.min(), widths.min()) < 1
                      or max(heights.max(), widths.max()) >= _MAX_SIDE):
        raise ValueError("draw_views: image heights and widths must be in [1, 2**22)")
    boxes = np.empty((len(view_ids), len(rows), 4), dtype=np.float32)
    flips = np.empty((len(view_ids), len(rows)), dtype=bool)
    for index, view in enumerate(view_ids):
        words = _view_words(seed, int(view), rows)  # (N, WORDS_PER_VIEW)
        top, left, crop_height, crop_width = _crop_boxes(words, heights, widths, spec)
        # float64 division then one rounding to float32; pixel_box inverts it exactly.
        boxes[index] = np.stack([top / heights, left / widths,
                                 crop_height / heights, crop_width / widths], axis=-1)
        flips[index] = _uniform(words[:, _FLIP]) < spec.flip_probability
    return boxes, flips


def pixel_box(box: Any, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer (top, left, height, width) of a normalised float32 box on a height x width image.

    Exact inverse of the normalisation in `draw_views`: |float32(t/H) * H - t| < 0.5 for all
    sides below 2**22 px. A box that does not fit means it was drawn for another image.
    """
    values = np.asarray(box, dtype=np.float32).astype(np.float64).reshape(4)
    top, left, crop_height, crop_width = (int(v) for v in np.rint(values * (height, width,
                                                                             height, width)))
    if not (0 <= top and 0 <= left and 0 < crop_height and 0 < crop_width
            and top + crop_height <= height and left + crop_width <= width):
        raise ValueError(f"crop box {tuple(values)} does not fit a {height}x{width} image: "
                         "was it drawn for another image or row?")
    return top, left, crop_height, crop_width


def apply_view(image: torch.Tensor, box: Any, flip: bool, size: int) -> torch.Tensor:
    """Crop `image` (3, H, W) uint8 to the normalised `box`, resize to (3, size, size), flip.

    Bilinear with antialias, as torchvision's RandomResizedCrop; any `size` replays the same box.
    """
    _check_image(image)
    top, left, crop_height, crop_width = pixel_box(box, image.shape[-2], image.shape[-1])
    crop = TF.resized_crop(image, top, left, crop_height, crop_width, size=[size, size],
                           interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.horizontal_flip(crop) if flip else crop  # (3, size, size)


# JPEG draft mode: libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT, for a fraction of the
# full decode's cost. A view is decoded drafted when its crop keeps at least `size` px on both
# sides at that scale, so the resize still only shrinks. Named in the store's attributes: a
# change here changes the pixels of drafted views, and the dump and the replay must agree.
DECODE = "pil-draft-v1"
DRAFT_SCALES = (8, 4, 2)


def draft_scale(box: Any, height: int, width: int, size: int) -> int:
    """The largest JPEG draft scale (8, 4, 2, else 1) at which the crop `box` of a height x
    width image is still at least `size` px on both sides."""
    _, _, crop_height, crop_width = pixel_box(box, height, width)
    return next((s for s in DRAFT_SCALES if min(crop_height, crop_width) >= s * size), 1)


def apply_view_drafted(drafted: Image.Image, box: Any, flip: bool, size: int, height: int,
                       width: int, scale: int) -> torch.Tensor:
    """`apply_view` on the 1/`scale` draft decode (RGB, ceil(width / scale) x ceil(height /
    scale)) of a height x width image: (3, size, size) uint8.

    The view is the same: its exact pixel box in the source, divided by the scale (a power of
    two: exact in float), is the region resampled, fractions included (PIL's resize box); the
    crop is bilinear with antialias (PIL's, the filter torchvision's antialias copies) and
    flipped as in `apply_view`. Only the pixels come from the DCT-scaled decode.
    """
    top, left, crop_height, crop_width = pixel_box(box, height, width)
    region = (left / scale, top / scale, (left + crop_width) / scale,
              (top + crop_height) / scale)
    crop = drafted.resize((size, size), Image.Resampling.BILINEAR, box=region)
    pixels = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)  # (3, size, size)
    return TF.horizontal_flip(pixels) if flip else pixels


def eval_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """The standard ImageNet evaluation transform: (3, H, W) uint8 -> (3, size, size) uint8.

    Resize the shorter side to round(size / 0.875) (bilinear, antialias; 224 -> 256,
    32 -> 37), then take the central size x size crop.
    """
    _check_image(image)
    resized = TF.resize(image, [round(size / EVAL_CROP_FRACTION)],
                        interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(resized, [size, size])


def normalize(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, H, W) `dtype`, scaled to [0, 1] then ImageNet mean/std.

    Runs on the batch's device (move uint8 to the GPU, normalise there: 4x fewer bytes moved)
    and keeps its memory format. Computed in float32 as torchvision's to_dtype + Normalize,
    then cast to `dtype`.
    """
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize expects a uint8 batch, got {batch.dtype}")
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"normalize expects a (B, 3, H, W) batch, got {tuple(batch.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=batch.device)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=batch.device)
    # .to keeps the strides (memory format); the in-place ops keep them too. mul_(1 / 255) is
    # torchvision's to_dtype(scale=True), so the result is bitwise that of its transforms.
    scaled = batch.to(torch.float32).mul_(1.0 / 255)
    return scaled.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1)).to(dtype)


# ---------------------------------------------------------------------------------------------
# Generator and crop algorithm


def _check_counters(seed: int, view_ids: np.ndarray, rows: np.ndarray) -> None:
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    if view_ids.size and (view_ids.min() < 0 or view_ids.max() >= 2**63):
        raise ValueError(f"view indices must be in [0, 2**63), got {view_ids.tolist()}")
    if rows.size and (rows.min() < 0 or rows.max() >= _MAX_ROW):
        raise ValueError(f"row indices must be in [0, 2**60), got min {rows.min()} "
                         f"max {rows.max()}")


def _view_words(seed: int, view: int, rows: np.ndarray) -> np.ndarray:
    """(N, WORDS_PER_VIEW) uint64: row r reads Philox counters r*6+1 .. r*6+6 of key (seed, view).

    Runs of consecutive rows (the usual case: a shard) come from a single generator call.
    """
    key = np.array([seed, view], dtype=np.uint64)
    words = np.empty((len(rows), WORDS_PER_VIEW), dtype=np.uint64)
    if not len(rows):
        return words
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        counter = np.array([rows[start] * _COUNTER_STEPS, 0, 0, 0], dtype=np.uint64)
        bit_generator = np.random.Philox(key=key, counter=counter)
        words[start:stop] = bit_generator.random_raw((stop - start) * WORDS_PER_VIEW).reshape(
            stop - start, WORDS_PER_VIEW)
    return words


def _uniform(words: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from the top 53 bits (numpy's own `random()` recipe)."""
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _below(words: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Integer in [0, bound) for bound < 2**32: (top 32 bits * bound) >> 32, exact in uint64."""
    return ((words >> np.uint64(32)) * bound.astype(np.uint64) >> np.uint64(32)).astype(np.int64)


def _crop_boxes(words: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                spec: CropSpec) -> tuple[np.ndarray, ...]:
    """torchvision RandomResizedCrop.get_params, vectorised over N rows -> 4 x (N,) int64."""
    log_low, log_high = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    area = (heights * widths).astype(np.float64)[:, None]  # (N, 1)
    target_area = area * (spec.scale[0] + (spec.scale[1] - spec.scale[0])
                          * _uniform(words[:, _AREA]))  # (N, 10)
    aspect = np.exp(log_low + (log_high - log_low) * _uniform(words[:, _RATIO]))  # (N, 10)
    # np.rint rounds half to even, like Python's round() in torchvision.
    crop_width = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
    crop_height = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = ((crop_width > 0) & (crop_width <= widths[:, None])
            & (crop_height > 0) & (crop_height <= heights[:, None]))  # (N, 10)
    found = fits.any(axis=1)
    first = fits.argmax(axis=1)  # first attempt that fits
    picked = np.arange(len(first))
    crop_height, crop_width = crop_height[picked, first], crop_width[picked, first]

    # Fallback: the whole image, clamped to the ratio range, centred.
    in_ratio = widths / heights
    too_tall, too_wide = in_ratio < spec.ratio[0], in_ratio > spec.ratio[1]
    fallback_height = np.where(too_tall, np.rint(widths / spec.ratio[0]), heights)
    fallback_width = np.where(too_wide, np.rint(heights * spec.ratio[1]), widths)
    crop_height = np.where(found, crop_height, fallback_height.astype(np.int64))
    crop_width = np.where(found, crop_width, fallback_width.astype(np.int64))

    top = np.where(found, _below(words[:, _TOP], heights - crop_height + 1),
                   (heights - crop_height) // 2)
    left = np.where(found, _below(words[:, _LEFT], widths - crop_width + 1),
                    (widths - crop_width) // 2)
    return top, left, crop_height, crop_width


def _check_image(image: torch.Tensor) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) uint8 image, got {tuple(image.shape)} "
                         f"{image.dtype}")
