"""Decoding on the training device (`student.decode: gpu`): the DataLoader workers only read
the encoded bytes and the cached logits; the trainer decodes a batch's JPEGs where it trains.

Two decode paths exist, and a store records the one its dump used (attribute `decode`):
- the CPU path (`pipeline.augment.DECODE`, "pil-draft-v1"): each worker decodes with Pillow,
  a JPEG at a DCT draft scale when the crop is large enough, and cuts the view
  (`pipeline.stream.SourceImage`);
- the device path (`DEVICE_DECODE`): the workers ship a JPEG's bytes as they are (any other
  image they decode, losslessly, to its pixels), and the trainer decodes a batch's JPEGs in
  one `torchvision.io.decode_jpeg` call on its device (nvJPEG on CUDA, libjpeg-turbo on the
  CPU), always at full size, then cuts every stored view with `apply_view`, the CPU path's own
  crop code, on the device.
On the CPU the two paths give the same pixels, bit for bit, for every view the CPU path
decodes at full size (tests/test_device_decode.py); nvJPEG's IDCT and chroma upsampling may
differ from libjpeg-turbo's in the last bits (benchmarks/gpu_check.py measures by how much,
and what that does to the teacher's logits). The dump decodes the way its student will
(`student.decode`), so the replay is the dump's pixels.

torchvision marks its image decoders deprecated from 0.29 in favour of TorchCodec, which the
package registries here do not hold; the nvJPEG batch decode is the one this module needs, so
the warning is silenced around that call only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.augment import DECODE, apply_view
from pipeline.errors import UserError

DEVICE_DECODE = "torchvision-full-v1"  # recorded in the store: full-size decode, apply_view
DECODE_SETTINGS = ("auto", "cpu", "gpu")

# What a worker ships per sample on the device path: a JPEG's bytes, or the (3, H, W) uint8
# pixels of an image of another format (PNG), decoded by Pillow as on the CPU path.
Payload = bytes | torch.Tensor


def decode_path(setting: str, device: torch.device, recorded: str | None = None) -> str:
    """The decode path for `student.decode` = `setting` on `device`: "cpu" -> DECODE, "gpu" ->
    DEVICE_DECODE, "auto" -> `recorded` (the path of the store being replayed) when given, else
    DEVICE_DECODE on CUDA and DECODE elsewhere. ValueError for another setting."""
    if setting == "cpu":
        return DECODE
    if setting == "gpu":
        return DEVICE_DECODE
    if setting != "auto":
        raise ValueError(f"decode setting must be one of {DECODE_SETTINGS}, got {setting!r}")
    if recorded is not None:
        return recorded
    return DEVICE_DECODE if device.type == "cuda" else DECODE


def check_replay_decode(store_path: str, recorded: str, path: str) -> None:
    """Refuse to replay a store dumped with decode path `recorded` through another `path`: the
    views would not be the teacher's pixels (drafted JPEG views differ by up to a few levels)."""
    if recorded != path:
        setting = {DECODE: "cpu", DEVICE_DECODE: "gpu"}.get(recorded)
        fix = (f"set student.decode: {setting} or auto, or rerun dump_logits" if setting
               else "rerun dump_logits")
        raise UserError(f"logit store {store_path} was dumped with decode path {recorded!r}; "
                        f"this student decodes with {path!r}, so its views would not be the "
                        f"teacher's pixels: {fix}")


def worker_payload(image) -> Payload:
    """What a DataLoader worker ships for one `pipeline.stream.SourceImage` on the device path:
    a JPEG's encoded bytes as stored, any other image decoded to (3, H, W) uint8."""
    return image.data if image.jpeg else image.full()


def decode_on_device(payloads: Sequence[Payload], device: torch.device,
                     rows: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Each payload as a (3, H, W) uint8 RGB image on `device`: the JPEGs in one batched
    `decode_jpeg` call (nvJPEG on CUDA), the others moved there. A JPEG that does not decode
    raises UserError naming the `rows` of the batch."""
    images: list[torch.Tensor | None] = [None] * len(payloads)
    jpegs = [i for i, payload in enumerate(payloads) if not isinstance(payload, torch.Tensor)]
    if jpegs:
        # bytearray: decode_jpeg takes a CPU uint8 tensor, which torch.frombuffer may only
        # build over a writable buffer; the copy is a memcpy per image.
        encoded = [torch.frombuffer(bytearray(payloads[i]), dtype=torch.uint8) for i in jpegs]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*deprecated.*")
                decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as error:
            where = f"rows {list(rows)}" if rows is not None else "this batch"
            raise UserError(f"a JPEG of {where} cannot be decoded on {device} ({error}); "
                            "set student.decode: cpu to find its shard, or rerun "
                            "prepare") from None
        for i, image in zip(jpegs, decoded):
            images[i] = image
    for i, payload in enumerate(payloads):
        if images[i] is None:
            images[i] = payload.to(device, non_blocking=True)
    return images


def device_views(payloads: Sequence[Payload], boxes: torch.Tensor, flips: torch.Tensor,
                 size: int, device: torch.device,
                 rows: Sequence[int] | None = None) -> torch.Tensor:
    """The views of a batch, decoded and cut on `device`: (B, 3, size, size) uint8.

    payloads: B worker payloads; boxes: (B, 4) float32 normalised (top, left, height, width),
    on the CPU; flips: (B,) bool. Each view is `apply_view` of the full-size decode.
    """
    return cut_views(decode_on_device(payloads, device, rows), boxes, flips, size)


def cut_views(images: Sequence[torch.Tensor], boxes, flips, size: int) -> torch.Tensor:
    """`apply_view` of each (3, H, W) uint8 image on its device: (B, 3, size, size) uint8.
    boxes: (B, 4) normalised, numpy or a CPU tensor; flips: (B,) bool."""
    return torch.stack([apply_view(image, box, bool(flip), size)
                        for image, box, flip in zip(images, np.asarray(boxes), np.asarray(flips))])


def batch_pixels(batch: dict, device: torch.device, size: int) -> torch.Tensor:
    """A training batch's images on `device`, (B, 3, size, size) uint8: moved there when the
    workers cut them (CPU path), decoded and cut there from `payloads`, `boxes` and `flips`
    (device path)."""
    if "images" in batch:
        return batch["images"].to(device, non_blocking=True)
    return device_views(batch["payloads"], batch["boxes"], batch["flips"], size, device,
                        batch["rows"].tolist())
