"""GPU check: cached IKL-KD vs plain CE training steps of a ResNet-50 student at 224 px.

    python benchmarks/gpu_check.py                # on a CUDA machine (a few minutes)
    python benchmarks/gpu_check.py --smoke        # tiny CPU run of the same code path

Both configurations run the real training loop, pipeline.train.fit (bf16 autocast,
channels_last, pinned memory and non-blocking copies, the per-step loss logging), on the same
in-memory batches: random uint8 images (the convolutions' cost does not depend on the pixels)
with labels and a synthetic top-k store entry per sample (top-k float16 logits, int64 class ids,
float32 log-sum-exp of random teacher logits), as pipeline.stream delivers them. The loader is
left out on purpose: the goal is the step's cost, which the loader must only keep fed.
The IKL run expands the top-k with pipeline.distill.CachedTeacher and uses the student objective
of pipeline.distill.student_objective (IKL-KD with sample-wise weights at T2 = 100, plus CE).

Each run is a fresh subprocess: --warmup steps (epoch 1: cuDNN and allocator warm-up), then
--steps timed steps (epoch 2), clocked with CUDA synchronisation at both ends; peak GPU memory
is torch.cuda.max_memory_allocated over the timed epoch. CE and IKL alternate over --rounds
rounds; figures are medians. Loss share: the same child then times the loss alone on the
student's (B, C) logits (CachedTeacher's copy and decoding + the objective, forward and
backward) and divides by the step time; the marginal share (IKL step - CE step) / IKL step is
printed beside it. Goals: IKL / CE throughput >= 0.95; loss < 1 % of the step.
Never imported by the tests: it needs a GPU (or --smoke) and minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TimedBatches, load_line, median, run_child, verdict  # noqa: E402

THROUGHPUT_GOAL, LOSS_SHARE_GOAL = 0.95, 0.01
FULL = dict(arch="resnet50", image_size=224, batch_size=128, classes=1000, topk=5,
            steps=300, warmup=30, rounds=2, loss_repeats=200)
SMOKE = dict(arch="resnet18", image_size=32, batch_size=8, classes=100, topk=5,
             steps=4, warmup=2, rounds=1, loss_repeats=5)
DISTINCT_BATCHES = 8  # cycled: enough that no batch stays in a cache between its uses


def tail_basis(settings: dict):
    """The quantised tail's basis of the synthetic teacher (pipeline.store.tail)."""
    from pipeline.store import fit_tail_basis
    from pipeline.store.tail import tail_components

    teacher = torch.randn(2048, settings["classes"], generator=torch.Generator().manual_seed(1))
    log_probs = torch.log_softmax(3 * teacher.double(), dim=1).numpy()
    return fit_tail_basis(log_probs, tail_components(settings["classes"]))


def synthetic_batches(settings: dict, pin: bool, basis) -> list[dict]:
    """DISTINCT_BATCHES batches shaped like pipeline.stream's (CPU tensors, pinned on CUDA),
    the teacher's fields encoded by the store's own encoder with a quantised tail."""
    from pipeline.store.encoding import decode_fields, encode_logits

    generator = torch.Generator().manual_seed(0)
    size, batch, classes = settings["image_size"], settings["batch_size"], settings["classes"]
    batches = []
    for _ in range(DISTINCT_BATCHES):
        teacher = torch.randn(batch, classes, generator=generator) * 3  # (B, C)
        fields = decode_fields(encode_logits(teacher.numpy(), settings["topk"], basis))
        entry = {"images": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                                         generator=generator),
                 "labels": torch.randint(0, classes, (batch,), generator=generator),
                 "rows": torch.arange(batch),
                 **{name: torch.from_numpy(value.astype("int64") if name == "topk_classes"
                                           else value) for name, value in fields.items()}}
        batches.append({k: v.pin_memory() if pin else v for k, v in entry.items()})
    return batches


