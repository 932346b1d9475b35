"""Decoder difference of the GPU check (part 4, the `decoder` child): nvJPEG (decode_on_device)
against Pillow (the CPU path's decode), in pixels and in the teacher's logits, beside the
store's quantisation error on the same logits; and whether decode_on_device overwrites memory
still to be read by kernels queued on the caller's stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gpu_check_data import data_folder, default_device, shards_path, store_path, teacher_path

TEACHER_LOGIT_STD = 3.0  # an ImageNet teacher's spread of logits per row
HAZARD_IMAGES, HAZARD_TRIALS = 16, 10  # decode_overwrites


def first_train_images(shards_dir: str, store, count: int) -> tuple[list, np.ndarray, np.ndarray]:
    """The first `count` train rows' SourceImages with their stored view 0: boxes (n, 4),
    flips (n,)."""
    from pipeline.data.manifest import load_manifest
    from pipeline.stream.decode import SourceImage
    from pipeline.stream.loader import read_shard, split_shards

    images, boxes, flips = [], [], []
    for shard in split_shards(shards_dir, load_manifest(shards_dir), "train"):
        stored = store.read_rows(0, shard.start, shard.stop)
        for sample in read_shard(shard):
            row = sample["meta"]["row"] - shard.start
            images.append(SourceImage(sample))
            boxes.append(stored["boxes"][row])
            flips.append(stored["flips"][row])
            if len(images) == count:
                return images, np.stack(boxes), np.array(flips)
    return images, np.stack(boxes), np.array(flips)


def pixel_difference(first, second) -> dict:
    """Max and mean |first - second| (grey levels) and the share of differing values over
    two lists (or batches) of uint8 images of equal shapes."""
    largest, total, differing, count = 0, 0, 0, 0
    for a, b in zip(first, second):
        difference = (a.cpu().int() - b.cpu().int()).abs()
        largest = max(largest, int(difference.max()))
        total += int(difference.sum())
        differing += int((difference > 0).sum())
        count += difference.numel()
    return {"max": largest, "mean": total / count, "differing": differing / count}


def logit_difference(first: torch.Tensor, second: torch.Tensor) -> dict:
    """Max and mean |first - second| over (n, C) logits, and the rms of the difference
    centred per row (a row's common shift changes neither its softmax nor any pairwise
    difference, which is all IKL-KD reads)."""
    difference = first.double() - second.double()
    centred = difference - difference.mean(dim=1, keepdim=True)
    return {"max": float(difference.abs().max()), "mean": float(difference.abs().mean()),
            "centred_rms": float(centred.pow(2).mean().sqrt())}


def store_round_trip(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """(n, C) logits as a store with a quantised tail gives them back: encode_logits with a
    tail basis fitted on them (as the dump fits one on its teacher), then decode_logits."""
    from pipeline.store import encode_logits, fit_tail_basis
    from pipeline.store.encoding import decode_logits
    from pipeline.store.tail import tail_components

    num_classes = logits.shape[1]
    basis = fit_tail_basis(torch.log_softmax(logits.double(), dim=1).numpy(),
                           tail_components(num_classes))
    stored = encode_logits(logits.numpy(), topk, basis)
    return torch.from_numpy(decode_logits(stored, num_classes, basis))


def set_tf32_convolutions(enabled: bool) -> None:
    """cuDNN convolutions in TF32 (PyTorch's default) or in full fp32."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = enabled


@torch.no_grad()
def teacher_logits(teacher, views: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(n, C) float32 logits (on the CPU) of (n, 3, S, S) uint8 views, eval mode, no autocast."""
    from pipeline.stream.augment import normalize

    return torch.cat([teacher(normalize(chunk.to(device))).float().cpu()
                      for chunk in views.split(64)])


def check_teacher(settings: dict, folder: Path, weights: str | None, device: torch.device,
                  views: torch.Tensor) -> tuple[torch.nn.Module, str]:
    """The teacher of the check, in eval mode on `device`, and what it is: the ImageNet
    weights in `weights`, else the dump's untrained teacher with its head rescaled so that
    its logits on `views` spread TEACHER_LOGIT_STD per row."""
    from pipeline.train.checkpoints import load_model
    from pipeline.train.models import build_model, classifier_head, load_weights

    arch = settings["teacher_arch"]
    if weights:
        model = load_weights(build_model(arch, 1000), weights)  # torchvision's ImageNet head
        return model.eval().to(device), f"{arch} from {weights}"
    model, _ = load_model(teacher_path(folder, settings))
    model = model.to(device)
    spread = float(teacher_logits(model, views, device).std(dim=1).mean())
    factor = TEACHER_LOGIT_STD / spread
    head = model.get_submodule(classifier_head(model))
    with torch.no_grad():
        head.weight.mul_(factor)
        head.bias.mul_(factor)
    return model, (f"untrained {arch} (BatchNorm calibrated), its {classifier_head(model)} "
                   f"layer rescaled x{factor:.3g} to a per-row logit std of "
                   f"{TEACHER_LOGIT_STD:g} (was {spread:.3g})")


def decode_overwrites(payloads: list, device: torch.device) -> int | None:
    """Of HAZARD_TRIALS decode_on_device calls, how many wrote into memory that kernels queued
    on the caller's stream had still to read (None off CUDA). Each trial fills uint8 blocks of
    the decoded images' shapes, queues a long kernel then a sum of each block and frees the
    blocks (the caching allocator hands them out again at once: their last use is ordered on
    this stream), then decodes: a sum that is not its block's count of ones was read after
    the decoder overwrote it (torchvision's nvJPEG decode does not wait for the caller's
    stream: pytorch/vision#9606). fit() queues steps ahead, so a decode in training can."""
    from pipeline.stream.device_decode import decode_on_device

    if device.type != "cuda" or not hasattr(torch.cuda, "_sleep"):
        return None
    shapes = [image.shape for image in decode_on_device(payloads, device)]
    corrupted = 0
    for _ in range(HAZARD_TRIALS):
        blocks = [torch.ones(shape, dtype=torch.uint8, device=device) for shape in shapes]
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time queued before the sums
        sums = [block.sum() for block in blocks]
        del blocks
        decode_on_device(payloads, device)
        torch.cuda.synchronize()
        corrupted += any(int(total) != shape.numel() for total, shape in zip(sums, shapes))
    return corrupted


def decoder_child(settings: dict, work: Path, weights: str | None) -> dict:
    """Pixels and teacher logits of the device decode (nvJPEG on CUDA) against the CPU path's
    decode (Pillow), and the store's quantisation error on the same logits."""
    from pipeline.stream.device_decode import cut_views, decode_on_device, worker_payload
    from pipeline.store import open_store

    device, size = default_device(), settings["image_size"]
    folder = data_folder(work, settings)
    store = open_store(str(store_path(folder, settings)))
    images, boxes, flips = first_train_images(str(shards_path(folder, settings)), store,
                                              settings["check_images"])
    pillow = [image.full() for image in images]  # (3, H, W) uint8 each, the CPU path's decode
    on_device = decode_on_device([worker_payload(image) for image in images], device)
    pillow_views = cut_views(pillow, boxes, flips, size)  # (n, 3, S, S): the CPU path's
    decoder_views = cut_views([image.cpu() for image in on_device], boxes, flips, size)
    trained_views = cut_views(on_device, boxes, flips, size).cpu()  # as the device path trains
    set_tf32_convolutions(False)
    teacher, described = check_teacher(settings, folder, weights, device, pillow_views)
    logits = {name: teacher_logits(teacher, views, device) for name, views in
              (("pillow", pillow_views), ("decoder", decoder_views),
               ("trained", trained_views))}
    set_tf32_convolutions(True)
    tf32 = teacher_logits(teacher, trained_views, device)
    payloads = [worker_payload(image) for image in images[:HAZARD_IMAGES]]
    return {
        "overwrites": decode_overwrites(payloads, device),
        "images": len(images), "device": str(device), "teacher": described,
        "megapixels": sum(image.shape[1] * image.shape[2] for image in pillow) / 1e6 / len(images),
        "pixels": {"full": pixel_difference(on_device, pillow),
                   "decoder": pixel_difference(decoder_views, pillow_views),
                   "trained": pixel_difference(trained_views, pillow_views)},
        "logits": {"decoder": logit_difference(logits["decoder"], logits["pillow"]),
                   "trained": logit_difference(logits["trained"], logits["pillow"]),
                   "store": logit_difference(store_round_trip(logits["pillow"],
                                                              settings["topk"]),
                                             logits["pillow"]),
                   "tf32": logit_difference(tf32, logits["trained"])},
        "logit_std": float(logits["pillow"].std(dim=1).mean()),
    }
