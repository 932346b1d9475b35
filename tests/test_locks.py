"""One writer at a time (issue 13, item 10): pipeline.locks, and its use by prepare and by a
training run. Other writers are real processes started here."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.locks import LockedError, exclusive_writer
from pipeline.params import DataParams
from pipeline.data.shards import prepare_shards
from pipeline.train.loop import TrainRun, fit

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys
from pipeline.locks import exclusive_writer
with exclusive_writer(sys.argv[1], "test writer"):
    print("held", flush=True)
    if sys.argv[2] == "die":
        import os
        os._exit(0)  # dies holding the lock, as after kill -9: the lock file stays
    sys.stdin.read()  # hold until the test closes stdin
"""


def writer_process(path, how):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path), how], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_lock_records_the_writer_and_is_removed_after(tmp_path):
    target = tmp_path / "out"
    with exclusive_writer(target, "prepare") as lock:
        assert lock == tmp_path / "out.lock"
        holder = json.loads(lock.read_text())
        assert (holder["pid"], holder["host"], holder["what"]) == (
            os.getpid(), socket.gethostname(), "prepare")
        assert holder["started"]
    assert not lock.exists()


def test_second_writer_is_refused_at_once_naming_the_other(tmp_path):
    target = tmp_path / "out"
    process = writer_process(target, "hold")
    try:
        with pytest.raises(LockedError) as error:
            with exclusive_writer(target, "prepare"):
                pytest.fail("entered a lock another process holds")
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(f"{target}: another test writer is writing here (pid "
                                   f"{process.pid} on host {socket.gethostname()}, since ")
        assert f"delete {target}.lock" in message
    finally:
        process.stdin.close()
        process.wait()
    assert not (tmp_path / "out.lock").exists()  # released by its owner on exit
    with exclusive_writer(target, "prepare"):  # free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    target = tmp_path / "out"
    process = writer_process(target, "die")
    process.wait()
    lock = tmp_path / "out.lock"
    assert json.loads(lock.read_text())["pid"] == process.pid  # left behind by the dead writer
    with exclusive_writer(target, "prepare"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"took over the lock of pid {process.pid}" in capsys.readouterr().out
    assert not lock.exists() and not list(tmp_path.glob("*.stale.*"))


def test_lock_of_a_reused_pid_is_stale(tmp_path):
    """The pid is alive (it is this process) but started at another time: not the writer."""
    lock = tmp_path / "out.lock"
    lock.write_text(json.dumps({"what": "prepare", "pid": os.getpid(),
                                "host": socket.gethostname(), "process_start": "1",
                                "started": "long ago"}))
    with exclusive_writer(tmp_path / "out", "prepare"):
        assert json.loads(lock.read_text())["process_start"] != "1"


@pytest.mark.parametrize("content, message", [
    ({"what": "logit dump", "pid": 1, "host": "elsewhere", "started": "today"},
     "another logit dump is writing here (pid 1 on host elsewhere, since today)"),
    (None, "another writer is starting (or left an unreadable lock"),
])
def test_locks_that_cannot_be_checked_are_respected(tmp_path, content, message):
    lock = tmp_path / "out.lock"
    lock.write_text("" if content is None else json.dumps(content))
    with pytest.raises(LockedError, match=message.replace("(", r"\(").replace(")", r"\)")):
        with exclusive_writer(tmp_path / "out", "prepare"):
            pass
    assert lock.exists()  # someone else's: left alone


def test_file_urls_and_object_storage_urls_are_locked(tmp_path):
    """file:// is a local path; other fsspec URLs get a lock object beside them, created only
    if absent (memory:// here; S3 with If-None-Match in tests/test_s3.py)."""
    with exclusive_writer(f"file://{tmp_path}/out", "logit dump") as lock:
        assert lock == tmp_path / "out.lock" and lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    memory = fsspec.filesystem("memory")
    with exclusive_writer("memory://locks_test/out", "logit dump") as lock:
        assert lock == "memory://locks_test/out.lock"
        holder = json.loads(memory.cat_file("/locks_test/out.lock"))
        assert holder["pid"] == os.getpid() and holder["what"] == "logit dump"
        with pytest.raises(LockedError, match=f"memory://locks_test/out: another logit dump is "
                                              f"writing here \\(pid {os.getpid()} on host"):
            with exclusive_writer("memory://locks_test/out", "prepare"):
                pass
    assert not memory.exists("/locks_test/out.lock")


def test_a_stale_lock_object_of_a_dead_process_is_taken_over(capsys):
    memory = fsspec.filesystem("memory")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"what": "logit dump", "pid": dead.pid, "host": socket.gethostname(),
             "started": "earlier"}
    memory.pipe_file("/locks_test/stale.lock", json.dumps(stale).encode())
    with exclusive_writer("memory://locks_test/stale", "logit dump"):
        assert json.loads(memory.cat_file("/locks_test/stale.lock"))["pid"] == os.getpid()
    assert f"took over the lock of pid {dead.pid}" in capsys.readouterr().out
    assert not memory.exists("/locks_test/stale.lock")


class NoCreateFileSystem(MemoryFileSystem):
    """An object store without a conditional create."""
    protocol = "nocreate"

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if mode == "create":
            raise NotImplementedError("no create-if-absent")
        return super().pipe_file(path, value, **kwargs)


def test_a_filesystem_without_conditional_create_runs_unlocked_saying_so(capsys):
    fsspec.register_implementation("nocreate", NoCreateFileSystem, clobber=True)
    with exclusive_writer("nocreate://locks_test/out", "logit dump") as lock:
        assert lock is None
    assert capsys.readouterr().out.strip() == (
        "nocreate://locks_test/out.lock: NoCreateFileSystem has no conditional create (no "
        "create-if-absent); this writer is not locked: run one writer at a time here "
        "(docs/scaling-out.md)")


def test_nested_writer_in_the_same_process_is_refused(tmp_path):
    with exclusive_writer(tmp_path / "out", "training run"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()} on host"):
            with exclusive_writer(tmp_path / "out", "training run"):
                pass
        assert (tmp_path / "out.lock").exists()  # the refused writer removed nothing


def test_prepare_refuses_a_second_prepare_into_the_same_folder(tmp_path):
    out = tmp_path / "shards"
    with exclusive_writer(out, "prepare"):
        with pytest.raises(LockedError, match=f"{out}: another prepare is writing here"):
            prepare_shards(DataParams(workers=0), 0, out)
    assert not out.exists() and not (tmp_path / "shards.partial").exists()


def test_training_run_refuses_a_second_run_into_the_same_out_dir(tmp_path):
    out = tmp_path / "models" / "teacher"
    run = TrainRun(settings=None, objective=None, train_batches=None, val_batches=None,
                   steps_per_epoch=1, identity={})
    with exclusive_writer(out, "training run"):
        with pytest.raises(LockedError, match=f"{out}: another training run is writing here"):
            fit(None, run, out, tmp_path / "live")
    assert not (tmp_path / "live").exists()
