"""The CPU decode of one sample's image: `SourceImage` decodes a JPEG once per draft scale its
views need (simplejpeg, libjpeg-turbo bundled in its wheel, bit for bit Pillow's draft-mode
pixels; Pillow for PNG, CMYK and what simplejpeg refuses). The teacher's dump and the student's
replay both decode here, so a stored view is the same pixels in both."""

from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.stream.augment import apply_view, apply_view_drafted, draft_scale
from pipeline.stream.tars import CorruptShardError, corrupt_shard

def decode(sample: dict) -> torch.Tensor:
    """The sample's image as (3, H, W) uint8 RGB, decoded as the training views are
    (`SourceImage`: simplejpeg for JPEGs, else Pillow)."""
    return SourceImage(sample).full()


def _rgb_tensor(image: Image.Image) -> torch.Tensor:
    """Decode `image` (opened, not loaded) to (3, H, W) uint8 RGB."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # np.array: (H, W, 3), writable


class SourceImage:
    """One sample's encoded image, decoded lazily, once per JPEG draft scale its views need:
    the one decode path of the teacher's dump and the student's replay, so the same view of
    the same row is the same pixels in both (pipeline.stream.augment.DECODE; tests/test_decode.py).
    `height`, `width`: the source image's size, from its header.

    JPEGs in YCbCr or grayscale are decoded by simplejpeg (libjpeg-turbo in its wheel) straight
    into a numpy array, at the DCT scale a view's draft needs: the same libjpeg-turbo decode
    Pillow runs (islow IDCT, fancy upsampling), so the same pixels, bit for bit
    (tests/test_decode.py compares both at every draft scale), for about 0.6x Pillow's CPU on
    photo-sized JPEGs (benchmarks/decode_steps.py): Pillow feeds libjpeg in chunks and copies
    the image once more into numpy. Other images (PNG, CMYK JPEGs) and JPEGs simplejpeg
    refuses (it stops at libjpeg's warnings) take Pillow's path, as before. `turbo=False`
    forces Pillow's path (the benchmarks' "before")."""

    def __init__(self, sample: dict, turbo: bool = True):
        self.sample, self.data = sample, image_bytes(sample)  # the encoded file
        self._unread = None
        header = _turbo_header(self.data) if turbo else None
        if header is not None:
            self.height, self.width = header
            self.jpeg = self.turbo = True
        else:
            with image_errors(sample):
                self._unread = Image.open(io.BytesIO(self.data))  # header only
            self.height, self.width = self._unread.height, self._unread.width
            self.jpeg, self.turbo = self._unread.format == "JPEG", False
        self._decoded = {}  # draft scale -> (3, H, W) tensor at scale 1, RGB PIL image above

    def crop(self, box, flip: bool, size: int) -> torch.Tensor:
        """The view (normalised `box`, `flip`) at `size` px: (3, size, size) uint8."""
        scale = draft_scale(box, self.height, self.width, size) if self.jpeg else 1
        if scale == 1:
            return apply_view(self.full(), box, flip, size)
        return apply_view_drafted(self._drafted(scale), box, flip, size, self.height,
                                  self.width, scale)

    def full(self) -> torch.Tensor:
        """The whole image, decoded at full size: (3, H, W) uint8."""
        if 1 not in self._decoded:
            pixels = self._turbo(1) if self.turbo else None
            if pixels is None:
                with image_errors(self.sample), self._unopened() as image:
                    self._decoded[1] = _rgb_tensor(image)
            else:
                self._decoded[1] = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W)
        return self._decoded[1]

    def _drafted(self, scale: int) -> Image.Image:
        if scale not in self._decoded:
            pixels = self._turbo(scale) if self.turbo else None
            if pixels is not None:
                drafted = Image.fromarray(pixels)
            else:
                with image_errors(self.sample), self._unopened() as image:
                    # asks for the scale exactly: PIL picks the largest s <= width // requested
                    image.draft(image.mode, (self.width // scale, self.height // scale))
                    drafted = image.convert("RGB")
            expected = (-(-self.width // scale), -(-self.height // scale))
            if drafted.size != expected:  # a decoder whose draft rounds otherwise
                raise RuntimeError(f"JPEG draft at 1/{scale} gave {drafted.size}, expected "
                                   f"{expected}: this Pillow or simplejpeg is not supported")
            self._decoded[scale] = drafted
        return self._decoded[scale]

    def _turbo(self, scale: int) -> np.ndarray | None:
        """(H / scale, W / scale, 3) uint8 RGB by simplejpeg at DCT scale 1 / `scale` (sides
        rounded up, as Pillow's draft), or None when it refuses the data (Pillow then decodes
        it as before, or names the shard as corrupt)."""
        try:
            return simplejpeg.decode_jpeg(self.data, "RGB", min_factor=scale,
                                          min_height=-(-self.height // scale),
                                          min_width=-(-self.width // scale))
        except ValueError:
            self.turbo = False
            return None

    def _unopened(self) -> Image.Image:
        """The file opened but not decoded: the header's on first use, then a new one."""
        image, self._unread = self._unread, None
        return image if image is not None else Image.open(io.BytesIO(self.data))


# libjpeg colour spaces whose RGB output is Pillow's convert("RGB") of its own decode.
_TURBO_COLORSPACES = ("YCbCr", "Gray")


def _turbo_header(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG that simplejpeg decodes as Pillow would, else None."""
    if data[:2] != b"\xff\xd8":  # not a JPEG (PNG): simplejpeg would only raise
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width) if colorspace in _TURBO_COLORSPACES else None


@contextmanager
def image_errors(sample: dict):
    """PIL's errors on the sample's bytes as a CorruptShardError naming the shard."""
    where = sample.get("__url__")
    try:
        yield
    except UnidentifiedImageError:
        raise CorruptShardError(corrupt_shard(where, f"sample {sample['__key__']} is not an "
                                                "image")) from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for damaged data
        raise CorruptShardError(corrupt_shard(where, f"sample {sample['__key__']} cannot be "
                                                f"decoded: {error}")) from None


def image_bytes(sample: dict) -> bytes:
    data = sample.get("jpg", sample.get("png"))
    if data is None:
        raise CorruptShardError(corrupt_shard(sample.get("__url__"),
                                         f"sample {sample['__key__']} has no jpg/png"))
    return data
