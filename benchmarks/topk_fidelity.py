"""Top-k fidelity: how far IKL-KD and KL-KD move when the teacher comes from a logit store.

    python benchmarks/topk_fidelity.py --workspace DIR   # a dvc workspace after `dvc repro`

A batch of the teacher's full float32 logits (B, C) goes through the store's own encoder and
decoder (encode_logits -> decode_logits: LogitStore.teacher_logits' path minus the lossless Zarr
layer); printed are the relative errors, in percent, of the loss |dL|/|L| and of its gradient
wrt the student ||dg||/||g|| for IKL-KD (alpha = beta = 1, T = 1, T2 = 100: the paper's R50 ->
R50 setting), for its wMSE term's gradient alone, and for KL-KD (T = 1). Encodings: `tail:
none` at k = 5, 20, 50 and `tail: quantized` at k = 5. Teachers: the workspace's CNN teacher on
every stored view (replayed from the shards), with its CE baseline and the teacher + N(0, 1)
as students; the hierarchical linear teacher (common.hierarchical_logits) at C = 1000 and at
iNaturalist's 8,142, with a weaker head and the teacher + N(0, 1) as students.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from common import INATURALIST_CLASSES, hierarchical_teacher, machine_line  # noqa: E402
from pipeline.stream.augment import apply_view, normalize  # noqa: E402
from pipeline.train.runs import load_model  # noqa: E402
from pipeline.train.losses import ikl_kd_loss, kl_kd_loss  # noqa: E402
from pipeline.data.shards import file_sha256  # noqa: E402
from pipeline.store import open_store  # noqa: E402
from pipeline.store.encoding import decode_logits, encode_logits  # noqa: E402
from pipeline.store.tail import TAIL_FIT_ROWS, fit_tail_basis, tail_components  # noqa: E402
from pipeline.stream.decode import decode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IKL_OPTIONS = {"alpha": 1.0, "beta": 1.0, "temperature": 1.0, "weight_temperature": 100.0}
ENCODINGS = [("none", 5), ("none", 20), ("none", 50), ("quantized", 5)]
GOALS = {"IKL loss": 0.5, "IKL grad": 1.0, "wMSE grad": 2.0, "KL loss": 0.5, "KL grad": 0.5}
INAT_EVAL_VIEWS = 1024  # (B, C) float64 losses with their gradients: 64 MB a tensor at 8,142
LOSSES = {
    "IKL": lambda s, t: ikl_kd_loss(s, t, **IKL_OPTIONS),
    "wMSE": lambda s, t: ikl_kd_loss(s, t, **{**IKL_OPTIONS, "alpha": 0.0}),
    "KL": lambda s, t: kl_kd_loss(s, t, temperature=1.0),
}


def through_store(teacher: torch.Tensor, topk: int, tail: str,
                  fit: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) teacher logits as a store with this encoding gives them back; the quantised
    tail's basis fitted as the dump fits it, on (up to) the first TAIL_FIT_ROWS samples of
    `fit` (default: of `teacher`)."""
    basis = None
    if tail == "quantized":
        fit = teacher if fit is None else fit
        log_probs = torch.log_softmax(fit[:TAIL_FIT_ROWS].double(), dim=1).numpy()
        basis = fit_tail_basis(log_probs, tail_components(teacher.shape[1]))
    stored = encode_logits(teacher.numpy(), topk, basis)
    return torch.from_numpy(decode_logits(stored, teacher.shape[1], basis))


def loss_and_gradient(loss, student: torch.Tensor, teacher: torch.Tensor):
    student = student.detach().double().requires_grad_(True)
    value = loss(student, teacher.double())
    value.backward()
    return value.item(), student.grad


def errors(student: torch.Tensor, teacher: torch.Tensor, cached: torch.Tensor) -> dict:
    """Percent relative errors of each loss and gradient, `cached` against `teacher`."""
    result = {}
    for name, loss in LOSSES.items():
        reference, reference_grad = loss_and_gradient(loss, student, teacher)
        value, grad = loss_and_gradient(loss, student, cached)
        if name != "wMSE":
            result[f"{name} loss"] = 100 * abs(value - reference) / abs(reference)
        result[f"{name} grad"] = 100 * float((grad - reference_grad).norm()
                                             / reference_grad.norm())
    return result


def describe(name: str, teacher: torch.Tensor, labels: torch.Tensor | None) -> str:
    probs = teacher.softmax(1)
    accuracy = (f"top-1 {100 * float((teacher.argmax(1) == labels).float().mean()):.1f} %, "
                if labels is not None else "")
    spread = teacher - teacher.mean(1, keepdim=True)
    return (f"{name}: {teacher.shape[0]} samples, C = {teacher.shape[1]}, {accuracy}mean top "
            f"probability {float(probs.max(1).values.mean()):.3f}, logit std per sample "
            f"{float(spread.std(1).mean()):.2f}, logit range per sample "
            f"{float((teacher.max(1).values - teacher.min(1).values).mean()):.1f}")


