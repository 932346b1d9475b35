"""Stage one's logit dump on a tiny real dataset with a trained teacher: the stored views are the
seeded draws, replaying them reproduces the stored logits, a killed dump resumes to the same
bits, mismatched or broken stores and teachers are refused, the class priors are exact, and the
stage and inspect CLIs work on it. A rerun keeps a complete matching store untouched and builds
any other one beside the old (`<path>.next`), swapping it in only once complete."""

import dataclasses
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import pipeline.store.dump
from helpers import (NUM_SHARDS, SHARD_SIZE, TRAIN_ROWS, params_from, train_samples, with_changes,
                     write_params_file)
from pipeline.stream.augment import CropSpec, apply_view, draw_views, normalize, pixel_box
from pipeline.tools.cli import cli
from pipeline.train.checkpoints import save_checkpoint
from pipeline.train.runs import crop_spec, load_model, train_student
from pipeline.distributed import distributed
from pipeline.store.dump import dump_logits
from pipeline.errors import UserError
from pipeline.train.priors import class_prior
from pipeline.data.manifest import file_sha256
from pipeline.store import (
    CHECKSUMS, LABEL_CHECKSUMS, MARKERS, PARTIALS_GROUP, StoreMismatchError, open_store,
    shard_bounds, verify_store)
from pipeline.store.tail import TAIL_STEP, tail_components
from stages.dump_logits import main as dump_main
from stages.train_student import main as student_main

VIEWS, TOPK, CLASSES = 3, 2, 3  # toy params: logits.views, logits.topk; 3 classes


class Killed(Exception):
    """Stands in for a crash or a kill of the dump process."""


def dump_to(data, checkpoint, path, params=None):
    dump_logits(params or data.params, "teacher", str(data.shards_dir), str(checkpoint),
                str(path))
    return str(path)


def open_expected(data, checkpoint, path):
    return open_store(str(path), fingerprint=data.manifest["fingerprint"], seed=data.params.seed,
                      teacher_sha256=file_sha256(checkpoint))


@pytest.fixture(scope="module")
def store_path(stage_one_data, teacher_checkpoint):
    """An uninterrupted dump: the reference every other store is compared with."""
    return dump_to(stage_one_data, teacher_checkpoint, stage_one_data.root / "reference.zarr")


@pytest.fixture(scope="module")
def samples(stage_one_data):
    return train_samples(stage_one_data.shards_dir, stage_one_data.manifest)


@pytest.fixture(scope="module")
def replayed_logits(stage_one_data, teacher_checkpoint, store_path, samples):
    """(V, N, C) float32: the teacher, in eval mode, on every stored view, replayed from the
    stored box and flip on the image decoded from the shard."""
    store = open_store(store_path)
    device = distributed().device  # the dump's device: replay compares like with like
    teacher = load_model(teacher_checkpoint)[0].to(device)
    size = stage_one_data.params.logits.image_size
    logits = []
    with torch.no_grad():
        for view in range(store.views):
            stored = store.read_rows(view, 0, store.rows)
            crops = torch.stack([apply_view(sample["image"], stored["boxes"][row],
                                            bool(stored["flips"][row]), size)
                                 for row, sample in enumerate(samples)])
            logits.append(teacher(normalize(crops.to(device))).cpu())  # (N, C)
    return torch.stack(logits).numpy()


def read_everything(path):
    """Every array of a store as stored (the raw zarr arrays: codes, checksums, priors and
    markers included) and its attributes."""
    group = zarr.open_group(str(path), mode="r")
    store = open_store(str(path))
    names = sorted(group.array_keys())  # every array at the top: the tail basis too
    assert set(store.array_names + ("labels", MARKERS, CHECKSUMS, LABEL_CHECKSUMS)) <= set(names)
    arrays = {name: group[name][:] for name in names}
    arrays.update({f"class_prior T={t}": store.class_prior(t) for t in store.temperatures})
    return arrays, dict(group.attrs)


def file_tree(path) -> dict[str, tuple[str, int]]:
    """relative file name -> (sha256, mtime in ns) of every file under `path`."""
    root = Path(path)
    return {str(file.relative_to(root)): (hashlib.sha256(file.read_bytes()).hexdigest(),
                                          file.stat().st_mtime_ns)
            for file in sorted(root.rglob("*")) if file.is_file()}


def count_dumped_shards(monkeypatch) -> list[int]:
    """Spy on the dump: the list fills with the index of every shard it computes."""
    real_dump_shard, dumped = pipeline.store.dump._dump_shard, []

    def counted(group, index, *args, **kwargs):
        dumped.append(index)
        return real_dump_shard(group, index, *args, **kwargs)

    monkeypatch.setattr(pipeline.store.dump, "_dump_shard", counted)
    return dumped


def assert_bitwise_equal(actual, expected, name):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    assert actual.tobytes() == expected.tobytes(), f"{name} differs"


