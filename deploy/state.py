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
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate.deploy.certs import DeployError
from pollinate.deploy.proc import alive


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


@contextlib.contextmanager
def single_instance(info_file: Path, what: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Hold ``info_file`` for this process: a second instance on the same folder is refused.

    Yields the previous session's info (``{}`` if none). On exit the file keeps the session's
    fields with ``"pid": None`` and ``"clean_exit": True``; if this process is killed the file
    still names the dead pid, which the next session sees as an unclean exit.
    """
    previous = read_json(info_file)
    pid = previous.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and alive(pid):
        raise DeployError(
            f"another {what} is running with state folder {info_file.parent} (pid {pid}); "
            f"stop it first, or give this one its own --state-dir"
        )
    current = {**fields, "pid": os.getpid(), "clean_exit": False}
    write_json(info_file, current)
    try:
        yield previous
    finally:
        latest = read_json(info_file) or current
        write_json(info_file, {**latest, "pid": None, "clean_exit": True})
