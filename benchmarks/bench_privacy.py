"""Accuracy vs privacy: user-level DP (DP-FedAvg) and local DP-SGD at ε in {0.5 ... 8, ∞}.

    python benchmarks/bench_privacy.py                       # the full grid (RESULTS.md)
    python benchmarks/bench_privacy.py --datasets digits --seeds 0 --epsilons 8   # a smoke check

Every run is a real Pollinate federation in this process (``fidelity_common``): the
ServerApp, the ClientApp, users hosted in cohorts. Data: digits (scikit-learn's 8x8 images,
20 users, Dirichlet 0.5) and Synthetic(1, 1) (FedProx's, 30 users); an MLP (32 hidden),
``--rounds`` rounds, all users every round, 1 local epoch, B = 16, lr 0.1, momentum 0.5;
personal model = the global one fine-tuned (head, 2 epochs). Privacy, with δ = 1e-5:

- ``user``: DP-FedAvg, clipping each user's update to C = 1 on its node; the noise
  multiplier is derived (Opacus RDP) so that the whole run is (ε, δ)-DP per *user*;
- ``local``: DP-SGD on every training of a user's data (update and fine-tuning), C = 1,
  the noise multiplier derived per user so that the run is (ε, δ)-DP per *example*;
- ε = ∞ is the same run without DP (``privacy.method = "none"``).

Reported: central test accuracy of the global model and the users' mean personal accuracy
(their own test splits) after the last round, mean ± std over seeds, and the mean round
time (rounds 2.., round 1 pays imports) of each method against the run without DP. Writes
``benchmarks/results/privacy.{csv,md,png}`` (the plot needs matplotlib; skipped without).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import fidelity_common as fc

SUITE = "privacy"
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
METHODS = ("user", "local")
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {
        "data.dataset": "digits",
        "data.num-users": 20,
        "data.partitioner": "dirichlet",
        "data.alpha": 0.5,
    },
    "synthetic(1,1)": {
        "data.dataset": "synthetic",
        "data.num-users": 30,
        "data.synthetic-alpha": 1.0,
        "data.synthetic-beta": 1.0,
    },
}


def base_config(dataset: str, rounds: int, seed: int) -> dict[str, Any]:
    return {
        **DATASETS[dataset],
        "run.num-rounds": rounds,
        "run.seed": seed,
        "model.name": "mlp",
        "model.hidden": 32,
        "train.epochs": 1,
        "train.batch-size": 16,
        "train.lr": 0.1,
        "train.momentum": 0.5,
        "personalization.method": "finetune",
        "personalization.finetune-epochs": 2,
        "personalization.finetune-head-only": True,
    }


def privacy_config(method: str, eps: float) -> dict[str, Any]:
    if math.isinf(eps):
        return {}
    return {
        "privacy.method": method,
        "privacy.target-epsilon": eps,
        "privacy.delta": 1e-5,
        "privacy.clipping-norm": 1.0,
    }


def result(run_dir: Path) -> dict[str, float]:
    from pollinate.server.metrics import read_rounds

    rounds = read_rounds(run_dir)
    last = rounds.iloc[-1]
    # Round 1 pays the process's one-off costs (imports, the noise search): timed from 2.
    done = rounds[rounds["round"] > 1] if len(rounds) > 2 else rounds[rounds["round"] > 0]
    spent = float(last["epsilon"]) if last["epsilon"] == last["epsilon"] else math.inf
    central = float(last["server_accuracy"])  # Synthetic has no central test set: the users'
    return {
        "global": central if central == central else float(last["global_accuracy"]),
        "personal": float(last["personal_accuracy"]),
        "spent": spent,
        "round_s": float(done["round_seconds"].mean()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    fc.add_engine_args(p)
    args = p.parse_args(argv)

    rows: list[dict[str, Any]] = []
    for dataset in args.datasets:
        for eps in sorted(set(args.epsilons) | {math.inf}):
            for method in args.methods if not math.isinf(eps) else ["none"]:
                for seed in args.seeds:
                    flat = {
                        **base_config(dataset, args.rounds, seed),
                        **privacy_config(method, eps),
                    }
                    tag = dataset.replace("(", "").replace(")", "").replace(",", "-")
                    name = f"{tag}-{method}-eps{eps:g}-r{args.rounds}-seed{seed}"
                    run_dir = fc.run(
                        SUITE, name, flat, engine=args.engine, fresh=args.fresh, runs=args.runs
                    )
                    rows.append(
                        {"dataset": dataset, "method": method, "epsilon": eps, "seed": seed}
                        | result(run_dir)
                    )
    out = Path(args.out)
    common.write_csv(out / "privacy.csv", rows)
    md = table(rows, args)
    (out / "privacy.md").write_text(md + "\n")
    plot(rows, args, out / "privacy.png")
    print(md)
    return 0


def _pick(
    rows: list[dict[str, Any]], dataset: str, method: str, eps: float, key: str
) -> list[float]:
    if math.isinf(eps):
        method = "none"
    return [
        r[key]
        for r in rows
        if r["dataset"] == dataset and r["method"] == method and r["epsilon"] == eps
    ]


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    epsilons = sorted(set(args.epsilons) | {math.inf})
    lines = []
    for dataset in args.datasets:
        for method in args.methods:
            for key, label in (
                ("global", "global (central test; Synthetic: users' mean)"),
                ("personal", "personal"),
            ):
                line: dict[str, Any] = {"dataset": dataset, "DP": method, "accuracy": label}
                for eps in epsilons:
                    line[f"ε={eps:g}"] = fc.pm(_pick(rows, dataset, method, eps, key))
                lines.append(line)
    head = (
        f"Accuracy after {args.rounds} rounds, mean ± std over seeds "
        f"{', '.join(map(str, args.seeds))}; δ = 1e-5, C = 1; ε = inf is the run without DP. "
        "user = user-level DP-FedAvg (ε per user), local = DP-SGD (ε per example of a user)."
    )
    return head + "\n\n" + common.markdown_table(lines) + "\n\n" + timing(rows, args)


def timing(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Mean round time of each method at each ε, as a ratio to the run without DP."""
    out = ["Mean seconds per round (same machine, same seeds, run one after another):", ""]
    lines = []
    for dataset in args.datasets:
        plain = statistics.fmean(_pick(rows, dataset, "none", math.inf, "round_s"))
        line: dict[str, Any] = {"dataset": dataset, "no DP (s)": f"{plain:.2f}"}
        for method in args.methods:
            times = [
                t
                for eps in args.epsilons
                if not math.isinf(eps)
                for t in _pick(rows, dataset, method, eps, "round_s")
            ]
            if times:
                m = statistics.fmean(times)
                line[f"{method} (s)"] = f"{m:.2f}"
                line[f"{method} / no DP"] = f"{m / plain:.2f}x"
        lines.append(line)
    return "\n".join(out) + common.markdown_table(lines)


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted(e for e in set(args.epsilons) if not math.isinf(e))
    xs = [*finite, 2 * max(finite)]  # ∞ drawn one step right of the largest ε
    fig, axes = plt.subplots(1, len(args.datasets), figsize=(6 * len(args.datasets), 4.2))
    axes = [axes] if len(args.datasets) == 1 else list(axes)
    for ax, dataset in zip(axes, args.datasets, strict=True):
        for method in args.methods:
            for key, style in (("global", "-"), ("personal", "--")):
                ms, ss = zip(
                    *(
                        fc.mean_std(_pick(rows, dataset, method, e, key))
                        for e in [*finite, math.inf]
                    ),
                    strict=True,
                )
                ax.errorbar(
                    xs,
                    ms,
                    yerr=ss,
                    marker="o",
                    capsize=2,
                    linestyle=style,
                    label=f"{method} DP, {key}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{e:g}" for e in finite] + ["∞"])
        ax.set(xlabel="ε (δ = 1e-5)", ylabel="accuracy", ylim=(0, 1), title=dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
