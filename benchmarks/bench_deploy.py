"""A deployed round on loopback vs the same round in simulation (issue 3's speed target).

    python benchmarks/bench_deploy.py                  # ~2 min: 3 devices, 8 rounds, both ways
    python benchmarks/bench_deploy.py --rounds 4       # quicker
    python benchmarks/bench_deploy.py --stock          # also Flower's stock SuperNode/grid
    python benchmarks/bench_deploy.py --insecure       # also without TLS / node auth

The job, identical both ways: 3 users (sklearn digits, 200 rows each, one CSV per device),
a 64-64-10 MLP, FedAvg + fine-tuned personal models, ``--rounds`` rounds. A round is one
``train`` and one ``evaluate`` exchange with every device; its time is ``round_seconds``
from the run's own ``metrics.db`` (from configuring training to the end of evaluation), so
both sides are timed by the same code. Round 1 carries one-off costs (the devices load
their data, Ray warms its actors), so the figure compared is the median of rounds 2..R.

- ``simulation``: ``pollinate run`` (Flower's simulation engine, 3 nodes, one user each).
- ``deployed``: ``pollinate server start`` (TLS + node authentication) and three
  ``pollinate node start`` (SuperNode + warm ClientApp worker, serving off) on 127.0.0.1.
- ``insecure`` (``--insecure``): the same without TLS and node authentication.
- ``memory`` (``--memory-state``): deployed (TLS) with the SuperLink's state in memory
  instead of its SQLite database (``server start --memory-state``).
- ``stock`` (``--stock``): the deployment as plain Flower would run it — ``flower-supernode``
  with its default per-message ``flwr-clientapp`` process and the ServerApp's stock
  ``HttpGrid`` (3 s reply poll), everything else the same.

Both ways a round is one exchange with every device once the run is going (the strategy
folds round r+1's training into round r's evaluation; round 1 adds the first training).
For the deployed runs the table also gives the SuperLink's HTTP requests per round (all
requests of the run over its rounds, start-up included): a request costs ~3-4 ms of the
SuperLink's CPU and ~10-20 ms of latency, which is what a small model's round is made of.

Target: deployed <= 2 x simulation per round. Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}


def write_devices(root: Path, num: int, rows: int) -> list[Path]:
    """The devices' files, plus all of them in one file for the simulation baseline."""
    import pandas as pd

    from pollinate.data.examples import write_digits_user_files

    paths = write_digits_user_files(root, num, rows)
    pd.concat([pd.read_csv(p, dtype={"user": str}) for p in paths]).to_csv(
        root / "all.csv", index=False
    )
    return paths


def config(root: Path, name: str, rounds: int, num: int, simulated: bool) -> Path:
    text = f"""
[run]
name = "{name}"
num-rounds = {rounds}
[model]
name = "mlp"
in-features = 64
num-classes = 10
[strategy]
min-nodes = {num}
[server]
node-wait-timeout = 120.0
round-timeout = 300.0
"""
    if simulated:
        text += f'[data]\ndataset = "file"\npath = "{root / "all.csv"}"\n'
        text += f"[simulation]\nnum-nodes = {num}\n"
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


def round_seconds(run_dir: Path) -> list[float]:
    with sqlite3.connect(run_dir / "metrics.db") as db:
        rows = db.execute("SELECT round, round_seconds FROM rounds ORDER BY round").fetchall()
    return [float(s) for r, s in rows if r >= 1]


def pollinate(*argv: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "pollinate", *argv],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env or ENV,
        start_new_session=True,
    )


def wait_for(log: Path, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text(errors="replace")):
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {pattern!r} in {log}:\n{log.read_text()[-2000:]}")


def run_simulation(root: Path, rounds: int, num: int) -> tuple[list[float], float]:
    cfg = config(root, "sim", rounds, num, simulated=True)
    start = time.monotonic()
    proc = pollinate("run", str(cfg), "--run-dir", str(root / "sim"), log=root / "sim.log")
    if proc.wait() != 0:
        raise SystemExit((root / "sim.log").read_text()[-3000:])
    return round_seconds(root / "sim"), time.monotonic() - start


def run_deployed(
    root: Path, rounds: int, num: int, insecure: bool = False, memory_state: bool = False
) -> tuple[list[float], float]:
    from pollinate.deploy.certs import create_certs, create_node_key
    from pollinate.deploy.proc import free_port

    root = root / (("insecure" if insecure else "secure") + ("-memory" if memory_state else ""))
    root.mkdir()
    for csv in root.parent.glob("device*.csv"):
        (root / csv.name).symlink_to(csv)
    env = {**ENV, "POLLINATE_HOME": str(root / "home"), "POLLINATE_REQUEST_STATS": "1"}
    state = root / "server"
    create_certs(state / "certs")
    keys = [create_node_key(root / "keys", f"device{i}") for i in range(num)]
    port = free_port()
    cfg = config(root, "dep", rounds, num, simulated=False)
    for key in keys:
        subprocess.run(
            [sys.executable, "-m", "pollinate", "server", "register-node", str(key.public),
             "--state-dir", str(state)],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
    start = time.monotonic()
    server = pollinate(
        "server", "start", "--config", str(cfg), "--address", f"127.0.0.1:{port}",
        "--state-dir", str(state), "--run-dir", str(root / "dep"),
        *(["--insecure"] if insecure else []),
        *(["--memory-state"] if memory_state else []), log=root / "server.log", env=env,
    )  # fmt: skip
    nodes = []
    try:
        wait_for(root / "server.log", r"run \d+ 'dep'", 60)
        for i, key in enumerate(keys):
            argv = [
                "node", "start", "--server", f"127.0.0.1:{port}",
                "--data", str(root / f"device{i}.csv"),
                "--state-dir", str(root / f"node{i}"), "--serve", "none",
                "--threads", "1",  # as the simulation gives each node one CPU
            ]  # fmt: skip
            if insecure:
                argv.append("--insecure")
            else:
                argv += ["--key", str(key.private), "--root-cert", str(state / "certs" / "ca.crt")]
            nodes.append(pollinate(*argv, log=root / f"node{i}.log", env=env))
        if server.wait(600) != 0:
            raise SystemExit((root / "server.log").read_text()[-3000:])
        total = time.monotonic() - start
    finally:
        for proc in [*nodes, server]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*nodes, server]:
            proc.wait(60)
    REQUESTS[root.name] = superlink_requests(state / "logs" / "superlink.log")
    return round_seconds(root / "dep"), total


