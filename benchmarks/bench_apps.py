"""A Flower user's own app on Flower's engine vs Pollinate's generic engine, side by side.

    python benchmarks/bench_apps.py                         # 10 users, 5 rounds, 3 repeats
    python benchmarks/bench_apps.py --users 20 --rounds 10 --repeats 5

The app: ``benchmarks/flower_default.py`` unchanged — quickstart-style, one Flower node per
user, Flower's plain ``FedAvg`` (here every user trains every round, ``--fraction 1``, so
every variant does the same work and ends with the same model). Variants:

- ``flower``: ``flwr.simulation.run_simulation`` with Flower's defaults (Ray, 2 CPUs per
  ClientApp);
- ``flower-1cpu``: the same with ``client_resources = {"num_cpus": 1}`` (as many ClientApps at
  once as the local backend runs);
- ``local``: ``pollinate.simulation.run_apps(server_app, client_app, num_nodes=N)``, the
  local backend;
- ``ray``: ``run_apps(..., backend="ray")``.

Each run is its own child process; its wall time is from launch to exit (imports, engine
start-up, rounds, shutdown). The variants take turns within each repeat, so a busy shared
machine slows them alike: compare the ratios. Writes ``benchmarks/results/apps.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ("flower", "flower-1cpu", "local", "ray")


def job_config(users: int, rounds: int, fraction: float) -> dict[str, Any]:
    return {
        "dataset": "synthetic",
        "num-users": users,
        "synthetic-alpha": 1.0,
        "synthetic-beta": 1.0,
        "seed": 0,
        "model": "mlp",
        "in-features": 60,
        "num-classes": 10,
        "hidden": 64,
        "epochs": 1,
        "batch-size": 32,
        "lr": 0.05,
        "fraction": fraction,
        "rounds": rounds,
    }


def child(variant: str, job: dict[str, Any], out: Path) -> None:
    """One run, in this (fresh) process; writes the final weights and round end times."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.path.insert(0, str(HERE))
    import logging

    import flower_default
    import torch

    round_ends: list[float] = []
    final: dict[str, Any] = {}
    server = flower_default.server_app(job, round_ends, final)
    users = int(job["num-users"])
    if variant.startswith("flower"):
        from flwr.simulation import run_simulation

        logging.getLogger("flwr").setLevel(logging.WARNING)
        resources = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
        run_simulation(
            server_app=server,
            client_app=flower_default.app,
            num_supernodes=users,
            **({"backend_config": resources} if variant == "flower-1cpu" else {}),  # type: ignore[arg-type]
        )
    else:
        from pollinate.simulation import run_apps

        run_apps(server, flower_default.app, num_nodes=users, backend=variant)
    torch.save(final["state_dict"], out / "weights.pt")
    (out / "rounds.json").write_text(json.dumps(round_ends))


def launch(variant: str, job: dict[str, Any], out: Path) -> float:
    """Wall seconds of one child run, launch to exit."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--job", json.dumps(job), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed: {done.stderr[-2000:]}")
    return wall


def max_weight_diff(a: Path, b: Path) -> float:
    import torch

    wa, wb = torch.load(a / "weights.pt"), torch.load(b / "weights.pt")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def report(walls: dict[str, list[float]], diffs: dict[str, float], args: argparse.Namespace) -> str:
    base = statistics.median(walls["flower"])
    lines = [
        f"{args.users} users (one node each), {args.rounds} rounds, fraction {args.fraction}, "
        f"{args.repeats} repeats, {os.cpu_count()} CPUs; wall s per whole process "
        f"(median [min-max]); speed-up = Flower default's median / this median",
        "",
        "| variant | wall s | speed-up vs `flower` | max abs weight diff vs `flower` |",
        "| --- | --- | --- | --- |",
    ]
    for variant, times in walls.items():
        med = statistics.median(times)
        lines.append(
            f"| {variant} | {med:.2f} [{min(times):.2f}-{max(times):.2f}] | {base / med:.2f}x "
            f"| {diffs.get(variant, 0.0):.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fraction", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.job), Path(args.out))
        return 0
    job = job_config(args.users, args.rounds, args.fraction)
    variants = args.variants.split(",")
    walls: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in variants:  # taking turns: contention hits every variant alike
                wall = launch(variant, job, Path(tmp) / f"{variant}-{repeat}")
                walls[variant].append(wall)
                print(f"repeat {repeat + 1} {variant}: {wall:.2f} s", flush=True)
        diffs = {v: max_weight_diff(Path(tmp) / f"{v}-0", Path(tmp) / "flower-0") for v in variants}
    text = report(walls, diffs, args)
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "apps.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
