"""A run folder that cannot lose data: one writer at a time, and only Pollinate's files removed.

- **Lock.** A run holds an OS lock (``flock``) on ``<run dir>/.pollinate/lock`` while it
  writes the folder; the file names the holder (pid, host, start time). A second run on the
  same folder is refused with that name. The kernel drops the lock when the holder dies,
  even by ``kill -9``, so a ``running`` status with nobody holding the lock is an
  interrupted run (:func:`effective_status`). Locks are reentrant within a process: the CLI
  takes it before starting anything, and the ServerApp (in the same process in simulation,
  in its own under a deployment) takes it again.
- **Manifest.** ``<run dir>/.pollinate/manifest`` lists every file the ServerApp writes
  there (one relative path a line, written *before* the file). The per-user model store
  keeps its own list of the user folders it made (:mod:`pollinate.client.store`). Only
  those files (and the temp files of their atomic writes) are ever removed; anything else
  in the folder is *foreign*, and a run there is refused unless ``run.overwrite``.
- **Policy** (:func:`prepare`): a new run needs an empty (or new) folder; a folder holding
  an earlier run needs ``run.resume`` (continue it) or ``run.overwrite`` (replace it).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pollinate.server.metrics import read_rounds, read_run_info
from pollinate.server.runlock import (
    LOCK,
    META,
    RunDirError,
    held,
)

MANIFEST = f"{META}/manifest"
STORE_MANIFEST = ".pollinate-manifest"  # what pollinate.client.store writes at its root
# What a store folder of a user holds when Pollinate wrote it (client/store.py's layout).
STORE_FILES = ("global.pt", "personal.pt")
STORE_STATE = ".state"


# -------------------------------------------------------------------------- manifest


def record(run_dir: Path, *names: str) -> None:
    """Add ``names`` (relative to ``run_dir``; ``users/`` = a model store) to the manifest.

    Called *before* the files are written, so a crash never leaves an unlisted one.
    """
    manifest = run_dir / MANIFEST
    known = set(_lines(manifest))
    new = [n for n in dict.fromkeys(names) if n not in known]
    if not new:
        return
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with manifest.open("a") as f:
        f.write("".join(f"{line}\n" for line in new))
        f.flush()
        os.fsync(f.fileno())


def _lines(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return []


def _with_leftovers(path: Path) -> list[Path]:
    """``path`` and what writing it may leave behind: atomic-write temp files, SQLite's."""
    out = [path, *path.parent.glob(f".{path.name}.*.tmp")]
    if path.suffix == ".db":
        out += [path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal")]
    return out


def store_files(store: Path) -> list[Path]:
    """The files of a model store that Pollinate wrote: its listed user folders' models."""
    out = [store / STORE_MANIFEST]
    for name in _lines(store / STORE_MANIFEST):
        folder = store / name
        if name in (".", "..") or "/" in name or not folder.is_dir():
            continue
        for kind in STORE_FILES:
            out += _with_leftovers(folder / kind)
        state = folder / STORE_STATE
        if state.is_dir():
            out += [p for p in state.rglob("*") if p.is_file() or p.is_symlink()]
    return out


def owned_files(run_dir: Path) -> set[Path]:
    """Every file in ``run_dir`` that Pollinate wrote (the manifest's, with leftovers)."""
    owned: set[Path] = {p for p in (run_dir / META).rglob("*") if p.is_file()}
    for line in _lines(run_dir / MANIFEST):
        path = run_dir / line
        if ".." in Path(line).parts or Path(line).is_absolute():
            continue  # a tampered manifest never points outside the folder
        if line.endswith("/*"):  # a folder that is all Pollinate's (TensorBoard's logs)
            folder = run_dir / line[:-2]
            owned.update(folder.rglob("*") if folder.is_dir() else [])
        elif line.endswith("/"):  # a model store
            owned.update(store_files(path))
        else:
            owned.update(_with_leftovers(path))
    return {p for p in owned if p.is_file() or p.is_symlink()}


def _all_files(run_dir: Path) -> Iterator[Path]:
    for p in run_dir.rglob("*"):
        if p.is_file() or p.is_symlink():
            yield p


def foreign_files(run_dir: Path) -> list[Path]:
    """Files in ``run_dir`` that Pollinate did not write, sorted."""
    if not run_dir.is_dir():
        return []
    owned = owned_files(run_dir)
    return sorted(p for p in _all_files(run_dir) if p not in owned)


def remove_owned(run_dir: Path) -> None:
    """Delete Pollinate's files in ``run_dir`` (never others), then its emptied folders."""
    lock = (run_dir / LOCK).resolve()
    for path in owned_files(run_dir):
        if path.resolve() != lock:
            path.unlink(missing_ok=True)
    (run_dir / MANIFEST).unlink(missing_ok=True)
    for folder in sorted((p for p in run_dir.rglob("*") if p.is_dir()), reverse=True):
        with suppress(OSError):
            folder.rmdir()  # only empty ones: a folder with a foreign file stays


def _listing(paths: Iterable[Path], root: Path, limit: int = 3) -> str:
    names = [str(p.relative_to(root)) for p in paths]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------------------- policy

# Keys a resumed run may change: where and how patiently it runs, not what it computes
# (simulation.num-nodes changes how nodes pre-average their users, so the float rounding).
RESUME_MAY_CHANGE = (
    "run.dir",  # a moved folder (a store inside it moves along: compared relative to it)
    "run.resume",
    "run.overwrite",
    "simulation.backend",
    "simulation.ray-address",
    # Where it computes: a run started on a GPU may go on on a CPU (float32 rounding apart).
    "simulation.device",
    "simulation.device-cache-mb",
    "simulation.nodes-per-gpu",
    "server.node-wait-timeout",
    "server.round-timeout",
)


def earlier_run(run_dir: Path) -> str | None:
    """A description of the run recorded in ``run_dir`` ("finished run, 10/10 rounds")."""
    if not (run_dir / "metrics.db").is_file():
        return None
    try:
        info = read_run_info(run_dir)
        done = int(read_rounds(run_dir)["round"].max()) if len(read_rounds(run_dir)) else 0
    except Exception:  # an unreadable database is still an earlier run's
        return "earlier run"
    # The caller holds the lock: a run still marked running there was killed.
    status = info.get("status", "?")
    status = "interrupted" if status == "running" else status
    return f"{status} run ({done}/{info.get('num_rounds', '?')} rounds)"


def precheck(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """:func:`prepare`'s refusals, removing nothing and keeping no lock: for a process
    (``server start``) whose run is written by another (the deployed ServerApp)."""
    with held(run_dir):
        prepare(run_dir, resume=resume, overwrite=overwrite, dry_run=True)


def prepare(run_dir: Path, *, resume: bool, overwrite: bool, dry_run: bool = False) -> None:
    """Check that this run may use ``run_dir`` (lock held) and clear it for a new run.

    Raises RunDirError, one line saying what to pass instead.
    """
    if resume:
        from pollinate.server.checkpoint import CHECKPOINT  # lazy: it imports torch

        if not (run_dir / CHECKPOINT).is_file():
            raise RunDirError(
                f"{run_dir} has no checkpoint to resume from (no round of a run was "
                "completed there); start it anew with --overwrite"
            )
        return
    previous = earlier_run(run_dir)
    if previous and not overwrite:
        raise RunDirError(
            f"{run_dir} holds a {previous}: pass --resume to continue it or --overwrite "
            "to replace it (or pick another --run-dir)"
        )
    foreign = foreign_files(run_dir)
    if foreign and not overwrite:
        raise RunDirError(
            f"{run_dir} holds files Pollinate did not write ({_listing(foreign, run_dir)}): "
            "pass --overwrite to run there anyway (they are kept), or pick another --run-dir"
        )
    if overwrite and not dry_run:
        remove_owned(run_dir)


# ---------------------------------------------------------------------- interruption


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so the same clean-up runs."""


class RunWriter:
    """Orders a run's writes (rounds, checkpoints, its end) against an interruption.

    The ServerApp writes from its own thread; Ctrl-C arrives in the main thread, which
    then stops the ClientApp workers. Once :func:`interrupt_runs` marked the run, nothing
    the ServerApp thread still does (a round whose replies failed because the workers
    were stopping) is recorded or checkpointed.
    """

    def __init__(self, mark_interrupted: Any) -> None:
        self.lock = threading.Lock()
        self.stopped = ""
        self._mark = mark_interrupted

    def interrupt(self, reason: str) -> None:
        with self.lock:
            if not self.stopped:
                self.stopped = reason
                self._mark(reason)


_writers: list[RunWriter] = []


@contextmanager
def writing(writer: RunWriter) -> Iterator[RunWriter]:
    _writers.append(writer)
    try:
        yield writer
    finally:
        _writers.remove(writer)


def interrupt_runs(reason: str) -> None:
    """Mark every run this process writes as interrupted (from a signal handler)."""
    for writer in list(_writers):
        writer.interrupt(reason)


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT / SIGTERM: mark this process's runs interrupted first, then raise.

    Marking first, in the handler, is what keeps a round cut short by the shutdown out of
    the metrics and the checkpoint. Only the main thread may install handlers; elsewhere
    this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        interrupt_runs(f"stopped by {name}")
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
