"""Follow a run in progress through its ``metrics.db``: each round as it is written.

The writer (``pollinate run``, or a deployment's ServerApp process) commits one round per
transaction, so a reader polling ``SELECT ... WHERE round > last`` on a read-only
connection sees whole rounds only and costs one indexed query per poll. Following ends
when the run's status is anything but ``running`` (finished, failed, stopped, ...), or when
the process that writes it is gone while the status still says ``running`` (killed, or the
machine lost power): the writer records its pid and host in the ``run`` table.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from pollinate.server.metrics import DB_NAME, ROUND_COLUMNS, MetricsError

POLL = 0.5  # seconds between checks: a round takes seconds at least
WAIT_FOR_DB = 60.0  # seconds to wait for a run that has not created its metrics.db yet


@dataclass(frozen=True)
class FollowEnd:
    """How following ended: the run's last status, its error, whether its writer vanished."""

    status: str
    error: str = ""
    writer_gone: bool = False


def follow_rounds(
    run_dir: str | Path,
    emit: Callable[[dict[str, object]], None],
    *,
    poll: float = POLL,
    wait_for_db: float = WAIT_FOR_DB,
    on_wait: Callable[[str], None] | None = None,
) -> FollowEnd:
    """Call ``emit(row)`` for every round row, old and new, until the run is no longer running.

    Raises :class:`MetricsError` when no ``metrics.db`` appears within ``wait_for_db`` s.
    ``on_wait`` gets one message if the database does not exist yet.
    """
    path = Path(run_dir) / DB_NAME
    _wait_for(path, wait_for_db, poll, on_wait)
    last = -1
    with contextlib.closing(_connect(path)) as db:
        while True:
            info = _run_info(db)
            # Rows first, then the status read before them: a round committed just before
            # the run finished is never missed.
            for row in _rounds_after(db, last):
                last = int(row["round"])  # type: ignore[call-overload]
                emit(row)
            status = info.get("status", "")
            if status and status != "running":
                return FollowEnd(status, info.get("error", ""))
            if status == "running" and writer_gone(info):
                # The writer may have finished between the two reads: look once more.
                info = _run_info(db)
                for row in _rounds_after(db, last):
                    last = int(row["round"])  # type: ignore[call-overload]
                    emit(row)
                if info.get("status", "") == "running":
                    return FollowEnd("running", info.get("error", ""), writer_gone=True)
                return FollowEnd(info.get("status", ""), info.get("error", ""))
            time.sleep(poll)


def _wait_for(
    path: Path, timeout: float, poll: float, on_wait: Callable[[str], None] | None
) -> None:
    if path.is_file():
        return
    if on_wait is not None:
        on_wait(f"waiting for {path} (the run has not started writing yet)")
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() >= deadline:
            raise MetricsError(
                f"no {DB_NAME} appeared in '{path.parent}' within {timeout:g} s: "
                "is a run writing there?"
            )
        time.sleep(poll)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    return db


def _run_info(db: sqlite3.Connection) -> dict[str, str]:
    try:
        return {str(k): str(v) for k, v in db.execute("SELECT key, value FROM run").fetchall()}
    except sqlite3.OperationalError:  # the writer has not created the tables yet
        return {}


def _rounds_after(db: sqlite3.Connection, last: int) -> list[dict[str, object]]:
    columns = ", ".join(ROUND_COLUMNS)
    try:
        rows = db.execute(
            f"SELECT {columns} FROM rounds WHERE round > ? ORDER BY round", (last,)
        ).fetchall()
    except sqlite3.OperationalError:
        return []
    return [{c: _nan_for_null(row[c]) for c in ROUND_COLUMNS} for row in rows]


def _nan_for_null(value: object) -> object:
    return float("nan") if value is None else value


def writer_gone(info: dict[str, str]) -> bool:
    """True when the run's writer ran on this host and its process no longer exists."""
    pid, host = info.get("pid", ""), info.get("host", "")
    if not pid.isdigit() or host != socket.gethostname():
        return False  # an older file, or a writer elsewhere: only the status can tell
    return not process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, exited but not reaped, is not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's process: alive
