"""Tests for the `inspect` command and its plain functions, on a tiny generated store."""
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.tools.inspect import coverage_stats, inspect_command, topk_mass, view_details
from pipeline.store import (CHECKSUMS, create_store, finalize_store, fit_tail_basis, open_store,
                            shard_bounds, verify_store, write_shard, write_tail_basis)
from pipeline.store.tail import TAIL_STEP, tail_components
from helpers import prepare_digits

ROWS, VIEWS, TOPK, CLASSES, SHARD_ROWS = 25, 2, 3, 4, 10
CLASS_NAMES = ["cat", "dog", "eel", "fox"]
KNOWN_ROW, KNOWN_VIEW = 12, 1
KNOWN_LOGITS, KNOWN_CLASSES = [2.0, 1.0, 0.5], [3, 0, 2]  # fox, cat, eel
OTHER_LOGIT = -1.0  # class 1 ("dog"), outside the top-3


def make_dump():
    """(V, N, ...) data: every view's full logits (the store computes top-k and lse itself)."""
    rng = np.random.default_rng(3)
    full = rng.normal(0.0, 1.5, (VIEWS, ROWS, CLASSES)).astype(np.float16).astype(np.float64)
    full[KNOWN_VIEW, KNOWN_ROW] = [KNOWN_LOGITS[1], OTHER_LOGIT, KNOWN_LOGITS[2], KNOWN_LOGITS[0]]
    return dict(
        logits=full.astype(np.float32),
        boxes=np.tile(np.float32([0.1, 0.2, 0.5, 0.25]), (VIEWS, ROWS, 1)),
        flips=np.arange(VIEWS * ROWS).reshape(VIEWS, ROWS) % 2 == 0,
        labels=rng.integers(0, CLASSES, ROWS))


