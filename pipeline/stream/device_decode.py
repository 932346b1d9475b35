"""Decoding on the training device (`student.decode: gpu`): the DataLoader workers only read
the encoded bytes and the cached logits; the trainer decodes a batch's JPEGs where it trains.

Two decode paths exist, and a store records the one its dump used (attribute `decode`):
- the CPU path (`pipeline.stream.augment.DECODE`, "pil-draft-v1"): each worker decodes with Pillow,
  a JPEG at a DCT draft scale when the crop is large enough, and cuts the view
  (`pipeline.stream.decode.SourceImage`);
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

from pipeline.stream.augment import DECODE, apply_view
from pipeline.errors import UserError

DEVICE_DECODE = "torchvision-full-v1"  # recorded in the store: full-size decode, apply_view
DECODE_SETTINGS = ("auto", "cpu", "gpu")

# What a worker ships per sample on the device path: a JPEG's bytes, or the (3, H, W) uint8
# pixels of an image of another format (PNG), decoded by Pillow as on the CPU path.
Payload = bytes | torch.Tensor


def decode_path(setting: str, device: torch.device, recorded: str | None = None) -> str:
    """The decode path for `student.decode` = `setting` on `device`: "cpu" -> DECODE, "gpu" ->
    DEVICE_DECODE, "auto" -> `recorded` (the path of the store being replayed) when given, else
    DECODE on every device. ValueError for another setting.

    `auto` takes only a measured path (DESIGN.md, "Scale"): the device path has never run on a
    GPU (benchmarks/gpu_check.py has not), so CUDA machines get the CPU path too until it has
    and its goals are met (BENCHMARKS.md section 7); `gpu` picks the device path by hand."""
    if setting == "cpu":
        return DECODE
    if setting == "gpu":
        return DEVICE_DECODE
    if setting != "auto":
        raise ValueError(f"decode setting must be one of {DECODE_SETTINGS}, got {setting!r}")
    if recorded is not None:
        return recorded
    return DECODE


SETTING_OF_PATH = {DECODE: "cpu", DEVICE_DECODE: "gpu"}


def describe_decode(path: str | None) -> str:
    """A decode path as its setting and name, e.g. "gpu (torchvision-full-v1)"."""
    if path is None:
        return f"cpu ({DECODE}; recorded before decode paths were)"
    setting = SETTING_OF_PATH.get(path)
    return f"{setting} ({path})" if setting else repr(path)


def decode_summary(path: str, setting: str, device: torch.device, *,
                   follows_store: bool = False) -> str:
    """The decode path in use, where it runs and why, for the dump's and the student's first
    lines, e.g. "decode cpu (pil-draft-v1) on cpu (student.decode: auto, no CUDA here)"."""
    why = f"student.decode: {setting}"
    if setting == "auto":
        why += (", following the store" if follows_store
                else ", the measured path; gpu (nvJPEG) is not measured on a GPU yet: "
                "BENCHMARKS.md section 7" if device.type == "cuda" else ", no CUDA here")
    where = device.type
    if path == DEVICE_DECODE and device.type != "cuda":
        where = "the CPU, in the training process (no CUDA: slower than the cpu path's workers)"
    return f"decode {describe_decode(path)} on {where} ({why})"


def check_replay_decode(store_path: str, recorded: str, path: str) -> None:
    """Refuse to replay a store dumped with decode path `recorded` through another `path`:
    drafted JPEG views, and the GPU's decoder and resize, can give other pixels than the
    teacher saw. (A PNG-only data set gives the same pixels either way on a CPU; the check
    does not look, so that one rule holds for every data set.)"""
    if recorded != path:
        setting = SETTING_OF_PATH.get(recorded)
        redump = "rerun dump_logits (dvc repro)"
        fix = (f"set student.decode: {setting} (or auto, which follows the store), or {redump}"
               if setting else redump)
        raise UserError(f"logit store {store_path} was dumped with student.decode "
                        f"{describe_decode(recorded)} but this student decodes with "
                        f"{describe_decode(path)}, so its views could differ from the "
                        f"teacher's pixels: {fix}")


def warn_if_decoded_elsewhere(store_path: str, recorded_device: str | None, path: str,
                              device: torch.device) -> None:
    """One line when the device path replays, on one kind of device, a store decoded on
    another: nvJPEG and libjpeg-turbo, and the CUDA and CPU resize kernels, may differ in the
    last bits of some pixels (benchmarks/gpu_check.py measures how much, and its effect on the
    teacher's logits against the store's own quantisation)."""
    if path == DEVICE_DECODE and recorded_device and recorded_device != device.type:
        print(f"note: {store_path} was decoded on {recorded_device} and this student decodes "
              f"on {device.type}: some pixels may differ in their last bits from the "
              "teacher's", flush=True)


def worker_payload(image) -> Payload:
    """What a DataLoader worker ships for one `pipeline.stream.decode.SourceImage` on the device path:
    a JPEG's encoded bytes as stored, any other image decoded to (3, H, W) uint8."""
    return image.data if image.jpeg else image.full()


def decode_on_device(payloads: Sequence[Payload], device: torch.device,
                     rows: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Each payload as a (3, H, W) uint8 RGB image on `device`: the JPEGs in one batched
    `decode_jpeg` call (nvJPEG on CUDA), the others moved there. A payload repeated in the
    list (the m views of one image, `student.views_per_decode`) is decoded once. A JPEG that
    does not decode raises UserError naming the `rows` of the batch."""
    first = {}  # id -> the payload's first position: repeats share one decode
    for i, payload in enumerate(payloads):
        first.setdefault(id(payload), i)
    images: dict[int, torch.Tensor] = {}
    jpegs = [i for i in first.values() if not isinstance(payloads[i], torch.Tensor)]
    if jpegs:
        # bytearray: decode_jpeg takes a CPU uint8 tensor, which torch.frombuffer may only
        # build over a writable buffer; the copy is a memcpy per image.
        encoded = [torch.frombuffer(bytearray(payloads[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = _decode_jpegs(encoded, device)
        except RuntimeError as error:
            where = f"rows {list(rows)}" if rows is not None else "this batch"
            raise UserError(f"a JPEG of {where} cannot be decoded on {device} ({error}); "
                            "set student.decode: cpu to find its shard, or rerun "
                            "prepare") from None
        images.update(zip(jpegs, decoded))
    for i in first.values():
        if i not in images:
            images[i] = payloads[i].to(device, non_blocking=True)
    return [images[first[id(payload)]] for payload in payloads]


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched decode_jpeg, made safe for the caller's stream on CUDA.

    On CUDA, torchvision allocates the outputs on the current stream but lets nvJPEG write
    them from a private stream that does not wait for the current stream's queued kernels
    (pytorch/vision#9606; torchcodec fixed its copy in meta-pytorch/torchcodec#1634): the
    caching allocator may hand it a block the previous training step has freed but not yet
    finished reading, and the step then reads decoded pixels. So the outputs are allocated on
    a side stream with no queued work (its memory pool is its own), the training stream waits
    for it, and `record_stream` keeps each output's block from reuse until the training
    stream is done with it. torchvision returns only after its private stream has finished.
    """
    with warnings.catch_warnings():  # deprecated in favour of TorchCodec (module docstring)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        if device.type != "cuda":
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in _SIDE_STREAMS:
            _SIDE_STREAMS[device] = torch.cuda.Stream(device)
        side = _SIDE_STREAMS[device]
        with torch.cuda.stream(side):
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    training = torch.cuda.current_stream(device)
    training.wait_stream(side)
    for image in decoded:
        image.record_stream(training)
    return decoded


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
