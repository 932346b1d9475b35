"""One writer at a time: a lock file beside what is written, naming the writer.

`exclusive_writer(path, what)` creates `<path>.lock` atomically (O_CREAT | O_EXCL, so of two
processes racing exactly one succeeds) holding the writer's pid, host, process start time and
start date, and removes it on exit. A second writer is refused at once with one line naming
the path and the writer that holds it. A lock left by a process that died (kill -9, a crash,
a power cut) on this host is taken over: the pid is gone, or now belongs to a process that
started later (a reused pid). A lock from another host cannot be checked from here; the
message says to delete it once that writer is known to be gone.

On object storage (an fsspec URL: s3://, gs://, memory://, ...) the lock is the object
`<url>.lock`, created with the store's conditional create (fsspec `pipe_file(mode="create")`:
S3's `If-None-Match: *`), so of two writers racing exactly one gets it; a stale one of this
host is deleted only if unchanged since it was read (S3's `If-Match` on its ETag). A server
that ignores `If-None-Match` (older S3-compatible servers) leaves a race of a few
milliseconds between the existence check and the put; a filesystem without a conditional
create is not locked, and says so in one line (docs/scaling-out.md).
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec
import fsspec.asyn

from pipeline.errors import UserError
from pipeline.storage import is_remote, storage_errors


class LockedError(UserError):
    """Another writer holds the lock; the message names it and the lock file."""


@contextmanager
def exclusive_writer(path: str | Path, what: str) -> Iterator[Path]:
    """Hold `<path>.lock` while the body writes `path` (a folder or file); `what` names the
    writer in messages ("prepare", "training run", "logit dump"). Yields the lock's path
    (the lock object's URL on object storage; None where that cannot be locked)."""
    text = str(path).rstrip("/")
    mine = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
            "process_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if is_remote(text):
        with remote_lock(text + ".lock", mine, path) as lock:
            yield lock
        return
    lock = Path(text.removeprefix("file://") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    _acquire(lock, mine, path)
    try:
        yield lock
    finally:
        if _read(lock) == mine:  # never remove a lock that is no longer ours
            lock.unlink(missing_ok=True)


def _acquire(lock: Path, mine: dict, path: str | Path) -> None:
    taken_over = None
    for _ in range(3):  # a stale lock taken over by another process meanwhile: try again
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(lock)
            if holder is None or not _is_stale(holder):
                raise LockedError(_held_message(path, lock, holder)) from None
            if _remove_stale(lock, holder):
                taken_over = holder
            continue
        with os.fdopen(descriptor, "w") as stream:
            stream.write(json.dumps(mine) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        if taken_over:
            print(f"{lock}: took over the lock of {_describe(taken_over)}, which is gone")
        return
    raise LockedError(_held_message(path, lock, _read(lock)))


@contextmanager
def remote_lock(url: str, mine: dict, path: str) -> Iterator[str | None]:
    """`exclusive_writer` on object storage: the lock object at `url`."""
    fs, key = fsspec.core.url_to_fs(url)
    with storage_errors(url):  # the first request: a wrong endpoint or bucket stops here
        acquired = _acquire_object(fs, key, url, mine, path)
    if not acquired:
        yield None
        return
    try:
        yield url
    finally:
        holder, tag = _read_object(fs, key)
        if holder == mine:  # never remove a lock that is no longer ours
            _delete_object(fs, key, tag)


def _acquire_object(fs, key: str, url: str, mine: dict, path: str) -> bool:
    """Create the lock object, or refuse (LockedError) as `_acquire` does; False when this
    filesystem has no conditional create (the writer runs unlocked, said in one line)."""
    data = (json.dumps(mine) + "\n").encode()
    taken_over = None
    for _ in range(3):  # a stale lock taken over by another process meanwhile: try again
        fs.invalidate_cache(key)
        try:
            # The existence check first: a server that ignores If-None-Match would overwrite.
            if fs.exists(key):
                raise FileExistsError(key)
            fs.pipe_file(key, data, mode="create")
        except FileExistsError:
            holder, tag = _read_object(fs, key)
            if holder is None and tag is None:  # deleted since: try again
                continue
            if holder is None or not _is_stale(holder):
                raise LockedError(_held_message(path, url, holder)) from None
            if _delete_object(fs, key, tag):
                taken_over = holder
            continue
        except (NotImplementedError, ValueError, TypeError) as error:
            print(f"{url}: {type(fs).__name__} has no conditional create ({error}); this "
                  "writer is not locked: run one writer at a time here (docs/scaling-out.md)")
            return False
        if _read_object(fs, key)[0] != mine:  # overwritten: the server ignored If-None-Match
            raise LockedError(_held_message(path, url, _read_object(fs, key)[0]))
        if taken_over:
            print(f"{url}: took over the lock of {_describe(taken_over)}, which is gone")
        return True
    raise LockedError(_held_message(path, url, _read_object(fs, key)[0]))


def _read_object(fs, key: str) -> tuple[dict | None, str | None]:
    """(the lock's content or None, its ETag or None); (None, None) when it is missing."""
    fs.invalidate_cache(key)
    try:
        tag = fs.info(key).get("ETag")
        text = fs.cat_file(key)
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(text)
    except ValueError:
        return None, tag or ""
    return (holder if isinstance(holder, dict) else None), tag or ""


def _delete_object(fs, key: str, tag: str | None) -> bool:
    """Delete the lock object only if it is still the one read (S3: `If-Match` on its ETag;
    elsewhere a plain delete). True when it deleted it."""
    try:
        if tag and hasattr(fs, "_call_s3"):
            bucket, name, _ = fs.split_path(key)
            fsspec.asyn.sync(fs.loop, fs._call_s3, "delete_object", Bucket=bucket, Key=name,
                             IfMatch=tag)
            fs.invalidate_cache(key)
        else:
            fs.rm_file(key)
    except FileNotFoundError:
        return False
    except OSError as error:  # s3fs: 412 PreconditionFailed, the lock changed since
        if "pre-condition" in str(error).lower() or "precondition" in str(error).lower():
            return False
        raise
    return True


def _held_message(path: str | Path, lock: Path | str, holder: dict | None) -> str:
    if holder is None:
        return (f"{path}: another writer is starting (or left an unreadable lock {lock}); "
                "wait for it, or delete the lock file if no other writer runs")
    return (f"{path}: another {holder.get('what', 'writer')} is writing here ({_describe(holder)}"
            f"); wait for it to finish, or, if that process is gone, delete {lock}")


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, since "
            f"{holder.get('started')}")


def _read(lock: Path) -> dict | None:
    """The lock's content, or None when it is missing, being written, or not a lock."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(holder: dict) -> bool:
    """True only when the holder is on this host and certainly gone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    pid = holder["pid"]
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        return False
    state = _proc_stat(pid)
    if state is None:  # no /proc to tell more: alive as far as we know
        return False
    return state[0] == "Z" or holder.get("process_start") not in (None, state[1])


def _remove_stale(lock: Path, holder: dict) -> bool:
    """Remove the stale lock, unless another process replaced it in the meantime: move it
    aside atomically (of several processes doing so, one wins), then check that what was
    moved is the stale lock; a live lock moved by mistake goes straight back. True when it
    removed the stale lock."""
    aside = lock.with_name(f"{lock.name}.stale.{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:  # another process took it over first
        return False
    if _read(aside) == holder:
        aside.unlink(missing_ok=True)
        return True
    try:  # a live writer's lock: put it back (link fails if the name is taken again)
        os.link(aside, lock)
    except FileExistsError:
        # A third process locked the path in between; its lock stands and the live writer
        # we moved keeps running without a file (its exit removes only its own lock).
        # Nothing safer can be done without a lock server: report it as not taken over.
        return False
    finally:
        aside.unlink(missing_ok=True)
    return False


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None."""
    state = _proc_stat(pid)
    return None if state is None else state[1]


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from /proc/PID/stat (state "Z": a zombie), or None
    without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (command) ": field 3 onwards
    return fields[0], fields[19]  # state (field 3), starttime (field 22)