# SuperLink requests of each deployed run ("secure", "insecure"), from its log.
REQUESTS: dict[str, int] = {}


def superlink_requests(log: Path) -> int:
    """The last request count the SuperLink printed (POLLINATE_REQUEST_STATS)."""
    counts = re.findall(r"pollinate: requests total=(\d+)", log.read_text(errors="replace"))
    return int(counts[-1]) if counts else 0


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


def run_stock(root: Path, rounds: int, num: int) -> tuple[list[float], float]:
    """Plain Flower: stock SuperLink grid and SuperNodes (a ClientApp process per message)."""
    from pollinate.deploy.appdir import pyproject_text
    from pollinate.deploy.proc import free_port

    app = root / "stockapp" / "pollinate"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        pyproject_text().replace("pollinate.server.app:app", "stock_serverapp:app")
    )
    (root / "stockapp" / "stock_serverapp.py").write_text(STOCK_SERVERAPP)
    flwr_home = root / "stockflwr"
    flwr_home.mkdir()
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "s"\n[superlink.s]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = {
        **ENV,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONPATH": str(root / "stockapp"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cfg = config(root, "stock", rounds, num, simulated=False)
    cfg.write_text(cfg.read_text().replace("[run]", f'[run]\ndir = "{root / "stock"}"'))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    link = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port)]
    procs = [subprocess.Popen(link, env=env, start_new_session=True, **quiet)]  # type: ignore[call-overload]
    try:
        time.sleep(3)
        for i in range(num):
            node_cfg = f"data-file='{root / f'device{i}.csv'}' model-dir='{root / f'stock{i}'}'"
            node = [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(free_port()), "--node-config", node_cfg,
            ]  # fmt: skip
            procs.append(subprocess.Popen(node, env=env, start_new_session=True, **quiet))  # type: ignore[call-overload]
        start = time.monotonic()
        subprocess.run(
            ["flwr", "run", str(app), "s", "--run-config", str(cfg)], env=env, check=True,
            capture_output=True,
        )  # fmt: skip
        db = root / "stock" / "metrics.db"
        while True:
            time.sleep(0.5)
            if db.is_file():
                with sqlite3.connect(db) as conn:
                    status = dict(conn.execute("SELECT key, value FROM run").fetchall())
                if status.get("status") in ("finished", "failed"):
                    break
            if time.monotonic() - start > 900:
                raise SystemExit("stock run did not finish in 15 min")
        total = time.monotonic() - start
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
    return round_seconds(root / "stock"), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200, help="rows per device")
    parser.add_argument("--stock", action="store_true", help="also plain Flower (slow)")
    parser.add_argument(
        "--memory-state",
        action="store_true",
        help="also deployed with the SuperLink's state in memory (server start --memory-state)",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="also deployed without TLS and node auth"
    )
    args = parser.parse_args()
    print(f"{args.devices} devices x {args.rows} rows, mlp 64-64-10, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        root = Path(tmp)
        write_devices(root, args.devices, args.rows)
        results["simulation"] = run_simulation(root, args.rounds, args.devices)
        results["deployed"] = run_deployed(root, args.rounds, args.devices)
        if args.memory_state:
            results["memory"] = run_deployed(root, args.rounds, args.devices, memory_state=True)
        if args.insecure:
            results["insecure"] = run_deployed(root, args.rounds, args.devices, insecure=True)
        if args.stock:
            results["stock"] = run_stock(root, args.rounds, args.devices)

    print(f"\n{'':<12}{'round 1 s':>10}{'median 2..R s':>15}{'max 2..R s':>12}{'run s':>8}")
    for name, (rounds, total) in results.items():
        rest = rounds[1:] or rounds
        print(
            f"{name:<12}{rounds[0]:>10.2f}{statistics.median(rest):>15.3f}"
            f"{max(rest):>12.3f}{total:>8.1f}"
        )
    for name, runs in (
        ("deployed", "secure"),
        ("memory", "secure-memory"),
        ("insecure", "insecure"),
    ):
        if runs in REQUESTS:
            per_round = REQUESTS[runs] / args.rounds
            print(f"{name}: {REQUESTS[runs]} SuperLink requests, {per_round:.0f} per round")
    sim = statistics.median(results["simulation"][0][1:])
    dep = statistics.median(results["deployed"][0][1:])
    verdict = "meets" if dep <= 2 * sim else "misses"
    print(f"\ndeployed / simulation per round: {dep / sim:.2f}x ({verdict} the 2x target)")
    print("round = train + evaluate with every device; 'run s' = submit to finish, incl. start-up")


if __name__ == "__main__":
    main()
