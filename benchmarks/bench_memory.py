"""Memory at scale: peak memory follows the users sampled per round, not the users in total.

    python benchmarks/bench_memory.py                          # the issue's 100,000-user job
    python benchmarks/bench_memory.py --scales 10000:0.1 --rounds 2   # a quick look

The job (issue 13): FedProx's Synthetic(1,1) users (generated lazily, per user, when a node
first trains one), logistic regression, FedAvg, E=1, B=10, no personalization, no client
evaluation, ``store.save-models = "final-round"``, users trained as stacks of models
(``train.stack-users``). Each scale ``USERS:FRACTION`` is one ``pollinate run`` in its own
process group, on the default local backend (one worker per CPU); the peak of the summed
RSS and PSS of its whole process tree (driver, fork server, workers) is sampled every 0.2 s.

The default scales put the claim side by side: 10,000 users at 10% and 100,000 users at 1%
sample the same 1,000 users a round (memory should barely differ), and 100,000 users at 10%
samples 10,000 (the issue's target: at most 8 GiB). Writes ``benchmarks/results/memory.csv``
and ``memory.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

GIB = 1024**3
DEFAULT_SCALES = "10000:0.1,100000:0.01,100000:0.1"
TARGET_GIB = 8.0


def job_config(users: int, fraction: float, rounds: int, stack: int) -> str:
    """The run's TOML: issue 13's job at ``users`` x ``fraction``."""
    return f"""\
[run]
name = "memory-{users}"
num-rounds = {rounds}

[data]
dataset = "synthetic"
num-users = {users}
synthetic-alpha = 1.0
synthetic-beta = 1.0

[model]
name = "logreg"

[train]
epochs = 1
batch-size = 10
lr = 0.01
stack-users = {stack}

[strategy]
name = "fedavg"
fraction-train = {fraction}
fraction-evaluate = 0.0

[personalization]
method = "none"

[store]
save-models = "final-round"
"""


def rounds_done(run_dir: Path) -> int:
    """Completed training rounds, from the run's own metrics (``pollinate metrics``)."""
    out = subprocess.run(
        [common.python(), "-m", "pollinate", "metrics", str(run_dir), "--format", "json"],
        capture_output=True,
        text=True,
        cwd=common.REPO,
        check=False,
    )
    if out.returncode != 0:
        return 0
    return sum(1 for row in json.loads(out.stdout) if row["round"] > 0 and row["train_users"])


def measure(users: int, fraction: float, rounds: int, stack: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pollinate-memory-") as tmp:
        config = Path(tmp) / "job.toml"
        config.write_text(job_config(users, fraction, rounds, stack))
        run_dir = Path(tmp) / "run"
        argv = [common.python(), "-m", "pollinate", "run", str(config), "--run-dir", str(run_dir)]
        log = Path(tmp) / "run.log"
        child = common.run_child(argv, log=log, timeout=timeout)
        done = rounds_done(run_dir)
        if child.returncode != 0:  # the run's own last lines say why
            print("".join(log.read_text().splitlines(keepends=True)[-20:]), file=sys.stderr)
    sampled = round(users * fraction)
    return {
        "users": users,
        "fraction": fraction,
        "sampled_per_round": sampled,
        "rounds": rounds,
        "rounds_done": done,
        "exit": child.returncode,
        "wall_s": round(child.wall_s, 1),
        "s_per_round": round(child.wall_s / max(done, 1), 1),
        "peak_rss_gib": round(child.peak_rss / GIB, 2),
        "peak_pss_gib": round(child.peak_pss / GIB, 2),
        "processes": child.peak_processes,
    }


def parse_scales(text: str) -> list[tuple[int, float]]:
    scales = []
    for item in text.split(","):
        users, _, fraction = item.partition(":")
        scales.append((int(users), float(fraction or 0.1)))
    return scales


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", default=DEFAULT_SCALES, help="USERS:FRACTION,...")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--stack-users", type=int, default=1024, help="train.stack-users (its default)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--name", default="memory")
    args = parser.parse_args(argv)

    rows = []
    for users, fraction in parse_scales(args.scales):
        row = measure(users, fraction, args.rounds, args.stack_users, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_csv(args.out / f"{args.name}.csv", rows)
    table = common.markdown_table(rows)
    (args.out / f"{args.name}.md").write_text(common.machine_markdown() + "\n\n" + table + "\n")
    print(table)
    failed = [r for r in rows if r["exit"] != 0 or r["rounds_done"] < r["rounds"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
