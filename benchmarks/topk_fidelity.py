"""Top-k fidelity: how far IKL-KD and KL-KD move when the teacher comes from a top-k store.

    python benchmarks/topk_fidelity.py         # about 20 s on 2 CPU cores

For each k, the teacher's full logits (B, C) are cut to what a store of width k holds (top-k
log-probabilities, logit - lse, as float16, read back as raw logits by adding lse; their class
ids; the float32 logsumexp over all C) and expanded back with
`pipeline.losses.expand_topk` (the tail gets the logit that spreads the residual mass evenly).
Printed: the relative error of the loss, |L(top-k) - L(full)| / |L(full)|, and of its gradient
wrt the student logits, ||g(top-k) - g(full)|| / ||g(full)|| (Frobenius, over the batch), for
IKL-KD (alpha = beta = 1, T = 1, T2 = 100, sample-wise weights: params.yaml's student) and KL-KD
(T = 1), all rows as one batch. "mean-logit fill": the same top-k, but every tail class gets the
mean of the true tail logits (computed here from the full logits: what one extra float per view
in the store would give); `expand_topk` is unchanged. Last two columns, on the float16
residual: the share of rows where 1 - sum(top-k probs) computed from the float16 top-k is <= 0
(clamped to MIN_RESIDUAL_MASS: every tail logit goes to about lse - 28 - log(C - k)), and the
IKL-KD loss error of the even-spread fill had the top-k been stored as float32 instead.

Data:
- digits: the embedded teacher's real logits. Every stored view of `data/logits/teacher.zarr`
  (the k = C = 10 store: V = 8 views of the 421 train rows) is replayed from its stored box and
  flip on the image decoded from the train shards, and run through the teacher checkpoint
  (float32 full logits; the store's float16 logits are checked against them) and through the CE
  baseline checkpoint `models/baseline/checkpoint.pt`, the student (resnet8, the student's
  architecture, trained without distillation). A second student, the teacher's logits plus
  N(0, 1) noise, is the one used for the earlier figures.
- generated, C = 100 (k = 5, 10, 20, 50): 20,000 samples of a long-tailed 100-class teacher, as
  CIFAR-100-LT: 20 superclasses of 5 classes, labels drawn with class counts
  n_c = 500 * 0.01 ** (c / 99); logits = 1.5 * N(0, 1) per class + 0.5 * log(n_c / n_0) (the
  head bias a long-tailed teacher learns) + 3 on the label's 4 superclass siblings + a margin
  U(4, 10) on the label. Student: 0.7 * teacher + N(0, 1) noise (a less confident, correlated
  model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pipeline.augment import apply_view, normalize  # noqa: E402
from pipeline.distill import load_model  # noqa: E402
from pipeline.shards import file_sha256  # noqa: E402
from pipeline.losses import MIN_RESIDUAL_MASS, expand_topk, ikl_kd_loss, kl_kd_loss  # noqa: E402
from pipeline.store import open_store  # noqa: E402
from pipeline.stream import decode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IKL_OPTIONS = {"alpha": 1.0, "beta": 1.0, "temperature": 1.0, "weight_temperature": 100.0}
KL_OPTIONS = {"temperature": 1.0}


def store_topk(full: torch.Tensor, topk: int, dtype: torch.dtype = torch.float16
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a store of width k gives back of full logits (B, C): the top-k, kept as `dtype`
    log-probabilities (the store's float16) and read as raw logits, their ids, the lse."""
    top = full.topk(topk, dim=1)  # sorted, descending, as the dump
    logsumexp = torch.logsumexp(full, dim=1)
    log_probs = (top.values - logsumexp[:, None]).to(dtype)
    return log_probs.float() + logsumexp[:, None], top.indices, logsumexp


def clamped_share(full: torch.Tensor, topk: int) -> float:
    """Share of rows whose residual mass 1 - sum(top-k probs), from the float16 top-k, is
    <= MIN_RESIDUAL_MASS: expand_topk then puts every tail logit at about lse - 28 - log(C - k)."""
    values, _, logsumexp = store_topk(full, topk)
    residual = 1 - (values.float() - logsumexp[:, None]).exp().sum(1)
    return float((residual <= MIN_RESIDUAL_MASS).float().mean())


