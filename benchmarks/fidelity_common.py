"""Shared by the fidelity suites: run a Pollinate config once, reuse it when asked again.

Every suite describes its runs as flat Pollinate configs and runs them through the product
code: the Pollinate ServerApp and ClientApp, users hosted in cohorts. By default they run
in this process (``pollinate.simulation.inprocess``): the same apps without Ray's seconds
of start-up per run, which on a 2-core machine would cost more than the training in a
sweep of many small runs; ``tests/simulation`` checks that this gives the same weights
as Flower's simulation engine. ``--engine ray`` runs them on the engine instead.

A finished run is kept under ``runs/bench/<suite>/<name>`` (git-ignored) with its config;
asking for the same config again reuses it, so a suite can be interrupted and resumed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common import REPO, RESULTS

RUNS = REPO / "runs" / "bench"


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=("inprocess", "ray"),
        default="inprocess",
        help="run through Flower's simulation engine, or in this process (default)",
    )
    p.add_argument("--out", default=str(RESULTS), help="where the CSV/Markdown/PNG go")
    p.add_argument("--fresh", action="store_true", help="rerun even if a finished run exists")
    p.add_argument("--runs", default=str(RUNS), help="where the run folders are kept")


def run(
    suite: str,
    name: str,
    flat: dict[str, Any],
    *,
    engine: str = "inprocess",
    fresh: bool = False,
    runs: str | Path = RUNS,
) -> Path:
    """The run folder of ``flat`` (run.dir set here), running it unless already done."""
    import torch

    from pollinate import config
    from pollinate.server.metrics import read_run_info

    run_dir = Path(runs) / suite / name
    # Reruns replace an unfinished or outdated earlier attempt (its stamp file is kept).
    flat = {**flat, "run.dir": str(run_dir), "run.name": name, "run.overwrite": True}
    cfg = config.resolve(flat)
    stamp = run_dir / "bench-config.json"
    wanted = json.dumps(cfg.to_flat(), sort_keys=True)
    if not fresh and stamp.exists() and stamp.read_text() == wanted:
        try:
            if read_run_info(run_dir).get("status") == "finished":
                return run_dir
        except Exception:  # an unreadable earlier attempt: run again
            pass
    torch.set_num_threads(1)  # what a Ray actor with one CPU gets
    started = time.perf_counter()
    if engine == "ray":
        from pollinate.simulation.engine import run_simulation

        run_simulation(cfg)
    else:
        from pollinate.simulation.inprocess import run_in_process

        quiet()
        run_in_process(cfg)
    stamp.write_text(wanted)
    print(f"  ran {suite}/{name} in {time.perf_counter() - started:.1f} s", flush=True)
    return run_dir


def quiet() -> None:
    """Flower logs every round at INFO; the suites print their own progress."""
    import logging

    import flwr.app  # noqa: F401  (importing Flower sets its logger's level: set it after)

    logging.getLogger("flwr").setLevel(logging.WARNING)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    import statistics

    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(values: Iterable[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return "-" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}"
