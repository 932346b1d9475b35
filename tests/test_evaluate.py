"""pipeline.train.evaluate on hand-made logits, and the evaluate stage through click's CliRunner."""

import csv
import json
import math

import pytest
import torch
from click.testing import CliRunner

from pipeline.train.runs import model_identity
from pipeline.train.evaluate import (calibration_report, expected_calibration_error,
                                     long_tail_report, predict, reliability_bins,
                                     write_reliability, write_report)
from pipeline.train.models import build_model
from pipeline.params import EvaluateParams, Params, TrainParams
from pipeline.data.manifest import file_sha256
from pipeline.stream.loader import eval_loader, split_shards
from stages.evaluate import main as evaluate_stage
from helpers import IMAGE_SIZE, prepare_digits

# Six classes straddling the default thresholds (many > 100 >= medium >= 20 > few).
TRAIN_COUNTS = [150, 101, 100, 20, 19, 5]
# Per test sample: (label, rank of the label among the logits; 0 = predicted). Per class
# top-1: 3/4, 1/2 | 4/4, 2/4 | 0/1, 2/2; the label is outside the top 5 for two samples.
SAMPLES = [(0, 0), (0, 0), (0, 0), (0, 5),
           (1, 0), (1, 2),
           (2, 0), (2, 0), (2, 0), (2, 0),
           (3, 0), (3, 1), (3, 0), (3, 5),
           (4, 4),
           (5, 0), (5, 0)]


def logits_with_label_ranks(samples, num_classes):
    """(N, C) logits where each sample's label sits at the given rank."""
    rows = []
    for index, (label, rank) in enumerate(samples):
        others = [c for c in range(num_classes) if c != label]
        others = others[index % len(others):] + others[:index % len(others)]  # vary the rest
        order = others[:rank] + [label] + others[rank:]  # classes from largest logit down
        row = torch.empty(num_classes)
        row[order] = torch.arange(num_classes, 0, -1, dtype=torch.float32)
        rows.append(row)
    return torch.stack(rows), torch.tensor([label for label, _ in samples])


def test_long_tail_report_known_values():
    logits, labels = logits_with_label_ranks(SAMPLES, 6)
    metrics, per_class = long_tail_report(logits, labels, TRAIN_COUNTS, EvaluateParams())
    assert metrics["top1"] == pytest.approx(100 * 12 / 17)
    assert metrics["top5"] == pytest.approx(100 * 15 / 17)
    # Groups average their classes' accuracies (not their samples).
    assert metrics["many"] == (75 + 50) / 2
    assert metrics["medium"] == (100 + 50) / 2
    assert metrics["few"] == (0 + 100) / 2
    assert (metrics["many_classes"], metrics["medium_classes"], metrics["few_classes"]) == (2, 2, 2)
    assert per_class == [
        {"class": c, "train_count": n, "test_count": t, "top1": a}
        for c, (n, t, a) in enumerate(zip(TRAIN_COUNTS, [4, 2, 4, 4, 1, 2],
                                          [75.0, 50.0, 100.0, 50.0, 0.0, 100.0]))]


def test_thresholds_come_from_params_and_an_empty_group_is_none():
    logits, labels = logits_with_label_ranks(SAMPLES, 6)
    settings = EvaluateParams(many_above=150, few_below=5)  # 150 is medium, 5 is medium
    metrics, _ = long_tail_report(logits, labels, TRAIN_COUNTS, settings)
    assert metrics["many"] is None and metrics["few"] is None
    assert metrics["medium"] == (75 + 50 + 100 + 50 + 0 + 100) / 6
    assert (metrics["many_classes"], metrics["medium_classes"], metrics["few_classes"]) == (0, 6, 0)
    metrics, _ = long_tail_report(logits, labels, TRAIN_COUNTS,
                                  EvaluateParams(many_above=149, few_below=6))
    assert metrics["many"] == 75.0 and metrics["few"] == 100.0  # 150 > 149; 5 < 6


def test_class_without_test_samples_is_left_out_of_its_group():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    labels = torch.tensor([0, 1])  # class 2 (few) has no test sample
    metrics, per_class = long_tail_report(logits, labels, [200, 50, 3], EvaluateParams())
    assert (metrics["many"], metrics["medium"], metrics["few"]) == (100.0, 0.0, None)
    assert metrics["few_classes"] == 0 and metrics["top1"] == 50.0 and metrics["top5"] == 100.0
    assert per_class[2]["test_count"] == 0 and math.isnan(per_class[2]["top1"])


