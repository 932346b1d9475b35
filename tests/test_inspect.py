"""Tests for the `inspect` command and its plain functions, on a tiny generated store."""
import json
import math
import re

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.inspect import coverage_stats, inspect_command, topk_mass, verify_store, view_details
from pipeline.store import create_store, finalize_store, open_store, shard_bounds, write_shard

ROWS, VIEWS, TOPK, CLASSES, SHARD_ROWS = 25, 2, 3, 4, 10
CLASS_NAMES = ["cat", "dog", "eel", "fox"]
KNOWN_ROW, KNOWN_VIEW = 12, 1
KNOWN_LOGITS, KNOWN_CLASSES = [2.0, 1.0, 0.5], [3, 0, 2]  # fox, cat, eel
OTHER_LOGIT = -1.0  # class 1 ("dog"), outside the top-3


def make_dump():
    """(V, N, ...) data with every view's full logits known, so lse is exact."""
    rng = np.random.default_rng(3)
    full = rng.normal(0.0, 1.5, (VIEWS, ROWS, CLASSES)).astype(np.float16).astype(np.float64)
    full[KNOWN_VIEW, KNOWN_ROW] = [KNOWN_LOGITS[1], OTHER_LOGIT, KNOWN_LOGITS[2], KNOWN_LOGITS[0]]
    order = np.argsort(-full, axis=-1, kind="stable")[..., :TOPK]
    return dict(
        topk_logits=np.take_along_axis(full, order, -1).astype(np.float32),
        topk_classes=order.astype(np.uint8),
        logsumexp=np.log(np.exp(full).sum(-1)).astype(np.float32),
        boxes=np.tile(np.float32([0.1, 0.2, 0.5, 0.25]), (VIEWS, ROWS, 1)),
        flips=np.arange(VIEWS * ROWS).reshape(VIEWS, ROWS) % 2 == 0,
        labels=rng.integers(0, CLASSES, ROWS))


def build_store(path, shards=(0, 1, 2), finalize=True, fingerprint="fp-abc"):
    attributes = dict(teacher_name="teacher_a", teacher_arch="resnet8", teacher_sha256="ab" * 32,
                      teacher_image_size=32, fingerprint=fingerprint, class_names=CLASS_NAMES,
                      augmentation={"scale": [0.08, 1.0]}, seed=7)
    group = create_store(str(path), rows=ROWS, views=VIEWS, topk=TOPK, num_classes=CLASSES,
                         shard_rows=SHARD_ROWS, attributes=attributes)
    dump = make_dump()
    for shard_index in shards:
        start, stop = shard_bounds(ROWS, SHARD_ROWS, shard_index)
        write_shard(group, shard_index, labels=dump["labels"][start:stop],
                    **{name: array[:, start:stop] for name, array in dump.items()
                       if name != "labels"})
    if finalize:
        finalize_store(group, {1.0: np.full((CLASSES, CLASSES), 0.25, np.float32)})
    return str(path), dump


@pytest.fixture
def store_path(tmp_path):
    return build_store(tmp_path / "teacher.zarr")[0]


def invoke(*args):
    return CliRunner().invoke(inspect_command, [str(arg) for arg in args])


def expected_mass(dump):
    logits = dump["topk_logits"].astype(np.float32)
    return np.exp(logits - dump["logsumexp"][..., None]).sum(-1)  # (V, N)


def test_coverage_stats_match_numpy(store_path):
    mass = topk_mass(open_store(store_path))
    # Top-k stored as float16 log-probabilities (pipeline/store.py): 1e-3 relative.
    np.testing.assert_allclose(mass, expected_mass(make_dump()), rtol=1e-3)
    stats = coverage_stats(mass)
    assert stats["count"] == VIEWS * ROWS
    assert stats["min"] == pytest.approx(mass.min())
    assert stats["p10"] == pytest.approx(np.percentile(mass, 10))
    assert stats["mean"] == pytest.approx(mass.mean())


