"""torchrun on CPU (gloo, 2 processes): the dump (with its quantised tail), the row split and
resuming after a kill."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr

from helpers_stage_one import (TRAIN_ROWS, stage_one_data, teacher_checkpoint,  # noqa: F401
                               write_params_file)
from pipeline.dump import dump_logits
from pipeline.store import open_store
from pipeline.stream import ViewSource, rank_segments, split_shards, train_loader
from pipeline.train import load_checkpoint


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
    assert {"tail_codes", "tail_floor"} <= set(names) <= set(found)
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


# Run the dump stage, but kill the rank writing shard 2 halfway through writing it: part of
# its tail codes land, then the process dies without cleanup (like SIGKILL).
KILLED_MID_SHARD_2 = textwrap.dedent("""
    import os, runpy, sys
    import pipeline.dump

    real_write_shard = pipeline.dump.write_shard

    def write_shard(group, shard_index, **arrays):
        if shard_index == 2:
            group["tail_codes"][:, 16:24] = 7
            os._exit(17)
        real_write_shard(group, shard_index, **arrays)

    pipeline.dump.write_shard = write_shard
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
""")


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
