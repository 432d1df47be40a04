"""Helpers for deployment tests with real processes on loopback (see conftest.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import tomli_w

from pollinate.data.examples import write_digits_user_files
from pollinate.deploy.certs import create_certs, create_node_key
from pollinate.deploy.proc import descendants

TAG = "POLLINATE_TEST_TAG"


def tagged_pids(tag: str) -> list[int]:
    """Live (not zombie) processes whose environment carries ``TAG=tag``."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get(TAG) == tag:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def command_line(pid: int) -> str:
    """``pid``'s command line, '' if it is gone."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


@dataclass
class Proc:
    """A ``pollinate ...`` process with its output in a file."""

    argv: list[str]
    log: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "pollinate", *self.argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fails on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output)
            if match:
                return match
            if self.popen.poll() is not None:
                time.sleep(0.2)
                match = re.search(pattern, self.output)
                if match:
                    return match
                pytest.fail(
                    f"`pollinate {' '.join(self.argv[:2])}` exited "
                    f"({self.popen.returncode}) before printing {pattern!r}:\n{self.output}"
                )
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} within {timeout} s from {self.argv[:2]}:\n{self.output}")

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`pollinate {' '.join(self.argv[:2])}` still running:\n{self.output}")

    def stop(self, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def pause(self) -> None:
        """SIGSTOP this process and everything it started: a device that stops answering."""
        self._signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_tree(signal.SIGCONT)

    def _signal_tree(self, signum: signal.Signals) -> None:
        for pid in [self.popen.pid, *descendants(self.popen.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def crash(self) -> None:
        """SIGKILL this process and everything it started at once: a power cut."""
        victims = [self.popen.pid, *descendants(self.popen.pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.popen.wait(10)


@dataclass
class Deployment:
    """A temporary place for a server, its devices and their files."""

    root: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    @property
    def server_state(self) -> Path:
        return self.root / "server"

    @property
    def certs(self) -> Path:
        return self.server_state / "certs"

    def start(self, *argv: str, name: str) -> Proc:
        proc = Proc(list(argv), self.root / "out" / f"{name}.txt", self.env)
        self.procs.append(proc)
        return proc

    def make_certs(self) -> Path:
        create_certs(self.certs)
        return self.certs / "ca.crt"

    def make_key(self, name: str) -> Path:
        return create_node_key(self.root / "keys", name).private

    def cli(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``pollinate ARGV`` to its end, output captured (the server's and devices' CLI)."""
        return subprocess.run(
            [sys.executable, "-m", "pollinate", *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register_keys(self, count: int) -> list[Path]:
        """``count`` device keys (``device<i>``), each registered with the server's state."""
        keys = [self.make_key(f"device{i}") for i in range(count)]
        for key in keys:
            out = self.register(key)
            assert out.returncode == 0, out.stdout + out.stderr
        return keys

    def register(self, key: Path) -> subprocess.CompletedProcess[str]:
        """``pollinate server register-node KEY.pub`` on this deployment's server state."""
        return self.cli(
            "server", "register-node", f"{key}.pub", "--state-dir", str(self.server_state)
        )

    def start_devices(
        self, port: int, keys: list[Path], serve_ports: list[int] | None = None
    ) -> list[Proc]:
        """One authenticated ``pollinate node start`` per key; returns once all joined."""
        serve: list[int | None] = list(serve_ports) if serve_ports else [None] * len(keys)
        nodes = [
            self.start(*self.node_argv(i, port, key=key, serve=serve[i]), name=f"node{i}")
            for i, key in enumerate(keys)
        ]
        for node in nodes:
            node.wait_for(r"joined the federation as node \d+", 90)
        return nodes

    def write_config(self, name: str, **sections: dict[str, object]) -> Path:
        path = self.root / f"{name}.toml"
        path.write_text(tomli_w.dumps(sections))
        return path

    def server_argv(self, config: Path, port: int, *extra: str) -> list[str]:
        return [
            "server", "start", "--config", str(config),
            "--address", f"127.0.0.1:{port}",
            "--state-dir", str(self.server_state),
            "--run-dir", str(self.root / "run"),
            *extra,
        ]  # fmt: skip

    def node_argv(self, i: int, port: int, *, key: Path | None, serve: int | None) -> list[str]:
        argv = [
            "node", "start", "--server", f"127.0.0.1:{port}",
            "--data", str(self.root / f"device{i}.csv"),
            "--state-dir", str(self.root / f"node{i}"),
            "--serve", f"127.0.0.1:{serve}" if serve else "none",
        ]  # fmt: skip
        if key is None:
            return [*argv, "--insecure"]
        return [*argv, "--key", str(key), "--root-cert", str(self.certs / "ca.crt")]


def predict(port: int, model: str, rows: list[list[float]], want_round: int) -> dict[str, Any]:
    """POST /predict until the service serves ``want_round`` (it hot-swaps within ~0.5 s)."""
    deadline = time.monotonic() + 20
    while True:
        reply = httpx.post(
            f"http://127.0.0.1:{port}/predict", json={"rows": rows, "model": model}, timeout=5
        )
        body = reply.json()
        if reply.status_code == 200 and body["version"]["round"] == want_round:
            return dict(body)
        if time.monotonic() > deadline:
            pytest.fail(f"/predict {model} never served round {want_round}: {body}")
        time.sleep(0.2)


def write_device_files(root: Path, num: int, rows: int = 120) -> list[Path]:
    """One CSV per device, user ``user<i>``, rows of sklearn's 8x8 digits (64 features)."""
    return write_digits_user_files(root, num, rows)


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        out.append(f"{pid}: {command_line(pid)[:120]}")
    return "; ".join(out)
