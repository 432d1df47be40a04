"""Every issue-4 benchmark suite, one after another (``make bench``).

    python benchmarks/run_all.py            # the documented defaults (about an hour on 2 cores)
    python benchmarks/run_all.py --quick    # a few minutes: tiny versions, to check it all runs

Each suite writes its CSV, Markdown table and PNG to ``benchmarks/results/`` (``--quick``
writes to ``runs/bench-quick/`` instead, leaving the reported results alone). The suites
are independent scripts; see ``benchmarks/README.md`` for each one's command and options.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUITES: dict[str, tuple[list[str], list[str]]] = {
    # name: (default arguments, --quick arguments)
    "bench_speed.py": (
        ["--repeat", "2"],
        ["--users", "10,100", "--rounds", "3"],
    ),
    "fidelity_fedprox.py": ([], ["--rounds", "5", "--datasets", "1,1"]),
    "fidelity_fedavg.py": (
        ["--seeds", "0", "1", "2"],
        ["--rounds", "20", "--lrs", "0.5", "--partitions", "iid"],
    ),
    "fidelity_personalization.py": ([], ["--rounds", "3", "--seeds", "0"]),
    "bench_stream.py": ([], ["--quick"]),
    "bench_attacks.py": ([], ["--rounds", "3", "--seeds", "0", "--fractions", "0.2"]),
    "bench_privacy.py": (
        [],
        ["--rounds", "2", "--seeds", "0", "--epsilons", "8", "--datasets", "digits"],
    ),
}
# Suites that keep their run folders under --runs (fidelity_common.run).
CACHED_RUNS = (
    "fidelity_fedprox.py",
    "fidelity_fedavg.py",
    "fidelity_personalization.py",
    "bench_attacks.py",
    "bench_privacy.py",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny versions of every suite")
    p.add_argument("--only", nargs="+", choices=list(SUITES), help="run just these suites")
    args = p.parse_args(argv)
    failed = []
    for script, (full, quick) in SUITES.items():
        if args.only and script not in args.only:
            continue
        quick_dir = HERE.parent / "runs" / "bench-quick"
        if args.quick:
            extra = [*quick, "--out", str(quick_dir)]
            if script in CACHED_RUNS:  # keep the reported runs' cache intact
                extra += ["--runs", str(quick_dir / "runs")]
        else:
            extra = full
        cmd = [sys.executable, str(HERE / script), *extra]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        code = subprocess.call(cmd, cwd=HERE.parent)
        print(f"== {script}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
        if code:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
