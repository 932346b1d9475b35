"""Shards and logit stores on a real S3 API (moto's server on 127.0.0.1, s3fs through fsspec,
credentials and endpoint from the AWS environment variables): the whole pipeline equal to the
same run on a local disk, a killed two-rank dump resumed, the replacement swap killed between
any two object operations and finished by the rerun, one writer at a time, other Zarr readers,
and one clear line for a wrong endpoint or a missing bucket."""

import json
import os
import subprocess
import sys
import threading
import time

import fsspec
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import pipeline.store.dump
from helpers.s3 import fresh_s3fs
from helpers import KILLED_MID_SHARD_2, TRAIN_ROWS, params_from, with_changes, write_params_file
from pipeline.locks import LockedError, exclusive_writer
from pipeline.store import open_store
from pipeline.store.dump import dump_logits
from pipeline.store.swap import swap_in
from stages.dump_logits import main as dump_stage
from stages.evaluate import main as evaluate_stage
from stages.prepare import main as prepare_stage
from stages.train_student import main as student_stage
from stages.train_teacher import main as teacher_stage


def invoke(stage, *args):
    result = CliRunner().invoke(stage, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def read_store(url):
    """Every raw array (all groups) and the root attributes of the Zarr store at `url`, listed
    afresh (s3fs caches listings per instance: this process listed the stores before)."""
    fresh_s3fs()
    group = zarr.open_group(url, mode="r")
    arrays = {name: array[...] for name, array in group.arrays()}
    arrays.update({f"class_prior/{name}": array[...]
                   for name, array in group["class_prior"].arrays()})
    return arrays, dict(group.attrs)


def assert_same_store(found_url, expected_url):
    (found, found_attrs), (expected, expected_attrs) = read_store(found_url), read_store(
        expected_url)
    assert found_attrs == expected_attrs and found_attrs["complete"]
    assert set(found) == set(expected) and {"tail_residuals", "tail_basis"} <= set(found)
    for name, values in expected.items():
        assert found[name].dtype == values.dtype and found[name].tobytes() == values.tobytes(), name

def torchrun(*args, ok=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if ok:
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def s3_run(s3, stage_one_data, tmp_path_factory):
    """prepare -> train_teacher -> dump_logits (1 rank) with shards and store on S3, each
    through its stage command; the teacher's checkpoint stays on the local disk."""
    data, work = stage_one_data, tmp_path_factory.mktemp("s3_run")
    params_file = write_params_file(work / "params.yaml", data.raw)
    shards, store = s3.url("shards"), s3.url("logits/teacher.zarr")
    invoke(prepare_stage, "--params", params_file, "--out", shards)
    invoke(teacher_stage, "--params", params_file, "--name", "teacher", "--shards", shards,
           "--out", work / "teacher", "--live", work / "teacher_live")
    checkpoint = work / "teacher" / "checkpoint.pt"
    invoke(dump_stage, "--params", params_file, "--name", "teacher", "--shards", shards,
           "--checkpoint", checkpoint, "--out", store)
    local_store = work / "local.zarr"  # the same dump from the local shards, to a local disk
    dump_logits(data.params, "teacher", str(data.shards_dir), str(checkpoint), str(local_store))
    return dict(params_file=params_file, shards=shards, store=store, checkpoint=checkpoint,
                local_store=str(local_store), work=work)


def test_prepare_writes_the_same_shards_to_s3(s3, s3_run, stage_one_data):
    fs = fresh_s3fs()
    with fs.open(f"{s3_run['shards']}/manifest.json") as stream:
        manifest = json.load(stream)
    assert manifest == stage_one_data.manifest  # every shard's sha256 and the fingerprint
    names = sorted(path.rsplit("/", 1)[-1] for path in fs.find(s3_run["shards"]))
    assert names == sorted(path.name for path in stage_one_data.shards_dir.iterdir())
    assert not fs.exists(s3_run["shards"] + ".lock")  # released


def test_pipeline_on_s3_equals_the_local_run(s3, s3_run, stage_one_data):
    """The store on S3 is the local dump's, raw array for raw array, attributes included;
    the student trains from it (2 DataLoader workers, forked: each reopens the store with its
    own S3 client) and the evaluation reads the shards from S3."""
    assert_same_store(s3_run["store"], s3_run["local_store"])
    work = s3_run["work"]
    student_params = write_params_file(work / "student.yaml", with_changes(
        stage_one_data.raw, "student", workers=2))
    invoke(student_stage, "--params", student_params, "--shards", s3_run["shards"], "--store",
           s3_run["store"], "--teacher-checkpoint", s3_run["checkpoint"],
           "--out", work / "student", "--live", work / "student_live")
    common = ["--params", s3_run["params_file"], "--shards", s3_run["shards"]]
    invoke(evaluate_stage, *common, "--name", "student", "--checkpoint",
           work / "student" / "checkpoint.pt", "--metrics", work / "test.json",
           "--per-class", work / "per_class.csv")
    metrics = json.loads((work / "test.json").read_text())
    assert 0 <= metrics["top1"] <= 100


def test_two_rank_dump_killed_midway_resumes_on_s3(s3, s3_run, stage_one_data):
    """Two ranks (torchrun, gloo) dump to S3; the rank writing shard 2 is killed mid-shard and
    rank 0's lock object is left behind. The rerun takes the dead writer's lock over, keeps
    the complete shards and ends with the local single-process store, bit for bit."""
    data, work = stage_one_data, s3_run["work"]
    crash = work / "killed_mid_shard_2.py"
    crash.write_text(KILLED_MID_SHARD_2)
    store = s3.url("logits/two.zarr")
    args = ["stages/dump_logits.py", "--params", s3_run["params_file"], "--name", "teacher",
            "--shards", s3_run["shards"], "--checkpoint", s3_run["checkpoint"], "--out", store]
    killed = torchrun(crash, *args, ok=False)
    assert killed.returncode != 0
    fs = fresh_s3fs()
    assert fs.exists(store + ".lock")  # the kill left it
    partial = open_store(store, require_complete=False)
    assert not partial.complete and 0 in partial.completed_shards()
    assert 2 not in partial.completed_shards()
    resumed = torchrun(*args)
    assert "took over the lock" in resumed.stdout and "which is gone" in resumed.stdout
    assert_same_store(store, s3_run["local_store"])
    assert not fs.exists(store + ".lock")
    assert data.manifest["splits"]["train"]["rows"] == TRAIN_ROWS


def test_zarr_and_tensorstore_read_the_store_from_the_server(s3, s3_run):
    import tensorstore

    local = zarr.open_group(s3_run["local_store"], mode="r")
    remote = zarr.open_group(s3_run["store"], mode="r")
    assert remote.attrs["complete"] and dict(remote.attrs) == dict(local.attrs)
    key = s3_run["store"].split("/", 3)[3]
    for name in ("topk_codes", "logsumexp", "tail_residuals", "boxes"):
        spec = {"driver": "zarr3", "kvstore": {
            "driver": "s3", "bucket": s3.bucket, "path": f"{key}/{name}/",
            "endpoint": s3.endpoint, "aws_region": "us-east-1"}}
        values = tensorstore.open(spec, read=True).result().read().result()
        assert np.array_equal(values, local[name][...]), name
        assert np.array_equal(remote[name][...], local[name][...]), name


class Killed(BaseException):
    """Stands in for a kill between two object operations (BaseException: nothing catches it)."""


def snapshot(fs, prefix):
    """{key relative to `prefix`: bytes} of every object of the store at `prefix` and of its
    replacement `prefix.next` (keys "/..." and ".next/...")."""
    fs.invalidate_cache()
    return {key[len(prefix):]: fs.cat_file(key) for key in fs.find(prefix.rsplit("/", 1)[0])
            if key.startswith((prefix + "/", prefix + ".next/"))}


def restore(fs, prefix, objects):
    """Exactly `objects` (a snapshot) under the store's and its replacement's prefixes."""
    fs.invalidate_cache()
    present = [key for key in fs.find(prefix.rsplit("/", 1)[0])
               if key.startswith((prefix + "/", prefix + ".next/"))]
    if present:
        fs.rm(present)
    for key, value in objects.items():
        fs.pipe_file(prefix + key, value)
    fs.invalidate_cache()


def test_a_swap_killed_between_any_two_object_operations_is_finished_by_the_rerun(
        s3, s3_run, stage_one_data, monkeypatch, capsys):
    """Other params (topk 1) build `<store>.next` and swap it in: on S3 a sequence of deletes
    and copies (pipeline/store/swap.py). Killed after each of a spread of its object
    operations, the rerun finishes the swap without dumping again, and the store is the
    replacement's objects, byte for byte, with nothing left of the replacement."""
    data = stage_one_data
    fs = fsspec.core.url_to_fs(s3_run["store"])[0]  # the instance swap.py gets, cached
    store = s3.url("logits/swap.zarr")
    prefix = store.removeprefix("s3://")
    restore(fs, prefix, snapshot(fs, s3_run["store"].removeprefix("s3://")))  # a copy
    params = params_from(with_changes(data.raw, "logits", topk=1))
    real_swap_in = pipeline.store.dump._swap_in
    monkeypatch.setattr(pipeline.store.dump, "_swap_in", lambda *args: None)  # not yet
    dump_logits(params, "teacher", s3_run["shards"], str(s3_run["checkpoint"]), store)
    monkeypatch.setattr(pipeline.store.dump, "_swap_in", real_swap_in)
    before = snapshot(fs, prefix)  # the old store and its finished replacement
    replacement = {key[len(".next"):]: value for key, value in before.items()
                   if key.startswith(".next/")}
    assert json.loads(replacement["/zarr.json"])["attributes"]["complete"]
    assert json.loads(before["/zarr.json"])["attributes"]["topk"] == 2

    operations, kill_after = [], [10 ** 6]
    for name in ("rm_file", "rm", "copy"):
        def counted(*args, real=getattr(fs, name), name=name, **kwargs):
            operations.append(name)
            if len(operations) == kill_after[0] + 1:
                raise Killed(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(fs, name, counted)
    swap_in(store + ".next", store)  # one whole swap: count its operations
    total = len(operations)
    assert operations == ["rm_file", "rm"] + ["copy"] * len(replacement) + ["rm_file", "rm"]
    assert snapshot(fs, prefix) == replacement
    dumped = []
    monkeypatch.setattr(pipeline.store.dump, "_dump_shard", lambda *a: dumped.append(a))
    for kill in sorted({0, 1, 2, total // 2, total - 2, total - 1}):  # each phase
        restore(fs, prefix, before)
        operations.clear()
        kill_after[0] = kill
        with pytest.raises(Killed):
            swap_in(store + ".next", store)
        kill_after[0] = 10 ** 6
        dump_logits(params, "teacher", s3_run["shards"], str(s3_run["checkpoint"]), store)
        assert dumped == [], kill
        assert snapshot(fs, prefix) == replacement, f"killed after {kill} of {total} operations"
        assert open_store(store).topk == 1
    capsys.readouterr()


def test_one_writer_at_a_time_on_s3(s3):
    """The lock object is created with If-None-Match: * : of eight threads racing, exactly one
    gets it; the others are refused naming the holder; it is gone after the writer."""
    fs = fresh_s3fs()
    url = s3.url("race/store.zarr")
    results, start = [], threading.Barrier(8)

    def writer():
        start.wait()
        try:
            with exclusive_writer(url, "logit dump"):
                results.append("held")
                hold.wait(30)
        except LockedError as error:
            results.append(str(error))

    hold = threading.Event()
    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for _ in range(600):  # the holder waits until the seven others are refused
        if sum(result != "held" for result in results) == 7:
            break
        time.sleep(0.05)
    hold.set()
    for thread in threads:
        thread.join()
    assert results.count("held") == 1
    refusals = [r for r in results if r != "held"]
    assert len(refusals) == 7
    assert all(f"{url}: another logit dump is writing here (pid {os.getpid()}" in r
               for r in refusals), refusals[0]
    assert not fs.exists(url + ".lock")


def test_a_lock_that_changed_since_it_was_read_is_not_deleted(s3):
    """Taking over a stale lock deletes it with If-Match on the ETag read: a lock another
    process wrote meanwhile stays."""
    from pipeline.locks import _delete_object, _read_object

    fs = fresh_s3fs()
    key = f"{s3.bucket}/changed.lock"
    fs.pipe_file(key, b'{"pid": 1}\n')
    _, tag = _read_object(fs, key)
    fs.pipe_file(key, b'{"pid": 2}\n')  # another process took it over meanwhile
    assert not _delete_object(fs, key, tag)
    assert fs.cat_file(key) == b'{"pid": 2}\n'
    assert _delete_object(fs, key, _read_object(fs, key)[1])
    assert not fs.exists(key)


def test_a_missing_bucket_is_one_line(s3, s3_run):
    result = CliRunner().invoke(teacher_stage, [
        "--params", str(s3_run["params_file"]), "--name", "teacher",
        "--shards", "s3://no-such-bucket/shards", "--out", str(s3_run["work"] / "t2"),
        "--live", str(s3_run["work"] / "t2_live")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: s3://no-such-bucket/shards/manifest.json: bucket "
                     f"'no-such-bucket' does not exist at the object store at {s3.endpoint}; "
                     "create it or fix the URL"]


def test_a_wrong_endpoint_is_one_line(s3, s3_run, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: closed
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fresh_s3fs()
    result = CliRunner().invoke(dump_stage, [
        "--params", str(s3_run["params_file"]), "--name", "teacher", "--shards",
        str(s3_run["shards"]), "--checkpoint", str(s3_run["checkpoint"]),
        "--out", s3.url("logits/other.zarr")])
    monkeypatch.undo()
    fresh_s3fs()
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: {s3_run['shards']}/manifest.json: cannot connect to the object "
                     "store at http://127.0.0.1:9; check AWS_ENDPOINT_URL (or the URL's "
                     "endpoint_url option) and that the server is running"], result.output
