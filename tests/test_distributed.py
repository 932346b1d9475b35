"""torchrun on CPU (gloo, 2 processes): the dump, the row split and resuming after a kill."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from helpers_stage_one import (TRAIN_ROWS, stage_one_data, teacher_checkpoint,  # noqa: F401
                               write_params_file)
from pipeline.dump import dump_logits
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


def test_two_rank_dump_equals_the_single_process_dump(stage_one_data, teacher_checkpoint,
                                                      tmp_path):
    data = stage_one_data
    single = tmp_path / "single.zarr"
    dump_logits(data.params, "teacher", str(data.shards_dir), str(teacher_checkpoint),
                str(single))
    params_file = write_params_file(tmp_path / "params.yaml", data.raw)
    two = tmp_path / "two.zarr"
    torchrun("stages/dump_logits.py", "--params", params_file, "--name", "teacher",
             "--shards", data.shards_dir, "--checkpoint", teacher_checkpoint, "--out", two)
    (expected, expected_attrs), (found, found_attrs) = read_store(single), read_store(two)
    assert found_attrs == expected_attrs and found_attrs["complete"]
    assert set(found) == set(expected)
    for name in expected:
        assert expected[name].dtype == found[name].dtype
        assert np.array_equal(expected[name], found[name], equal_nan=True), name


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
