"""Benchmark IKL-KD's closed form against the pairwise (C x C) form and against KL-KD.

    python benchmarks/losses.py --batch 128 --classes 1000 --repeats 200

Prints forward+backward time per step and peak memory of each loss, measured in one run on
this machine, with the ratios and their goals.

Time: median over repeats after warm-up. IKL-KD and KL-KD steps are interleaved so that load
from other processes hits both alike, and their ratio is the median of the per-step ratios;
the slow pairwise form is timed on its own.
Memory: growth of the process's peak resident set (Linux /proc/self/status VmHWM) over one
forward+backward, each loss in its own fresh subprocess with its inputs already built and its
kernels warmed up on a tiny batch, so the number is the step's own peak working memory (page
granularity; allocator reuse can hide a few hundred KiB). ru_maxrss is not used: Linux carries
it over from the parent process across fork + exec.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pipeline.losses import ikl_kd_loss, kl_kd_loss  # noqa: E402

SPEEDUP_GOAL = 500.0  # pairwise time / closed-form time, at least
OVERHEAD_GOAL = 1.5  # IKL time / KL-KD time, at most
IKL_OPTIONS = {"alpha": 1.0, "beta": 1.0, "temperature": 1.0, "weight_temperature": 100.0}


def pairwise_ikl_loss(student_logits, teacher_logits, *, alpha, beta, temperature,
                      weight_temperature):
    """The paper's definition materialised: (B, C, C) difference and weight matrices."""
    teacher_logits = teacher_logits.detach()
    weights = torch.softmax(teacher_logits / weight_temperature, dim=1)  # (B, C)
    teacher_gaps = teacher_logits[:, :, None] - teacher_logits[:, None, :]  # (B, C, C)
    student_gaps = student_logits[:, :, None] - student_logits[:, None, :]  # (B, C, C)
    pair_weights = weights[:, :, None] * weights[:, None, :]  # (B, C, C)
    wmse = 0.25 * (pair_weights * (teacher_gaps - student_gaps) ** 2).sum((1, 2)).mean()
    return alpha * kl_kd_loss(student_logits, teacher_logits, temperature=temperature) + beta * wmse


LOSSES = {
    "ikl": lambda s, t: ikl_kd_loss(s, t, **IKL_OPTIONS),
    "ikl_pairwise": lambda s, t: pairwise_ikl_loss(s, t, **IKL_OPTIONS),
    "kl": lambda s, t: kl_kd_loss(s, t, temperature=1.0),
}


def make_inputs(batch: int, classes: int):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(batch, classes, generator=generator) * 3).requires_grad_(True)
    teacher = torch.randn(batch, classes, generator=generator) * 3
    return student, teacher


def step(loss_name: str, student, teacher) -> None:
    student.grad = None
    LOSSES[loss_name](student, teacher).backward()


def time_steps(loss_names: list[str], batch: int, classes: int, repeats: int):
    """Per loss, the seconds of each forward+backward, steps interleaved across losses so that
    round i of every loss ran under the same outside load."""
    inputs = {name: make_inputs(batch, classes) for name in loss_names}
    for name in loss_names:  # warm-up: allocator, thread pool
        step(name, *inputs[name])
    times = {name: [] for name in loss_names}
    for _ in range(repeats):
        for name in loss_names:
            start = time.perf_counter()
            step(name, *inputs[name])
            times[name].append(time.perf_counter() - start)
    return times


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("no VmHWM in /proc/self/status: the memory figure needs Linux")


def peak_memory_child(loss_name: str, batch: int, classes: int) -> None:
    """Child process: print the peak-RSS growth (bytes) of one forward+backward."""
    tiny_student, tiny_teacher = make_inputs(2, 8)
    step(loss_name, tiny_student, tiny_teacher)  # load kernels and threads outside the window
    student, teacher = make_inputs(batch, classes)
    before = peak_resident_bytes()
    step(loss_name, student, teacher)
    print(peak_resident_bytes() - before)


def peak_memory(loss_name: str, batch: int, classes: int) -> int:
    command = [sys.executable, __file__, "--memory-child", loss_name,
               "--batch", str(batch), "--classes", str(classes)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=200, help="timed steps per fast loss")
    parser.add_argument("--pairwise-repeats", type=int, default=3,
                        help="timed steps of the slow pairwise form")
    parser.add_argument("--memory-child", choices=sorted(LOSSES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child, args.batch, args.classes)
        return

    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, "
          f"B = {args.batch}, C = {args.classes}, float32, forward+backward per step")
    repeats = {"ikl": args.repeats, "kl": args.repeats, "ikl_pairwise": args.pairwise_repeats}
    times = time_steps(["ikl", "kl"], args.batch, args.classes, args.repeats)
    times.update(time_steps(["ikl_pairwise"], args.batch, args.classes, args.pairwise_repeats))
    seconds = {name: statistics.median(values) for name, values in times.items()}
    memory = {name: peak_memory(name, args.batch, args.classes) for name in LOSSES}
    labels = {"ikl": "IKL-KD closed form", "ikl_pairwise": "IKL-KD pairwise (C x C)",
              "kl": "KL-KD"}
    for name in LOSSES:
        print(f"  {labels[name]:<26} {seconds[name] * 1e3:10.3f} ms/step (median of "
              f"{repeats[name]})   peak memory {memory[name] / 2**20:9.1f} MiB")
    print("time: median per step after warm-up, IKL-KD and KL-KD interleaved step by step; "
          "memory: growth of peak RSS (VmHWM) over one forward+backward in a fresh subprocess "
          "per loss, inputs built and kernels warmed up beforehand")
    speedup = seconds["ikl_pairwise"] / seconds["ikl"]
    # Median of the per-step ratios: robust to load that drifts during the run. Ratio of the
    # fastest steps: the intrinsic cost, least disturbed by other processes (timeit's advice).
    overhead = statistics.median(ikl / kl for ikl, kl in zip(times["ikl"], times["kl"]))
    best_overhead = min(times["ikl"]) / min(times["kl"])
    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    print(f"speed-up closed form vs pairwise (medians): {speedup:8.1f}x  "
          f"(goal >= {SPEEDUP_GOAL:g}x: {verdict(speedup >= SPEEDUP_GOAL)})")
    print(f"IKL-KD / KL-KD, median of step ratios:      {overhead:8.2f}x  "
          f"(goal <= {OVERHEAD_GOAL:g}x: {verdict(overhead <= OVERHEAD_GOAL)})")
    print(f"IKL-KD / KL-KD, fastest step of each:       {best_overhead:8.2f}x  "
          f"(goal <= {OVERHEAD_GOAL:g}x: {verdict(best_overhead <= OVERHEAD_GOAL)})")
    print(f"IKL-KD {min(times['ikl']) * 1e3:.3f} ms, KL-KD {min(times['kl']) * 1e3:.3f} ms "
          f"fastest steps; load average while running: {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    pairwise_memory = memory["ikl_pairwise"] / max(memory["ikl"], 1)
    print(f"peak memory pairwise / closed form: {pairwise_memory:6.0f}x   "
          f"(one (B, C, C) float32 matrix alone is {args.batch * args.classes**2 * 4 / 2**20:.0f}"
          " MiB)")


if __name__ == "__main__":
    main()
