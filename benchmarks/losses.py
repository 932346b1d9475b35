"""IKL-KD's closed form against the pairwise (C x C) form and against KL-KD.

    python benchmarks/losses.py --rounds 5                 # B 128, C 1000, 1 thread: a minute
    python benchmarks/losses.py --device cuda --batch 256  # the same on a GPU

Forward + backward time per step (wall, CPU, minor page faults) and peak memory of each loss
(LOSSES), each in a fresh child, the fast ones alternating over --rounds rounds of --repeats
steps; on CUDA every clock is synchronised and the goals are judged by wall time, on the CPU by
CPU time. A child first allocates and frees 8 MiB, so glibc raises its trim threshold as a
training step's activations would (else the loss's freed buffers go back to the kernel and
every step pays hundreds of page faults, by luck of the order of frees). Memory: the peak
resident set's (on CUDA the allocator's) growth over one step, from a peak reset just before
it, kernels warmed up first.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (alternate, child_options, machine_line, median, median_ratio,  # noqa: E402
                    parser, run_child, setup, sync, verdict)
from pipeline.params import IKLParams  # noqa: E402
from pipeline.store import encode_logits, fit_tail_basis, teacher_logits_from_fields  # noqa: E402
from pipeline.store.encoding import decode_fields  # noqa: E402
from pipeline.store.tail import tail_components  # noqa: E402
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


def stored_teacher(teacher: torch.Tensor):
    """The loss's teacher argument as the trainer gets it: the fields a store with a quantised
    tail holds for `teacher` (B, C), on its device, and the function dequantising them."""
    classes = teacher.shape[1]
    log_probs = torch.log_softmax(teacher.double().cpu(), 1).numpy()
    basis = fit_tail_basis(log_probs, tail_components(classes))
    fields = {name: torch.from_numpy(value).to(teacher.device) for name, value in
              decode_fields(encode_logits(teacher.cpu().numpy(), 5, basis)).items()}
    basis = basis.to(teacher.device)
    return lambda: teacher_logits_from_fields(fields, classes, basis)  # (B, C)


_IKL_MODULE = IKLDivergenceKD(IKLParams(**IKL_OPTIONS))
LOSSES = {  # name -> (label, loss of (student, teacher); teacher a function for "ikl_stored")
    "ikl": ("IKL-KD closed form", lambda s, t: ikl_kd_loss(s, t, **IKL_OPTIONS)),
    "ikl_terms": ("IKL-KD + logged terms", lambda s, t: _IKL_MODULE.terms(s, t).total),
    "ikl_stored": ("IKL-KD, stored teacher", lambda s, t: ikl_kd_loss(s, t(), **IKL_OPTIONS)),
    "kl": ("KL-KD", lambda s, t: kl_kd_loss(s, t, temperature=1.0)),
    "ikl_pairwise": ("IKL-KD pairwise (C x C)",
                     lambda s, t: pairwise_ikl_loss(s, t, **IKL_OPTIONS)),
}


def inputs(name: str, batch: int, classes: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(batch, classes, generator=generator) * 3).to(device)
    teacher = (torch.randn(batch, classes, generator=generator) * 3).to(device)
    return (student.requires_grad_(True),
            stored_teacher(teacher) if name == "ikl_stored" else teacher)


def step(name: str, student, teacher) -> None:
    student.grad = None
    LOSSES[name][1](student, teacher).backward()


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def time_child(name: str, args, device) -> dict:
    """Wall seconds, CPU seconds and minor page faults per forward + backward."""
    torch.ones(HEAP_WARM_UP_FLOATS)  # allocated, touched and freed: see the module docstring
    student, teacher = inputs(name, args.batch, args.classes, device)
    for _ in range(min(5, args.repeats)):
        step(name, student, teacher)
    sync(device)()
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.repeats):
        step(name, student, teacher)
    sync(device)()
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"wall": wall / args.repeats, "cpu": cpu / args.repeats,
            "faults": (after.ru_minflt - before.ru_minflt) / args.repeats}


def memory_child(name: str, args, device) -> dict:
    """Peak-memory growth (bytes) of one forward + backward."""
    step(name, *inputs(name, 2, 8, device))  # kernels and threads loaded outside the window
    student, teacher = inputs(name, args.batch, args.classes, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # the peak resident set back to the current one: the inputs' making is not the step's
        Path("/proc/self/clear_refs").write_text("5")
    before = peak_bytes(device)
    step(name, student, teacher)
    return {"peak_bytes": peak_bytes(device) - before}


def main() -> None:
    p = parser(__doc__, rounds=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=200, help="timed steps per round")
    p.add_argument("--pairwise-repeats", type=int, default=2, help="timed pairwise steps")
    args = p.parse_args()
    device = setup(args)
    if args.child:
        mode, name = args.child
        print(json.dumps((time_child if mode == "time" else memory_child)(name, args, device)))
        return

    def child(mode: str, name: str, repeats: int = 1) -> dict:
        return run_child(__file__, ["--child", mode, name, "--repeats", str(repeats),
                                    *child_options(args, "batch", "classes")])

    print(f"{machine_line(args.device)}; B = {args.batch}, C = {args.classes}, float32, "
          f"forward+backward on {args.device}")
    fast = ("ikl", "ikl_terms", "ikl_stored", "kl")
    runs = alternate(args.rounds, fast, lambda name: child("time", name, args.repeats))
    timing = {name: {key: median(r[key] for r in records) for key in ("wall", "cpu", "faults")}
              for name, records in runs.items()}
    timing["ikl_pairwise"] = child("time", "ikl_pairwise", args.pairwise_repeats)
    # not "ikl_stored": making its inputs leaves freed heap pages that its step reuses unseen
    memory = {name: child("memory", name)["peak_bytes"] for name in LOSSES if name != "ikl_stored"}
    for name, t in timing.items():
        steps = (f"1 x {args.pairwise_repeats}" if name == "ikl_pairwise"
                 else f"{args.rounds} x {args.repeats}")
        print(f"  {LOSSES[name][0]:<24} {t['wall'] * 1e3:10.3f} ms/step wall, "
              f"{t['cpu'] * 1e3:10.3f} ms/step CPU, {t['faults']:6.0f} faults/step "
              f"({steps} steps)   peak memory " + (f"{memory[name] / 2**20:7.1f} MiB"
                                                        if name in memory else "      -"))
    speedup = timing["ikl_pairwise"]["wall"] / timing["ikl"]["wall"]
    print(f"speed-up closed form vs pairwise (wall):  {speedup:9.1f}x  "
          f"(goal >= {SPEEDUP_GOAL:g}x: {verdict(speedup >= SPEEDUP_GOAL)})")
    judged = "cpu" if args.device == "cpu" else "wall"
    for key in ("wall", "cpu"):
        overhead = median_ratio(runs["ikl"], runs["kl"], key)
        goal = (f"goal <= {OVERHEAD_GOAL:g}x: {verdict(overhead <= OVERHEAD_GOAL)}"
                if key == judged else "not the judged clock")
        print(f"IKL-KD / KL-KD ({key:<4}, median of rounds): {overhead:8.2f}x  ({goal}); with "
              f"its logged terms {median_ratio(runs['ikl_terms'], runs['kl'], key):.2f}x, "
              f"from a stored teacher {median_ratio(runs['ikl_stored'], runs['kl'], key):.2f}x")
    print(f"peak memory pairwise / closed form:      "
          f"{memory['ikl_pairwise'] / max(memory['ikl'], 1):9.0f}x  (one (B, C, C) float32 "
          f"matrix alone is {args.batch * args.classes**2 * 4 / 2**20:.0f} MiB)")
    print(f"after the run: {machine_line(args.device).rsplit(', ', 1)[-1]}")


if __name__ == "__main__":
    main()
