"""The run folder's lock: one writer at a time, and who holds it.

A run holds an OS lock (``flock``) on ``<run dir>/.pollinate/lock`` while it writes the
folder; the file names the holder (pid, host, start time). The kernel drops the lock when
the holder dies, even by ``kill -9``, so a ``running`` status with nobody holding the lock
is an interrupted run (:func:`effective_status`). Its own module so that the metrics
database (which reports that status) and the run folder's policy (which reads the metrics
of an earlier run) need not import each other.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

META = ".pollinate"
LOCK = f"{META}/lock"


class RunDirError(ValueError):
    """A run folder that this run may not use (held, foreign files, nothing to resume)."""


# ------------------------------------------------------------------------------ lock

_held: dict[Path, list[int]] = {}  # resolved run dir -> [fd, holds]
_held_guard = threading.Lock()


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time()})


def _describe(info: dict[str, Any]) -> str:
    started = info.get("started_at")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(started)))
        if isinstance(started, int | float)
        else "?"
    )
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}"


def _read_info(fd: int) -> dict[str, Any]:
    with suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode() or "{}")
        if isinstance(data, dict):
            return data
    return {}


def acquire(run_dir: Path) -> None:
    """Hold ``run_dir``'s lock (again, if this process holds it); RunDirError if another does."""
    key = run_dir.resolve()
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            return
        (key / META).mkdir(parents=True, exist_ok=True)
        fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            raise RunDirError(
                f"run folder {key} is in use by another run ({_describe(info)}); wait for it "
                "to end, or give this run its own --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        _held[key] = [fd, 1]


def release(run_dir: Path) -> None:
    """Drop one hold; the lock goes with the last one (the lock file stays: no race)."""
    key = run_dir.resolve()
    with _held_guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.close(entry[0])


@contextmanager
def held(run_dir: Path) -> Iterator[None]:
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def holder(run_dir: Path) -> dict[str, Any] | None:
    """Who holds ``run_dir``'s lock (pid, host, started_at), or None if nobody does."""
    key = Path(run_dir).resolve()
    with _held_guard:
        if key in _held:
            return _read_info(_held[key][0])
    try:
        fd = os.open(key / LOCK, os.O_RDONLY | os.O_CLOEXEC)  # readers create nothing
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_info(fd)
    finally:
        os.close(fd)
    return None


def effective_status(run_dir: Path, recorded: str) -> str:
    """``recorded``, except a ``running`` run nobody holds any more: that one was killed."""
    if recorded == "running" and (Path(run_dir) / LOCK).exists() and holder(run_dir) is None:
        return "interrupted"
    return recorded
