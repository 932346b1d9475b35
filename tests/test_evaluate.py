"""pipeline.train.evaluate on hand-made logits, and the evaluate stage through click's CliRunner."""

import csv
import json
import math

import pytest
import torch
from click.testing import CliRunner

from pipeline.train.runs import model_identity
from pipeline.train.evaluate import long_tail_report, predict, write_report
from pipeline.train.models import build_model
from pipeline.params import EvaluateParams, Params, TrainParams
from pipeline.data.manifest import file_sha256
from pipeline.stream.loader import eval_loader, split_shards
from stages.evaluate import main as evaluate_stage
from test_stream import IMAGE_SIZE, prepare_tiny_shards

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
    return str(out), prepare_tiny_shards(out, test_per_class=10)


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
        "--metrics", str(out_dir / "test.json"), "--per-class", str(out_dir / "per_class.csv")])


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
    assert metrics.pop("checkpoint_sha256") == file_sha256(checkpoint)  # what was evaluated
    model = build_model("resnet8", 10)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    batches = eval_loader(split_shards(shards_dir, manifest, "test"), batch_size=32,
                          image_size=IMAGE_SIZE, workers=0)
    logits, labels = predict(model, batches, torch.device("cpu"))
    assert len(labels) == 100
    expected, _ = long_tail_report(logits, labels, manifest["train_counts"],
                                   EvaluateParams(batch_size=32))
    assert metrics == pytest.approx(expected)
    assert {"top1", "top5", "many", "medium", "few"} <= set(metrics)
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