def test_summary_prints_shapes_identity_sizes_and_coverage(store_path):
    result = invoke(store_path)
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ["V=2 views", "N=25 rows", "k=3", "C=4", "shard_rows=10", "teacher_a (resnet8)",
                 "ab" * 32, "fp-abc", "complete     True", "shards complete 3/3",
                 "topk_logits     (2, 25, 3)", "float16", "uint8",
                 "shards (2, 10, 3) chunks (1, 10, 3)",
                 "bytes on disk", "bytes per view", "compression ratio", "over 50 views"]:
        assert text in out, text
    mass = topk_mass(open_store(store_path))  # what is stored (checked against numpy above)
    assert f"min {mass.min():.4f}" in out
    assert f"p50 {np.percentile(mass, 50):.4f}" in out
    assert f"mean {mass.mean():.4f}" in out


def test_row_view_shows_classes_names_probabilities_box_and_flip(store_path):
    result = invoke(store_path, "--row", KNOWN_ROW, "--view", KNOWN_VIEW)
    assert result.exit_code == 0, result.output
    total = sum(math.exp(x) for x in KNOWN_LOGITS + [OTHER_LOGIT])
    probabilities = [math.exp(x) / total for x in KNOWN_LOGITS]
    lines = result.output.splitlines()
    expected = zip(KNOWN_CLASSES, ["fox", "cat", "eel"], probabilities)
    for rank, (cls, name, prob) in enumerate(expected):
        line = lines[1 + rank]
        assert f"class {cls:5d} {name}" in line, line
        printed = float(re.search(r"p=([0-9.]+)", line).group(1))
        assert printed == pytest.approx(prob, rel=1e-4), line  # lse kept to 16 bits
    residual = float(re.search(r"residual mass ([0-9.]+)", result.output).group(1))
    assert residual == pytest.approx(math.exp(OTHER_LOGIT) / total, abs=1e-4)
    assert "box top=0.1000 left=0.2000 height=0.5000 width=0.2500" in result.output
    assert "flip False" in result.output  # flat index 1 * 25 + 12 = 37 is odd
    details = view_details(open_store(store_path), KNOWN_ROW, KNOWN_VIEW)
    assert details["class_names"] == ["fox", "cat", "eel"]
    np.testing.assert_allclose(details["probabilities"], probabilities, rtol=1e-4)


def test_verify_ok_on_good_store_with_matching_manifest(store_path, tmp_path):
    result = invoke(store_path, "--verify")
    assert result.exit_code == 0 and result.output.startswith("OK "), result.output
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"fingerprint": "fp-abc", "train": {"rows": ROWS}}))
    result = invoke(store_path, "--verify", "--manifest", manifest)
    assert result.exit_code == 0 and "matches the manifest fingerprint" in result.output


def test_verify_fails_on_missing_shard(tmp_path):
    path, _ = build_store(tmp_path / "partial.zarr", shards=(0, 2), finalize=False)
    result = invoke(path, "--verify")
    assert result.exit_code != 0
    assert "incomplete" in result.output and "1 of 3 shards not written: [1]" in result.output
    assert verify_store(path)[1] == "1 of 3 shards not written: [1]"


def test_verify_fails_on_fingerprint_mismatch(store_path, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"fingerprint": "fp-new", "train": {"rows": ROWS}}))
    result = invoke(store_path, "--verify", "--manifest", manifest)
    assert result.exit_code != 0
    assert "fingerprint expected 'fp-new', found 'fp-abc'" in result.output


def test_verify_finds_non_finite_data(store_path):
    assert verify_store(store_path) == []
    zarr.open_group(store_path, mode="r+")["logsumexp"][1, 21] = np.nan
    # Raw logits are read back as log-probabilities + logsumexp: both are non-finite there.
    assert verify_store(store_path) == ["shard 2: non-finite topk_logits at row 21, view 1",
                                        "shard 2: non-finite logsumexp at row 21, view 1"]


def test_plot_writes_png(store_path, tmp_path):
    plot = tmp_path / "coverage.png"
    result = invoke(store_path, "--plot", plot)
    assert result.exit_code == 0, result.output
    assert plot.stat().st_size > 1000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_store_is_a_clear_error(tmp_path):
    result = invoke(tmp_path / "nothing.zarr")
    assert result.exit_code != 0 and "no logit store" in result.output