def assert_same_store(path, reference_path, *, attributes: bool = True) -> dict:
    """The store at `path` holds exactly the reference's arrays, bit for bit (and, with
    `attributes`, its attributes); returns the reference's arrays (read_everything)."""
    actual, actual_attrs = read_everything(path)
    reference, reference_attrs = read_everything(reference_path)
    if attributes:
        assert actual_attrs == reference_attrs
    assert sorted(actual) == sorted(reference)
    for name, array in reference.items():
        assert_bitwise_equal(actual[name], array, name)
    return reference


# ---------------------------------------------------------------------------------------------
# What the store holds


def test_store_shape_and_identity(stage_one_data, teacher_checkpoint, store_path, samples):
    store = open_expected(stage_one_data, teacher_checkpoint, store_path)
    assert (store.views, store.rows, store.topk, store.num_classes) == (VIEWS, TRAIN_ROWS, TOPK,
                                                                        CLASSES)
    assert store.num_shards == NUM_SHARDS and store.completed_shards() == set(range(NUM_SHARDS))
    attrs = store.attributes
    assert attrs["complete"] is True
    assert attrs["teacher_name"] == "teacher" and attrs["teacher_arch"] == "resnet8"
    assert attrs["teacher_image_size"] == stage_one_data.params.logits.image_size
    assert attrs["format_version"] == 3
    # k < C with the quantised tail: every class's logit is kept (what IKL needs)
    assert store.tail == attrs["tail"] == "quantized" and store.exact_logits
    assert store.array_names == ("topk_codes", "topk_classes", "logsumexp", "tail_coefficients",
                                 "tail_residuals", "boxes", "flips")
    components = attrs["tail_components"]
    assert components == tail_components(CLASSES) >= 1
    basis = store.tail_basis  # the PCA basis the dump fitted, stored once
    assert basis.mean.shape == (CLASSES,) and basis.basis.shape == (CLASSES, components)
    assert store.group["tail_coefficients"].shape == (VIEWS, TRAIN_ROWS, components)
    assert store.group["tail_residuals"].shape == (VIEWS, TRAIN_ROWS, CLASSES)
    assert attrs["class_names"] == stage_one_data.manifest["class_names"]
    assert attrs["prior_temperatures"] == [1.0, 4.0]
    assert store.labels.tolist() == [sample["label"] for sample in samples]


def test_stored_boxes_and_flips_are_the_seeded_draws(stage_one_data, store_path, samples):
    store = open_store(store_path)
    spec = CropSpec.from_dict(store.attributes["augmentation"])
    assert spec == crop_spec(stage_one_data.params.augment)
    heights = [sample["image"].shape[1] for sample in samples]
    widths = [sample["image"].shape[2] for sample in samples]
    assert len(set(zip(heights, widths))) > 10  # odd, varied sizes: the boxes differ per row
    boxes, flips = draw_views(store.attributes["seed"], VIEWS, np.arange(TRAIN_ROWS), heights,
                              widths, spec=spec)  # (V, N, 4), (V, N)
    group = store.group
    # Boxes are stored in fixed point sized by max_image_side: the replayed PIXEL box is exact.
    assert group["boxes"].dtype == np.uint16
    for view in range(VIEWS):
        stored = store.read_rows(view, 0, TRAIN_ROWS)["boxes"]  # (N, 4) float32, decoded
        for row in range(TRAIN_ROWS):
            assert (pixel_box(stored[row], heights[row], widths[row])
                    == pixel_box(boxes[view, row], heights[row], widths[row])), (view, row)
    assert store.attributes["max_image_side"] == max(max(heights), max(widths))
    assert_bitwise_equal(group["flips"][:], flips, "flips")
    assert flips.any() and not flips.all()  # both flip states are replayed


def test_teacher_on_a_replayed_view_reproduces_the_stored_logits(store_path, replayed_logits):
    store = open_store(store_path)
    full = torch.from_numpy(replayed_logits)  # (V, N, C)
    top = full.topk(TOPK, dim=-1)
    group = store.group
    assert np.array_equal(group["topk_classes"][:], top.indices.numpy())
    lse = torch.logsumexp(full.double(), -1)  # (V, N)
    log_probs = (top.values.double() - lse[..., None]).numpy()  # (V, N, k)
    read = [store.read_rows(view, 0, TRAIN_ROWS) for view in range(VIEWS)]
    stored_log_probs = np.stack([rows["topk_log_probs"] for rows in read])
    assert stored_log_probs.dtype == np.float16
    # Stored as float16 log-probabilities: half a unit in the last place, ~2**-11 relative.
    np.testing.assert_allclose(stored_log_probs.astype(np.float32), log_probs,
                               rtol=2**-10, atol=1e-4)
    stored_lse = np.stack([rows["logsumexp"] for rows in read])
    assert stored_lse.dtype == np.float32
    np.testing.assert_allclose(stored_lse, lse.numpy(), rtol=2**-16, atol=1e-5)  # 16 bits kept
    # The raw top-k logits again: log-probability + logsumexp.
    raw = stored_log_probs.astype(np.float32) + stored_lse[..., None]
    np.testing.assert_allclose(raw, top.values.numpy(), rtol=2**-10, atol=1e-3)
    # Every class's logit (the quantised tail): the top-k as above, the others within half a
    # step, TAIL_STEP / 2, of the teacher's (plus the float32 rounding of the decoding).
    decoded = np.stack([store.teacher_logits(view, 0, TRAIN_ROWS) for view in range(VIEWS)])
    assert decoded.dtype == np.float32 and decoded.shape == full.shape
    error = np.abs(decoded - full.numpy())
    assert (error <= TAIL_STEP / 2 + 1e-4).all(), error.max()
    np.testing.assert_allclose(np.take_along_axis(decoded, top.indices.numpy(), -1),
                               top.values.numpy(), rtol=2**-10, atol=1e-3)