def slow_ece(logits, labels, bins=15):
    """ECE by its definition, one sample at a time in plain Python: bin m holds confidences in
    ((m - 1) / bins, m / bins]; sum over bins of |B_m| / N * |accuracy - mean confidence|."""
    members = [[] for _ in range(bins)]
    for row, label in zip(logits.tolist(), labels.tolist()):
        exps = [math.exp(v - max(row)) for v in row]
        probabilities = [e / sum(exps) for e in exps]
        confidence = max(probabilities)
        predicted = probabilities.index(confidence)
        m = next(m for m in range(bins) if confidence <= (m + 1) / bins)
        members[m].append((confidence, predicted == label))
    return sum(len(b) / len(labels) * abs(sum(c for _, c in b) / len(b)
                                          - sum(p for p, _ in b) / len(b))
               for b in members if b)


def slow_nll(logits, labels):
    """Mean of -log softmax(logits)[label], in nats, sample by sample."""
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        total += math.log(sum(math.exp(v) for v in row)) - row[label]
    return total / len(labels)


def test_ece_and_nll_on_hand_computed_logits():
    # Two classes; confidences 0.9 (right), 0.9 (wrong), 0.65 (right), 0.65 (right): bins
    # 13 (0.8667, 0.9333] and 9 (0.6, 0.6667]; ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1 - 0.65|.
    odds = lambda p: math.log(p / (1 - p))  # noqa: E731
    logits = torch.tensor([[odds(0.9), 0.0], [odds(0.9), 0.0], [odds(0.65), 0.0],
                           [0.0, odds(0.65)]])
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(logits, labels) == pytest.approx(0.2 + 0.175)
    nll = -(math.log(0.9) + math.log(0.1) + 2 * math.log(0.65)) / 4
    metrics, bins = calibration_report(logits, labels, [200, 50], EvaluateParams())
    assert metrics["ece"] == pytest.approx(0.375) and metrics["nll"] == pytest.approx(nll)
    # Per group: class 0 (many) holds samples 0 and 2, class 1 (medium) samples 1 and 3.
    assert metrics["ece_many"] == pytest.approx(1 / 2 * 0.1 + 1 / 2 * 0.35)
    assert metrics["ece_medium"] == pytest.approx(1 / 2 * 0.9 + 1 / 2 * 0.35)
    assert metrics["ece_few"] is None  # no sample in the group
    assert [b["count"] for b in bins] == [0] * 9 + [2] + [0] * 3 + [2, 0]
    assert bins[13]["accuracy"] == 0.5 and bins[13]["confidence"] == pytest.approx(0.9)
    assert math.isnan(bins[0]["accuracy"]) and math.isnan(bins[0]["confidence"])


def test_calibration_matches_the_slow_reference_on_random_logits():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 7, generator=generator)
    labels = torch.randint(0, 7, (500,), generator=generator)
    logits[torch.arange(250), labels[:250]] += 5  # half of them confidently right
    counts = [300, 150, 60, 30, 19, 10, 4]
    metrics, bins = calibration_report(logits, labels, counts, EvaluateParams())
    assert metrics["ece"] == pytest.approx(slow_ece(logits, labels), abs=1e-12)
    assert metrics["nll"] == pytest.approx(slow_nll(logits, labels), rel=1e-12)
    for group, classes in (("many", [0, 1]), ("medium", [2, 3]), ("few", [4, 5, 6])):
        mask = torch.isin(labels, torch.tensor(classes))
        assert metrics[f"ece_{group}"] == pytest.approx(slow_ece(logits[mask], labels[mask]),
                                                        abs=1e-12)
    assert sum(b["count"] for b in bins) == 500
    assert expected_calibration_error(logits, labels, bins=10) == pytest.approx(
        slow_ece(logits, labels, bins=10), abs=1e-12)


def test_confidence_on_a_bin_edge_falls_in_the_lower_bin():
    logits = torch.tensor([[0.0, 0.0]])  # confidence exactly 0.5: the upper edge of bin 0 of 2
    assert [b["count"] for b in reliability_bins(logits, torch.tensor([0]), bins=2)] == [1, 0]


