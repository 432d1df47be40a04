"""Child processes: start, watch, stop, and leave nothing behind.

``pollinate server start`` and ``pollinate node start`` stay in the foreground and supervise
their children (the SuperLink; or the SuperNode, the ClientApp worker and the inference
service). Whatever happens — Ctrl-C, SIGTERM, a child dying — :class:`Supervisor` stops
every child and every process those children started:

- each child runs in its own session (process group), so a terminal's Ctrl-C reaches only
  the supervisor, which then stops the children in order;
- on Linux the supervisor is a *child subreaper*: processes that Flower detaches
  (``flower-superexec``, ``flwr-serverapp``) stay its descendants even when their parent
  exits first, so none can be orphaned and missed;
- stopping is SIGTERM to each child's group, a grace period, then SIGKILL to every
  descendant still alive;
- every child Pollinate starts calls :func:`guard_tree` first thing: it becomes a subreaper
  too, so nothing it starts can leave its subtree, and once the supervisor is gone — even
  killed with SIGKILL, when it cannot clean up — it SIGKILLs its whole subtree, then itself.
  So ``kill -9`` of ``pollinate server start`` leaves no SuperLink, ``flower-superexec``
  or ``flwr-serverapp`` behind (left alone, the ServerApp outlived it by minutes, then
  reached the *next* server's SuperLink and wrote its failure into the new run's folder).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import psutil

STOP_GRACE = 10.0


# ---------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> bool:
    """True once ``host:port`` accepts connections; False on timeout or if ``alive()`` fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def parse_address(text: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address '{text}' must look like HOST:PORT, e.g. 127.0.0.1:9092")
    host = host.strip("[]") or default_host
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def become_subreaper() -> bool:
    """Linux: orphaned descendants are re-parented to this process instead of init."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def start_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), None if it is not running.

    A pid and its start time name one process: pids are recycled, the pair is not.
    """
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, exited but not reaped, is not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's process: alive


def poll_interval(waited: float, share: float, low: float, high: float) -> float:
    """The next poll's wait: ``share`` of the time waited so far, within ``[low, high]``.

    Whatever arrives is then noticed at most ``share`` of the wait late, and a long idle
    wait costs few polls: a 1.5x backoff instead lets a 1 s wait's event sit up to 0.5 s.
    """
    return min(max(low, waited * share), high)


# The supervisor's pid, in the environment of each child it starts: a child that finds
# another parent (the supervisor died before the child could look) knows it is orphaned.
SUPERVISOR_ENV = "POLLINATE_SUPERVISOR_PID"
GUARD_POLL = 0.2


def kill_tree(pids: list[int] | None = None) -> None:
    """SIGKILL ``pids`` (default: every descendant of this process) until none is alive."""
    for _ in range(20):
        victims = [p for p in (pids if pids is not None else descendants(os.getpid())) if alive(p)]
        victims = [p for p in victims if p != os.getpid()]
        if not victims:
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def guard_tree(interval: float = GUARD_POLL) -> bool:
    """Die with the supervisor, and take every process this one started along.

    Call it before starting anything. This process becomes a subreaper (processes it
    starts, detached or not, stay in its subtree), and a thread checks every ``interval``
    s that the parent is still the supervisor; when it is not, every descendant gets
    SIGKILL, then this process. The supervisor is the pid in ``POLLINATE_SUPERVISOR_PID``
    (set by :class:`Supervisor`; else the parent at the time of the call). Returns
    whether the subreaper could be set (Linux only; elsewhere only this process exits).
    """
    expected = os.environ.pop(SUPERVISOR_ENV, None)
    supervisor = int(expected) if expected and expected.isdigit() else os.getppid()
    subreaper = become_subreaper()

    def orphaned() -> None:
        kill_tree()
        os.kill(os.getpid(), signal.SIGKILL)

    if os.getppid() != supervisor:
        orphaned()

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(interval)
        orphaned()

    threading.Thread(target=watch, name="guard-tree", daemon=True).start()
    return subreaper


def watch_parent(interval: float = 0.5) -> None:
    """Exit (SIGTERM to self) when this process's parent goes away.

    For a child that starts nothing and wants to stop gracefully (the streaming
    consumer); a child that starts processes calls :func:`guard_tree` instead.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for children: this interpreter's scripts first on PATH, quiet."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------- supervisor


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    on_line: Callable[[str], None] | None = None
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None


class Supervisor:
    """Starts children, tees their output to log files, and stops all of them on exit."""

    def __init__(
        self,
        log_dir: Path,
        *,
        echo: Callable[[str, str], None] | None = None,
        record: Callable[[list[tuple[int, float | None]]], None] | None = None,
    ) -> None:
        """``record`` is told (pid, start time) of every child whenever one starts, so a
        successor can kill what survived this process (see ``state.single_instance``)."""
        self.log_dir = log_dir
        self.record = record
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.echo = echo
        self.stop_requested = threading.Event()
        self.stop_signal: int | None = None
        self._old_handlers: dict[int, object] = {}
        self.subreaper = become_subreaper()

    # -- lifecycle --------------------------------------------------------------
    def __enter__(self) -> Supervisor:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_all()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signal = signum
        self.stop_requested.set()

    # -- children ---------------------------------------------------------------
    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> Child:
        log_path = self.log_dir / f"{name}.log"
        env = dict(env if env is not None else child_env())
        env[SUPERVISOR_ENV] = str(os.getpid())
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        child = Child(name, popen, log_path, on_line=on_line)
        child._reader = threading.Thread(
            target=self._pump, args=(child,), name=f"log-{name}", daemon=True
        )
        child._reader.start()
        self.children.append(child)
        if self.record is not None:
            self.record([(c.pid, start_time(c.pid)) for c in self.children])
        return child

    def _pump(self, child: Child) -> None:
        stream: IO[bytes] | None = child.popen.stdout
        assert stream is not None
        with child.log_path.open("a", encoding="utf-8") as log:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                child.tail.append(line)
                if child.on_line is not None:
                    with contextlib.suppress(Exception):
                        child.on_line(line)
                if self.echo is not None:
                    self.echo(child.name, line)

    def exited(self) -> Child | None:
        """The first child that has exited, if any."""
        for child in self.children:
            if not child.running():
                return child
        return None

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` s, waking early on a stop request."""
        self.stop_requested.wait(timeout)

    def stop_child(self, child: Child, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM the child's process group, then SIGKILL whatever of it is left."""
        tree = [child.pid, *descendants(child.pid)]
        if child.running():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(grace)
        self._kill_all(tree + descendants(child.pid))
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(5)
        if child._reader is not None:
            child._reader.join(2)
        return child.popen.returncode

    def stop_all(self, grace: float = STOP_GRACE) -> None:
        """Stop children in reverse start order, then anything re-parented to us."""
        for child in reversed(self.children):
            self.stop_child(child, grace)
        # Detached grandchildren (flower-superexec and its apps) watch their parent and
        # leave on their own within a second; give them that, then make sure.
        leftovers = descendants(os.getpid())
        deadline = time.monotonic() + 3
        while leftovers and time.monotonic() < deadline:
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            time.sleep(0.2)
            self._reap()
            leftovers = [p for p in descendants(os.getpid()) if alive(p)]
        self._kill_all(leftovers)
        self._reap()

    @staticmethod
    def _kill_all(pids: list[int]) -> None:
        for pid in pids:
            if pid != os.getpid() and alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def _reap(self) -> None:
        """Collect exit statuses of re-parented orphans (we are their subreaper)."""
        if not self.subreaper:
            return
        known = {c.pid for c in self.children}
        for pid in descendants(os.getpid()):
            if pid in known:
                continue
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
