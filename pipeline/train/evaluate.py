"""Evaluation: top-1/top-5, the long-tail view (many / medium / few-shot accuracy and
per-class accuracy against the number of training images of each class) and calibration
(expected calibration error, overall and per group, negative log-likelihood, reliability bins)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from pipeline.stream.augment import normalize
from pipeline.train.checkpoints import load_model
from pipeline.distributed import distributed
from pipeline.errors import UserError
from pipeline.params import EvaluateParams
from pipeline.tools.plots import Reliability, plot_per_class, read_per_class
from pipeline.data.manifest import file_sha256, load_manifest
from pipeline.stream.loader import eval_loader, split_shards


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[dict], device: torch.device, *,
            precision: str = "bf16"):
    """Logits (N, C) float32 and labels (N,) for every sample of `batches`, on the CPU.
    On CUDA the model runs under bf16 autocast unless `precision` is "fp32"."""
    was_training = model.training
    model.eval()
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and precision == "bf16")
    all_logits, all_labels = [], []
    for batch in batches:
        images = normalize(batch["images"].to(device, non_blocking=True))
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            all_logits.append(model(images).float().cpu())
        all_labels.append(batch["labels"])
    model.train(was_training)
    if not all_logits:  # no batches (e.g. a rank with no shard of this split)
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(all_logits), torch.cat(all_labels)


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percentage of samples whose label is among the k largest logits."""
    top = logits.topk(k, dim=1).indices  # (N, k)
    return 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()


def long_tail_report(logits: torch.Tensor, labels: torch.Tensor, train_counts: list[int],
                     settings: EvaluateParams) -> tuple[dict, list[dict]]:
    """Metrics (top1, top5, many/medium/few top-1, in %) and one row per class.

    Groups by training images per class: many > many_above >= medium >= few_below > few.
    Group accuracy is the mean of its classes' accuracies (as in the long-tail literature).
    """
    num_classes = logits.shape[1]
    correct = (logits.argmax(1) == labels).float()
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        accuracy = 100.0 * correct[mask].mean().item() if mask.any() else float("nan")
        per_class.append({"class": c, "train_count": train_counts[c],
                          "test_count": int(mask.sum()), "top1": accuracy})
    groups = group_members(settings)
    metrics = {"top1": top_k_accuracy(logits, labels, 1),
               "top5": top_k_accuracy(logits, labels, min(5, num_classes))}
    for group, member in groups.items():
        values = [r["top1"] for r in per_class
                  if member(r["train_count"]) and r["test_count"] > 0]
        # A group with no classes has no accuracy: recorded as null, not as 0.
        metrics[group] = sum(values) / len(values) if values else None
        metrics[f"{group}_classes"] = len(values)
    return metrics, per_class


CALIBRATION_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017


def group_members(settings: EvaluateParams) -> dict:
    """Group name -> predicate on a class's train count: many > many_above >= medium >=
    few_below > few."""
    return {"many": lambda n: n > settings.many_above,
            "medium": lambda n: settings.few_below <= n <= settings.many_above,
            "few": lambda n: n < settings.few_below}


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor,
                     bins: int = CALIBRATION_BINS) -> list[dict]:
    """The reliability diagram's data: the confidence range [0, 1] cut into `bins` equal-width
    bins, bin m (from 0) holding the samples whose confidence (the largest softmax probability
    of `logits` (N, C)) lies in (m / bins, (m + 1) / bins] (bin 0 also holds 0). Per bin:
    `lower`, `upper`, `count`, mean `confidence` and `accuracy` (fractions; NaN when empty)."""
    confidence, predicted = torch.softmax(logits.double(), dim=1).max(dim=1)  # (N,), (N,)
    correct = (predicted == labels).double()  # (N,)
    # ceil(conf * bins) - 1 puts conf == m / bins in bin m - 1: the right-closed convention.
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)  # (N,)
    count = torch.bincount(index, minlength=bins).double()  # (bins,)
    confidence_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    return [{"bin": m, "lower": m / bins, "upper": (m + 1) / bins, "count": int(count[m]),
             "confidence": (confidence_sum[m] / count[m]).item() if count[m] else math.nan,
             "accuracy": (correct_sum[m] / count[m]).item() if count[m] else math.nan}
            for m in range(bins)]


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor,
                               bins: int = CALIBRATION_BINS) -> float | None:
    """ECE, the standard definition (Naeini et al. 2015; Guo et al. 2017) with `bins` (15)
    equal-width confidence bins: sum over bins of |B_m| / N * |accuracy(B_m) -
    confidence(B_m)|, where confidence is the largest softmax probability of `logits` (N, C)
    and accuracy whether its class is the label (N,). A fraction in [0, 1]; None for N = 0."""
    if len(labels) == 0:
        return None
    total = len(labels)
    return sum(row["count"] / total * abs(row["accuracy"] - row["confidence"])
               for row in reliability_bins(logits, labels, bins) if row["count"])


