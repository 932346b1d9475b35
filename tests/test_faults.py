"""Damaged files and faults met mid-run (issue 21): damaged checkpoints, edited or truncated
store metadata, a full disk during the dump, byte-identical stores for identical inputs, and
the `Error:` line after a progress bar. Each is one clear line, never a traceback and never a
silent wrong result."""

import errno
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr.storage._local
from click.testing import CliRunner
from PIL import Image

from helpers import params_from, with_changes, write_params_file
from pipeline.errors import UserError
from pipeline.store import StoreCorruptError, open_store, verify_store
from pipeline.store.dump import dump_logits
from pipeline.tools.inspect import inspect_command
from pipeline.train.checkpoints import load_checkpoint, state_digest
from pipeline.train.runs import train_teacher
from stages.dump_logits import main as dump_stage
from stages.prepare import main as prepare_stage
from stages.train_teacher import main as teacher_stage


def one_line(message: str) -> str:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Checkpoints: an integrity record of their own, checked on every load and resume

def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


def tensor_byte(path: Path) -> int:
    """The position of a byte in the middle of the checkpoint's largest tensor record."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename),
                     key=lambda i: i.file_size)
    with open(path, "rb") as stream:  # the local header: 30 bytes, the name, the extra field
        stream.seek(record.header_offset + 26)
        name_length, extra_length = np.frombuffer(stream.read(4), "<u2")
    return record.header_offset + 30 + int(name_length) + int(extra_length) + record.file_size // 2


def test_a_flipped_byte_anywhere_is_refused_or_changes_nothing(teacher_checkpoint, tmp_path):
    """Every 997th byte of a real checkpoint flipped in turn: the load is refused in one line,
    or (zip padding, unused header bits) gives exactly the saved contents; never other ones."""
    reference = state_digest(load_checkpoint(teacher_checkpoint))
    size = teacher_checkpoint.stat().st_size
    positions = [*range(0, size, 997), tensor_byte(teacher_checkpoint)]
    refused = 0
    for position in positions:
        damaged = tmp_path / "checkpoint.pt"
        shutil.copy(teacher_checkpoint, damaged)
        flip(damaged, position)
        try:
            state = load_checkpoint(damaged)
        except UserError as error:
            assert one_line(str(error)).startswith(f"{damaged}: damaged")
            assert "delete it and rerun its training stage" in str(error)
            refused += 1
            continue
        assert state_digest(state) == reference, f"byte {position} changed the contents"
    assert refused >= len(positions) * 0.9, (refused, len(positions))


def test_a_damaged_checkpoint_is_never_resumed(stage_one_data, teacher_checkpoint, tmp_path,
                                               capsys):
    out = tmp_path / "teacher"
    shutil.copytree(teacher_checkpoint.parent, out)
    checkpoint = out / "checkpoint.pt"
    flip(checkpoint, tensor_byte(checkpoint))  # in the weights: torch reads it without a word
    damaged = checkpoint.read_bytes()
    params = params_from(with_changes(stage_one_data.raw, "teachers.teacher", epochs=3))
    with pytest.raises(UserError) as error:
        train_teacher(params, "teacher", str(stage_one_data.shards_dir), str(out),
                      str(tmp_path / "live"))
    assert one_line(str(error.value)) == (
        f"{checkpoint}: damaged (its contents no longer match the sha256 recorded when it was "
        "saved); delete it and rerun its training stage (dvc repro)")
    assert "resuming" not in capsys.readouterr().out
    assert checkpoint.read_bytes() == damaged  # left for the user to look at, not trained on


# ---------------------------------------------------------------------------------------------
# The dump: byte-identical stores, a full disk

def dump(data, checkpoint, path) -> str:
    dump_logits(data.params, "teacher", str(data.shards_dir), str(checkpoint), str(path))
    return str(path)


def every_file(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def store(stage_one_data, teacher_checkpoint, tmp_path_factory) -> Path:
    return Path(dump(stage_one_data, teacher_checkpoint,
                     tmp_path_factory.mktemp("dump") / "teacher.zarr"))


def test_two_dumps_of_the_same_inputs_are_byte_identical(stage_one_data, teacher_checkpoint,
                                                         store, tmp_path):
    again = Path(dump(stage_one_data, teacher_checkpoint, tmp_path / "teacher.zarr"))
    first, second = every_file(store), every_file(again)
    assert sorted(first) == sorted(second) and len(first) > 20
    assert [name for name in first if first[name] != second[name]] == []


def test_a_full_disk_in_the_dump_is_one_line_and_the_rerun_resumes(
        stage_one_data, teacher_checkpoint, store, tmp_path, monkeypatch):
    put = zarr.storage._local._put
    written = []

    def disk_full_after_shard_0(path, value, exclusive=False):
        written.append(path)
        # The first shard fits; from the second shard's data on, the disk is full.
        if any(part == "c" for part in path.parts) and "/c/0/1" in str(path):
            monkeypatch.setattr(zarr.storage._local, "_put", full)
        return put(path, value, exclusive=exclusive)

    def full(path, value, exclusive=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(zarr.storage._local, "_put", disk_full_after_shard_0)
    params = write_params_file(tmp_path / "params.yaml", stage_one_data.raw)
    path = tmp_path / "teacher.zarr"
    args = ["--params", str(params), "--name", "teacher", "--shards",
            str(stage_one_data.shards_dir), "--checkpoint", str(teacher_checkpoint),
            "--out", str(path)]
    result = CliRunner().invoke(dump_stage, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().split("\n")[-1] == (
        f"Error: {path}: no space left on the device (disk full) while writing the logit store; "
        "free space there and rerun dump_logits: it resumes after the shards already written")
    assert open_store(str(path), require_complete=False).completed_shards() == {0}
    monkeypatch.setattr(zarr.storage._local, "_put", put)  # space freed
    result = CliRunner().invoke(dump_stage, args)
    assert result.exit_code == 0, result.output
    resumed, straight = every_file(path), every_file(store)
    assert [name for name in straight if resumed.get(name) != straight[name]] == []


# ---------------------------------------------------------------------------------------------
# Store metadata: every attribute protected, dtypes checked, truncated JSON named

def edited(store: Path, tmp_path: Path, file: str, change) -> Path:
    copy = tmp_path / "edited.zarr"
    shutil.copytree(store, copy)
    metadata = json.loads((copy / file).read_text())
    change(metadata)
    (copy / file).write_text(json.dumps(metadata, indent=2))
    return copy


def attribute(*keys, value=None, add=0):
    def change(metadata):
        node = metadata["attributes"]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value if value is not None else node[keys[-1]] + add
    return change


@pytest.mark.parametrize("change", [
    attribute("encoding", "box_scale", add=1),  # crop boxes shifted, checksums still match
    attribute("encoding", "tail_step", add=0.01),
    attribute("encoding", "logsumexp_keepbits", add=-1),
    attribute("max_image_side", add=1),
    attribute("seed", add=1),
    attribute("class_names", value=["bee", "ant", "cow"]),
    attribute("augmentation", "flip_probability", value=0.0),
    attribute("teacher_image_size", add=16),
], ids=["box_scale", "tail_step", "keepbits", "max_side", "seed", "class_names",
        "augmentation", "teacher_image_size"])
def test_an_edited_attribute_is_refused_like_a_damaged_chunk(store, tmp_path, change):
    copy = edited(store, tmp_path, "zarr.json", change)
    message = (f"logit store {copy}: the attributes' sha256 (attributes_sha256) no longer "
               "matches them (an edit of its zarr.json?); what its stored integers mean "
               "(box_scale, tail_step, k, ...) cannot be trusted: delete the store and rerun "
               "dump_logits")
    with pytest.raises(StoreCorruptError) as error:
        open_store(str(copy))
    assert str(error.value) == message
    assert verify_store(str(copy)) == [message]
    result = CliRunner().invoke(inspect_command, [str(copy), "--verify"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message in result.output


@pytest.mark.parametrize("array, change, found", [
    ("logsumexp", lambda m: m.update(data_type="uint32"), "uint32"),  # float bits as integers
    ("boxes", lambda m: m.update(data_type="int16"), "int16"),
    ("boxes", lambda m: m["codecs"][0]["configuration"]["codecs"][0]["configuration"].update(
        endian="big"), None),  # caught by the chunk checksums (the values change)
])
def test_an_edited_array_dtype_is_refused(store, tmp_path, array, change, found):
    copy = edited(store, tmp_path, f"{array}/zarr.json", change)
    problems = verify_store(str(copy))
    assert problems, "an edited data type passed verification"
    if found:
        assert problems == [f"logit store {copy}: array {array!r} has data type {found}, the "
                            f"store writes {np.dtype(np.float32 if array == 'logsumexp' else np.uint16)}; "
                            "its zarr.json was edited or damaged: delete the store and rerun "
                            "dump_logits"]
    assert all(one_line(problem) for problem in problems)


@pytest.mark.parametrize("file", ["zarr.json", "boxes/zarr.json", "class_prior/zarr.json"])
def test_a_truncated_zarr_json_is_one_line_naming_it(store, tmp_path, file):
    copy = tmp_path / "truncated.zarr"
    shutil.copytree(store, copy)
    text = (copy / file).read_text()
    (copy / file).write_text(text[:len(text) // 2])
    problems = verify_store(str(copy))
    assert len(problems) >= 1 and all(one_line(p) for p in problems)
    assert f"{copy / file} is not valid JSON (" in problems[0] or file.startswith("class_prior")
    assert "rerun dump_logits" in problems[0]
    result = CliRunner().invoke(inspect_command, [str(copy)])
    if file != "class_prior/zarr.json":  # the summary reads no prior
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert f"{copy / file} is not valid JSON" in one_line(result.output)


@pytest.mark.parametrize("file", ["zarr.json", "topk_codes/zarr.json"])
def test_a_truncated_zarr_json_met_by_the_dump_is_one_line(stage_one_data, teacher_checkpoint,
                                                           store, tmp_path, file):
    copy = tmp_path / "truncated.zarr"
    shutil.copytree(store, copy)
    if file != "zarr.json":  # an unfinished dump, resumed: it reopens every array
        group = json.loads((copy / "zarr.json").read_text())
        group["attributes"]["complete"] = False
        (copy / "zarr.json").write_text(json.dumps(group))
    (copy / file).write_text((copy / file).read_text()[:100])
    with pytest.raises(StoreCorruptError) as error:
        dump(stage_one_data, teacher_checkpoint, copy)
    assert one_line(str(error.value)).startswith(
        f"logit store {copy}: {copy / file} is not valid JSON (")


def test_a_damaged_chunk_is_named_without_raw_bytes(store, tmp_path):
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(store, copy)
    chunk = sorted((copy / "labels" / "c").rglob("*"))[-1]
    flip(chunk, chunk.stat().st_size // 2)
    problems = verify_store(str(copy))
    assert problems and "labels" in problems[0] and one_line(problems[0])
    assert "b'" not in problems[0] and "\\x" not in problems[0], problems[0]


# ---------------------------------------------------------------------------------------------
# Progress bars and the Error: line

def test_the_error_line_starts_its_own_line_after_a_progress_bar(tmp_path):
    """A shard damaged after prepare stops the teacher mid-epoch, its bar open."""
    root = tmp_path / "folder"
    for name in "ab":
        (root / name).mkdir(parents=True)
        for i in range(9):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), np.uint8)).save(
                root / name / f"{i}.png")
    train = dict(arch="resnet8", image_size=8, epochs=1, batch_size=2, workers=0)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "data": dict(source="image_folder", root=str(root), val_per_class=0, test_per_class=1,
                     imbalance_ratio=1, workers=0, shard_size=4),
        "teachers": {"teacher": train}, "student": train, "logits": {"topk": 2}}))
    shards = tmp_path / "shards"
    assert CliRunner().invoke(prepare_stage, ["--params", str(params), "--out",
                                              str(shards)]).exit_code == 0
    shard = sorted(shards.glob("train-*.tar"))[-1]
    data = bytearray(shard.read_bytes())
    start = data.find(b"\x89PNG")
    data[start + 20:start + 60] = bytes(40)  # an image's header zeroed
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(teacher_stage, [
        "--params", str(params), "--name", "teacher", "--shards", str(shards),
        "--out", str(tmp_path / "model"), "--live", str(tmp_path / "live")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "teacher: epoch 1/1:" in result.output  # a bar was drawn ...
    last = result.output.rstrip("\n").split("\n")[-1]  # ... and ended before the error
    assert last == (f"Error: {shard}: corrupt shard (sample 000000012 is not an image); rerun "
                    "prepare (dvc repro prepare) to rewrite it")
