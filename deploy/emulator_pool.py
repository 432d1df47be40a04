"""Emulated devices over several processes: one :class:`~pollinate.deploy.emulator.Emulator`
per process, each hosting its share of the device identities.

Why: one emulator process is one Python interpreter, so it does at most one core's worth of
TLS, request signing, protobuf and ClientApp calls; at 1,000 devices that, not the server,
was the limit (issue 13: ~173 ms of emulator CPU per exchange, 184 of 1,000 devices served
in 600 s). :class:`EmulatorPool` splits the devices over ``processes`` spawned processes
(:func:`split_devices`: every device exactly once, shares differ by at most one) and gathers
what they report — active devices, requests by RPC, ClientApp calls and each process's CPU
time — into one :class:`PoolStats`, which reads as an :class:`EmulatorStats` does.

The ClientApp is named by import path (``"pollinate.client.app:app"``): each process imports
its own, as a SuperNode's worker does.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from pollinate.deploy.emulator import TUNED, DeviceSpec, Emulator, PollPolicy

REPORT_EVERY = 0.5  # s between a process's reports to the pool
STOP_TIMEOUT = 120.0  # s for a process to deactivate its devices and exit


def split_devices(devices: Sequence[DeviceSpec], processes: int) -> list[list[DeviceSpec]]:
    """``devices`` dealt round-robin into ``min(processes, len(devices))`` shares.

    Round-robin, not in blocks: neighbouring devices (whose data overlap, see
    :func:`~pollinate.deploy.emulator.write_device_files`) land in different processes, and
    shares differ by at most one device.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    n = max(1, min(processes, len(devices)))
    return [list(devices[i::n]) for i in range(n)]


def load_client_app(path: str) -> Any:
    """The object at ``"module:attribute"``."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"client app {path!r}: expected 'module:attribute'")
    return getattr(importlib.import_module(module), attr)


@dataclass
class _Report:
    active: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    app_errors: int = 0
    request_errors: int = 0
    cpu: float = 0.0  # s of this process's CPU (user + system, all threads)
    done: bool = False


def _cpu_seconds() -> float:
    return time.process_time()


def _serve_share(
    devices: list[DeviceSpec],
    address: str,
    client_app: str,
    root_certificates: bytes | None,
    policy: PollPolicy,
    threads: int,
    seed: int,
    conn: Connection,
) -> None:
    """A pool process: serve ``devices`` until the pool says stop; report as it goes."""
    import torch

    torch.set_num_threads(1)  # many small ClientApp calls; one core's share each
    emulator = Emulator(
        devices,
        address,
        client_app=load_client_app(client_app),
        root_certificates=root_certificates,
        policy=policy,
        threads=threads,
        seed=seed,
    )

    def report(done: bool = False) -> _Report:
        s = emulator.stats
        with s._lock:
            requests = dict(s.requests)
        return _Report(
            emulator.active, requests, s.messages, s.app_errors, s.request_errors,
            _cpu_seconds(), done,
        )  # fmt: skip

    emulator.start()
    try:
        while not conn.poll(REPORT_EVERY):
            conn.send(report())
    finally:
        emulator.stop()
        conn.send(report(done=True))
        conn.close()


@dataclass
class PoolStats:
    """The pool's processes' reports, summed (the fields of an ``EmulatorStats``)."""

    reports: list[_Report]

    @property
    def requests(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.reports:
            total.update(r.requests)
        return total

    @property
    def messages(self) -> int:
        return sum(r.messages for r in self.reports)

    @property
    def app_errors(self) -> int:
        return sum(r.app_errors for r in self.reports)

    @property
    def request_errors(self) -> int:
        return sum(r.request_errors for r in self.reports)

    @property
    def cpu(self) -> float:
        """CPU seconds of all the pool's processes since each started."""
        return sum(r.cpu for r in self.reports)


class EmulatorPool:
    """Serve ``devices`` from ``processes`` processes (``threads`` threads each).

    Use as a context manager, or :meth:`start` / :meth:`stop`. :attr:`active` and
    :attr:`stats` are as of the processes' last reports (every ~0.5 s).
    """

    def __init__(
        self,
        devices: Sequence[DeviceSpec],
        address: str,
        *,
        client_app: str,
        root_certificates: bytes | None,
        policy: PollPolicy = TUNED,
        processes: int = 2,
        threads: int = 8,
        seed: int = 0,
    ) -> None:
        load_client_app(client_app)  # a bad path fails here, not in every process
        self.shares = split_devices(devices, processes)
        self._args = (address, client_app, root_certificates, policy, threads)
        self._seed = seed
        self._reports = [_Report() for _ in self.shares]
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._readers: list[threading.Thread] = []

    @property
    def active(self) -> int:
        return sum(r.active for r in self._reports)

    @property
    def stats(self) -> PoolStats:
        return PoolStats(list(self._reports))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def __enter__(self) -> EmulatorPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ctx = mp.get_context("spawn")  # the caller may hold threads: no fork
        for i, share in enumerate(self.shares):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_serve_share,
                args=(share, *self._args, self._seed + i, theirs),
                name=f"emulator-{i}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            reader = threading.Thread(target=self._read, args=(i, ours), daemon=True)
            reader.start()
            self._procs.append(proc)
            self._conns.append(ours)
            self._readers.append(reader)

    def _read(self, i: int, conn: Connection) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                self._reports[i] = conn.recv()
                if self._reports[i].done:
                    return

    def stop(self) -> None:
        """Each process deactivates its devices and exits (killed after a timeout)."""
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send("stop")
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        for reader in self._readers:
            reader.join(5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self._readers = [], [], []


__all__ = ["EmulatorPool", "PoolStats", "load_client_app", "split_devices"]