def test_write_reliability_csv(tmp_path):
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    bins = reliability_bins(logits, torch.tensor([0, 0]))
    write_reliability(bins, tmp_path / "r" / "reliability.csv")
    with open(tmp_path / "r" / "reliability.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["bin", "lower", "upper", "count", "confidence", "accuracy"]
    assert len(rows) == 15 and sum(int(r["count"]) for r in rows) == 2


def test_write_report_files(tmp_path):
    logits, labels = logits_with_label_ranks(SAMPLES, 6)
    metrics, per_class = long_tail_report(logits, labels, TRAIN_COUNTS,
                                          EvaluateParams(many_above=150, few_below=5))
    names = [f"class_{c}" for c in range(6)]
    metrics_file, per_class_file = tmp_path / "out" / "test.json", tmp_path / "csv" / "pc.csv"
    write_report(metrics, per_class, names, metrics_file, per_class_file)
    written = json.loads(metrics_file.read_text())
    assert written == metrics and written["many"] is None  # JSON null for an empty group
    with open(per_class_file, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["class", "name", "train_count", "test_count", "top1"]
    assert [(r["class"], r["name"], r["train_count"], r["test_count"], float(r["top1"]))
            for r in rows] == [(str(r["class"]), names[r["class"]], str(r["train_count"]),
                                str(r["test_count"]), r["top1"]) for r in per_class]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Train counts 162 .. 16 (many, medium and few all present), 10 test images per class."""
    out = tmp_path_factory.mktemp("evaluate") / "shards"
    return str(out), prepare_digits(out, test_per_class=10)


def save_checkpoint(path, manifest, seed=0):
    """An untrained resnet8 in pipeline.train.loop's checkpoint format."""
    torch.manual_seed(seed)
    settings = TrainParams(arch="resnet8", image_size=IMAGE_SIZE)
    state = {"model": build_model("resnet8", manifest["num_classes"]).state_dict(), "epoch": 0,
             **model_identity(settings, Params(), manifest)}
    torch.save(state, path)
    return path


def run_stage(params_file, shards_dir, checkpoint, out_dir):
    return CliRunner().invoke(evaluate_stage, [
        "--params", str(params_file), "--shards", shards_dir, "--checkpoint", str(checkpoint),
        "--metrics", str(out_dir / "test.json"), "--per-class", str(out_dir / "per_class.csv"),
        "--reliability", str(out_dir / "reliability.csv"),
        "--evaluated", str(out_dir / "evaluated.json"), "--plot", str(out_dir / "pc.png")])


def test_evaluate_stage_writes_metrics_and_per_class_table(shards, tmp_path):
    shards_dir, manifest = shards
    assert manifest["train_counts"][0] > 100 and manifest["train_counts"][-1] < 20
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", manifest)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("evaluate:\n  many_above: 100\n  few_below: 20\n  batch_size: 32\n")
    result = run_stage(params_file, shards_dir, checkpoint, tmp_path / "results")
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and "few" in result.output

    metrics = json.loads((tmp_path / "results" / "test.json").read_text())
    # Only numbers among the metrics; which checkpoint they belong to is written beside them.
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    evaluated = json.loads((tmp_path / "results" / "evaluated.json").read_text())
    assert evaluated["checkpoint_sha256"] == file_sha256(checkpoint)
    counts = manifest["train_counts"]
    assert evaluated["group_classes"] == {"many": sum(n > 100 for n in counts),
                                          "medium": sum(20 <= n <= 100 for n in counts),
                                          "few": sum(n < 20 for n in counts)}
    assert "ECE" in result.output and "NLL" in result.output
    model = build_model("resnet8", 10)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    batches = eval_loader(split_shards(shards_dir, manifest, "test"), batch_size=32,
                          image_size=IMAGE_SIZE, workers=0)
    logits, labels = predict(model, batches, torch.device("cpu"))
    assert len(labels) == 100
    expected, _ = long_tail_report(logits, labels, manifest["train_counts"],
                                   EvaluateParams(batch_size=32))
    calibration, bins = calibration_report(logits, labels, manifest["train_counts"],
                                           EvaluateParams(batch_size=32))
    for group in ("many", "medium", "few"):  # in evaluated.json, beside the metrics
        assert expected.pop(f"{group}_classes") == evaluated["group_classes"][group]
    assert metrics == pytest.approx({**expected, **calibration})
    assert metrics["ece"] == pytest.approx(slow_ece(logits, labels), abs=1e-9)
    assert metrics["nll"] == pytest.approx(slow_nll(logits, labels), rel=1e-9)
    assert {"top1", "top5", "many", "medium", "few", "ece", "nll", "ece_many", "ece_medium",
            "ece_few"} <= set(metrics)
    with open(tmp_path / "results" / "reliability.csv", newline="") as stream:
        assert [int(r["count"]) for r in csv.DictReader(stream)] == [b["count"] for b in bins]
    assert (tmp_path / "results" / "pc.png").read_bytes().startswith(b"\x89PNG")
    assert all(metrics[group] is not None for group in ("many", "medium", "few"))
    with open(tmp_path / "results" / "per_class.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["train_count"]) for r in rows] == manifest["train_counts"]
    assert [r["name"] for r in rows] == manifest["class_names"]
    assert all(int(r["test_count"]) == 10 for r in rows)


def test_evaluate_stage_refuses_another_dataset_and_a_missing_checkpoint(shards, tmp_path):
    shards_dir, manifest = shards
    params_file = tmp_path / "params.yaml"
    params_file.write_text("evaluate:\n  batch_size: 32\n")
    other = save_checkpoint(tmp_path / "other.pt", {**manifest, "fingerprint": "0" * 64})
    result = run_stage(params_file, shards_dir, other, tmp_path / "results")
    assert result.exit_code == 1 and "trained on another dataset" in result.output
    result = run_stage(params_file, shards_dir, tmp_path / "absent.pt", tmp_path / "results")
    assert result.exit_code == 1 and "checkpoint not found" in result.output
    assert not (tmp_path / "results").exists()