def mean_logit_fill(full: torch.Tensor, topk: int) -> torch.Tensor:
    """(B, C): the stored float16 top-k, every other class at the mean of its true logits."""
    values, indices, _ = store_topk(full, topk)
    filled = full.clone()
    if topk < full.shape[1]:
        tail = torch.ones_like(full, dtype=torch.bool).scatter_(1, indices, False)
        tail_mean = (full * tail).sum(1, keepdim=True) / tail.sum(1, keepdim=True)  # (B, 1)
        filled = tail_mean.expand_as(full).clone()
    return filled.scatter_(1, indices, values.float())


def loss_and_gradient(loss, student: torch.Tensor, teacher: torch.Tensor):
    student = student.detach().clone().requires_grad_(True)
    value = loss(student, teacher)
    value.backward()
    return float(value.detach()), student.grad


def errors(student: torch.Tensor, full: torch.Tensor, topk: int) -> dict:
    """Percent relative errors of both losses and gradients, residual fill and mean-logit fill."""
    expanded = expand_topk(*store_topk(full, topk), full.shape[1])
    expanded32 = expand_topk(*store_topk(full, topk, torch.float32), full.shape[1])
    filled = mean_logit_fill(full, topk)
    losses = {"ikl": lambda s, t: ikl_kd_loss(s, t, **IKL_OPTIONS),
              "kl": lambda s, t: kl_kd_loss(s, t, **KL_OPTIONS)}
    result = {"mass": float(torch.softmax(full, 1).topk(topk, 1).values.sum(1).mean()),
              "clamped": 100 * clamped_share(full, topk), "tail": topk < full.shape[1]}
    for name, loss in losses.items():
        reference, reference_grad = loss_and_gradient(loss, student, full)
        for fill, teacher in (("even", expanded), ("even32", expanded32), ("mean", filled)):
            value, grad = loss_and_gradient(loss, student, teacher)
            result[f"{fill} {name} loss"] = 100 * abs(value - reference) / abs(reference)
            result[f"{fill} {name} grad"] = 100 * float((grad - reference_grad).norm()
                                                        / reference_grad.norm())
    return result


