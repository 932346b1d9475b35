"""Every image as the 8-bit RGB picture an image viewer shows: one conversion, decided once in
prepare, so the shards hold plain 8-bit RGB (or greyscale) PNG/JPEG and every later reader
(stream, dump, evaluate) decodes the same pixels with a plain `convert("RGB")`.

The rules (each tested with a generated file whose pixels are known, tests/test_inputs.py):
- EXIF orientation is applied, as viewers and browsers do: the stored picture is upright, and
  the width and height the manifest records are the upright ones.
- Transparency (RGBA, LA, PA, RGBa, a palette or an RGB/L image with a transparent colour)
  is composited over white: the page a browser or viewer shows a transparent image on, and
  the background of most scanned or drawn data sets (glyphs, documents, product photos).
- 1-bit: 0 -> black, 1 -> white.
- 16-bit integer (I;16, I;16B, ...): the high byte (v >> 8), so 0..65535 maps linearly onto
  0..255; Pillow reads 16-bit RGB PNGs the same way, so every 16-bit file gets one rule.
- 32-bit integer (I): values inside 0..65535 are 16-bit data in a 32-bit container (how some
  TIFF writers and older Pillow versions hand out 16-bit files) and take the 16-bit rule; any
  other range is stretched linearly from the image's min..max onto 0..255.
- float (F): values inside [0, 1] (the float convention of imaging tools) scale by 255,
  rounded; any other range is stretched from min..max (NaN and Inf count as the minimum). An
  image of one constant value outside these ranges is black.
- CMYK, YCbCr, LAB, HSV and the rest: Pillow's own conversion to RGB. Embedded ICC profiles
  are not applied (a colour-managed viewer would; such files are rare in ML data sets).
An image that already is 8-bit RGB or greyscale JPEG/PNG, upright and without transparency,
is kept byte for byte.
"""

from __future__ import annotations

import struct

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # white, under any transparency
ORIENTATION = 0x0112  # the EXIF orientation tag; 1 = upright
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per sample


def is_plain(image: Image.Image) -> bool:
    """True when the file's own bytes already decode to the picture a viewer shows: an 8-bit
    RGB or greyscale JPEG/PNG, upright, with no transparency."""
    return (image.format in ("JPEG", "PNG") and image.mode in ("RGB", "L")
            and "transparency" not in image.info and _orientation(image) == 1)


def viewer_rgb(image: Image.Image) -> Image.Image:
    """`image` (any Pillow mode) as the upright 8-bit RGB picture a viewer shows (rules in the
    module docstring): (H, W) of the upright picture, mode "RGB"."""
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _DEPTH_MODES:
        gray = _to_8_bit(np.asarray(image))  # (H, W) uint8
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "1":
        return image.convert("L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ORIENTATION, 1))
    except (TypeError, ValueError, SyntaxError, OSError, struct.error):
        return 1  # malformed EXIF: viewers show such an image as stored


def _to_8_bit(values: np.ndarray) -> np.ndarray:
    """(H, W) samples of more than 8 bits -> (H, W) uint8 by the rules above."""
    if values.dtype.kind in "ui":
        if values.dtype.itemsize == 2 or (values.min() >= 0 and values.max() <= 65535):
            return (values.astype(np.uint32) >> 8).astype(np.uint8)  # the 16-bit rule
        return _stretch(values.astype(np.float64))
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    values = np.where(finite, values, values[finite].min())  # NaN, Inf -> the minimum
    if values.min() >= 0 and values.max() <= 1:
        return np.round(values * 255).astype(np.uint8)
    return _stretch(values)


def _stretch(values: np.ndarray) -> np.ndarray:
    """min..max -> 0..255 linearly, rounded; a constant image is black."""
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) * (255 / (high - low))).astype(np.uint8)
