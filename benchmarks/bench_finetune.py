"""Fine-tuning at evaluation, one user at a time vs as one stack, side by side.

    python benchmarks/bench_finetune.py                     # 1,000 users, 5 rounds, 2 tries
    python benchmarks/bench_finetune.py --users 200 --rounds 3 --repeat 1   # a quick look

``personalization.method = finetune`` builds every evaluated user's personal model from the
newest global model at each evaluation: with ``strategy.fraction-evaluate = 1`` that is
every user, every round, and fine-tuning is most of a round. The same ``pollinate run``
(FedAvg on Synthetic(1,1), an MLP, 10% of the users trained a round, all of them evaluated,
``finetune-epochs`` local epochs each) with ``train.stack-users = 0`` (one user at a time)
and ``= --stack`` (each node fine-tunes its users as stacks of models,
:func:`pollinate.models.batched.train_stacked`), alternated ``--repeat`` times so that a
busy spell hits both alike; the fastest try of each is reported. Both must end with the
same personal accuracy (float32 rounding apart): column ``personal_acc``.
Writes ``benchmarks/results/finetune.{csv,md}``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def job(users: int, rounds: int, epochs: int) -> list[str]:
    return [
        "data.dataset='synthetic'",
        f"data.num-users={users}",
        f"run.num-rounds={rounds}",
        "model.name='mlp'",
        "train.epochs=1",
        "train.batch-size=10",
        "strategy.fraction-train=0.1",
        "strategy.fraction-evaluate=1.0",
        "personalization.method='finetune'",
        f"personalization.finetune-epochs={epochs}",
        "store.save-models='final-round'",
    ]


def run_once(work: Path, label: str, sets: list[str], timeout: float) -> dict[str, Any]:
    from pollinate.server.metrics import read_rounds

    run_dir = work / label
    config = work / "finetune-bench.toml"  # every key comes from --set
    config.write_text('[run]\nname = "finetune-bench"\n')
    argv = [sys.executable, "-m", "pollinate", "run", str(config), "--run-dir", str(run_dir)]
    for s in sets:
        argv += ["--set", s]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed: {proc.stderr.strip()[-500:]}")
    rounds = read_rounds(run_dir)
    done = rounds[rounds["round"] > 0]
    return {
        "wall_s": wall,
        "rounds_s": float(done["round_seconds"].sum()),
        "personal_acc": float(done["personal_accuracy"].iloc[-1]),
        "global_acc": float(done["global_accuracy"].iloc[-1]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2, help="personalization.finetune-epochs")
    p.add_argument("--stack", type=int, default=4096, help="train.stack-users of the stacked run")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(common.RESULTS))
    args = p.parse_args(argv)

    base = job(args.users, args.rounds, args.epochs)
    variants = {
        "one-by-one": ["train.stack-users=0"],
        "stacked": [f"train.stack-users={args.stack}"],
    }
    print("machine:", common.machine(), "load:", os.getloadavg(), flush=True)
    tries: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="pollinate-finetune-") as tmp:
        for i in range(args.repeat):
            for label, sets in variants.items():
                r = run_once(Path(tmp), f"{label}-{i}", base + sets, args.timeout)
                tries[label].append(r)
                print(f"  {label:>10} try {i}: wall {r['wall_s']:6.1f} s | rounds "
                      f"{r['rounds_s']:6.1f} s | personal acc {r['personal_acc']:.4f}",
                      flush=True)  # fmt: skip
    rows = []
    for label in variants:
        best = dict(min(tries[label], key=lambda t: t["wall_s"]))
        best["variant"] = label
        best["wall_s_all"] = " ".join(f"{t['wall_s']:.1f}" for t in tries[label])
        rows.append(best)
    one = rows[0]
    for r in rows:
        r["x_faster_wall"] = one["wall_s"] / r["wall_s"]
        r["x_faster_rounds"] = one["rounds_s"] / r["rounds_s"]
    out = Path(args.out)
    common.write_csv(out / "finetune.csv", rows)
    title = (
        f"finetune at every evaluation: {args.users} users (all evaluated, 10% trained) x "
        f"{args.rounds} rounds, finetune-epochs {args.epochs}, MLP on Synthetic(1,1), B=10; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    cols = ["variant", "wall_s", "rounds_s", "x_faster_wall", "x_faster_rounds"]
    md = f"{title}\n\n" + common.markdown_table(
        rows, [*cols, "personal_acc", "global_acc", "wall_s_all"]
    )
    (out / "finetune.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
