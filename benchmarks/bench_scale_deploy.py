"""The server side of a deployment at 10 / 100 / 1,000 devices: stock Flower vs Pollinate.

    python benchmarks/bench_scale_deploy.py                          # 10 and 100 devices, 5 rounds
    python benchmarks/bench_scale_deploy.py --devices 10,100,1000 --rounds 5,5,2
    python benchmarks/bench_scale_deploy.py --devices 100 --paths tuned --profile out.svg
    python benchmarks/bench_scale_deploy.py --devices 10,100,1000 --rounds 2 --paths tuned \
        --repeat 3

Devices are emulated (:mod:`pollinate.deploy.emulator`), split over
``--emulator-processes`` processes (:mod:`pollinate.deploy.emulator_pool`; default one per
CPU; their CPU is summed). Each device identity has its own ECDSA node key (registered
with the SuperLink, every request signed), its own TLS connection and its own data file
(40 rows of sklearn's digits). Both
paths run TLS + node authentication, the SuperLink's state in memory (stock Flower's
default; ``pollinate server start --memory-state``), the same Pollinate strategy and
ClientApp, and the same job: logistic regression 64 -> 10, FedAvg, every device every
round (``strategy.fraction-train = 1``), no personalization, ``--rounds`` rounds.

- ``stock``: Flower's own ``flower_superlink()`` (only an ASGI counter of requests added),
  the ServerApp on Flower's stock ``HttpGrid`` (3 s reply poll), devices speaking as a
  stock ``flower-supernode`` does (3 s idle poll, GetRun + GetFab per run, 30 s heartbeat);
- ``tuned``: ``pollinate server start --memory-state`` (Pollinate's SuperLink launcher, its
  responsive grid), devices with the tuned poll (:data:`pollinate.deploy.emulator.TUNED`).

Measured over the run, from the moment all devices are active until the run's status is
``finished`` (so SuperLink start-up and node activation are outside it; the initial user
query and the last evaluation are inside): the SuperLink process's CPU time (psutil, user +
system, its children excluded), the ServerApp process's CPU time, the SuperLink's HTTP
requests (Fleet = devices, other = the ServerApp's Runtime API) and the wall time.
"Device-round" = devices x rounds. Everything runs on this machine: the emulator's own CPU
competes with the server's, so wall times are upper bounds; CPU times are per process.

``--repeat N`` runs every scale N times, the scales in turn (10, 100, 1,000, 10, ...), so
that a slow spell of a shared machine falls on all of them, and the flatness verdict
compares each scale's median. At 10 devices the window is 1-3 s and one run's figure
swings by a quarter; a verdict from one run per scale is mostly that noise.

``--profile FILE``: record the SuperLink with py-spy (``pip install py-spy``) during the
tuned run (``--profile emulator=FILE``: the first emulator process instead) and write a
flame graph (``.svg``), speedscope JSON (``.json``) or collapsed stacks
(``.txt``, one ``frame;frame;... count`` line per stack: ``profile_summary.py`` reads it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}
REQUESTS_LINE = re.compile(r"pollinate: requests total=(\d+)(.*)")
HANDSHAKES_LINE = re.compile(r"pollinate: tls handshakes=(\d+)")


def job_config(root: Path, name: str, rounds: int, devices: int) -> Path:
    # Timeouts grow with the devices: on a shared 2-core machine 1,000 devices take minutes
    # per exchange (the emulator's CPU and the server's share the cores).
    path = root / f"{name}.toml"
    path.write_text(
        f"""[run]
name = "{name}"
num-rounds = {rounds}
dir = "{root / "run"}"
[model]
name = "logreg"
in-features = 64
num-classes = 10
[train]
epochs = 1
batch-size = 10
[strategy]
min-nodes = {devices}
fraction-train = 1.0
fraction-evaluate = 1.0
[personalization]
method = "none"
[store]
save-models = "final-round"
[server]
node-wait-timeout = {600.0 + 1.2 * devices}
round-timeout = {900.0 + 1.5 * devices}
"""
    )
    return path


# ---------------------------------------------------------------------- measurement


@dataclass
class Sampler:
    """CPU time of the SuperLink and the ServerApp, and the SuperLink's peak resident
    memory, sampled until stopped (they exit)."""

    root_pid: int
    cpu: dict[str, float] = field(default_factory=dict)
    superlink_rss: int = 0  # bytes, the peak seen
    pids: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._loop, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.2)

    def sample(self) -> dict[str, float]:
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return dict(self.cpu)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(proc.cmdline())
                role = (
                    "superlink"
                    if ("superlink" in cmd and "serverapp" not in cmd and "superexec" not in cmd)
                    else "serverapp"
                    if "flwr-serverapp" in cmd
                    else None
                )
                if role is None:
                    continue
                t = proc.cpu_times()
                self.cpu[role] = t.user + t.system
                if role == "superlink":
                    self.superlink_rss = max(self.superlink_rss, proc.memory_info().rss)
                self.pids[role] = proc.pid
        return dict(self.cpu)


def request_counts(log: Path) -> tuple[int, int]:
    """(fleet, other) requests in the SuperLink's last ``pollinate: requests`` line."""
    lines = REQUESTS_LINE.findall(log.read_text(errors="replace")) if log.is_file() else []
    if not lines:
        return 0, 0
    total, rest = lines[-1]
    fleet = sum(int(n) for path, n in re.findall(r"(\S+)=(\d+)", rest) if "/fleet/" in path)
    return fleet, int(total) - fleet


