"""GPU check: what one GPU session runs before `student.decode: auto` may take the device path.

    python benchmarks/gpu_check.py            # on a CUDA machine: checks, then the timings
    python benchmarks/gpu_check.py --smoke    # the checks' code on the CPU; judges nothing

Checks, on the GPU (on the CPU with --smoke, torchvision's CPU decode in nvJPEG's place):
1. decode: the device decode (pipeline.stream.device_decode.decode_on_device: nvJPEG) against the
   CPU path's (SourceImage.full) on photo-like JPEGs: pixels of the full images and of views
   cut on each device, then an untrained teacher's fp32 logits (its head rescaled to a logit
   spread of 3 per row, an ImageNet teacher's) on both sets of views, against the store's own
   quantisation error on the same logits (row-centred rms: a row's common shift changes neither
   softmax nor IKL); and whether decode_on_device writes into memory that kernels queued on
   the caller's stream have still to read (pytorch/vision#9606).
2. losses: IKL-KD and KL-KD (value and gradient) and the dequantisation of a store's fields
   computed on the device against the CPU.
3. stages: dump_logits then train_student (1 epoch) with `student.decode` auto and gpu: the
   decode path each takes on this device, and a finite training loss.
Then, on CUDA, the timings of the folded scripts, each printing its own goals:
loader.py, epoch_cost.py and losses.py with --device cuda.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (load_line, make_params, prepare, raw_params, verdict,  # noqa: E402
                    write_teacher_checkpoint)

HERE = Path(__file__).resolve().parent
FULL = dict(classes=8, per_class=8, sides=(300, 500), size=224, arch="resnet50", batch=16)
SMOKE = dict(classes=6, per_class=4, sides=(48, 80), size=32, arch="resnet18", batch=8)
LOSS_TOLERANCE = 1e-4  # relative, float32 on two devices: other reduction orders
HAZARD_TRIALS = 10
TIMINGS = [["loader.py", "--workers", "4", "--classes", "100", "--per-class", "40",
            "--max-side", "0", "--epochs", "3", "--rounds", "2"],
           ["epoch_cost.py", "--rounds", "2"], ["losses.py", "--batch", "256", "--rounds", "3"]]


def difference(first: torch.Tensor, second: torch.Tensor) -> dict:
    """Max and mean |first - second|, the share of differing values, the row-centred rms."""
    delta = first.double().cpu() - second.double().cpu()
    rows = delta.reshape(len(delta), -1)
    return {"max": float(delta.abs().max()), "mean": float(delta.abs().mean()),
            "differing": float((delta != 0).double().mean()),
            "centred_rms": float((rows - rows.mean(1, keepdim=True)).pow(2).mean().sqrt())}


def line(name: str, d: dict) -> str:
    return (f"  {name}: max {d['max']:.3g}, mean {d['mean']:.3g}, {100 * d['differing']:.2f}% "
            f"of values differ, row-centred rms {d['centred_rms']:.3g}")


def decode_check(shards: Path, work: Path, settings: dict, device: torch.device) -> list:
    from pipeline.data.manifest import load_manifest
    from pipeline.store import encode_logits, fit_tail_basis
    from pipeline.store.dump import _ieee_float32
    from pipeline.store.encoding import decode_logits
    from pipeline.store.tail import tail_components
    from pipeline.stream.augment import draw_views, normalize
    from pipeline.stream.decode import SourceImage
    from pipeline.stream.device_decode import cut_views, decode_on_device, worker_payload
    from pipeline.stream.loader import read_shard, split_shards
    from pipeline.train.checkpoints import load_model
    from pipeline.train.models import classifier_head

    manifest = load_manifest(str(shards))
    samples = [s for shard in split_shards(str(shards), manifest, "train")
               for s in read_shard(shard)]
    images = [SourceImage(sample) for sample in samples]
    on_cpu = [image.full() for image in images]  # (3, H, W) uint8 each: the CPU path's decode
    on_device = decode_on_device([worker_payload(image) for image in images], device)
    boxes, flips = draw_views(0, 1, [s["meta"]["row"] for s in samples],
                              [i.height for i in images], [i.width for i in images])
    size = settings["size"]
    cpu_views = cut_views(on_cpu, boxes[0], flips[0], size)  # (n, 3, S, S)
    device_views = cut_views(on_device, boxes[0], flips[0], size)  # as the device path trains
    print(f"\n1. decode: {len(images)} JPEGs, {decode_on_device.__module__}.decode_on_device on "
          f"{device} vs SourceImage.full on the CPU; views of {size} px")
    print(line("pixels, full images", difference(torch.cat([i.flatten() for i in on_device]).cpu(),
                                                 torch.cat([i.flatten() for i in on_cpu]))))
    print(line("pixels, views", difference(device_views, cpu_views)))
    checkpoint = write_teacher_checkpoint(work / "teacher.pt", settings["arch"],
                                          manifest["num_classes"], size, manifest["fingerprint"])
    teacher = load_model(checkpoint)[0].to(device).eval()
    with _ieee_float32(), torch.no_grad():  # full fp32 convolutions, as the dump runs them
        def logits(views):  # (n, C) float32 on the CPU
            return teacher(normalize(views.to(device))).float().cpu()

        head = teacher.get_submodule(classifier_head(teacher))
        factor = 3.0 / float(logits(cpu_views).std(dim=1).mean())
        head.weight.mul_(factor)
        head.bias.mul_(factor)
        reference, decoded = logits(cpu_views), logits(device_views)
    classes = reference.shape[1]
    basis = fit_tail_basis(torch.log_softmax(reference.double(), 1).numpy(),
                           tail_components(classes))
    stored = torch.from_numpy(decode_logits(encode_logits(reference.numpy(), 5, basis), classes,
                                            basis))
    decoder, store = difference(decoded, reference), difference(stored, reference)
    print(line("teacher logits, device decode vs CPU decode", decoder))
    print(line("teacher logits, the store's quantisation (top-5 + quantised tail)", store))
    payloads = [worker_payload(image) for image in images[:16]]
    overwrites = decode_overwrites(payloads, device)
    print("  decode_on_device with reads still queued on the caller's stream: "
          + ("not applicable off CUDA" if overwrites is None else
             f"{overwrites} of {HAZARD_TRIALS} trials overwrote them"))
    return [("decoder difference below the store's quantisation (row-centred rms)",
             f"{decoder['centred_rms']:.3g} vs {store['centred_rms']:.3g}",
             decoder["centred_rms"] < store["centred_rms"]),
            ("decode_on_device never overwrites queued reads",
             "not applicable off CUDA" if overwrites is None else f"{overwrites} trials",
             not overwrites)]


def decode_overwrites(payloads: list, device: torch.device) -> int | None:
    """Of HAZARD_TRIALS decode_on_device calls, how many wrote into blocks that kernels queued
    on the caller's stream had still to read (None off CUDA): each trial fills blocks of the
    decoded shapes with ones, queues a long kernel then a sum of each, frees the blocks (the
    caching allocator hands them out again at once), then decodes; a wrong sum was read after
    the decoder overwrote its block. fit() queues steps ahead, so a decode in training can."""
    from pipeline.stream.device_decode import decode_on_device

    if device.type != "cuda":
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


def loss_check(device: torch.device) -> list:
    from pipeline.store import encode_logits, fit_tail_basis, teacher_logits_from_fields
    from pipeline.store.encoding import decode_fields
    from pipeline.store.tail import tail_components
    from pipeline.train.losses import ikl_kd_loss, kl_kd_loss

    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(64, 1000, generator=generator) * 3 for _ in range(2))
    basis = fit_tail_basis(torch.log_softmax(teacher.double(), 1).numpy(), tail_components(1000))
    fields = {k: torch.from_numpy(v) for k, v in
              decode_fields(encode_logits(teacher.numpy(), 5, basis)).items()}
    losses = {"IKL-KD": lambda s, t: ikl_kd_loss(s, t, alpha=1.0, beta=1.0, temperature=1.0,
                                                 weight_temperature=100.0),
              "KL-KD": lambda s, t: kl_kd_loss(s, t, temperature=1.0)}

    def on(where: torch.device) -> dict:
        stored = teacher_logits_from_fields({k: v.to(where) for k, v in fields.items()}, 1000,
                                            basis.to(where))
        results = {"dequantised teacher": stored.cpu()}
        for name, loss in losses.items():
            s = student.clone().to(where).requires_grad_(True)  # a new leaf on each call
            value = loss(s, teacher.to(where))
            value.backward()
            results[f"{name} value"] = value.detach().cpu()
            results[f"{name} gradient"] = s.grad.cpu()
        return results

    here, cpu = on(device), on(torch.device("cpu"))
    worst = max(float((here[k] - cpu[k]).abs().max() / cpu[k].abs().max()) for k in cpu)
    print(f"\n2. losses on {device} vs the CPU, B 64, C 1000: " + ", ".join(
        f"{k} {float((here[k] - cpu[k]).abs().max() / cpu[k].abs().max()):.2g}" for k in cpu)
        + " (max |difference| / max |value|)")
    return [("losses and dequantisation equal the CPU's", f"{worst:.2g} (tolerance "
             f"{LOSS_TOLERANCE:g})", worst <= LOSS_TOLERANCE)]


def stage_check(data, shards: Path, work: Path, settings: dict, device: torch.device) -> list:
    from pipeline.store import open_store
    from pipeline.store.dump import dump_logits
    from pipeline.train.runs import student_decode_path, train_student

    goals = []
    print(f"\n3. stages on {device}: dump_logits, then train_student for 1 epoch")
    for decode in ("auto", "gpu"):
        train = dict(arch=settings["arch"], image_size=settings["size"], epochs=1, lr=0.01,
                     batch_size=settings["batch"], warmup_epochs=0, workers=1)
        params = make_params(raw_params(
            data, student={**train, "loss": "ikl", "decode": decode}, teacher=train,
            logits={"views": 1, "topk": 5, "tail": "quantized", "image_size": settings["size"],
                    "batch_size": settings["batch"]}))
        store = work / f"store-{decode}.zarr"
        dump_logits(params, "teacher", str(shards), str(work / "teacher.pt"), str(store))
        path = student_decode_path(params.student, device, open_store(str(store)))
        metrics = train_student(params, str(shards), str(store), str(work / "teacher.pt"),
                                str(work / f"student-{decode}"), str(work / f"live-{decode}"))
        loss = metrics["train/loss"]
        print(f"  student.decode {decode}: the decode path {path}, train loss {loss:.4g}")
        goals.append((f"stages with student.decode {decode}", f"path {path}, loss {loss:.4g}",
                      math.isfinite(loss)))
    return goals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the checks' code on the CPU")
    smoke = p.parse_args().smoke
    if smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA starts: every check on the CPU
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a CUDA machine, or pass --smoke to "
                 "run the checks' code on the CPU (it judges nothing)")
    torch.set_num_threads(1)
    device, settings = torch.device("cpu" if smoke else "cuda"), SMOKE if smoke else FULL
    import torchvision

    where = "CPU (smoke: judges nothing)" if smoke else torch.cuda.get_device_name()
    print(f"GPU check on {where}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, {load_line()}")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        work = Path(scratch)
        manifest, data, shards = prepare(work, "photo", settings["classes"],
                                         settings["per_class"], sides=settings["sides"])
        goals = decode_check(shards, work, settings, device)
        goals += loss_check(device)
        goals += stage_check(data, shards, work, settings, device)
    print("\nchecks:")
    for name, figure, met in goals:
        print(f"  {name}: {figure}: {'n/a (smoke)' if smoke else verdict(met)}")
    if not smoke:
        for script, *options in TIMINGS:
            command = [sys.executable, str(HERE / script), "--device", "cuda", *options]
            print(f"\n$ python benchmarks/{script} --device cuda {' '.join(options)}", flush=True)
            subprocess.run(command, check=False)
    print(f"\n{load_line()} (at the end)")


if __name__ == "__main__":
    main()
