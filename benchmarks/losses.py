"""Benchmark IKL-KD's closed form against the pairwise (C x C) form and against KL-KD.

    python benchmarks/losses.py --batch 128 --classes 1000 --repeats 200

Prints forward+backward time per step and peak memory of each loss, measured in one run on
this machine, with the ratios and their goals.

Time: one torch thread unless --threads says otherwise. Every measurement runs in a fresh
subprocess holding one loss, so no loss inherits another's allocator state. IKL-KD and KL-KD
alternate over `--rounds` rounds (load from other processes then hits both alike); each round
times `--repeats` steps after warm-up. Reported: median over rounds of wall time per step,
process CPU time per step (less sensitive to other processes) and minor page faults per step;
ratios are medians of the per-round ratios.
Before timing, a child allocates and frees one 8 MiB tensor: glibc then raises its mmap/trim
thresholds, as the first training step's activations would, instead of returning the 0.5 MB
loss buffers to the kernel after every step (which costs hundreds of page faults per step and
depends on the exact order of frees, i.e. on luck, not on the loss).
Memory: growth of the peak resident set (Linux /proc/self/status VmHWM) over one
forward+backward in a fresh subprocess per loss, inputs built and kernels warmed up on a tiny
batch beforehand (no 8 MiB trick there: its freed pages would hide the step's own allocations).
ru_maxrss is not used: Linux carries it over from the parent process across fork + exec.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pipeline.train.losses import ikl_kd_loss, kl_kd_loss  # noqa: E402

SPEEDUP_GOAL = 500.0  # pairwise time / closed-form time, at least
OVERHEAD_GOAL = 1.5  # IKL time / KL-KD time, at most
IKL_OPTIONS = {"alpha": 1.0, "beta": 1.0, "temperature": 1.0, "weight_temperature": 100.0}
HEAP_WARM_UP_FLOATS = 2 * 2**20  # 8 MiB: under glibc's 32 MiB ceiling for its mmap threshold


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
LABELS = {"ikl": "IKL-KD closed form", "ikl_pairwise": "IKL-KD pairwise (C x C)",
          "kl": "KL-KD"}


def make_inputs(batch: int, classes: int):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(batch, classes, generator=generator) * 3).requires_grad_(True)
    teacher = torch.randn(batch, classes, generator=generator) * 3
    return student, teacher


def step(loss_name: str, student, teacher) -> None:
    student.grad = None
    LOSSES[loss_name](student, teacher).backward()


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("no VmHWM in /proc/self/status: the memory figure needs Linux")


def time_child(loss_name: str, batch: int, classes: int, repeats: int) -> dict:
    """Wall seconds, CPU seconds and minor page faults per forward+backward."""
    heap_warm_up = torch.ones(HEAP_WARM_UP_FLOATS)  # allocated, touched, freed: see the
    del heap_warm_up  # module docstring
    student, teacher = make_inputs(batch, classes)
    for _ in range(min(5, repeats)):
        step(loss_name, student, teacher)
    usage_before, wall_before = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        step(loss_name, student, teacher)
    usage_after, wall_after = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime)
    return {"wall": (wall_after - wall_before) / repeats, "cpu": cpu / repeats,
            "faults": (usage_after.ru_minflt - usage_before.ru_minflt) / repeats}


def memory_child(loss_name: str, batch: int, classes: int) -> dict:
    """Peak-RSS growth (bytes) of one forward+backward."""
    tiny_student, tiny_teacher = make_inputs(2, 8)
    step(loss_name, tiny_student, tiny_teacher)  # load kernels and threads outside the window
    student, teacher = make_inputs(batch, classes)
    before = peak_resident_bytes()
    step(loss_name, student, teacher)
    return {"peak_bytes": peak_resident_bytes() - before}


def run_child(args, mode: str, loss_name: str, repeats: int = 1) -> dict:
    command = [sys.executable, __file__, "--child", mode, loss_name, "--batch", str(args.batch),
               "--classes", str(args.classes), "--repeats", str(repeats),
               "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=200, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating IKL/KL rounds")
    parser.add_argument("--pairwise-repeats", type=int, default=2,
                        help="timed steps of the slow pairwise form")
    # One thread by default: at 128k elements per op, OpenMP barriers cost as much as the work,
    # and when other processes share the CPUs their spin-waits inflate steps 100-fold.
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        mode, loss_name = args.child
        if mode == "time":
            print(json.dumps(time_child(loss_name, args.batch, args.classes, args.repeats)))
        else:
            print(json.dumps(memory_child(loss_name, args.batch, args.classes)))
        return

    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, "
          f"B = {args.batch}, C = {args.classes}, float32, forward+backward per step")
    rounds = [{name: run_child(args, "time", name, args.repeats) for name in ("ikl", "kl")}
              for _ in range(args.rounds)]
    pairwise = run_child(args, "time", "ikl_pairwise", args.pairwise_repeats)
    timing = {name: {key: statistics.median(r[name][key] for r in rounds)
                     for key in ("wall", "cpu", "faults")} for name in ("ikl", "kl")}
    timing["ikl_pairwise"] = pairwise
    memory = {name: run_child(args, "memory", name)["peak_bytes"] for name in LOSSES}
    steps = {"ikl": f"{args.rounds} x {args.repeats}", "kl": f"{args.rounds} x {args.repeats}",
             "ikl_pairwise": f"1 x {args.pairwise_repeats}"}
    for name in ("ikl", "kl", "ikl_pairwise"):
        t = timing[name]
        print(f"  {LABELS[name]:<24} {t['wall'] * 1e3:10.3f} ms/step wall, "
              f"{t['cpu'] * 1e3:10.3f} ms/step CPU, {t['faults']:6.0f} faults/step "
              f"({steps[name]} steps)   peak memory {memory[name] / 2**20:7.1f} MiB")
    print("time: medians over rounds, each loss in its own subprocess, IKL-KD and KL-KD "
          "alternating; memory: growth of peak RSS (VmHWM) over one forward+backward in a "
          "fresh subprocess")

    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    speedup = timing["ikl_pairwise"]["wall"] / timing["ikl"]["wall"]
    print(f"speed-up closed form vs pairwise (wall):  {speedup:9.1f}x  "
          f"(goal >= {SPEEDUP_GOAL:g}x: {verdict(speedup >= SPEEDUP_GOAL)})")
    for key, what in (("wall", "wall"), ("cpu", "CPU ")):
        overhead = statistics.median(r["ikl"][key] / r["kl"][key] for r in rounds)
        print(f"IKL-KD / KL-KD ({what}, median of rounds): {overhead:9.2f}x  "
              f"(goal <= {OVERHEAD_GOAL:g}x: {verdict(overhead <= OVERHEAD_GOAL)})")
    pairwise_memory = memory["ikl_pairwise"] / max(memory["ikl"], 1)
    print(f"peak memory pairwise / closed form:      {pairwise_memory:9.0f}x  "
          f"(one (B, C, C) float32 matrix alone is "
          f"{args.batch * args.classes**2 * 4 / 2**20:.0f} MiB)")
    print(f"load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