def handshake_count(log: Path) -> int:
    """TLS handshakes in the SuperLink's last count (-1: it prints none, as stock's)."""
    lines = HANDSHAKES_LINE.findall(log.read_text(errors="replace")) if log.is_file() else []
    return int(lines[-1]) if lines else -1


def run_status(run_dir: Path) -> str:
    db = run_dir / "metrics.db"
    if not db.is_file():
        return ""
    with contextlib.suppress(sqlite3.Error), sqlite3.connect(db, timeout=1) as conn:
        return str(dict(conn.execute("SELECT key, value FROM run").fetchall()).get("status", ""))
    return ""


def rounds_done(run_dir: Path) -> int:
    with sqlite3.connect(run_dir / "metrics.db") as conn:
        return int(conn.execute("SELECT count(*) FROM rounds WHERE round >= 1").fetchone()[0])


@dataclass
class Result:
    path: str
    devices: int
    rounds: int
    wall: float
    superlink_cpu: float
    serverapp_cpu: float
    fleet_requests: int
    other_requests: int
    emulator_requests: int
    finished_rounds: int
    by_rpc: dict[str, int]
    exchanges: int  # device-side ClientApp calls (query, train, evaluate) in the window
    emulator_cpu: float
    handshakes: int  # new TLS connections the SuperLink accepted in the window (-1: unknown)
    superlink_rss: int  # bytes, peak over the whole run

    @property
    def device_rounds(self) -> int:
        return self.devices * self.rounds


# ---------------------------------------------------------------------- the two paths


def start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    from pollinate.deploy.emulator import wait_until

    if not wait_until(check, timeout):
        tail = log.read_text(errors="replace")[-3000:] if log and log.is_file() else ""
        raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


STOCK_SERVERAPP = """
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pollinate.config import resolve
from pollinate.server.app import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, resolve(dict(context.run_config)))  # Flower's own HttpGrid
"""