def calibration_report(logits: torch.Tensor, labels: torch.Tensor, train_counts: list[int],
                       settings: EvaluateParams) -> tuple[dict, list[dict]]:
    """Metrics `ece` (15 bins, a fraction), `nll` (mean negative log-likelihood of the label,
    nats) and `ece_many` / `ece_medium` / `ece_few` (ECE over the test samples whose label is
    in the group; None for a group without samples), and the reliability bins of all samples.
    logits (N, C) float, labels (N,)."""
    metrics = {"ece": expected_calibration_error(logits, labels),
               "nll": torch.nn.functional.cross_entropy(logits.double(), labels).item()}
    counts = [train_counts[label] for label in labels.tolist()]  # each sample's class's
    for group, member in group_members(settings).items():
        mask = torch.tensor([member(n) for n in counts], dtype=torch.bool)  # (N,)
        metrics[f"ece_{group}"] = expected_calibration_error(logits[mask], labels[mask])
    return metrics, reliability_bins(logits, labels)


def write_reliability(bins: list[dict], path: str | Path) -> None:
    """The reliability bins as CSV (bin, lower, upper, count, confidence, accuracy)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, list(bins[0]))
        writer.writeheader()
        writer.writerows(bins)


def write_evaluated(checkpoint: str | Path, path: str | Path,
                    group_classes: dict[str, int] | None = None) -> None:
    """What a report describes, beside the metrics: the checkpoint (its sha256) and the number
    of classes in each group. Identifiers and counts of the data, not measurements of the
    model, so they stay out of `dvc metrics show`, which shows every metric as a column."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"checkpoint": str(checkpoint),
                                      "checkpoint_sha256": file_sha256(checkpoint),
                                      "group_classes": group_classes or {}},
                                     indent=1) + "\n")


def write_report(metrics: dict, per_class: list[dict], class_names: list[str],
                 metrics_file: str | Path, per_class_file: str | Path) -> None:
    """metrics.json for `dvc metrics show`; a per-class CSV for `dvc plots show`."""
    Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics_file).write_text(json.dumps(metrics, indent=1) + "\n")
    Path(per_class_file).parent.mkdir(parents=True, exist_ok=True)
    with open(per_class_file, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, ["class", "name", "train_count", "test_count", "top1"])
        writer.writeheader()
        for row in per_class:
            writer.writerow({**row, "name": class_names[row["class"]]})


def evaluate_checkpoint(settings: EvaluateParams, shards_dir: str, checkpoint: str,
                        metrics_file: str, per_class_file: str, plot_file: str | None = None,
                        name: str = "model", reliability_file: str | None = None,
                        evaluated_file: str | None = None) -> dict:
    """Test-split report of one checkpoint, written for DVC: metrics (accuracy, long-tail
    groups, calibration), the per-class CSV, given `reliability_file` the reliability bins
    (CSV), given `evaluated_file` the checkpoint's sha256 (JSON, to tie the metrics to the
    exact file evaluated, and the classes per group), and given `plot_file` a PNG of per-class accuracy against train
    count titled with `name` (with the reliability diagram). Returns the metrics."""
    manifest = load_manifest(shards_dir)
    model, state = load_model(checkpoint)
    if state["fingerprint"] != manifest["fingerprint"]:
        raise UserError(f"{checkpoint} was trained on another dataset (fingerprint "
                        f"{state['fingerprint'][:12]}, shards {manifest['fingerprint'][:12]})"
                        "; rerun its training stage")
    device = distributed().device
    image_size = state["params"]["train"]["image_size"]
    batches = eval_loader(split_shards(shards_dir, manifest, "test"),
                          batch_size=settings.batch_size, image_size=image_size, workers=0)
    precision = state["params"]["train"].get("precision", "bf16")  # older checkpoints: bf16
    logits, labels = predict(model.to(device), batches, device, precision=precision)
    metrics, per_class = long_tail_report(logits, labels, manifest["train_counts"], settings)
    calibration, bins = calibration_report(logits, labels, manifest["train_counts"], settings)
    metrics.update(calibration)
    group_classes = {group: metrics.pop(f"{group}_classes") for group in group_members(settings)}
    write_report(metrics, per_class, manifest["class_names"], metrics_file, per_class_file)
    if reliability_file:
        write_reliability(bins, reliability_file)
    if evaluated_file:
        write_evaluated(checkpoint, evaluated_file, group_classes)
    if plot_file:
        label = f"{name} ({state['arch']})"
        plot_per_class([read_per_class(per_class_file, label)], settings, plot_file,
                       reliability=[Reliability.from_bins(label, bins)])
    return metrics
