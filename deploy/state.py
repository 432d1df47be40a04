"""Where a deployed server and a device keep their state, and the one-instance lock.

Everything lives under one folder per role, by default ``$POLLINATE_HOME/server`` and
``$POLLINATE_HOME/node`` (``POLLINATE_HOME`` defaults to ``~/.pollinate``)::

    server/                          node/
      superlink.db   runs, nodes       node.json    last session (pid, ports, clean exit)
      certs/         TLS (certs create) models/      the model store (default --model-dir)
      nodes/*.pub    registered keys   logs/        supernode, worker, serve
      flwr/          FLWR_HOME: [superlink.pollinate] connection for `flwr` commands
      app/pollinate/ the Flower app bundled for each run (see appdir.py)
      run-config.toml, server.json, logs/
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate.deploy.certs import DeployError
from pollinate.deploy.proc import descendants, kill_tree, start_time


def pollinate_home() -> Path:
    return Path(os.environ.get("POLLINATE_HOME", "~/.pollinate")).expanduser()


def default_server_dir() -> Path:
    return pollinate_home() / "server"


def default_node_dir() -> Path:
    return pollinate_home() / "node"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class ServerDir:
    root: Path

    @property
    def database(self) -> Path:
        return self.root / "superlink.db"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def apps(self) -> Path:
        return self.root / "app"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run_config(self) -> Path:
        return self.root / "run-config.toml"

    @property
    def info_file(self) -> Path:
        return self.root / "server.json"

    def info(self) -> dict[str, Any]:
        return read_json(self.info_file)


@dataclass(frozen=True)
class NodeDir:
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def info_file(self) -> Path:
        return self.root / "node.json"

    def info(self) -> dict[str, Any]:
        return read_json(self.info_file)


def _lock_path(info_file: Path) -> Path:
    return info_file.with_name(f".{info_file.stem}.lock")


def instance_running(info_file: Path) -> bool:
    """Whether a live process holds the lock of ``info_file`` (see :func:`single_instance`)."""
    lock = _lock_path(info_file)
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we got
    return False


def _kill_leftovers(previous: dict[str, Any]) -> int:
    """SIGKILL the children a dead session recorded that still run (same pid *and* start
    time, so a recycled pid is never hit), with their descendants; how many there were."""
    found = []
    for entry in previous.get("children") or []:
        if not (isinstance(entry, list) and len(entry) == 2):
            continue
        pid, started = entry
        if isinstance(pid, int) and started is not None and start_time(pid) == started:
            found += [pid, *descendants(pid)]
    kill_tree(found)
    return len(found)


@contextlib.contextmanager
def single_instance(info_file: Path, what: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Hold ``info_file`` for this process: a second instance on the same folder is refused.

    The hold is an OS lock (``flock``) on a file next to it, taken before anything is read:
    two instances starting at once cannot both get it, and it goes with its holder however
    that ends (``kill -9`` included), so a dead predecessor never blocks a restart.

    Yields the previous session's info (``{}`` if none). If that session did not end
    cleanly, whatever it recorded as its children (:meth:`Supervisor.record`) and is still
    running is killed first; ``"leftovers"`` says how many processes that was. On exit the
    file keeps the session's fields with ``"pid": None`` and ``"clean_exit": True``.
    """
    info_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_lock_path(info_file), os.O_RDWR | os.O_CREAT, 0o600)  # not inherited
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = read_json(info_file).get("pid")
        raise DeployError(
            f"another {what} is running with state folder {info_file.parent}"
            + (f" (pid {pid})" if isinstance(pid, int) else "")
            + "; stop it first, or give this one its own --state-dir"
        ) from None
    try:
        previous = read_json(info_file)
        if previous.get("clean_exit") is False:
            previous["leftovers"] = _kill_leftovers(previous)
        current = {**fields, "pid": os.getpid(), "clean_exit": False}
        write_json(info_file, current)
        try:
            yield previous
        finally:
            latest = read_json(info_file) or current
            write_json(info_file, {**latest, "pid": None, "clean_exit": True, "children": []})
    finally:
        os.close(fd)


def record_children(info_file: Path, children: list[tuple[int, float | None]]) -> None:
    """Note the session's children (pid, start time) for :func:`single_instance`'s cleanup."""
    write_json(info_file, {**read_json(info_file), "children": [list(c) for c in children]})