def launch_stock(root: Path, cfg: Path, port: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Flower's SuperLink (TLS, node auth, in-memory state) and the run submitted to it."""
    from pollinate.deploy.appdir import pyproject_text
    from pollinate.deploy.certs import create_certs

    certs = root / "certs"
    create_certs(certs)
    app = root / "stockapp" / "pollinate"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        pyproject_text().replace("pollinate.server.app:app", "stock_serverapp:app")
    )
    (root / "stockapp" / "stock_serverapp.py").write_text(STOCK_SERVERAPP)
    flwr_home = root / "flwr"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "s"\n[superlink.s]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n'
    )
    env = {
        **ENV,
        "FLWR_HOME": str(flwr_home),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(root / "stockapp"), os.environ.get("PYTHONPATH", "")) if p
        ),
        "POLLINATE_REQUEST_STATS": "1",
    }
    log = root / "superlink.log"
    link = start(
        [
            sys.executable, __file__, "--stock-superlink",
            "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        ],
        log,
        env,
    )  # fmt: skip
    from pollinate.deploy.proc import port_in_use

    wait_for(lambda: port_in_use("127.0.0.1", port), 60, "the stock SuperLink", log)
    subprocess.run(
        ["flwr", "run", str(app), "s", "--run-config", str(cfg)],
        env=env,
        check=True,
        capture_output=True,
    )
    return link, log, flwr_home


def launch_tuned(root: Path, cfg: Path, port: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``pollinate server start --memory-state`` (TLS + node auth)."""
    from pollinate.deploy.certs import create_certs

    state = root / "server"
    create_certs(state / "certs")
    env = {**ENV, "POLLINATE_HOME": str(root / "home"), "POLLINATE_REQUEST_STATS": "1"}
    out = root / "server.log"
    server = start(
        [
            sys.executable, "-m", "pollinate", "server", "start", "--config", str(cfg),
            "--address", f"127.0.0.1:{port}", "--state-dir", str(state),
            "--run-dir", str(root / "run"), "--memory-state",
        ],
        out,
        env,
    )  # fmt: skip
    wait_for(lambda: "waiting up to" in out.read_text(errors="replace"), 120, "the server", out)
    return server, state / "logs" / "superlink.log", state / "flwr"


def run_path(
    path: str, root: Path, devices: int, rounds: int, threads: int, processes: int, profile: str
) -> Result:
    from pollinate.deploy.emulator import POLICIES, device_specs, register_devices
    from pollinate.deploy.emulator_pool import EmulatorPool
    from pollinate.deploy.proc import free_port

    root.mkdir(parents=True)
    specs = device_specs(root, devices, keys=True)
    cfg = job_config(root, "scale", rounds, devices)
    port = free_port()
    launch = launch_stock if path == "stock" else launch_tuned
    proc, link_log, flwr_home = launch(root, cfg, port)
    sampler = Sampler(proc.pid)
    sampler.start()
    spy: subprocess.Popen[bytes] | None = None
    try:
        register_devices(flwr_home, "s" if path == "stock" else "pollinate", specs)
        ca = (root / ("certs" if path == "stock" else "server/certs") / "ca.crt").read_bytes()
        emulator = EmulatorPool(
            specs,
            f"127.0.0.1:{port}",
            client_app="pollinate.client.app:app",
            root_certificates=ca,
            policy=POLICIES[path],
            processes=processes,
            threads=threads,
        )
        with emulator:
            wait_for(lambda: emulator.active == devices, 600, f"{devices} devices active")
            t0, cpu0 = time.monotonic(), sampler.sample()
            req0, tls0 = request_counts(link_log), handshake_count(link_log)
            emu0 = emulator.stats.requests
            msg0, me0 = emulator.stats.messages, emulator.stats.cpu
            target, _, out = profile.rpartition("=") if "=" in profile else ("", "", profile)
            pid = emulator.pids[0] if target == "emulator" else sampler.pids.get("superlink")
            if out and path == "tuned" and pid:
                spy = subprocess.Popen(
                    ["py-spy", "record", "-p", str(pid), "-o", out,
                     "-r", "50", *PROFILE_FORMATS.get(Path(out).suffix, [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                )  # fmt: skip
            wait_for(
                lambda: run_status(root / "run") in ("finished", "failed"),
                3600,
                "the run to finish",
                link_log,
            )
            cpu1 = sampler.sample()
            wall = time.monotonic() - t0
            time.sleep(STATS_SETTLE)
            req1, tls1 = request_counts(link_log), handshake_count(link_log)
            emu1 = emulator.stats.requests
            msg1, me1 = emulator.stats.messages, emulator.stats.cpu
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(120)
    finally:
        sampler.stop()
        stop(proc)
    return Result(
        path=path,
        devices=devices,
        rounds=rounds,
        wall=wall,
        superlink_cpu=cpu1.get("superlink", 0) - cpu0.get("superlink", 0),
        serverapp_cpu=cpu1.get("serverapp", 0) - cpu0.get("serverapp", 0),
        fleet_requests=req1[0] - req0[0],
        other_requests=req1[1] - req0[1],
        emulator_requests=sum((emu1 - emu0).values()),
        finished_rounds=rounds_done(root / "run"),
        by_rpc=dict(emu1 - emu0),
        exchanges=msg1 - msg0,
        emulator_cpu=me1 - me0,
        handshakes=tls1 - tls0 if min(tls0, tls1) >= 0 else -1,
        superlink_rss=sampler.superlink_rss,
    )


PROFILE_FORMATS = {".json": ["-f", "speedscope"], ".txt": ["-f", "raw"]}  # else a flame graph
STATS_SETTLE = 1.2  # the SuperLink prints its request counts once a second


def report(results: list[Result]) -> None:
    print(
        f"\n{'path':<7}{'devices':>8}{'rounds':>7}{'wall s':>8}{'SL cpu s':>9}"
        f"{'SL ms/dr':>9}{'app ms/dr':>10}{'fleet/dr':>9}{'other/dr':>9}{'s/round':>8}"
        f"{'SL ms/ex':>9}{'req/ex':>7}{'emu ms/ex':>10}{'TLS/ex':>7}{'SL MiB':>7}"
    )
    for r in results:
        dr, ex = r.device_rounds, max(1, r.exchanges)
        print(
            f"{r.path:<7}{r.devices:>8}{r.finished_rounds:>7}{r.wall:>8.1f}"
            f"{r.superlink_cpu:>9.2f}{1000 * r.superlink_cpu / dr:>9.2f}"
            f"{1000 * r.serverapp_cpu / dr:>10.2f}{r.fleet_requests / dr:>9.1f}"
            f"{r.other_requests / dr:>9.2f}{r.wall / r.rounds:>8.2f}"
            f"{1000 * r.superlink_cpu / ex:>9.2f}{(r.fleet_requests + r.other_requests) / ex:>7.1f}"
            f"{1000 * r.emulator_cpu / ex:>10.2f}"
            f"{(f'{r.handshakes / ex:.2f}' if r.handshakes >= 0 else '-'):>7}"
            f"{r.superlink_rss / 2**20:>7.0f}"
        )
    for r in results:
        rpcs = ", ".join(
            f"{name} {n / r.device_rounds:.1f}" for name, n in sorted(r.by_rpc.items())
        )
        print(f"{r.path} {r.devices}: device requests per device-round: {rpcs}")
    print(
        "dr = device-round (devices x rounds); ex = exchange (one message to a device and its "
        "reply: the user query, each round's train, the last evaluation); SL = SuperLink "
        "process; app = ServerApp process; emu = the emulator (all devices' side); TLS = new TLS "
        "connections the SuperLink accepted; SL MiB = its peak resident memory"
    )
    for path in ("stock", "tuned"):
        runs: dict[int, list[float]] = {}
        for r in results:
            if r.path == path:
                runs.setdefault(r.devices, []).append(r.superlink_cpu / max(1, r.exchanges))
        if len(runs) > 1:
            medians = {n: statistics.median(per) for n, per in runs.items()}
            for n, per in sorted(runs.items()):
                listed = " / ".join(f"{1000 * x:.1f}" for x in per)
                print(f"{path} {n}: SuperLink CPU ms per exchange {listed}, median "
                      f"{1000 * medians[n]:.1f}")  # fmt: skip
            spread = max(medians.values()) / min(medians.values())
            verdict = "flat (within 1.5x)" if spread <= 1.5 else "NOT flat (over 1.5x)"
            what = "max/min" if max(map(len, runs.values())) == 1 else "max/min of the medians"
            print(f"{path}: SuperLink CPU per exchange {what} = {spread:.2f}x, {verdict}")
    by = {(r.path, r.devices): r for r in results}
    for (path, n), r in sorted(by.items()):
        if path == "tuned" and ("stock", n) in by:
            s = by[("stock", n)]
            cpu = (r.superlink_cpu / r.device_rounds) / (s.superlink_cpu / s.device_rounds)
            reqs = (r.fleet_requests + r.other_requests) / r.device_rounds
            stock_reqs = (s.fleet_requests + s.other_requests) / s.device_rounds
            wall = (r.wall / r.rounds) / (s.wall / s.rounds)
            print(
                f"{n} devices, tuned/stock per device-round: SuperLink CPU {cpu:.2f}x, "
                f"requests {reqs / stock_reqs:.2f}x; wall per round {wall:.2f}x"
            )


def stock_superlink(argv: list[str]) -> None:
    """Flower's ``flower_superlink()`` with only a request counter (for this benchmark)."""
    import flwr.superlink.main as superlink_main

    from pollinate.deploy import superlink as ours

    ours._print_request_stats()
    create_app = superlink_main.create_app

    def counted(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)

        async def count(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http" and ours._requests is not None:
                ours._requests[scope["path"]] = ours._requests.get(scope["path"], 0) + 1
            await app(scope, receive, send)

        return count

    superlink_main.create_app = counted
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *argv]
    flower_superlink()


def main() -> None:
    if sys.argv[1:2] == ["--stock-superlink"]:
        stock_superlink(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="10,100", help="comma-separated device counts")
    parser.add_argument("--rounds", default="5", help="rounds, one for all or one per count")
    parser.add_argument("--paths", default="stock,tuned")
    parser.add_argument("--threads", type=int, default=8, help="threads per emulator process")
    parser.add_argument(
        "--emulator-processes",
        type=int,
        default=os.cpu_count() or 1,
        help="processes the devices are split over (default: one per CPU)",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="py-spy output for the tuned SuperLink (FILE), or its first emulator process "
        "(emulator=FILE)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per scale and path, the scales in turn; the verdict compares medians",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.devices.split(",")]
    rounds = [int(r) for r in args.rounds.split(",")]
    rounds = rounds * len(counts) if len(rounds) == 1 else rounds
    import torch

    torch.set_num_threads(1)
    print(f"{os.cpu_count()} CPUs; devices {counts}, rounds {rounds}, paths {args.paths}")
    results = []
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for rep in range(args.repeat):
            for n, r in zip(counts, rounds, strict=True):
                for path in args.paths.split(","):
                    res = run_path(
                        path,
                        Path(tmp) / f"{path}-{n}-{rep}",
                        n,
                        r,
                        args.threads,
                        args.emulator_processes,
                        args.profile,
                    )
                    results.append(res)
                    report([res])
    report(results)


if __name__ == "__main__":
    main()
