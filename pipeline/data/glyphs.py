"""glyphs-LT: 100 classes of characters rendered offline from fonts shipped with matplotlib.

The second embedded data set (the first is digits-LT): the class structure of CIFAR-100-LT at a
cost a 2-core CPU can train in minutes. Each class is one character; each sample draws a font
(DejaVu Sans / Serif / Sans Mono and STIX General, each regular, bold, oblique and bold
oblique: 16 faces), a size, a position, a small rotation and shear, a stroke width, a
foreground and a background colour, and a textured, noisy background. The alphabet holds real
confusions (o / O / 0, l / I / 1, c / C, s / S, x / X, ...), so a small CNN stays well below
100 %.

Every sample's pixels are a pure function of (seed, split, class, index) through a
SeedSequence-keyed generator: the same bytes on every run and for any number of workers.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


# The 100 classes in label order; label 0 has the most train images. The order is a fixed
# shuffle (so each confusable group spans head and tail) of: digits, a-z, A-Z, 27 Greek letters
# that do not look like Latin ones, and 11 symbols.
CHARACTERS = ("DLΛ+!ΨAξλSizγ6QμfΩoH9Φw#BClxηδZWbFq4yt7ζτ>s5Iv1πθJΓYUeKψ@3V&αΣhn8Pm=OΔcσrG0?up2"
              "βεΘEjX<NφkTR%ΠdMΞ$agω")

FONT_FILES = tuple(
    f"{family}{style}.ttf"
    for family, styles in (("DejaVuSans", ("", "-Bold", "-Oblique", "-BoldOblique")),
                           ("DejaVuSerif", ("", "-Bold", "-Italic", "-BoldItalic")),
                           ("DejaVuSansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
                           ("STIXGeneral", ("", "Bol", "Italic", "BolIta")))
    for style in styles)

SPLITS = ("train", "val", "test")  # their index is part of every sample's seed key
SUPERSAMPLE = 2  # render at twice the side, then downsample: smooth edges after rotation
MAX_TRAIN_PER_CLASS = 400  # n_max of the long-tailed train split (CIFAR-100-LT has 500)

# Augmentation ranges, in units of the image side where they are lengths.
FONT_SIZE = (0.6, 0.9)  # em size; case pairs (c / C) overlap in apparent size
MAX_SHIFT = 0.1  # of the glyph centre from the image centre, each axis
MAX_ROTATION = 10.0  # degrees
MAX_SHEAR = 0.2  # horizontal shear factor
MAX_STROKE = 0.03  # outline width added around the glyph
MIN_CONTRAST = 0.5  # |luminance(fg) - luminance(bg)| in [0, 1]
TEXTURE_AMPLITUDE = 0.2  # low-frequency background texture, in [0, 1] intensity units
NOISE_STD = 0.04  # per-pixel Gaussian noise, in [0, 1] intensity units


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder (mpl-data/fonts/ttf): nothing is downloaded."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def sample_rng(seed_key: int, split: str, label: int, index: int) -> np.random.Generator:
    """The generator of one sample: a pure function of its key, independent of call order."""
    sequence = np.random.SeedSequence(seed_key, spawn_key=(SPLITS.index(split), label, index))
    return np.random.default_rng(sequence)


def render_glyph(character: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One sample of `character` on a `size` x `size` canvas -> (size, size, 3) uint8 RGB."""
    side = size * SUPERSAMPLE
    mask = _glyph_mask(character, side, rng)  # (side, side) float in [0, 1]
    mask = np.asarray(Image.fromarray(np.uint8(np.round(mask * 255))).resize(
        (size, size), Image.Resampling.BOX), dtype=np.float32)[:, :, None] / 255  # (S, S, 1)
    foreground, background = _colours(rng)  # (3,) each, in [0, 1]
    image = background * _texture(size, rng) * (1 - mask) + foreground * mask  # (S, S, 3)
    image += rng.normal(0.0, NOISE_STD, image.shape)
    return np.uint8(np.round(np.clip(image, 0, 1) * 255))


def _glyph_mask(character: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage of the glyph, drawn with a random face, size, stroke and offset, then rotated
    and sheared about the image centre: (side, side) float in [0, 1]."""
    font_file = FONT_FILES[rng.integers(len(FONT_FILES))]
    font_size = int(round(side * rng.uniform(*FONT_SIZE)))
    stroke = int(round(side * rng.uniform(0, MAX_STROKE)))
    centre = side / 2 + side * rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2)
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).text(tuple(centre), character, fill=255, anchor="mm",
                                font=_font(font_file, font_size), stroke_width=stroke,
                                stroke_fill=255)
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR)
    # Inverse map (output pixel -> input pixel) of rotate-then-shear about the centre.
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.array([[1, shear], [0, 1]]) @ np.array([[cos, -sin], [sin, cos]])
    inverse = np.linalg.inv(forward)
    middle = np.array([side / 2, side / 2])
    offset = middle - inverse @ middle
    coefficients = (*inverse[0], offset[0], *inverse[1], offset[1])
    warped = canvas.transform((side, side), Image.Transform.AFFINE, coefficients,
                              resample=Image.Resampling.BILINEAR)
    return np.asarray(warped, dtype=np.float32) / 255


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random foreground and background RGB colours whose luminances differ by at least
    MIN_CONTRAST, so the glyph stays visible; either may be the lighter one."""
    luminance = np.array([0.299, 0.587, 0.114])
    while True:
        foreground, background = rng.uniform(0, 1, size=(2, 3))
        if abs(luminance @ (foreground - background)) >= MIN_CONTRAST:
            return foreground, background


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random brightness field around 1: (size, size, 1) float32, a 4x4 grid of
    random values upsampled bilinearly (blotches about a quarter of the image wide)."""
    grid = rng.uniform(1 - TEXTURE_AMPLITUDE, 1 + TEXTURE_AMPLITUDE, size=(4, 4))
    field = Image.fromarray(grid.astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR)
    return np.asarray(field, dtype=np.float32)[:, :, None]


@lru_cache(maxsize=None)
def _font(font_file: str, font_size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / font_file), font_size)
