"""torchrun on CPU (gloo, 2 processes): the dump (with its quantised tail), the row split, the
global batch and resuming after a kill."""

import json
import subprocess
import sys

import pytest
import torch
import zarr

from helpers import KILLED_MID_SHARD_2, TRAIN_ROWS, digits_params, write_params_file
from pipeline.store.dump import dump_logits
from pipeline.params import to_dict
from pipeline.store import open_store
from pipeline.stream.views import ViewSource
from pipeline.stream.loader import rank_segments, split_shards, train_loader
from pipeline.train.loop import load_checkpoint


def torchrun(*args, ok=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if ok:
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return result


def read_store(path):
    group = zarr.open_group(str(path), mode="r")
    arrays = {}
    for name, array in group.arrays():
        arrays[name] = array[...]
    for name, array in group["class_prior"].arrays():
        arrays[f"class_prior/{name}"] = array[...]
    return arrays, dict(group.attrs)


def assert_same_store(found_path, expected_path):
    """Every raw zarr array (codes, tail, checksums, markers, priors) equal, bit for bit, and
    the same attributes."""
    (expected, expected_attrs), (found, found_attrs) = (read_store(expected_path),
                                                        read_store(found_path))
    assert found_attrs == expected_attrs and found_attrs["complete"]
    assert set(found) == set(expected)
    # the toy store keeps a quantised tail (k = 2 < C = 3): its arrays are compared too
    names = open_store(str(found_path)).array_names
    assert {"tail_coefficients", "tail_residuals"} <= set(names) <= set(found)
    assert {"tail_mean", "tail_basis", "tail_scales"} <= set(found)  # the basis rank 0 fitted
    for name in expected:
        assert expected[name].dtype == found[name].dtype, name
        assert expected[name].tobytes() == found[name].tobytes(), name


@pytest.fixture(scope="module")
def single_process_store(stage_one_data, teacher_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "single.zarr"
    dump_logits(stage_one_data.params, "teacher", str(stage_one_data.shards_dir),
                str(teacher_checkpoint), str(path))
    return path


def dump_args(data, checkpoint, params_file, out):
    return ["stages/dump_logits.py", "--params", params_file, "--name", "teacher",
            "--shards", data.shards_dir, "--checkpoint", checkpoint, "--out", out]


def test_two_rank_dump_equals_the_single_process_dump(stage_one_data, teacher_checkpoint,
                                                      single_process_store, tmp_path):
    data = stage_one_data
    params_file = write_params_file(tmp_path / "params.yaml", data.raw)
    two = tmp_path / "two.zarr"
    torchrun(*dump_args(data, teacher_checkpoint, params_file, two))
    assert_same_store(two, single_process_store)

def test_two_rank_dump_killed_midway_resumes_to_the_single_process_store(
        stage_one_data, teacher_checkpoint, single_process_store, tmp_path):
    data = stage_one_data
    params_file = write_params_file(tmp_path / "params.yaml", data.raw)
    crash = tmp_path / "killed_mid_shard_2.py"
    crash.write_text(KILLED_MID_SHARD_2)
    out = tmp_path / "killed.zarr"
    killed = torchrun(crash, *dump_args(data, teacher_checkpoint, params_file, out), ok=False)
    assert killed.returncode != 0
    partial = open_store(str(out), require_complete=False)
    assert not partial.complete and 2 not in partial.completed_shards()
    assert 0 in partial.completed_shards()  # rank 0 wrote shard 0 before dying at shard 2
    resumed = torchrun(*dump_args(data, teacher_checkpoint, params_file, out))
    assert "complete" in resumed.stdout
    assert_same_store(out, single_process_store)


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_gets_an_equal_share_of_rows_and_batches(stage_one_data, world_size):
    data = stage_one_data
    shards = split_shards(str(data.shards_dir), data.manifest, "train")
    for epoch in range(2):
        views = ViewSource(data.params.seed, epoch, 1)
        per_rank = []
        for rank in range(world_size):
            batches = train_loader(shards, views, batch_size=4, image_size=8, workers=2,
                                   rank=rank, world_size=world_size)
            taken = list(batches)
            assert len(taken) == len(batches)  # the count DDP relies on, known in advance
            per_rank.append([row for batch in taken for row in batch["rows"].tolist()])
        share = -(-TRAIN_ROWS // world_size)
        assert [len(rows) for rows in per_rank] == [share] * world_size
        every = sorted(row for rows in per_rank for row in rows)
        if TRAIN_ROWS % world_size == 0:  # 26 rows, 2 ranks: each row exactly once
            assert every == list(range(TRAIN_ROWS))
        else:  # 3 ranks: 9 + 9 + 8, the last rank pads with one row of the epoch's start
            assert sorted(set(every)) == list(range(TRAIN_ROWS))
            assert len(every) == TRAIN_ROWS + 1


def test_rank_segments_cut_shards_at_the_share_boundary(stage_one_data):
    shards = split_shards(str(stage_one_data.shards_dir), stage_one_data.manifest, "train")
    ranges = [[(s.shard.start, s.start, s.stop) for s in rank_segments(shards, rank, 3)]
              for rank in range(3)]
    # Shards of 8, 8, 8, 2 rows; shares of 9: rank 1 starts one row into the second shard.
    assert ranges == [[(0, 0, 8), (8, 8, 9)], [(8, 9, 16), (16, 16, 18)],
                      [(0, 0, 1), (16, 18, 24), (24, 24, 26)]]


def test_two_rank_training_killed_after_an_epoch_resumes(stage_one_data, tmp_path):
    data = stage_one_data
    raw = {**data.raw, "teachers": {"teacher": {**data.raw["teachers"]["teacher"],
                                                "epochs": 2}}}
    params_file = write_params_file(tmp_path / "params.yaml", raw)

    def train(out, crash=False):
        script = ["tests/crash_after_first_checkpoint.py"] if crash else []
        return torchrun(*script, "stages/train_teacher.py", "--params", params_file,
                        "--name", "teacher", "--shards", data.shards_dir, "--out", out,
                        "--live", f"{out}_live", ok=not crash)

    train(tmp_path / "uninterrupted")
    killed = train(tmp_path / "resumed", crash=True)
    assert killed.returncode != 0
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["epoch"] == 0
    resumed = train(tmp_path / "resumed")
    assert "resuming" in resumed.stdout + resumed.stderr
    final = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    reference = load_checkpoint(tmp_path / "uninterrupted" / "checkpoint.pt")
    assert final["epoch"] == reference["epoch"] == 1
    for name, tensor in reference["model"].items():
        assert torch.equal(final["model"][name], tensor), name


def run_recorded(tmp_path, name, params, stage_one, ranks, runtime=None):
    """Train the student of `params` on 1 rank (plain python) or 2 (torchrun); returns
    (per-rank records of the rows of every step, checkpoint). `runtime`: the params' runtime
    section, with which plain python may launch ranks itself (then `ranks` is their count)."""
    shards_dir, _, checkpoint, store_path = stage_one
    raw = json.loads(json.dumps(to_dict(params)))  # tuples -> lists, for YAML
    if runtime is not None:
        raw["runtime"] = runtime
    params_file = write_params_file(tmp_path / f"{name}.yaml", raw)
    records = tmp_path / f"{name}_rows"
    records.mkdir()
    args = ["tests/record_training_rows.py", records, "stages/train_student.py", "--params",
            params_file, "--shards", shards_dir, "--store", store_path, "--teacher-checkpoint",
            checkpoint, "--out", tmp_path / name, "--live", tmp_path / f"{name}_live"]
    if ranks == 2 and runtime is None:
        torchrun(*args)
    else:
        result = subprocess.run([sys.executable, *map(str, args)], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-6000:]
        launched = f"launching {ranks} processes (gloo, CPU)" in result.stdout
        assert launched == (ranks > 1), result.stdout[-3000:]
    found = [json.loads(path.read_text()) for path in sorted(records.glob("rank*.json"))]
    assert len(found) == ranks
    return found, load_checkpoint(tmp_path / name / "checkpoint.pt")


def rows_per_epoch(records):
    """Per epoch: the sorted rows all ranks trained on, and each rank's steps."""
    epochs = len(records[0]["epochs"])
    rows = [sorted(row for record in records for step in record["epochs"][epoch]
                   for row in step) for epoch in range(epochs)]
    steps = [[len(record["epochs"][epoch]) for record in records] for epoch in range(epochs)]
    return rows, steps


@pytest.mark.parametrize("drop_last", [False, True])
def test_one_rank_and_two_ranks_take_the_same_steps_on_the_same_rows(digits_stage_one,
                                                                     tmp_path, drop_last):
    """batch_size is the global batch: 32 on one rank = 16 + 16 on two. 86 rows: ceil(86/32) =
    ceil(43/16) = 3 steps, or 2 with drop_last (floor of both). Student IKL with the previous
    epoch's GI prior, which is all-reduced over the ranks."""
    params = digits_params(loss="ikl", epochs=2, batch_size=32, drop_last=drop_last, ikl={
        "weights": "class_prior", "prior": "previous_epoch", "weight_temperature": 1.0})
    one, one_state = run_recorded(tmp_path, "one", params, digits_stage_one, ranks=1)
    two, two_state = run_recorded(tmp_path, "two", params, digits_stage_one, ranks=2)
    steps = 2 if drop_last else 3
    assert one[0]["steps_per_epoch"] == two[0]["steps_per_epoch"] == two[1]["steps_per_epoch"]
    assert one[0]["steps_per_epoch"] == steps
    one_rows, one_steps = rows_per_epoch(one)
    two_rows, two_steps = rows_per_epoch(two)
    assert one_steps == [[steps]] * 2 and two_steps == [[steps, steps]] * 2
    sizes = lambda record: [len(step) for step in record["epochs"][0]]  # noqa: E731
    assert sizes(one[0]) == ([32, 32] if drop_last else [32, 32, 22])
    assert sizes(two[0]) == sizes(two[1]) == ([16, 16] if drop_last else [16, 16, 11])
    assert one_state["scheduler"]["last_epoch"] == two_state["scheduler"]["last_epoch"] == 2 * steps
    for epoch in range(2):
        if drop_last:  # 64 of the 86 rows, once each; which 22 are dropped depends on the split
            assert len(one_rows[epoch]) == len(two_rows[epoch]) == 64
            assert len(set(one_rows[epoch])) == len(set(two_rows[epoch])) == 64
        else:  # every row exactly once, on one rank as on two
            assert one_rows[epoch] == two_rows[epoch] == list(range(86))
    if not drop_last:  # the same crops seen: the prior summed over both ranks is the same
        torch.testing.assert_close(two_state["class_prior"]["prior"],
                                   one_state["class_prior"]["prior"], rtol=0, atol=1e-6)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(digits_stage_one,
                                                                       tmp_path):
    params = digits_params(loss="kl", batch_size=33)
    raw = json.loads(json.dumps(to_dict(params)))
    shards_dir, _, checkpoint, store_path = digits_stage_one
    result = torchrun("stages/train_student.py", "--params",
                      write_params_file(tmp_path / "p.yaml", raw), "--shards", shards_dir,
                      "--store", store_path, "--teacher-checkpoint", checkpoint,
                      "--out", tmp_path / "s", "--live", tmp_path / "live", ok=False)
    assert result.returncode != 0
    assert ("Error: student.batch_size: 33 does not split evenly over 2 ranks"
            in result.stdout + result.stderr)


def test_a_stage_outside_torchrun_launches_runtime_devices_ranks_as_torchrun_would(
        digits_stage_one, tmp_path):
    """`runtime.devices: 2` on a CPU: plain `python stages/train_student.py` launches 2 gloo
    ranks itself (pipeline.launch), which train on the same rows, step for step, to the same
    weights as `torchrun --nproc_per_node 2`."""
    params = digits_params(loss="ikl", epochs=1, batch_size=32)
    by_torchrun, torchrun_state = run_recorded(tmp_path, "torchrun", params, digits_stage_one,
                                               ranks=2)
    launched, launched_state = run_recorded(tmp_path, "launched", params, digits_stage_one,
                                            ranks=2, runtime={"devices": 2})
    assert launched == by_torchrun and len(launched) == 2
    assert launched[0]["epochs"] != launched[1]["epochs"]  # two ranks, each its own rows
    assert launched_state["epoch"] == torchrun_state["epoch"]
    for name, tensor in torchrun_state["model"].items():
        assert torch.equal(launched_state["model"][name], tensor), name