def child(loss: str, settings: dict) -> dict:
    """fit() the student for warmup + steps steps with `loss` ("ce" or "ikl")."""
    from pipeline.distill import CachedTeacher, student_objective
    from pipeline.models import build_model
    from pipeline.params import StudentParams
    from pipeline.train import TrainRun, fit

    cuda = torch.cuda.is_available()  # fit picks the same device for itself
    device = torch.device("cuda" if cuda else "cpu")
    student = StudentParams(arch=settings["arch"], image_size=settings["image_size"], epochs=2,
                            batch_size=settings["batch_size"], lr=0.1, warmup_epochs=0,
                            workers=0, loss=loss)
    objective = student_objective(student)
    basis = tail_basis(settings)
    targets = (CachedTeacher(settings["classes"], None, device, basis)
               if objective.needs_teacher else None)
    batches = synthetic_batches(settings, pin=cuda, basis=basis)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    log = []

    def on_start():
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def on_end():
        return {"peak_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss()}

    def train_batches(epoch: int):
        count = settings["warmup"] if epoch == 0 else settings["steps"]
        return TimedBatches([batches[i % len(batches)] for i in range(count)], log, sync,
                            on_start, on_end)

    tiny = {k: v[:2] for k, v in batches[0].items()}
    run = TrainRun(settings=student, objective=objective, train_batches=train_batches,
                   val_batches=lambda: [tiny], steps_per_epoch=settings["steps"],
                   identity={"benchmark": "gpu_check", "loss": loss},
                   teacher_targets=targets, description=f"gpu_check {loss}")
    torch.manual_seed(0)
    model = build_model(settings["arch"], settings["classes"])
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        fit(model, run, out_dir=str(scratch / "model"), live_dir=str(scratch / "live"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    timed = log[-1]
    return {"step": timed["wall"] / timed["steps"], "samples_per_s": timed["samples"] /
            timed["wall"], "peak_bytes": timed["peak_bytes"],
            "loss": loss_alone(objective, targets, batches, settings, device, sync)}


def loss_alone(objective, targets, batches, settings, device, sync) -> float:
    """Seconds per (copy + decoding +) objective forward + backward on (B, C) logits."""
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(settings["batch_size"], settings["classes"], generator=generator)
              .to(device).requires_grad_(True))  # (B, C) float32, as fit passes them

    def once(batch):
        labels = batch["labels"].to(device, non_blocking=True)
        teacher_logits, weights = targets(batch, None) if targets else (None, None)
        logits.grad = None
        objective(logits, labels, teacher_logits, weights)["loss"].backward()

    for i in range(5):
        once(batches[i % len(batches)])
    sync()
    start = time.perf_counter()
    for i in range(settings["loss_repeats"]):
        once(batches[i % len(batches)])
    sync()
    return (time.perf_counter() - start) / settings["loss_repeats"]


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU run (resnet18, 32 px, a few steps): checks the code path")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                            help=f"default {value} ({SMOKE[key]} with --smoke)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = SMOKE if args.smoke else FULL
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value
                for key, value in defaults.items()}
    if args.smoke:
        # One thread: with other processes on the CPUs, OpenMP spin-waits inflate steps 100-fold.
        torch.set_num_threads(1)
    if args.child:
        torch.manual_seed(0)
        print(json.dumps(child(args.child, settings)))
        return
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("gpu_check: no CUDA device here. This check measures ResNet-50 training steps "
                 "on a GPU; run it on a CUDA machine, or pass --smoke for a tiny CPU run of the "
                 "same code path (its numbers say nothing about the goals).")
    device = (torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke
              else "CPU (smoke: the numbers say nothing about the goals)")
    print(f"GPU check on {device}, torch {torch.__version__}, {load_line()}")
    print(f"student {settings['arch']} at {settings['image_size']} px, batch "
          f"{settings['batch_size']}, C = {settings['classes']}, top-{settings['topk']}; "
          f"pipeline.train.fit ({'bf16 autocast, channels_last' if not args.smoke else 'CPU'}); "
          f"{settings['steps']} timed steps after {settings['warmup']} warm-up steps, "
          f"median over {settings['rounds']} rounds (CE and IKL alternating, fresh processes)")
    command = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    if args.smoke:
        command.append("--smoke")
        # The child must not see a GPU in smoke mode: the point is the CPU code path.
    results = {"ce": [], "ikl": []}
    for round_index in range(settings["rounds"]):
        for loss in (("ce", "ikl") if round_index % 2 == 0 else ("ikl", "ce")):
            results[loss].append(run_child(__file__, ["--child", loss, *command],
                                           env={"CUDA_VISIBLE_DEVICES": ""} if args.smoke
                                           else None))
    memory = "peak GPU memory" if not args.smoke else "peak host RSS"
    for loss, label in (("ce", "plain CE"), ("ikl", "cached IKL-KD")):
        runs = results[loss]
        print(f"  {label:<14} {median(r['samples_per_s'] for r in runs):9.1f} samples/s   "
              f"step {1e3 * median(r['step'] for r in runs):8.2f} ms   {memory} "
              f"{median(r['peak_bytes'] for r in runs) / 2**30:6.2f} GiB   loss alone "
              f"{1e3 * median(r['loss'] for r in runs):7.3f} ms")
    throughput = median(i["samples_per_s"] / c["samples_per_s"]
                        for i, c in zip(results["ikl"], results["ce"]))
    share = median(r["loss"] / r["step"] for r in results["ikl"])
    marginal = median((i["step"] - c["step"]) / i["step"]
                      for i, c in zip(results["ikl"], results["ce"]))
    print(f"  throughput cached IKL-KD / plain CE: {throughput:.3f}x  "
          f"(goal >= {THROUGHPUT_GOAL}: {verdict(throughput >= THROUGHPUT_GOAL)})")
    print(f"  loss (decoding + IKL-KD + CE, forward + backward) share of the IKL step: "
          f"{100 * share:.2f}%  (goal < {100 * LOSS_SHARE_GOAL:g}%: "
          f"{verdict(share < LOSS_SHARE_GOAL)}); marginal (IKL step - CE step) / IKL step: "
          f"{100 * marginal:.2f}%")
    print(f"  {load_line()} (at the end)")


if __name__ == "__main__":
    main()