def build_store(path, shards=(0, 1, 2), finalize=True, fingerprint="fp-abc", tail="none",
                **extra_attributes):
    attributes = dict(teacher_name="teacher_a", teacher_arch="resnet8", teacher_sha256="ab" * 32,
                      teacher_image_size=32, fingerprint=fingerprint, class_names=CLASS_NAMES,
                      augmentation={"scale": [0.08, 1.0]}, seed=7, **extra_attributes)
    group = create_store(str(path), rows=ROWS, views=VIEWS, topk=TOPK, num_classes=CLASSES,
                         shard_rows=SHARD_ROWS, attributes=attributes, tail=tail)
    dump = make_dump()
    if tail == "quantized":  # the tail's PCA basis, before any shard (as the dump does)
        full = dump["logits"].reshape(-1, CLASSES).astype(np.float64)
        log_probs = full - np.log(np.exp(full).sum(-1, keepdims=True))
        write_tail_basis(group, fit_tail_basis(log_probs, tail_components(CLASSES)))
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
    """(V, N) top-k probability mass, from the full logits in float64."""
    full = dump["logits"].astype(np.float64)
    probabilities = np.exp(full - full.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    return np.sort(probabilities, axis=-1)[..., -TOPK:].sum(-1)


def test_coverage_stats_match_numpy(store_path):
    mass = topk_mass(open_store(store_path))
    # Top-k stored as float16 log-probabilities (pipeline/store/encoding.py): 1e-3 relative.
    np.testing.assert_allclose(mass, expected_mass(make_dump()), rtol=1e-3)
    stats = coverage_stats(mass)
    assert stats["count"] == VIEWS * ROWS
    assert stats["min"] == pytest.approx(mass.min())
    assert stats["p10"] == pytest.approx(np.percentile(mass, 10))
    assert stats["mean"] == pytest.approx(mass.mean())


def test_summary_names_the_decode_path_and_device(tmp_path):
    path, _ = build_store(tmp_path / "gpu.zarr", decode="torchvision-full-v1",
                          decode_device="cuda")
    result = invoke(path)
    assert result.exit_code == 0, result.output
    assert "decode       gpu (torchvision-full-v1) on cuda" in result.output


def array_table(output: str) -> dict[str, list[str]]:
    """The summary's array table: array name -> its cells, after checking that every column
    starts at the same character on every line (the header's)."""
    lines = output.splitlines()
    first = next(i for i, line in enumerate(lines) if line.split()[:2] == ["array", "shape"])
    last = next(i for i, line in enumerate(lines) if line.startswith("  bytes on disk"))
    table = lines[first:last]
    rows = {}
    for line in table:
        cells = [(match.start(), match.group()) for match in re.finditer(r"\S+(?: \S+)*", line)]
        rows[cells[0][1]] = cells
    starts = [[start for start, _ in cells[:-1]] for cells in rows.values()]  # last: right-aligned
    assert all(row == starts[0] for row in starts), "\n".join(table)
    ends = {cells[-1][0] + len(cells[-1][1]) for cells in rows.values()}
    assert len(ends) == 1, "\n".join(table)
    return {name: [cell for _, cell in cells] for name, cells in rows.items()}


def test_summary_prints_shapes_identity_sizes_and_coverage(store_path):
    result = invoke(store_path)
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ["V=2 views", "N=25 rows", "k=3", "C=4", "tail=none", "shard_rows=10",
                 "teacher_a (resnet8)", "ab" * 32, "fp-abc", "(format 3)", "complete     True",
                 "decode       cpu (pil-draft-v1; recorded before decode paths were)",
                 "shards complete 3/3",
                 "bytes on disk", "bytes per view", "compression ratio", "over 50 views"]:
        assert text in out, text
    table = array_table(out)
    assert table["array"] == ["array", "shape", "dtype", "shards", "chunks", "stored"]
    assert table["topk_codes"][:5] == ["topk_codes", "(2, 25, 3)", "uint16", "(2, 10, 3)",
                                       "(1, 10, 3)"]
    assert table["topk_classes"][1:3] == ["(2, 25, 3)", "uint8"]
    assert table["logsumexp"][1:3] == ["(2, 25)", "float32"]
    assert table["boxes"][1:3] == ["(2, 25, 4)", "uint16"]
    assert table["flips"][1:3] == ["(2, 25)", "bool"]
    assert table["labels"][3] == "-"  # not sharded
    mass = topk_mass(open_store(store_path))  # what is stored (checked against numpy above)
    assert f"min {mass.min():.4f}" in out
    assert f"p50 {np.percentile(mass, 50):.4f}" in out
    assert f"mean {mass.mean():.4f}" in out
    assert "tail_" not in out  # tail: none keeps the top-k only


def test_summary_of_a_quantized_tail_store_aligns_the_tail_arrays(tmp_path):
    path, _ = build_store(tmp_path / "tail.zarr", tail="quantized")
    result = invoke(path)
    assert result.exit_code == 0, result.output
    assert "tail=quantized" in result.output
    components = tail_components(CLASSES)
    table = array_table(result.output)  # the longest name, tail_coefficients, aligned too
    assert table["tail_coefficients"][1:5] == [
        f"(2, 25, {components})", "int8", f"(2, 10, {components})", f"(1, 10, {components})"]
    assert table["tail_residuals"][1:5] == ["(2, 25, 4)", "uint16", "(2, 10, 4)", "(1, 10, 4)"]


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
    # The raw top-k logits come back as log-probability + logsumexp: float16 log-probabilities
    # (|log p| < 2: 2**-10 absolute) plus a logsumexp kept to 16 mantissa bits.
    np.testing.assert_allclose(details["logits"], KNOWN_LOGITS, rtol=0, atol=2**-10)
    assert details["logsumexp"] == pytest.approx(math.log(total), rel=2**-16)
    assert details["tail_logits"] is None  # tail: none, k < C: no class's own tail logit
    assert "all 4 logits" not in result.output


def test_row_view_of_a_quantized_tail_store_shows_every_logit(tmp_path):
    path, dump = build_store(tmp_path / "tail.zarr", tail="quantized")
    result = invoke(path, "--row", KNOWN_ROW, "--view", KNOWN_VIEW)
    assert result.exit_code == 0, result.output
    summary = re.search(r"all 4 logits: min (\S+)  median (\S+)  max (\S+)", result.output)
    assert summary, result.output
    np.testing.assert_allclose([float(value) for value in summary.groups()],
                               [OTHER_LOGIT, 0.75, KNOWN_LOGITS[0]], rtol=0,
                               atol=TAIL_STEP / 2 + 2e-3)  # printed to 3 decimals
    details = view_details(open_store(path), KNOWN_ROW, KNOWN_VIEW)
    assert details["class_names"] == ["fox", "cat", "eel"]
    full = [KNOWN_LOGITS[1], OTHER_LOGIT, KNOWN_LOGITS[2], KNOWN_LOGITS[0]]  # class order
    # Top-k to float16 log-probabilities; the tail class within half a quantisation step
    # (TAIL_STEP / 2, plus the top-k's float16 and logsumexp rounding).
    np.testing.assert_allclose(details["tail_logits"], full, rtol=0,
                               atol=TAIL_STEP / 2 + 2**-10)
    np.testing.assert_allclose(details["logits"], KNOWN_LOGITS, rtol=0, atol=2**-10)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(manifest.json path, manifest) of tiny prepared shards: --manifest checks the tar
    shards beside it too."""
    out = tmp_path_factory.mktemp("inspect") / "shards"
    manifest = prepare_digits(out)
    return out / "manifest.json", manifest


def test_verify_ok_on_good_store_with_matching_manifest(store_path, prepared, tmp_path):
    result = invoke(store_path, "--verify")
    # The OK line on stdout (verify's progress bar goes to stderr)
    assert result.exit_code == 0 and result.stdout.startswith("OK "), result.output
    assert result.stdout.strip() == (f"OK {store_path}: 3 shards, 25 rows x 2 views complete, "
                                     "every chunk matches its checksum")
    manifest_file, manifest = prepared
    path, _ = build_store(tmp_path / "matching.zarr", fingerprint=manifest["fingerprint"])
    result = invoke(path, "--verify", "--manifest", manifest_file)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"OK {path}: 3 shards, 25 rows x 2 views complete, every chunk matches its checksum and "
        "matches the manifest fingerprint; every tar shard matches its sha256")


def test_verify_fails_on_missing_shard(tmp_path):
    path, _ = build_store(tmp_path / "partial.zarr", shards=(0, 2), finalize=False)
    result = invoke(path, "--verify")
    assert result.exit_code != 0
    assert "incomplete" in result.output and "1 of 3 shards not written: [1]" in result.output
    assert verify_store(path)[1] == "1 of 3 shards not written: [1]"


def test_verify_of_an_incomplete_store_reports_only_the_unwritten_shards(tmp_path):
    path, _ = build_store(tmp_path / "partial.zarr", shards=(0, 2), finalize=False)
    assert verify_store(path) == [
        "store is incomplete (the complete flag is not set); rerun dump_logits",
        "1 of 3 shards not written: [1]"]


def test_row_view_of_an_incomplete_store_shows_a_written_row(tmp_path):
    path, dump = build_store(tmp_path / "partial.zarr", shards=(0, 2), finalize=False)
    result = invoke(path, "--row", 21, "--view", 0)
    assert result.exit_code == 0, result.output
    assert f"row 21 view 0  label {dump['labels'][21]}" in result.output
    result = invoke(path, "--row", 11, "--view", 0)
    assert result.exit_code != 0 and "row 11 is in shard 1, which is not written yet" in (
        result.output)


def test_verify_with_a_manifest_prepare_did_not_write_is_a_one_line_error(store_path, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"fingerprint": "fp-abc"}')
    result = invoke(store_path, "--verify", "--manifest", manifest)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "not a manifest prepare wrote" in result.output


def test_verify_fails_on_fingerprint_mismatch(store_path, prepared):
    manifest_file, manifest = prepared
    result = invoke(store_path, "--verify", "--manifest", manifest_file)
    assert result.exit_code != 0
    assert f"fingerprint expected {manifest['fingerprint']!r}, found 'fp-abc'" in result.output


def damaged(path, array, shard, first, last, view) -> re.Pattern:
    """The message of a missing or damaged chunk (the words between "damaged" and the advice
    may say more about why)."""
    return re.compile(re.escape(f"logit store {path}: array '{array}', shard {shard} (rows "
                                f"{first}..{last}, view {view}) is missing or damaged")
                      + r".*; delete the store and rerun dump_logits")


def test_verify_finds_a_value_changed_behind_the_stores_back(store_path):
    assert verify_store(store_path) == []
    zarr.open_group(store_path, mode="r+")["logsumexp"][1, 21] = np.nan
    # The chunk no longer matches the checksum recorded when its shard was written.
    problems = verify_store(store_path)
    assert len(problems) == 1 and damaged(store_path, "logsumexp", 2, 20, 24, 1).fullmatch(
        problems[0]), problems
    result = invoke(store_path, "--verify")
    assert result.exit_code != 0 and problems[0] in result.output


def test_verify_finds_non_finite_data_with_a_matching_checksum(store_path):
    """A non-finite value that passes its checksum (e.g. written so by a buggy dump) is still
    reported, naming the shard, rows, view and array."""
    group = zarr.open_group(store_path, mode="r+")
    group["logsumexp"][1, 21] = np.nan
    position = open_store(store_path).array_names.index("logsumexp")
    group[CHECKSUMS][2, 1, position] = zlib.crc32(group["logsumexp"][1, 20:25].tobytes())
    assert verify_store(store_path) == ["shard 2 (rows 20..24), view 1: non-finite logsumexp"]


def test_verify_finds_a_damaged_tail_basis(tmp_path):
    path, _ = build_store(tmp_path / "tail.zarr", tail="quantized")
    assert verify_store(path) == []
    group = zarr.open_group(path, mode="r+")
    group["tail_basis"][0, 0] += 1.0  # every shard decodes through the basis
    problems = verify_store(path)
    assert len(problems) == 1 and re.fullmatch(
        re.escape(f"logit store {path}: array 'tail_basis' is missing or damaged")
        + r".*; delete the store and rerun dump_logits", problems[0]), problems
    result = invoke(path, "--verify")
    assert result.exit_code != 0 and "'tail_basis' is missing or damaged" in result.output


def test_verify_finds_a_missing_chunk(store_path):
    fs_root = Path(store_path)
    chunks = sorted((fs_root / "topk_codes" / "c").rglob("*"))
    shard_files = [path for path in chunks if path.is_file()]
    assert len(shard_files) == 3  # one object per WebDataset shard, holding every view
    shard_files[1].unlink()  # shard 1 (sorted by name: c/0/1/0)
    problems = verify_store(store_path)
    assert len(problems) == VIEWS, problems
    for view, problem in enumerate(problems):
        assert damaged(store_path, "topk_codes", 1, 10, 19, view).fullmatch(problem), problem


def test_plot_writes_png(store_path, tmp_path):
    plot = tmp_path / "coverage.png"
    result = invoke(store_path, "--plot", plot)
    assert result.exit_code == 0, result.output
    assert plot.stat().st_size > 1000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_store_is_a_clear_error(tmp_path):
    result = invoke(tmp_path / "nothing.zarr")
    assert result.exit_code != 0 and "no logit store" in result.output
