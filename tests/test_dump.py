"""Stage one's logit dump on a tiny real dataset with a trained teacher: the stored views are the
seeded draws, replaying them reproduces the stored logits, a killed dump resumes to the same
bits, mismatched or broken stores and teachers are refused, the class priors are exact, and the
stage and inspect CLIs work on it."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import pipeline.dump
from helpers_stage_one import (  # noqa: F401 (fixtures)
    NUM_SHARDS, SHARD_SIZE, TRAIN_ROWS, params_from, stage_one_data, teacher_checkpoint,
    train_samples, with_changes, write_params_file)
from pipeline.augment import CropSpec, apply_view, draw_views, normalize, pixel_box
from pipeline.cli import cli
from pipeline.distill import crop_spec, load_model, train_student
from pipeline.distributed import distributed
from pipeline.dump import dump_logits
from pipeline.errors import UserError
from pipeline.losses import class_prior
from pipeline.shards import file_sha256
from pipeline.store import (
    MARKERS, PARTIALS_GROUP, VIEW_ARRAYS, StoreMismatchError, open_store, shard_bounds)
from stages.dump_logits import main as dump_main

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
    """Every array of a store (priors and markers included) and its attributes."""
    group = zarr.open_group(str(path), mode="r")
    arrays = {name: group[name][:] for name in VIEW_ARRAYS + ("labels", MARKERS)}
    store = open_store(str(path))
    arrays.update({f"class_prior T={t}": store.class_prior(t) for t in store.temperatures})
    return arrays, dict(group.attrs)


def assert_bitwise_equal(actual, expected, name):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    assert actual.tobytes() == expected.tobytes(), f"{name} differs"


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
    stored = group["boxes"][:]
    for view in range(VIEWS):
        for row in range(TRAIN_ROWS):
            assert (pixel_box(stored[view, row], heights[row], widths[row])
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
    # Stored as float16 log-probabilities: half a unit in the last place, ~2**-11 relative.
    log_probs = top.values - torch.logsumexp(full, -1, keepdim=True)
    np.testing.assert_allclose(group["topk_logits"][:].astype(np.float32), log_probs.numpy(),
                               rtol=2**-10, atol=1e-4)
    read = np.stack([store.read_rows(view, 0, TRAIN_ROWS)["topk_logits"]
                     for view in range(VIEWS)])  # raw logits again
    np.testing.assert_allclose(read, top.values.numpy(), rtol=2**-10, atol=1e-3)
    np.testing.assert_allclose(group["logsumexp"][:], torch.logsumexp(full, -1).numpy(),
                               rtol=1e-5, atol=1e-5)


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
    real_write_shard = pipeline.dump.write_shard

    def killed_mid_shard_2(group, shard_index, **arrays):
        if shard_index == 2:  # part of the shard's data lands, then the process dies
            start, stop = shard_bounds(TRAIN_ROWS, SHARD_SIZE, shard_index)
            group["topk_logits"][:, start:stop] = 7.0
            group["boxes"][:, start:stop] = 0.5
            raise Killed
        real_write_shard(group, shard_index, **arrays)

    path = tmp_path / "resumed.zarr"
    monkeypatch.setattr(pipeline.dump, "write_shard", killed_mid_shard_2)
    with pytest.raises(Killed):
        dump_to(stage_one_data, teacher_checkpoint, path)
    with pytest.raises(StoreMismatchError, match="incomplete"):
        open_store(str(path))

    monkeypatch.setattr(pipeline.dump, "write_shard", real_write_shard)
    real_dump_shard, dumped = pipeline.dump._dump_shard, []

    def counted(group, index, *args, **kwargs):
        dumped.append(index)
        return real_dump_shard(group, index, *args, **kwargs)

    monkeypatch.setattr(pipeline.dump, "_dump_shard", counted)
    dump_to(stage_one_data, teacher_checkpoint, path)
    assert dumped == [2, 3]  # shards 0 and 1 were complete: not recomputed

    resumed, resumed_attrs = read_everything(path)
    reference, reference_attrs = read_everything(store_path)
    assert resumed_attrs == reference_attrs
    assert sorted(resumed) == sorted(reference)
    assert len([name for name in reference if name.startswith("class_prior")]) == 2
    for name, array in reference.items():
        assert_bitwise_equal(resumed[name], array, name)
    assert PARTIALS_GROUP not in zarr.open_group(str(path), mode="r")


def test_rerun_with_other_prior_temperatures_gives_exact_priors(stage_one_data,
                                                                teacher_checkpoint,
                                                                replayed_logits, tmp_path,
                                                                monkeypatch):
    real_dump_shard = pipeline.dump._dump_shard

    def dies_at_shard_2(group, index, *args, **kwargs):
        if index == 2:
            raise Killed
        return real_dump_shard(group, index, *args, **kwargs)

    monkeypatch.setattr(pipeline.dump, "_dump_shard", dies_at_shard_2)
    path = tmp_path / "temperatures.zarr"
    with pytest.raises(Killed):
        dump_to(stage_one_data, teacher_checkpoint, path)  # priors at T = 1 and 4
    monkeypatch.setattr(pipeline.dump, "_dump_shard", real_dump_shard)
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
        monkeypatch.setattr(pipeline.dump, "distributed", lambda rank=rank: FakeRank(rank))
        dump_logits(stage_one_data.params, "teacher", str(stage_one_data.shards_dir),
                    str(teacher_checkpoint), str(path))
        group = zarr.open_group(str(path), mode="r")
        assert group.attrs["complete"] == (rank == 0)  # rank 0 finishes, after all ranks
    resumed, resumed_attrs = read_everything(path)
    reference, reference_attrs = read_everything(store_path)
    assert resumed_attrs == reference_attrs
    for name, array in reference.items():
        assert_bitwise_equal(resumed[name], array, name)


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
    real_dump_shard = pipeline.dump._dump_shard

    def dies_at_shard_1(group, index, *args, **kwargs):
        if index == 1:
            raise Killed
        return real_dump_shard(group, index, *args, **kwargs)

    monkeypatch.setattr(pipeline.dump, "_dump_shard", dies_at_shard_1)
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
    torch.save(state, other_teacher)
    data = stage_one_data
    with pytest.raises(StoreMismatchError, match="teacher_sha256 expected"):
        train_student(data.params, str(data.shards_dir), store_path, str(other_teacher),
                      str(tmp_path / "student"), str(tmp_path / "live"))
    other_seed = dataclasses.replace(data.params, seed=data.params.seed + 1)
    with pytest.raises(StoreMismatchError, match="seed expected 4, found 3"):
        train_student(other_seed, str(data.shards_dir), store_path, str(teacher_checkpoint),
                      str(tmp_path / "student"), str(tmp_path / "live"))
    assert not (tmp_path / "student").exists()  # refused before any training


def test_nan_teacher_stops_the_dump_naming_the_row(stage_one_data, teacher_checkpoint,
                                                    tmp_path):
    state = torch.load(teacher_checkpoint, weights_only=True)
    state["model"]["fc.bias"][1] = float("nan")
    broken = tmp_path / "nan_teacher.pt"
    torch.save(state, broken)
    path = tmp_path / "nan.zarr"
    with pytest.raises(UserError, match=r"NaN or Inf at row 0, view 0 \(.*train-000000.tar"):
        dump_to(stage_one_data, broken, path)
    assert open_store(str(path), require_complete=False).completed_shards() == set()


def test_inf_teacher_logit_stops_the_dump_naming_the_row(stage_one_data, teacher_checkpoint,
                                                          tmp_path, monkeypatch):
    real_teacher_logits, calls = pipeline.dump._teacher_logits, []

    def inf_at_row_13_view_2(*args, **kwargs):
        logits = real_teacher_logits(*args, **kwargs)  # (n, C), calls: shard-major, then view
        calls.append(len(calls))
        if len(calls) == 1 * VIEWS + 2 + 1:  # shard 1 (rows 8..15), view 2
            logits[13 - 8, 2] = float("inf")
        return logits

    monkeypatch.setattr(pipeline.dump, "_teacher_logits", inf_at_row_13_view_2)
    path = tmp_path / "inf.zarr"
    with pytest.raises(UserError, match=r"NaN or Inf at row 13, view 2 \(.*train-000001.tar"):
        dump_to(stage_one_data, teacher_checkpoint, path)
    assert open_store(str(path), require_complete=False).completed_shards() == {0}


def test_a_top_logit_beyond_float16_is_stored_relative_to_logsumexp(stage_one_data,
                                                                     teacher_checkpoint,
                                                                     tmp_path, monkeypatch):
    """Raw logits beyond float16's range store fine: the store keeps log-probabilities."""
    real_teacher_logits = pipeline.dump._teacher_logits

    def huge_at_row_3(*args, **kwargs):
        logits = real_teacher_logits(*args, **kwargs)  # (n, C); the last shard has 2 rows
        if len(logits) > 3:
            logits[3] += 1e5  # finite in float32, beyond float16 as a raw logit
        return logits

    monkeypatch.setattr(pipeline.dump, "_teacher_logits", huge_at_row_3)
    path = tmp_path / "huge.zarr"
    dump_logits(stage_one_data.params, "teacher", str(stage_one_data.shards_dir),
                str(teacher_checkpoint), str(path))
    rows = open_store(str(path)).read_rows(0, 0, 8)
    assert np.isfinite(rows["topk_logits"]).all()
    assert rows["topk_logits"][3, 0] == pytest.approx(1e5, rel=1e-3)
    top_probability = np.exp(rows["topk_logits"][3, 0] - rows["logsumexp"][3])
    assert 0 < top_probability <= 1


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
    cli_store, _ = read_everything(out)
    reference, _ = read_everything(store_path)
    for name, array in reference.items():
        assert_bitwise_equal(cli_store[name], array, name)

    result = runner.invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    for text in [f"logit store {out}", "teacher      teacher (resnet8)",
                 f"fingerprint  {stage_one_data.manifest['fingerprint']}   seed 3",
                 "V=3 views  N=26 rows  k=2  C=3  shard_rows=8", "complete     True",
                 "shards complete 4/4", "class prior temperatures [1.0, 4.0]",
                 "topk_logits     (3, 26, 2)", "over 78 views"]:
        assert text in result.output, text

    manifest = stage_one_data.shards_dir / "manifest.json"
    result = runner.invoke(cli, ["inspect", str(out), "--verify", "--manifest", str(manifest)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (f"OK {out}: 4 shards, 26 rows x 3 views complete and "
                                     "finite and matches the manifest fingerprint")


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
    reference = open_store(store_path)
    for view in range(2):  # views are a function of (seed, view, row): the first two agree
        assert_bitwise_equal(store.read_rows(view, 0, TRAIN_ROWS)["boxes"],
                             reference.read_rows(view, 0, TRAIN_ROWS)["boxes"], "boxes")
