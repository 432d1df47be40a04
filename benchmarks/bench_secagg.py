"""The time cost of secure aggregation (SecAgg+) per round, side by side with the same run without.

    python benchmarks/bench_secagg.py                      # simulation + deployment, ~6 min
    python benchmarks/bench_secagg.py --no-deploy --nodes 3 10 20   # simulation only

The job is ``bench_deploy.py``'s, identical both ways: one user per device (sklearn digits,
200 rows each, one CSV per device), a 64-64-10 MLP (4,810 weights), FedAvg + fine-tuned
personal models, ``--rounds`` rounds. The round time is ``round_seconds`` from the run's own
``metrics.db`` (configuring training to the end of evaluation); the figure compared is
the median of rounds 2..R (round 1 carries start-up costs).

- ``simulation``: ``pollinate run`` (Flower's simulation engine), one node per user, for
  each ``--nodes`` count;
- ``deployed``: ``pollinate server start`` (TLS + node authentication) and ``--devices``
  ``pollinate node start`` on 127.0.0.1 (as ``bench_deploy.py``).

Each is run with ``privacy.secure-aggregation`` off and on (every device one share of
every other's secrets, ``num-shares = 1.0``; threshold half of them). What secure
aggregation adds per round: three more exchanges with every device (setup, share keys,
unmask) besides the one that trains, and the training no longer rides on the previous
round's evaluation exchange (the plain run folds them), so 5 exchanges a round instead of
one; and per device an ECDH key pair, one Shamir split and one mask per neighbour, on the
server one mask per device (and per dropped device's neighbour). Prints a table; nothing
is written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_deploy as bd

SECURE = "\n[privacy]\nsecure-aggregation = true\n"


def with_secure_aggregation(
    config: Callable[[Path, str, int, int, bool], Path],
) -> Callable[[Path, str, int, int, bool], Path]:
    """bench_deploy's config writer, plus ``[privacy] secure-aggregation = true``."""

    def write(root: Path, name: str, rounds: int, num: int, simulated: bool) -> Path:
        path = config(root, name, rounds, num, simulated)
        path.write_text(path.read_text() + SECURE)
        return path

    return write


def measure(
    run: Callable[[Path, int, int], tuple[list[float], float]],
    root: Path,
    rounds: int,
    num: int,
    secure: bool,
) -> tuple[list[float], float]:
    """One run of ``run`` (bench_deploy's run_simulation / run_deployed) in its own folder."""
    folder = root / f"{run.__name__}-{num}-{'secagg' if secure else 'plain'}"
    folder.mkdir()
    bd.write_devices(folder, num, ROWS)
    plain = bd.config
    if secure:
        bd.config = with_secure_aggregation(plain)  # the one difference between the runs
    try:
        return run(folder, rounds, num)
    finally:
        bd.config = plain


ROWS = 200


def main() -> None:
    global ROWS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--nodes", nargs="+", type=int, default=[3, 10], help="simulated nodes")
    p.add_argument("--devices", type=int, default=3, help="deployed devices")
    p.add_argument("--rows", type=int, default=200, help="rows per device")
    p.add_argument("--no-deploy", action="store_true", help="simulation only")
    args = p.parse_args()
    ROWS = args.rows
    print(
        f"one user per node x {args.rows} rows, mlp 64-64-10, {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs"
    )
    rows: list[tuple[str, int, list[float], list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        root = Path(tmp)
        jobs: list[tuple[str, Callable[..., tuple[list[float], float]], int]] = [
            ("simulation", bd.run_simulation, n) for n in args.nodes
        ]
        if not args.no_deploy:
            jobs.append(("deployed (TLS)", bd.run_deployed, args.devices))
        for label, run, num in jobs:
            plain, _ = measure(run, root, args.rounds, num, secure=False)
            secure, _ = measure(run, root, args.rounds, num, secure=True)
            rows.append((label, num, plain, secure))
            print(f"  done: {label}, {num} nodes", flush=True)

    print(f"\n{'':<16}{'nodes':>6}{'plain s/round':>15}{'secagg s/round':>16}{'ratio':>8}"
          f"{'added s':>9}")  # fmt: skip
    for label, num, plain, secure in rows:
        a = statistics.median(plain[1:] or plain)
        b = statistics.median(secure[1:] or secure)
        print(f"{label:<16}{num:>6}{a:>15.3f}{b:>16.3f}{b / a:>7.2f}x{b - a:>9.3f}")
    print("s/round = median of rounds 2..R of metrics.db's round_seconds (train + evaluate)")


if __name__ == "__main__":
    main()
