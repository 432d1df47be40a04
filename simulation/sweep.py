"""``pollinate sweep``: a grid of runs x seeds, each in its own folder, then one table.

A sweep is the cartesian product of ``--grid key=v1,v2`` axes, each point run with
``--seeds N`` seeds (``run.seed`` + 0..N-1). Every run is a plain ``pollinate run`` in a
subprocess, with its own folder ``<sweep dir>/<label>`` (the label names the varied keys:
``lr=0.1_name=fedprox_seed=0``) and its log next to it in ``<sweep dir>/logs/``. With
``--parallel K`` K runs go at once, each pinned to its share of this machine's cores (so K
runs do not each start a worker per core). The whole grid is validated before anything
runs: an unknown key or a bad value is one line.

At the end ``sweep.csv`` (one row per grid point: mean and std over seeds of the final
global, personal and central accuracy) and ``runs.csv`` (one row per run) are written to
the sweep folder and the table is printed.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pollinate import config
from pollinate.config import ConfigError, RunConfig, data_spec
from pollinate.server.metrics import MetricsError, read_rounds
from pollinate.server.tables import format_table
from pollinate.simulation.engine import count_users

# Keys the sweep sets itself for every run.
RESERVED = {"run.dir": "each run's folder", "run.name": "each run's name"}
# What the comparison table reports: column in metrics.db -> table name.
FINAL_METRICS = {
    "global_accuracy": "global_acc",
    "personal_accuracy": "personal_acc",
    "server_accuracy": "central_acc",
}
POLL = 0.2
STOP_GRACE = 15.0  # seconds a run gets to stop after Ctrl-C before it is killed


class SweepError(ConfigError):
    """A bad ``--grid`` / ``--seeds`` / ``--parallel``; one line, exit 2."""


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[str, ...]  # as typed; each is parsed as a TOML value like --set does


@dataclass
class SweepRun:
    label: str
    point: dict[str, str]  # grid key -> value as typed
    seed: int
    run_dir: Path
    overrides: list[str]
    status: str = "pending"  # pending | running | finished | failed
    seconds: float = math.nan
    final: dict[str, float] = field(default_factory=dict)


def parse_grid(items: Sequence[str]) -> list[Axis]:
    """``["train.lr=0.1,0.01", ...]`` -> axes; every mistake is a :class:`SweepError`."""
    axes: list[Axis] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = tuple(v.strip() for v in raw.split(","))
        if not sep or not key or not raw.strip() or any(v == "" for v in values):
            raise SweepError(
                f"--grid '{item}' must look like key=value1,value2 (e.g. train.lr=0.1,0.01)"
            )
        if key in RESERVED:
            raise SweepError(f"--grid {key}: the sweep sets {RESERVED[key]}; vary another key")
        if any(a.key == key for a in axes):
            raise SweepError(f"--grid {key} is given twice; list all its values in one --grid")
        if len(set(values)) != len(values):
            raise SweepError(f"--grid '{item}' repeats a value")
        axes.append(Axis(key, values))
    if not axes:
        raise SweepError("give at least one --grid key=value1,value2")
    return axes


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """``train.lr`` -> ``lr`` where the last part is unique among the keys, else the key."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {
        k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves, strict=True)
    }


def _safe(text: str) -> str:
    # Folder names: keep letters, digits and . - + ; the rest (quotes, slashes) becomes '-'.
    return "".join(c if c.isalnum() or c in ".-+" else "-" for c in text.strip("\"'"))


def plan_sweep(
    config_path: str | Path,
    axes: Sequence[Axis],
    *,
    seeds: int = 1,
    sets: Sequence[str] = (),
    out_dir: Path,
    name: str,
) -> list[SweepRun]:
    """Every run of the sweep, each config validated (raises before anything runs)."""
    if seeds < 1:
        raise SweepError(f"--seeds must be >= 1, got {seeds}")
    if seeds > 1 and any(a.key == "run.seed" for a in axes):
        raise SweepError("--grid run.seed and --seeds > 1 both set the seed; use one of them")
    base = config.load(config_path, list(sets))
    short = _short_names([a.key for a in axes])
    runs: list[SweepRun] = []
    for values in itertools.product(*(a.values for a in axes)):
        point = {a.key: v for a, v in zip(axes, values, strict=True)}
        for i in range(seeds):
            seed = base.run.seed + i
            parts = [f"{short[k]}={_safe(v)}" for k, v in point.items()]
            if "run.seed" not in point:
                parts.append(f"seed={seed}")
            label = "_".join(parts)
            run_dir = out_dir / label
            overrides = [
                *sets,
                *(f"{k}={v}" for k, v in point.items()),
                *([] if "run.seed" in point else [f"run.seed={seed}"]),
                f'run.name="{name}-{label}"',
                f'run.dir="{run_dir}"',
                "run.overwrite=true",  # the sweep's own folders: a rerun replaces them
            ]
            if not base.tracking.mlflow_experiment:  # one MLflow experiment per sweep
                overrides.append(f'tracking.mlflow-experiment="{name}"')
            cfg = config.load(config_path, overrides)  # an unknown key / bad value: here
            runs.append(SweepRun(label, point, cfg.run.seed, cfg.run_dir, overrides))
    _check_data(config_path, runs)
    return runs


def _check_data(config_path: str | Path, runs: Sequence[SweepRun]) -> None:
    """Load each distinct dataset once, so a data error stops the sweep before it starts."""
    seen: set[object] = set()
    for run in runs:
        cfg: RunConfig = config.load(config_path, run.overrides)
        spec = data_spec(cfg)
        if spec not in seen:
            seen.add(spec)
            count_users(cfg)


