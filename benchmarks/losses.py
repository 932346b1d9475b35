"""Benchmark IKL-KD's closed form against the pairwise (C x C) form and against KL-KD.

    python benchmarks/losses.py --rounds 5      # B 128, C 1000, 1 thread: about a minute

Prints forward+backward time per step and peak memory of each loss, measured in one run on
this machine, with the ratios and their goals. The harness is common's: one fresh child process
per measurement, IKL-KD (the pure loss, and with its logged terms as the trainer's objective
computes them) and KL-KD alternating over `--rounds` rounds, each timing `--repeats` steps after
warm-up; medians over rounds of wall time, the process's CPU time (less sensitive to other
processes) and minor page faults per step; ratios are medians of the per-round ratios.
Before timing, a child allocates and frees one 8 MiB tensor: glibc then raises its mmap/trim
thresholds, as the first training step's activations would, instead of returning the 0.5 MB
loss buffers to the kernel after every step (hundreds of page faults per step, depending on the
order of frees, i.e. on luck, not on the loss).
Memory: growth of the peak resident set (Linux VmHWM) over one forward+backward in a fresh
process per loss, kernels warmed up on a tiny batch first (no 8 MiB trick there: its freed
pages would hide the step's own allocations). ru_maxrss is not used: Linux carries it over
from the parent across fork + exec.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternate, machine_line, median, median_ratio, run_child, verdict  # noqa: E402
from pipeline.params import IKLParams  # noqa: E402
from pipeline.train.losses import IKLDivergenceKD, ikl_kd_loss, kl_kd_loss  # noqa: E402

SPEEDUP_GOAL = 500.0  # pairwise time / closed-form time, at least
OVERHEAD_GOAL = 1.3  # IKL time / KL-KD time, at most (the pure loss)
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
    soft_ce = -(torch.softmax(teacher_logits / temperature, 1)
                * torch.log_softmax(student_logits / temperature, 1)).sum(1).mean()
    return alpha * soft_ce + beta * wmse


_IKL_MODULE = IKLDivergenceKD(IKLParams(**IKL_OPTIONS))
LOSSES = {  # name -> (label, loss)
    "ikl": ("IKL-KD closed form", lambda s, t: ikl_kd_loss(s, t, **IKL_OPTIONS)),
    "ikl_terms": ("IKL-KD + logged terms", lambda s, t: _IKL_MODULE.terms(s, t).total),
    "kl": ("KL-KD", lambda s, t: kl_kd_loss(s, t, temperature=1.0)),
    "ikl_pairwise": ("IKL-KD pairwise (C x C)", lambda s, t: pairwise_ikl_loss(s, t,
                                                                              **IKL_OPTIONS)),
}


def make_inputs(batch: int, classes: int):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(batch, classes, generator=generator) * 3).requires_grad_(True)
    teacher = torch.randn(batch, classes, generator=generator) * 3
    return student, teacher


def step(loss_name: str, student, teacher) -> None:
    student.grad = None
    LOSSES[loss_name][1](student, teacher).backward()


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
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        step(loss_name, student, teacher)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"wall": wall / repeats, "cpu": cpu / repeats,
            "faults": (after.ru_minflt - before.ru_minflt) / repeats}


def memory_child(loss_name: str, batch: int, classes: int) -> dict:
    """Peak-RSS growth (bytes) of one forward+backward."""
    step(loss_name, *make_inputs(2, 8))  # load kernels and threads outside the window
    student, teacher = make_inputs(batch, classes)
    before = peak_resident_bytes()
    step(loss_name, student, teacher)
    return {"peak_bytes": peak_resident_bytes() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=200, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--pairwise-repeats", type=int, default=2,
                        help="timed steps of the slow pairwise form")
    # One thread by default: at 128k elements per op, OpenMP barriers cost as much as the work,
    # and when other processes share the CPUs their spin-waits inflate steps 100-fold.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        mode, loss_name = args.child
        print(json.dumps(time_child(loss_name, args.batch, args.classes, args.repeats)
                         if mode == "time" else memory_child(loss_name, args.batch, args.classes)))
        return

    def child(mode: str, loss_name: str, repeats: int = 1) -> dict:
        return run_child(__file__, ["--child", mode, loss_name, "--batch", str(args.batch),
                                    "--classes", str(args.classes), "--repeats", str(repeats),
                                    "--threads", str(args.threads)])

    print(f"{machine_line()}; B = {args.batch}, C = {args.classes}, float32, forward+backward")
    runs = alternate(args.rounds, ("ikl", "ikl_terms", "kl"),
                     lambda name: child("time", name, args.repeats))
    timing = {name: {key: median(r[key] for r in records) for key in ("wall", "cpu", "faults")}
              for name, records in runs.items()}
    timing["ikl_pairwise"] = child("time", "ikl_pairwise", args.pairwise_repeats)
    memory = {name: child("memory", name)["peak_bytes"] for name in LOSSES}
    for name, t in timing.items():
        steps = (f"1 x {args.pairwise_repeats}" if name == "ikl_pairwise"
                 else f"{args.rounds} x {args.repeats}")
        print(f"  {LOSSES[name][0]:<24} {t['wall'] * 1e3:10.3f} ms/step wall, "
              f"{t['cpu'] * 1e3:10.3f} ms/step CPU, {t['faults']:6.0f} faults/step "
              f"({steps} steps)   peak memory {memory[name] / 2**20:7.1f} MiB")
    speedup = timing["ikl_pairwise"]["wall"] / timing["ikl"]["wall"]
    print(f"speed-up closed form vs pairwise (wall):  {speedup:9.1f}x  "
          f"(goal >= {SPEEDUP_GOAL:g}x: {verdict(speedup >= SPEEDUP_GOAL)})")
    for key, what in (("wall", "wall"), ("cpu", "CPU ")):
        overhead = median_ratio(runs["ikl"], runs["kl"], key)
        with_terms = median_ratio(runs["ikl_terms"], runs["kl"], key)
        print(f"IKL-KD / KL-KD ({what}, median of rounds): {overhead:9.2f}x  "
              f"(goal <= {OVERHEAD_GOAL:g}x: {verdict(overhead <= OVERHEAD_GOAL)}); with its "
              f"logged terms (the trainer's objective): {with_terms:.2f}x")
    pairwise_memory = memory["ikl_pairwise"] / max(memory["ikl"], 1)
    print(f"peak memory pairwise / closed form:      {pairwise_memory:9.0f}x  "
          f"(one (B, C, C) float32 matrix alone is "
          f"{args.batch * args.classes**2 * 4 / 2**20:.0f} MiB)")
    print(f"after the run: {machine_line().rsplit(', ', 1)[-1]}")


if __name__ == "__main__":
    main()