def digits_logits(store_path: Path, shards_dir: Path, teacher_path: Path,
                  student_path: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Teacher and baseline logits (V * N, C) on every stored view, replayed from the shards,
    and the largest gap between the replayed teacher's top logits and the stored ones."""
    store = open_store(str(store_path), teacher_sha256=file_sha256(teacher_path))
    if store.topk != store.num_classes:
        raise SystemExit(f"{store_path} holds k = {store.topk} of {store.num_classes} logits; "
                         "this benchmark needs the full store (logits.topk = C)")
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    images = {}
    for shard in manifest["splits"]["train"]["shards"]:
        for sample in wds.WebDataset(str(shards_dir / shard["file"]), shardshuffle=False):
            images[json.loads(sample["json"])["row"]] = decode(sample)  # (3, H, W) uint8
    teacher, student = load_model(teacher_path)[0], load_model(student_path)[0]
    size = store.attributes["teacher_image_size"]
    teacher_logits, student_logits, gap = [], [], 0.0
    with torch.no_grad():
        for view in range(store.views):
            stored = store.read_rows(view, 0, store.rows)
            crops = torch.stack([apply_view(images[row], stored["boxes"][row],
                                            bool(stored["flips"][row]), size)
                                 for row in range(store.rows)])
            batch = normalize(crops)
            full = teacher(batch).float()  # (N, C)
            teacher_logits.append(full)
            student_logits.append(student(batch).float())
            replayed = full.topk(store.topk, dim=1).values
            gap = max(gap, float((replayed - torch.from_numpy(
                stored["topk_logits"].astype(np.float32))).abs().max()))
    return torch.cat(teacher_logits), torch.cat(student_logits), gap


def generated_logits(samples: int = 20_000, num_classes: int = 100, seed: int = 0):
    """Teacher and student logits (B, C) of the long-tailed 100-class generator (module doc)."""
    generator = torch.Generator().manual_seed(seed)
    counts = 500 * 0.01 ** (torch.arange(num_classes, dtype=torch.float64) / (num_classes - 1))
    labels = torch.multinomial(counts, samples, replacement=True, generator=generator)  # (B,)
    superclass = torch.arange(num_classes) // 5
    siblings = (superclass[None, :] == superclass[labels][:, None]).float()  # (B, C)
    margin = 4 + 6 * torch.rand(samples, generator=generator)  # (B,)
    teacher = (1.5 * torch.randn(samples, num_classes, generator=generator)
               + 0.5 * torch.log(counts / counts[0]).float()[None, :] + 3 * siblings)
    teacher[torch.arange(samples), labels] += margin - 3  # the label is its own sibling
    student = 0.7 * teacher + torch.randn(samples, num_classes, generator=generator)
    return teacher, student


COLUMNS = [("even ikl loss", "IKL loss"), ("even ikl grad", "IKL grad"),
           ("even kl loss", "KL loss"), ("even kl grad", "KL grad"),
           ("mean ikl loss", "IKL loss"), ("mean ikl grad", "IKL grad"),
           ("mean kl loss", "KL loss"), ("mean kl grad", "KL grad")]


def print_table(title: str, rows: list[tuple[str, int, dict]]) -> None:
    print(f"\n{title}")
    print(f"  {'student':<16}{'k':>4}{'top-k':>7} | {'even-spread fill (expand_topk)':^39}"
          f" | {'mean-logit fill (1 float more)':^39} | {'float16 residual':^19}")
    print(f"  {'':<16}{'':>4}{'mass':>7} | " + " ".join(f"{label:>9}" for _, label in COLUMNS[:4])
          + " | " + " ".join(f"{label:>9}" for _, label in COLUMNS[4:])
          + f" | {'clamped':>9} {'IKL fp32':>9}")
    for student, topk, result in rows:
        cells = [f"{result[key]:8.2f}%" for key, _ in COLUMNS]
        print(f"  {student:<16}{topk:>4}{result['mass']:7.4f} | " + " ".join(cells[:4])
              + " | " + " ".join(cells[4:])
              + (f" | {result['clamped']:8.2f}% {result['even32 ikl loss']:8.2f}%"
                 if result["tail"] else f" | {'-':>9} {'-':>9}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "data" / "logits" / "teacher.zarr")
    parser.add_argument("--shards", type=Path, default=ROOT / "data" / "shards")
    parser.add_argument("--teacher", type=Path,
                        default=ROOT / "models" / "teacher" / "checkpoint.pt")
    parser.add_argument("--student", type=Path,
                        default=ROOT / "models" / "baseline" / "checkpoint.pt")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"IKL-KD {IKL_OPTIONS}, KL-KD {KL_OPTIONS}")
    print("relative errors vs the full teacher logits, loss |dL|/|L| and gradient wrt the "
          "student ||dg||/||g||, in percent")

    teacher, baseline, gap = digits_logits(args.store, args.shards, args.teacher, args.student)
    noisy = teacher + torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1))
    num_classes = teacher.shape[1]
    rows = [(name, k, errors(student, teacher, k))
            for name, student in (("baseline (CE)", baseline), ("teacher+N(0,1)", noisy))
            for k in (1, 2, 5, num_classes)]
    print_table(f"digits: the embedded teacher's real logits, {teacher.shape[0]} views "
                f"(C = {num_classes}; replayed top logits within {gap:.4f} of the stored "
                "float16 ones)", rows)

    teacher, student = generated_logits()
    rows = [("0.7 t + N(0,1)", k, errors(student, teacher, k)) for k in (5, 10, 20, 50)]
    print_table(f"generated long-tailed teacher, C = {teacher.shape[1]}, {teacher.shape[0]} "
                "samples", rows)


if __name__ == "__main__":
    main()