def workspace_logits(workspace: Path):
    """Teacher and baseline logits (V * N, C) on every stored view of the workspace's teacher
    store, replayed from the shards, the labels, and the largest gap between the store's
    teacher_logits and the replayed teacher's on the top-k classes."""
    teacher_path = workspace / "models" / "teacher" / "checkpoint.pt"
    store = open_store(str(workspace / "data" / "logits" / "teacher.zarr"),
                       teacher_sha256=file_sha256(teacher_path))
    shards_dir = workspace / "data" / "shards"
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    images = {}
    for shard in manifest["splits"]["train"]["shards"]:
        for sample in wds.WebDataset(str(shards_dir / shard["file"]), shardshuffle=False):
            images[json.loads(sample["json"])["row"]] = decode(sample)  # (3, H, W) uint8
    teacher = load_model(teacher_path)[0]
    baseline = load_model(workspace / "models" / "baseline" / "checkpoint.pt")[0]
    size = store.attributes["teacher_image_size"]
    teacher_logits, baseline_logits, gap = [], [], 0.0
    with torch.no_grad():
        for view in range(store.views):
            stored = store.read_rows(view, 0, store.rows)
            cached = torch.from_numpy(store.teacher_logits(view, 0, store.rows))
            for start in range(0, store.rows, 512):
                rows = range(start, min(start + 512, store.rows))
                batch = normalize(torch.stack([apply_view(images[row], stored["boxes"][row],
                                                          bool(stored["flips"][row]), size)
                                               for row in rows]))
                full = teacher(batch).float()  # (n, C)
                teacher_logits.append(full)
                baseline_logits.append(baseline(batch).float())
                top = torch.from_numpy(stored["topk_classes"][rows.start:rows.stop]).long()
                gap = max(gap, float((full.gather(1, top)
                                      - cached[rows.start:rows.stop].gather(1, top)).abs().max()))
    labels = torch.from_numpy(store.labels.astype(np.int64)).repeat(store.views)
    return torch.cat(teacher_logits), torch.cat(baseline_logits), labels, gap


def print_table(title: str, students: dict[str, torch.Tensor], teacher: torch.Tensor,
                fit: torch.Tensor | None = None) -> dict:
    print(f"\n{title}")
    columns = list(GOALS)
    print(f"  {'student':<22}{'tail':>10}{'k':>4} | " + " ".join(f"{c:>10}" for c in columns))
    worst = {}
    for student_name, student in students.items():
        for tail, topk in ENCODINGS:
            if topk >= teacher.shape[1]:
                continue
            result = errors(student, teacher, through_store(teacher, topk, tail, fit))
            print(f"  {student_name:<22}{tail:>10}{topk:>4} | "
                  + " ".join(f"{result[c]:9.3f}%" for c in columns))
            if tail == "quantized":
                for column in columns:
                    worst[column] = max(worst.get(column, 0.0), result[column])
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=ROOT,
                        help="a dvc workspace after `dvc repro` (default: this checkout)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"{machine_line()}; IKL-KD {IKL_OPTIONS}, KL-KD T = 1")
    print("relative errors vs the full float32 teacher logits, loss |dL|/|L| and gradient wrt "
          "the student ||dg||/||g||, in percent; goals for tail = quantized: "
          + ", ".join(f"{name} < {goal}%" for name, goal in GOALS.items()))
    worst, tables = {}, []
    if (args.workspace / "models" / "teacher" / "checkpoint.pt").is_file():
        teacher, baseline, labels, gap = workspace_logits(args.workspace)
        print(describe(f"workspace {args.workspace} teacher", teacher, labels)
              + f"; store vs replayed teacher on the top-k: max |diff| {gap:.4f}")
        print(describe("  its CE baseline", baseline, labels))
        noisy = teacher + torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1))
        tables.append(("workspace CNN teacher",
                       {"CE baseline": baseline, "teacher + N(0,1)": noisy}, teacher))
    else:
        print(f"workspace {args.workspace}: no models/teacher/checkpoint.pt (run dvc repro "
              "there); its CNN teacher's table is left out of this run")
    teacher, weaker, labels = hierarchical_teacher(1000)
    print(describe("hierarchical linear teacher", teacher, labels))
    print(describe("  its weaker student", weaker, labels))
    noisy = teacher + torch.randn(teacher.shape, generator=torch.Generator().manual_seed(2))
    tables.append(("hierarchical linear teacher, C = 1000",
                   {"weaker linear head": weaker, "teacher + N(0,1)": noisy}, teacher))
    # iNaturalist's C = 8,142: the basis fitted on the first TAIL_FIT_ROWS views (in prepare's
    # shuffled order), the errors measured on the next INAT_EVAL_VIEWS, held out from the fit
    teacher, weaker, labels = hierarchical_teacher(INATURALIST_CLASSES)
    order = torch.from_numpy(np.random.default_rng(1).permutation(len(labels)))
    teacher, weaker, labels = teacher[order], weaker[order], labels[order]
    print(describe("hierarchical linear teacher", teacher, labels))
    print(describe("  its weaker student", weaker, labels))
    held = slice(TAIL_FIT_ROWS, TAIL_FIT_ROWS + INAT_EVAL_VIEWS)
    noisy = teacher + torch.randn(teacher.shape, generator=torch.Generator().manual_seed(3))
    tables.append((f"hierarchical linear teacher, C = {INATURALIST_CLASSES} ({INAT_EVAL_VIEWS} "
                   "views held out from the basis fit)",
                   {"weaker linear head": weaker[held], "teacher + N(0,1)": noisy[held]},
                   teacher[held], teacher))
    for title, students, teacher, *fit in tables:
        for column, value in print_table(title, students, teacher, *fit).items():
            worst[column] = max(worst.get(column, 0.0), value)
    print("\ntail = quantized, k = 5, worst over all teachers and students: " + ", ".join(
        f"{name} {value:.3f}% (goal < {GOALS[name]}%: {'met' if value < GOALS[name] else 'MISSED'})"
        for name, value in worst.items()))


if __name__ == "__main__":
    main()
