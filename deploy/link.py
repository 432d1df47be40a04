"""Talking to the running SuperLink's Control API through Flower's own ``flwr`` CLI.

The connection lives in ``<server state>/flwr/config.toml`` (``FLWR_HOME``) as
``[superlink.pollinate]``, so an operator can use every ``flwr`` command directly::

    FLWR_HOME=~/.pollinate/server/flwr flwr ls pollinate
    FLWR_HOME=~/.pollinate/server/flwr flwr log <run-id> pollinate --show

Each call here is ``flwr ... pollinate --format json`` (about a second); failures become a
one-line :class:`LinkError`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import tomli_w

from pollinate.deploy.certs import DeployError
from pollinate.deploy.proc import child_env
from pollinate.flower_compat.control_errors import api_error_code, flower_error_code
from pollinate.text import one_line

CONNECTION = "pollinate"


class LinkError(DeployError):
    """The SuperLink could not be reached or refused a request."""


def write_connection(flwr_home: Path, address: str, root_cert: Path | None) -> None:
    """``[superlink.pollinate]`` in ``flwr_home/config.toml`` (the whole file is ours)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection: dict[str, str | bool] = {"address": address}
    if root_cert is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_cert.resolve())
    document = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    text = "# Written by `pollinate server start`.\n" + tomli_w.dumps(document)
    (flwr_home / "config.toml").write_text(text)


def flwr_env(flwr_home: Path) -> dict[str, str]:
    return child_env(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
    )


def flwr_json(flwr_home: Path, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json``; the parsed reply, or LinkError with Flower's reason."""
    argv = ["flwr", *args, "--format", "json"]
    try:
        out = subprocess.run(
            argv,
            env=flwr_env(flwr_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise LinkError(f"`{' '.join(argv[:3])}` did not answer within {timeout:g} s") from None
    except FileNotFoundError:
        raise LinkError("the `flwr` command is not installed next to pollinate") from None
    reply = _last_json(out.stdout)
    if reply is None:
        detail = (out.stderr or out.stdout).strip().splitlines()
        raise LinkError(f"`flwr {args[0]}` failed: {detail[-1] if detail else 'no output'}")
    if not reply.get("success", False):
        message = str(reply.get("error-message", "unknown error"))
        raise LinkError(_one_line(message))
    return reply


def _last_json(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
        except ValueError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def _one_line(message: str) -> str:
    # Flower prefixes "Using SuperLink: ..." before the reason.
    lines = [ln for ln in message.splitlines() if not ln.strip().startswith("Using SuperLink")]
    return one_line("\n".join(lines))


# --------------------------------------------------------------------------- commands


def register_key(flwr_home: Path, public_key: Path) -> tuple[int | None, bool]:
    """Register a node key: (node id, newly registered). Already known -> (None, False)."""
    try:
        reply = flwr_json(flwr_home, "supernode", "register", str(public_key), CONNECTION)
    except LinkError as err:
        if flower_error_code(str(err)) == api_error_code("PUBLIC_KEY_ALREADY_IN_USE"):
            return None, False
        raise
    return int(reply["node-id"]), True


def list_nodes(flwr_home: Path) -> list[dict[str, Any]]:
    return list(flwr_json(flwr_home, "supernode", "list", CONNECTION).get("nodes", []))


def list_runs(flwr_home: Path, run_id: int | None = None) -> list[dict[str, Any]]:
    args = ["ls", CONNECTION] + (["--run-id", str(run_id)] if run_id is not None else [])
    return list(flwr_json(flwr_home, *args).get("runs", []))


def submit_run(flwr_home: Path, app_dir: Path, run_config: Path) -> int:
    reply = flwr_json(flwr_home, "run", str(app_dir), CONNECTION, "--run-config", str(run_config))
    return int(reply["run-id"])


def stop_run(flwr_home: Path, run_id: int) -> None:
    flwr_json(flwr_home, "stop", str(run_id), CONNECTION, timeout=15)


def env_for_superlink(flwr_home: Path) -> dict[str, str]:
    return flwr_env(flwr_home)


__all__ = [
    "CONNECTION",
    "LinkError",
    "env_for_superlink",
    "flwr_json",
    "list_nodes",
    "list_runs",
    "register_key",
    "stop_run",
    "submit_run",
    "write_connection",
]