def core_shares(parallel: int, cpus: Sequence[int] | None = None) -> list[list[int]]:
    """This process's cores split into ``parallel`` shares (a core each at least)."""
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        return [[] for _ in range(parallel)]
    if parallel >= len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(parallel)]
    size = len(cpus) // parallel
    return [list(cpus[i * size : (i + 1) * size]) for i in range(parallel)]


def _command(config_path: str | Path, run: SweepRun) -> list[str]:
    argv = [sys.executable, "-m", "pollinate", "run", str(config_path)]
    for item in run.overrides:
        argv += ["--set", item]
    return argv


def run_sweep(
    config_path: str | Path,
    runs: list[SweepRun],
    *,
    parallel: int = 1,
    echo: Callable[[str], None] = print,
) -> list[SweepRun]:
    """Run every run, ``parallel`` at a time; returns them with status, time and results."""
    if parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {parallel}")
    logs = runs[0].run_dir.parent / "logs" if runs else Path("logs")
    logs.mkdir(parents=True, exist_ok=True)
    shares = core_shares(parallel)
    free = list(range(parallel))
    pending = list(runs)
    active: dict[int, tuple[SweepRun, subprocess.Popen[bytes], float]] = {}
    done = 0
    try:
        while pending or active:
            while pending and free:
                run, slot = pending.pop(0), free.pop(0)
                active[slot] = (run, _start(config_path, run, logs, shares[slot]), time.monotonic())
                run.status = "running"
            for slot, (run, proc, started) in list(active.items()):
                code = proc.poll()
                if code is None:
                    continue
                del active[slot]
                free.append(slot)
                done += 1
                run.seconds = time.monotonic() - started
                run.status = "finished" if code == 0 else "failed"
                run.final = final_metrics(run.run_dir) if code == 0 else {}
                echo(_progress_line(done, len(runs), run, logs))
            time.sleep(POLL)
    except KeyboardInterrupt:
        _stop_all([proc for _, proc, _ in active.values()])
        raise
    return runs


def _start(
    config_path: str | Path, run: SweepRun, logs: Path, cores: list[int]
) -> subprocess.Popen[bytes]:
    log = (logs / f"{run.label}.log").open("wb")

    def pin() -> None:  # in the child, before exec: its share of the cores
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)

    try:
        # Own process group: Ctrl-C is passed on to a run and its workers at once.
        return subprocess.Popen(
            _command(config_path, run),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=pin,
            start_new_session=True,
        )
    finally:
        log.close()


def _stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _progress_line(done: int, total: int, run: SweepRun, logs: Path) -> str:
    head = f"[{done}/{total}] {run.label}: {run.status} in {run.seconds:.1f} s"
    if run.status != "finished":
        return f"{head} (log: {logs / (run.label + '.log')})"
    accs = " | ".join(
        f"{short} {run.final[col]:.4f}"
        for col, short in FINAL_METRICS.items()
        if not math.isnan(run.final.get(col, math.nan))
    )
    return f"{head} | {accs}"


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last round's accuracies of a finished run (NaN where not measured)."""
    try:
        rounds = read_rounds(run_dir)
    except MetricsError:
        return {}
    if rounds.empty:
        return {}
    last = rounds.iloc[-1]
    return {col: float(last[col]) for col in FINAL_METRICS}


def runs_table(runs: Sequence[SweepRun]) -> pd.DataFrame:
    """One row per run: the grid point, seed, status, seconds and final accuracies."""
    rows = []
    for run in runs:
        row: dict[str, object] = {**run.point, "seed": run.seed, "status": run.status}
        row["seconds"] = run.seconds
        for col, short in FINAL_METRICS.items():
            row[short] = run.final.get(col, math.nan)
        row["run_dir"] = str(run.run_dir)
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_table(runs: Sequence[SweepRun], keys: Sequence[str]) -> pd.DataFrame:
    """One row per grid point: runs finished of all, mean and std over seeds of each metric."""
    per_run = runs_table(runs)
    rows = []
    group_keys = [k for k in keys if k != "run.seed"]
    groups = per_run.groupby(group_keys, sort=False) if group_keys else [((), per_run)]
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        ok = group[group["status"] == "finished"]
        row: dict[str, object] = dict(zip(group_keys, values, strict=True))
        row["runs"] = f"{len(ok)}/{len(group)}"
        for short in FINAL_METRICS.values():
            measured = ok[short].dropna()
            row[f"{short}_mean"] = measured.mean() if len(measured) else math.nan
            row[f"{short}_std"] = measured.std(ddof=1) if len(measured) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def format_comparison(table: pd.DataFrame, keys: Sequence[str]) -> str:
    """The comparison as printed: ``0.9617 ± 0.0031`` per metric, std left out for 1 seed."""
    shown = table[[k for k in keys if k in table.columns] + ["runs"]].copy()
    for short in FINAL_METRICS.values():
        mean, std = table[f"{short}_mean"], table[f"{short}_std"]
        if mean.isna().all():
            continue  # e.g. no central test set
        shown[short] = [_mean_std(m, s) for m, s in zip(mean, std, strict=True)]
    return format_table(shown)


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def write_tables(
    runs: Sequence[SweepRun], keys: Sequence[str], out_dir: Path
) -> tuple[Path, Path, pd.DataFrame]:
    """``sweep.csv`` (per grid point) and ``runs.csv`` (per run), written then renamed."""
    table = comparison_table(runs, keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for frame, name in ((table, "sweep.csv"), (runs_table(runs), "runs.csv")):
        path = out_dir / name
        tmp = path.with_name(f".{name}.tmp")
        frame.to_csv(tmp, index=False)
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1], table