def test_class_priors_are_exact_over_all_rows_and_views(stage_one_data, store_path,
                                                        replayed_logits):
    store = open_store(store_path)
    temperatures = stage_one_data.params.logits.prior_temperatures
    assert store.temperatures == sorted(temperatures)
    labels = torch.from_numpy(store.labels.astype(np.int64)).repeat(VIEWS)  # view-major
    full = torch.from_numpy(replayed_logits).reshape(VIEWS * TRAIN_ROWS, CLASSES)
    for temperature in temperatures:
        expected = class_prior(full, labels, CLASSES, weight_temperature=temperature).numpy()
        prior = store.class_prior(temperature)
        assert prior.dtype == np.float32
        np.testing.assert_allclose(prior, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(store.class_prior(1.0), store.class_prior(4.0))
    assert PARTIALS_GROUP not in store.group  # the partial sums are dropped once final


# ---------------------------------------------------------------------------------------------
# Crashes and resumption


def test_killed_dump_resumes_to_an_identical_store(stage_one_data, teacher_checkpoint,
                                                   store_path, tmp_path, monkeypatch):
    real_write_shard = pipeline.store.dump.write_shard

    def killed_mid_shard_2(group, shard_index, **arrays):
        if shard_index == 2:  # part of the shard's data lands, then the process dies
            start, stop = shard_bounds(TRAIN_ROWS, SHARD_SIZE, shard_index)
            group["topk_codes"][:, start:stop] = 7
            group["tail_residuals"][:, start:stop] = 3
            group["boxes"][:, start:stop] = 5
            raise Killed
        real_write_shard(group, shard_index, **arrays)

    path = tmp_path / "resumed.zarr"
    monkeypatch.setattr(pipeline.store.dump, "write_shard", killed_mid_shard_2)
    with pytest.raises(Killed):
        dump_to(stage_one_data, teacher_checkpoint, path)
    with pytest.raises(StoreMismatchError, match="incomplete"):
        open_store(str(path))

    monkeypatch.setattr(pipeline.store.dump, "write_shard", real_write_shard)
    dumped = count_dumped_shards(monkeypatch)
    dump_to(stage_one_data, teacher_checkpoint, path)
    assert dumped == [2, 3]  # shards 0 and 1 were complete: not recomputed

    reference = assert_same_store(path, store_path)
    assert len([name for name in reference if name.startswith("class_prior")]) == 2
    assert PARTIALS_GROUP not in zarr.open_group(str(path), mode="r")


def test_a_dump_killed_while_writing_the_tail_basis_resumes_to_an_identical_store(
        stage_one_data, teacher_checkpoint, store_path, tmp_path, monkeypatch):
    real_write_tail_basis = pipeline.store.dump.write_tail_basis

    def killed_after_the_first_array(group, basis):
        group.create_array("tail_mean", data=basis.mean.numpy())  # lands, then the kill
        raise Killed

    path = tmp_path / "basis.zarr"
    monkeypatch.setattr(pipeline.store.dump, "write_tail_basis", killed_after_the_first_array)
    with pytest.raises(Killed):
        dump_to(stage_one_data, teacher_checkpoint, path)
    monkeypatch.setattr(pipeline.store.dump, "write_tail_basis", real_write_tail_basis)
    dump_to(stage_one_data, teacher_checkpoint, path)
    assert_same_store(path, store_path)


def test_rerun_with_other_prior_temperatures_gives_exact_priors(stage_one_data,
                                                                teacher_checkpoint,
                                                                replayed_logits, tmp_path,
                                                                monkeypatch):
    real_dump_shard = pipeline.store.dump._dump_shard

    def dies_at_shard_2(group, index, *args, **kwargs):
        if index == 2:
            raise Killed
        return real_dump_shard(group, index, *args, **kwargs)

    monkeypatch.setattr(pipeline.store.dump, "_dump_shard", dies_at_shard_2)
    path = tmp_path / "temperatures.zarr"
    with pytest.raises(Killed):
        dump_to(stage_one_data, teacher_checkpoint, path)  # priors at T = 1 and 4
    monkeypatch.setattr(pipeline.store.dump, "_dump_shard", real_dump_shard)
    # The user edits logits.prior_temperatures before the rerun: the shards written so far
    # hold no partial sums at T = 2, so they must not be reused.
    raw = with_changes(stage_one_data.raw, "logits", prior_temperatures=[1.0, 2.0])
    dump_to(stage_one_data, teacher_checkpoint, path, params=params_from(raw))
    store = open_store(str(path))
    assert store.temperatures == [1.0, 2.0]
    labels = torch.from_numpy(store.labels.astype(np.int64)).repeat(VIEWS)
    full = torch.from_numpy(replayed_logits).reshape(VIEWS * TRAIN_ROWS, CLASSES)
    expected = class_prior(full, labels, CLASSES, weight_temperature=2.0).numpy()
    np.testing.assert_allclose(store.class_prior(2.0), expected, rtol=1e-5, atol=1e-7)


class FakeRank:
    """A rank of a 2-process run without a process group: barriers are no-ops, since the
    test runs the ranks one after the other."""

    def __init__(self, rank: int):
        self.rank, self.world_size, self.device = rank, 2, torch.device("cpu")
        self.is_main = rank == 0

    def barrier(self) -> None:
        pass


def test_ranks_writing_disjoint_shards_give_the_same_store(stage_one_data, teacher_checkpoint,
                                                           store_path, tmp_path, monkeypatch):
    path = tmp_path / "two_ranks.zarr"
    for rank in (1, 0):  # rank 1 first: rank 0 must still find and finish the same store
        monkeypatch.setattr(pipeline.store.dump, "distributed", lambda rank=rank: FakeRank(rank))
        dump_logits(stage_one_data.params, "teacher", str(stage_one_data.shards_dir),
                    str(teacher_checkpoint), str(path))
        group = zarr.open_group(str(path), mode="r")
        assert group.attrs["complete"] == (rank == 0)  # rank 0 finishes, after all ranks
    assert_same_store(path, store_path)


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("key", ["fingerprint", "seed", "teacher_sha256"])
def test_open_store_refuses_a_mismatch_naming_it(stage_one_data, teacher_checkpoint, store_path,
                                                 key):
    expected = dict(fingerprint=stage_one_data.manifest["fingerprint"],
                    seed=stage_one_data.params.seed, teacher_sha256=file_sha256(teacher_checkpoint))
    open_store(store_path, **expected)  # the right values open it
    wrong = {"fingerprint": "0" * 64, "seed": expected["seed"] + 1,
             "teacher_sha256": "f" * 64}[key]
    with pytest.raises(StoreMismatchError) as error:
        open_store(store_path, **{**expected, key: wrong})
    message = str(error.value)
    assert f"{key} expected {wrong!r}, found {expected[key]!r}" in message
    assert "rerun dump_logits" in message


def test_open_store_refuses_an_incomplete_store(stage_one_data, teacher_checkpoint, tmp_path,
                                                monkeypatch):
    real_dump_shard = pipeline.store.dump._dump_shard

    def dies_at_shard_1(group, index, *args, **kwargs):
        if index == 1:
            raise Killed
        return real_dump_shard(group, index, *args, **kwargs)

    monkeypatch.setattr(pipeline.store.dump, "_dump_shard", dies_at_shard_1)
    path = tmp_path / "partial.zarr"
    with pytest.raises(Killed):
        dump_to(stage_one_data, teacher_checkpoint, path)
    with pytest.raises(StoreMismatchError,
                       match=r"is incomplete \(complete expected True, found False; 1/4 shards"):
        open_expected(stage_one_data, teacher_checkpoint, path)
    assert open_store(str(path), require_complete=False).completed_shards() == {0}


def test_student_refuses_a_store_of_another_teacher_or_seed(stage_one_data, teacher_checkpoint,
                                                            store_path, tmp_path):
    state = torch.load(teacher_checkpoint, weights_only=True)
    state["model"]["fc.bias"] += 1.0  # another teacher: same arch, other weights
    other_teacher = tmp_path / "other.pt"
    save_checkpoint(other_teacher, state)  # a sound checkpoint, of another teacher
    data = stage_one_data
    with pytest.raises(StoreMismatchError, match="teacher_sha256 expected"):
        train_student(data.params, str(data.shards_dir), store_path, str(other_teacher),
                      str(tmp_path / "student"), str(tmp_path / "live"))
    other_seed = dataclasses.replace(data.params, seed=data.params.seed + 1)
    with pytest.raises(StoreMismatchError, match="seed expected 4, found 3"):
        train_student(other_seed, str(data.shards_dir), store_path, str(teacher_checkpoint),
                      str(tmp_path / "student"), str(tmp_path / "live"))
    assert not (tmp_path / "student").exists()  # refused before any training


def test_topk_above_the_classes_stops_the_dump_naming_the_key(stage_one_data, tmp_path):
    """A change of logits.topk reruns only the dump: it makes the params' own check (3 classes
    here, known only from the shards), before the teacher is even loaded."""
    params = params_from(with_changes(stage_one_data.raw, "logits", topk=4))
    with pytest.raises(UserError) as error:
        dump_to(stage_one_data, tmp_path / "no_checkpoint.pt", tmp_path / "k.zarr", params)
    assert str(error.value) == (f"logits.topk: 4 exceeds the 3 classes of "
                                f"{stage_one_data.shards_dir}; set logits.topk <= 3")
    assert not (tmp_path / "k.zarr").exists()


def test_nan_teacher_stops_the_dump_naming_the_row(stage_one_data, teacher_checkpoint,
                                                    tmp_path):
    state = torch.load(teacher_checkpoint, weights_only=True)
    state["model"]["fc.bias"][1] = float("nan")
    broken = tmp_path / "nan_teacher.pt"
    save_checkpoint(broken, state)  # sound, with NaN weights
    path = tmp_path / "nan.zarr"
    with pytest.raises(UserError, match=r"NaN or Inf at row 0, view 0 \(.*train-000000.tar"):
        dump_to(stage_one_data, broken, path)
    assert open_store(str(path), require_complete=False).completed_shards() == set()


def test_inf_teacher_logit_stops_the_dump_naming_the_row(stage_one_data, teacher_checkpoint,
                                                          tmp_path, monkeypatch):
    real_teacher_logits = pipeline.store.dump._teacher_logits
    real_dump_shard = pipeline.store.dump._dump_shard
    where = {"shard": None, "view": -1}  # the shard being dumped, its view (calls: view order)

    def tracked(group, index, *args, **kwargs):
        where.update(shard=index, view=-1)
        return real_dump_shard(group, index, *args, **kwargs)

    def inf_at_row_13_view_2(*args, **kwargs):
        logits = real_teacher_logits(*args, **kwargs)  # (n, C)
        if where["shard"] is not None:  # not the tail basis' fit, before any shard
            where["view"] += 1
            if (where["shard"], where["view"]) == (1, 2):  # shard 1 (rows 8..15), view 2
                logits[13 - 8, 2] = float("inf")
        return logits

    monkeypatch.setattr(pipeline.store.dump, "_dump_shard", tracked)
    monkeypatch.setattr(pipeline.store.dump, "_teacher_logits", inf_at_row_13_view_2)
    path = tmp_path / "inf.zarr"
    with pytest.raises(UserError, match=r"NaN or Inf at row 13, view 2 \(.*train-000001.tar"):
        dump_to(stage_one_data, teacher_checkpoint, path)
    assert open_store(str(path), require_complete=False).completed_shards() == {0}


def test_a_top_logit_beyond_float16_is_stored_relative_to_logsumexp(stage_one_data,
                                                                     teacher_checkpoint,
                                                                     tmp_path, monkeypatch):
    """Raw logits beyond float16's range store fine: the store keeps log-probabilities."""
    real_teacher_logits = pipeline.store.dump._teacher_logits

    def huge_at_row_3(*args, **kwargs):
        logits = real_teacher_logits(*args, **kwargs)  # (n, C); the last shard has 2 rows
        if len(logits) > 3:
            logits[3] += 1e5  # finite in float32, beyond float16 as a raw logit
        return logits

    monkeypatch.setattr(pipeline.store.dump, "_teacher_logits", huge_at_row_3)
    path = tmp_path / "huge.zarr"
    dump_logits(stage_one_data.params, "teacher", str(stage_one_data.shards_dir),
                str(teacher_checkpoint), str(path))
    store = open_store(str(path))
    rows = store.read_rows(0, 0, 8)
    assert np.isfinite(rows["topk_log_probs"]).all() and (rows["topk_log_probs"] <= 0).all()
    assert rows["logsumexp"][3] == pytest.approx(1e5, rel=1e-3)
    top_probability = np.exp(rows["topk_log_probs"][3, 0].astype(np.float32))
    assert 0 < top_probability <= 1
    logits = store.teacher_logits(0, 0, 8)  # (8, C): the raw logits again
    assert np.isfinite(logits).all()
    assert logits[3].max() == pytest.approx(1e5, rel=1e-3)
    assert logits[3].max() - logits[2].max() > 9e4  # row 3 moved, row 2 did not


# ---------------------------------------------------------------------------------------------
# CLIs: the dump stage and `python -m pipeline inspect`


def test_dump_stage_cli_and_inspect(stage_one_data, teacher_checkpoint, store_path, tmp_path):
    runner = CliRunner()
    params_file = write_params_file(tmp_path / "params.yaml", stage_one_data.raw)
    out = tmp_path / "logits" / "teacher.zarr"
    args = ["--params", str(params_file), "--shards", str(stage_one_data.shards_dir),
            "--checkpoint", str(teacher_checkpoint), "--out", str(out)]

    result = runner.invoke(dump_main, ["--help"])
    assert result.exit_code == 0
    for text in ["--params", "--name", "--shards", "--checkpoint", "--out", "logit store"]:
        assert text in result.output, text

    result = runner.invoke(dump_main, args + ["--name", "nope"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "Error: 'nope' is not a key of teachers (known: teacher); pass --name with one of them"]
    assert not out.exists()

    result = runner.invoke(dump_main, args + ["--name", "teacher"])
    assert result.exit_code == 0, result.output
    assert f"{out}: complete" in result.output
    assert_same_store(out, store_path, attributes=False)

    result = runner.invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    for text in [f"logit store {out}", "teacher      teacher (resnet8)",
                 f"fingerprint  {stage_one_data.manifest['fingerprint']}   seed 3",
                 "V=3 views  N=26 rows  k=2  C=3  tail=quantized  shard_rows=8",
                 "complete     True", "shards complete 4/4",
                 "class prior temperatures [1.0, 4.0]", "over 78 views"]:
        assert text in result.output, text
    # the array table's columns are sized to its widest cell (test_inspect checks alignment)
    for name, shape in (("topk_codes", "(3, 26, 2)"), ("tail_residuals", "(3, 26, 3)")):
        assert re.search(rf"^\s*{name}\s+{re.escape(shape)}", result.output, re.M), name

    manifest = stage_one_data.shards_dir / "manifest.json"
    result = runner.invoke(cli, ["inspect", str(out), "--verify", "--manifest", str(manifest)])
    assert result.exit_code == 0, result.output
    # stdout: the verdict (the progress bar goes to stderr)
    assert result.stdout.strip() == (
        f"OK {out}: 4 shards, 26 rows x 3 views complete, every chunk matches its checksum and "
        "matches the manifest fingerprint; every tar shard matches its sha256")


def test_dump_stage_cli_reports_a_missing_checkpoint_in_one_line(stage_one_data, tmp_path):
    params_file = write_params_file(tmp_path / "params.yaml", stage_one_data.raw)
    result = CliRunner().invoke(dump_main, [
        "--params", str(params_file), "--name", "teacher", "--shards",
        str(stage_one_data.shards_dir), "--checkpoint", str(tmp_path / "missing.pt"),
        "--out", str(tmp_path / "out.zarr")])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "missing.pt: checkpoint not found" in lines[0], result.output


def test_rerun_over_a_store_of_other_params_starts_afresh(stage_one_data, teacher_checkpoint,
                                                           store_path, tmp_path):
    path = tmp_path / "stale.zarr"
    shutil.copytree(store_path, path)
    raw = with_changes(stage_one_data.raw, "logits", views=2)
    dump_to(stage_one_data, teacher_checkpoint, path, params=params_from(raw))
    store = open_expected(stage_one_data, teacher_checkpoint, path)
    assert store.views == 2
    assert sorted(os.listdir(tmp_path)) == ["stale.zarr"]  # no .next or .old left behind
    reference = open_store(store_path)
    for view in range(2):  # views are a function of (seed, view, row): the first two agree
        assert_bitwise_equal(store.read_rows(view, 0, TRAIN_ROWS)["boxes"],
                             reference.read_rows(view, 0, TRAIN_ROWS)["boxes"], "boxes")


# ---------------------------------------------------------------------------------------------
# Reruns: a complete matching store is kept; another dump is built beside it and swapped in


def test_rerun_on_a_complete_matching_store_keeps_it_untouched(stage_one_data,
                                                               teacher_checkpoint, store_path,
                                                               tmp_path, monkeypatch, capsys):
    path = tmp_path / "kept.zarr"
    shutil.copytree(store_path, path)
    before = file_tree(path)

    def never(*args, **kwargs):
        raise AssertionError("a complete matching store was written to")

    for name in ("write_shard", "create_store", "finalize_store", "_dump_shard", "_swap_in"):
        monkeypatch.setattr(pipeline.store.dump, name, never)
    capsys.readouterr()
    dump_to(stage_one_data, teacher_checkpoint, path)
    assert f"{path} is complete and matches this dump; kept as it is" in capsys.readouterr().out
    assert file_tree(path) == before  # the same bytes, and no file rewritten (mtimes)
    assert sorted(os.listdir(tmp_path)) == ["kept.zarr"]


def test_rerun_with_other_params_builds_a_replacement_and_swaps_it_in(
        stage_one_data, teacher_checkpoint, store_path, replayed_logits, tmp_path, monkeypatch):
    data = stage_one_data
    path = tmp_path / "store" / "teacher.zarr"
    shutil.copytree(store_path, path)
    before = file_tree(path)
    params = params_from(with_changes(data.raw, "logits", topk=CLASSES))  # k = C: exact
    real_write_shard, written = pipeline.store.dump.write_shard, []

    def killed_at_the_second_shard(group, shard_index, **arrays):
        if written:
            raise Killed
        written.append(shard_index)
        real_write_shard(group, shard_index, **arrays)

    monkeypatch.setattr(pipeline.store.dump, "write_shard", killed_at_the_second_shard)
    with pytest.raises(Killed):
        dump_to(data, teacher_checkpoint, path, params=params)
    assert written == [0]
    # The old complete store is still there, intact; the replacement is beside it, partial.
    assert file_tree(path) == before
    old = open_expected(data, teacher_checkpoint, path)
    assert old.topk == TOPK and old.complete
    replacement = path.parent / "teacher.zarr.next"
    assert sorted(os.listdir(path.parent)) == ["teacher.zarr", "teacher.zarr.next"]
    partial = open_store(str(replacement), require_complete=False)
    assert partial.topk == CLASSES and not partial.complete
    assert partial.completed_shards() == {0}

    monkeypatch.setattr(pipeline.store.dump, "write_shard", real_write_shard)
    dumped = count_dumped_shards(monkeypatch)
    dump_to(data, teacher_checkpoint, path, params=params)
    assert dumped == [1, 2, 3]  # the replacement resumed: shard 0 was not recomputed
    assert sorted(os.listdir(path.parent)) == ["teacher.zarr"]  # .next (and .old) gone
    new = open_expected(data, teacher_checkpoint, path)
    assert new.complete and new.topk == CLASSES and new.exact_logits
    # k = C: nothing beyond the top-k to keep
    assert not [name for name in new.group.array_keys() if name.startswith("tail_")]
    decoded = np.stack([new.teacher_logits(view, 0, TRAIN_ROWS) for view in range(VIEWS)])
    np.testing.assert_allclose(decoded, replayed_logits, rtol=2**-10, atol=1e-3)
    # the same store, bit for bit, as a dump of these params from scratch
    monkeypatch.undo()  # the real dump again, unobserved
    direct = dump_to(data, teacher_checkpoint, tmp_path / "direct.zarr", params=params)
    assert_same_store(path, direct)


def test_a_dump_killed_before_swapping_in_its_finished_replacement_completes_on_rerun(
        stage_one_data, teacher_checkpoint, store_path, tmp_path, monkeypatch):
    data = stage_one_data
    path = tmp_path / "teacher.zarr"
    shutil.copytree(store_path, path)
    before = file_tree(path)
    params = params_from(with_changes(data.raw, "logits", topk=CLASSES))
    real_swap_in = pipeline.store.dump._swap_in

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(pipeline.store.dump, "_swap_in", killed)
    with pytest.raises(Killed):
        dump_to(data, teacher_checkpoint, path, params=params)
    assert file_tree(path) == before
    assert open_store(f"{path}.next").complete
    monkeypatch.setattr(pipeline.store.dump, "_swap_in", real_swap_in)
    dump_to(data, teacher_checkpoint, path, params=params)
    assert open_expected(data, teacher_checkpoint, path).topk == CLASSES
    assert sorted(os.listdir(tmp_path)) == ["teacher.zarr"]


def test_a_dump_killed_midway_through_the_swap_completes_it_on_rerun(
        stage_one_data, teacher_checkpoint, store_path, tmp_path, monkeypatch):
    """Killed between moving the old store aside and moving the replacement in: nothing is
    lost (old at .old, new at .next), and the rerun finishes the swap without dumping again."""
    data = stage_one_data
    path = tmp_path / "teacher.zarr"
    shutil.copytree(store_path, path)
    params = params_from(with_changes(data.raw, "logits", topk=CLASSES))

    def killed_mid_swap(replacement, store_path):
        os.rename(store_path, f"{store_path}.old")  # the old store moved aside, then the kill
        raise Killed

    monkeypatch.setattr(pipeline.store.dump, "_swap_in", killed_mid_swap)
    with pytest.raises(Killed):
        dump_to(data, teacher_checkpoint, path, params=params)
    assert sorted(os.listdir(tmp_path)) == ["teacher.zarr.next", "teacher.zarr.old"]
    monkeypatch.undo()
    dumped = count_dumped_shards(monkeypatch)
    dump_to(data, teacher_checkpoint, path, params=params)
    assert dumped == []  # the finished replacement is swapped in, not dumped again
    assert open_expected(data, teacher_checkpoint, path).topk == CLASSES
    assert sorted(os.listdir(tmp_path)) == ["teacher.zarr"]


# ---------------------------------------------------------------------------------------------
# The teacher's input size


def test_dump_refuses_an_image_size_other_than_the_teachers(stage_one_data, teacher_checkpoint,
                                                            tmp_path):
    trained = stage_one_data.params.teachers["teacher"].image_size
    assert trained == 16 and load_model(teacher_checkpoint)[1]["params"]["train"][
        "image_size"] == trained
    raw = with_changes(stage_one_data.raw, "logits", image_size=20)
    out = tmp_path / "resized.zarr"
    with pytest.raises(UserError, match=r"logits\.image_size: 20 .*\b16 px") as error:
        dump_to(stage_one_data, teacher_checkpoint, out, params=params_from(raw))
    assert "logits.image_size: 16" in str(error.value)  # the fix, named
    assert not out.exists()

    params_file = write_params_file(tmp_path / "params.yaml", raw)
    result = CliRunner().invoke(dump_main, [
        "--params", str(params_file), "--name", "teacher", "--shards",
        str(stage_one_data.shards_dir), "--checkpoint", str(teacher_checkpoint),
        "--out", str(out)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: logits.image_size: 20 "), lines
    assert "16 px" in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# A top-k-only store (`logits.tail: none`) and the student stage


def student_args(params_file, data, store, checkpoint, out):
    return ["--params", str(params_file), "--shards", str(data.shards_dir), "--store",
            str(store), "--teacher-checkpoint", str(checkpoint), "--out", str(out),
            "--live", f"{out}_live"]


def test_ikl_student_stage_refuses_a_top_k_only_store_unless_told_to_approximate(
        stage_one_data, teacher_checkpoint, tmp_path):
    data = stage_one_data
    raw = with_changes(data.raw, "logits", tail="none")
    assert raw["logits"]["topk"] < CLASSES and raw["student"]["loss"] == "ikl"
    store = dump_to(data, teacher_checkpoint, tmp_path / "top2.zarr", params=params_from(raw))
    opened = open_expected(data, teacher_checkpoint, store)
    assert opened.tail == "none" and not opened.exact_logits
    assert not [name for name in opened.group.array_keys() if name.startswith("tail_")]
    runner = CliRunner()

    out = tmp_path / "ikl"
    result = runner.invoke(student_main, student_args(
        write_params_file(tmp_path / "ikl.yaml", raw), data, store, teacher_checkpoint, out))
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "logits.tail" in lines[0] and "student.ikl.approximate_tail" in lines[0]
    assert not out.exists()  # refused before any training

    approximate = with_changes(raw, "student", ikl={"approximate_tail": True})
    out = tmp_path / "ikl_approximate"
    result = runner.invoke(student_main, student_args(
        write_params_file(tmp_path / "approximate.yaml", approximate), data, store,
        teacher_checkpoint, out))
    assert result.exit_code == 0, result.output
    assert "student: val top-1" in result.stdout
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["params"]["train"]["loss"] == "ikl"
    assert state["targets"]["tail"] == "none" and state["targets"]["topk"] == TOPK

    kl = with_changes(raw, "student", loss="kl")  # KL-KD needs only the top-k's mass
    out = tmp_path / "kl"
    result = runner.invoke(student_main, student_args(
        write_params_file(tmp_path / "kl.yaml", kl), data, store, teacher_checkpoint, out))
    assert result.exit_code == 0, result.output
    assert torch.load(out / "checkpoint.pt", weights_only=True)["params"]["train"][
        "loss"] == "kl"


def test_ikl_student_stage_trains_on_a_quantized_tail_store(stage_one_data, teacher_checkpoint,
                                                            store_path, tmp_path):
    data = stage_one_data
    assert data.raw["student"]["loss"] == "ikl" and open_store(store_path).exact_logits
    out = tmp_path / "ikl"
    result = CliRunner().invoke(student_main, student_args(
        write_params_file(tmp_path / "params.yaml", data.raw), data, store_path,
        teacher_checkpoint, out))
    assert result.exit_code == 0, result.output
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["targets"]["tail"] == "quantized"


def test_a_dump_killed_at_seeded_random_writes_resumes_to_an_identical_store(
        stage_one_data, teacher_checkpoint, store_path, tmp_path, monkeypatch):
    """Fault injection: every zarr write of a dump is a place a kill can land. Run the dump
    three times, each killed at a seeded random write (the first run always dies: it makes as
    many writes as a clean dump; a rerun resumes, writes less, and may finish first), then let
    it finish: the store is bitwise the uninterrupted one, attributes included."""
    real_setitem = zarr.Array.__setitem__
    writes = {"count": 0, "kill_at": None}

    def counting_setitem(self, selection, value):
        writes["count"] += 1
        if writes["count"] == writes["kill_at"]:
            raise Killed
        return real_setitem(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", counting_setitem)
    dump_to(stage_one_data, teacher_checkpoint, tmp_path / "counted.zarr")
    total = writes["count"]  # zarr writes of one uninterrupted dump
    path = tmp_path / "faulted.zarr"
    rng = np.random.default_rng(13)
    killed = []
    for kill_at in rng.integers(1, total, size=3):
        writes.update(count=0, kill_at=int(kill_at))
        try:
            dump_to(stage_one_data, teacher_checkpoint, path)
        except Killed:
            killed.append(int(kill_at))
    assert killed and killed[0] < total  # at least the first run died mid-dump
    writes.update(count=0, kill_at=None)
    dump_to(stage_one_data, teacher_checkpoint, path)
    assert_same_store(path, store_path)


def test_a_rerun_rebuilds_a_complete_store_that_lost_a_chunk(stage_one_data, teacher_checkpoint,
                                                             store_path, tmp_path):
    """`dvc repro` after a chunk was deleted must not keep the damaged store."""
    path = tmp_path / "damaged.zarr"
    shutil.copytree(store_path, path)
    chunk = next(p for p in sorted((path / "topk_classes" / "c").rglob("*")) if p.is_file())
    chunk.unlink()
    dump_to(stage_one_data, teacher_checkpoint, path)
    assert verify_store(str(path)) == []
    assert_same_store(path, store_path)
