"""Fidelity: FedProx (Li et al., MLSys 2020) on its Synthetic datasets, with stragglers.

    python benchmarks/fidelity_fedprox.py      # the paper's whole grid: 68 runs, ~40 min
    python benchmarks/fidelity_fedprox.py --rounds 100 --mus 0 1 --stragglers 0 0.9 \
        --stragglers-datasets 1,1 iid           # a quicker subset (14 runs)

The paper's setup (Sec. 5.1 and App. C.2): 30 devices, 10 selected per round, E = 20 local
epochs, minibatch B = 10, lr = 0.01, multinomial logistic regression; Synthetic(alpha,
beta) and Synthetic-IID (``pollinate.data.synthetic``). Systems heterogeneity: a fraction
of the selected devices are stragglers that run a random 1..E epochs; FedAvg drops them,
FedProx keeps their partial work (``train.straggler-fraction``, ``train.drop-stragglers``;
here each selected device is a straggler with that probability, seeded per device and
round). Reported per round, from the global model saved after each round: the training
loss over all devices' training data and the test accuracy over all devices' test data,
both weighted by samples — the paper's two curves.

Default: the paper's grid — Synthetic(1,1), (0.5,0.5), (0,0) and IID, each at 0%, 50% and
90% stragglers, FedAvg and FedProx with mu in {0, 0.001, 0.01, 0.1, 1}, 200 rounds. At 0%
stragglers FedAvg and FedProx mu=0 are the same algorithm, so one run stands for both.
Finished runs are reused (``runs/bench/fedprox``), so the grid can be split over processes
(e.g. ``--datasets 1,1 iid --out /tmp/a`` and ``--datasets 0,0 0.5,0.5 --out /tmp/b``) and
then assembled by the default command. Writes ``benchmarks/results/fedprox.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import fidelity_common as fc

SUITE = "fedprox"


def dataset_flat(name: str) -> dict[str, Any]:
    if name == "iid":
        return {"data.dataset": "synthetic-iid"}
    a, b = (float(v) for v in name.split(","))
    return {"data.dataset": "synthetic", "data.synthetic-alpha": a, "data.synthetic-beta": b}


def label(name: str) -> str:
    return "Synthetic-IID" if name == "iid" else f"Synthetic({name.replace(',', ', ')})"


def base_flat(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "run.num-rounds": args.rounds,
        "run.seed": args.seed,
        "data.num-users": 30,
        "model.name": "logreg",
        "train.epochs": 20,
        "train.batch-size": 10,
        "train.lr": 0.01,
        # int(30 * 0.3) = 9, raised to 10 by the minimum: 10 devices per round.
        "strategy.fraction-train": 0.3,
        "strategy.min-train-users": 10,
        "strategy.fraction-evaluate": 0.0,  # evaluated below from the saved global models
        "personalization.method": "none",
    }


def methods(stragglers: float, mus: list[float]) -> list[tuple[str, dict[str, Any]]]:
    """(name, config) per method; FedAvg at 0% stragglers is FedProx mu=0 (one run)."""
    out: list[tuple[str, dict[str, Any]]] = []
    if stragglers > 0:
        out.append(("FedAvg", {"strategy.name": "fedavg", "train.drop-stragglers": True}))
    for mu in mus:
        out.append((f"FedProx mu={mu:g}", {"strategy.name": "fedprox", "strategy.proximal-mu": mu}))
    return out


def curves(run_dir: Path, every: int) -> list[dict[str, float]]:
    """Training loss and test accuracy of each saved global model, over all devices."""
    import numpy as np
    import torch

    from pollinate import config
    from pollinate.config import data_spec
    from pollinate.data import load_federated_dataset
    from pollinate.models import create_model, evaluate, load_artifact

    cfg = config.load(run_dir / "config.toml")
    data = load_federated_dataset(data_spec(cfg))
    users = data.users()
    x_tr = torch.from_numpy(np.concatenate([u.x_train for u in users]))
    y_tr = torch.from_numpy(np.concatenate([u.y_train for u in users]))
    x_te = torch.from_numpy(np.concatenate([u.x_test for u in users]))
    y_te = torch.from_numpy(np.concatenate([u.y_test for u in users]))
    rows = []
    model = None
    for r in range(0, cfg.run.num_rounds + 1):
        if r % every and r != cfg.run.num_rounds:
            continue
        art = load_artifact(run_dir / "models" / f"global-round-{r:04d}.pt")
        if model is None:
            model = create_model(art.spec.name, **art.spec.kwargs)
        model.load_state_dict(art.state_dict)
        tr, te = evaluate(model, x_tr, y_tr), evaluate(model, x_te, y_te)
        rows.append({"round": r, "train_loss": tr.loss, "test_accuracy": te.accuracy})
    return rows


def plot(rows: list[dict[str, Any]], path: Path, datasets: list[str], levels: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One row per (dataset, curve), one column per straggler level: the paper's layout.
    datasets = [d for d in datasets if any(r["dataset"] == d for r in rows)]
    metrics = ("train_loss", "test_accuracy")
    fig, axes = plt.subplots(
        2 * len(datasets),
        len(levels),
        figsize=(4.2 * len(levels), 2.6 * 2 * len(datasets)),
        squeeze=False,
    )
    mus = sorted({r["method"] for r in rows if r["method"].startswith("FedProx")})
    blues = plt.get_cmap("viridis")
    colors = {"FedAvg": "tab:red"}
    colors.update({m: blues(i / max(1, len(mus) - 1)) for i, m in enumerate(mus)})
    for i, d in enumerate(datasets):
        for col, s in enumerate(levels):
            here = [r for r in rows if r["dataset"] == d and r["stragglers"] == s]
            for j, metric in enumerate(metrics):
                ax = axes[2 * i + j, col]
                if not here:
                    ax.axis("off")
                    continue
                for name in dict.fromkeys(r["method"] for r in here):
                    pts = [(r["round"], r[metric]) for r in here if r["method"] == name]
                    xs, ys = zip(*pts, strict=True)
                    # At 0% stragglers FedAvg is the mu=0 run: dashed, so both stay visible.
                    ax.plot(
                        xs,
                        ys,
                        label=name,
                        color=colors.get(name),
                        lw=1.1,
                        ls="--" if name == "FedAvg" and s == 0 else "-",
                    )
                ax.set_title(f"{label(d)}, {s:.0%} stragglers", fontsize=9)
                ax.set_xlabel("round", fontsize=8)
                ax.set_ylabel("training loss" if metric == "train_loss" else "test accuracy")
                if metric == "train_loss":
                    ax.set_yscale("log")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument(
        "--datasets",
        nargs="+",
        default=["1,1", "0.5,0.5", "0,0", "iid"],
        help="alpha,beta pairs or 'iid'",
    )
    p.add_argument("--stragglers", nargs="+", type=float, default=[0.0, 0.5, 0.9])
    p.add_argument("--mus", nargs="+", type=float, default=[0.0, 0.001, 0.01, 0.1, 1.0])
    p.add_argument(
        "--stragglers-datasets",
        nargs="+",
        default=["1,1", "0.5,0.5", "0,0", "iid"],
        help="datasets that get the straggler levels above 0 (others: 0 only)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=1)
    fc.add_engine_args(p)
    args = p.parse_args(argv)
    fc.quiet()

    rows: list[dict[str, Any]] = []
    for d in args.datasets:
        levels = [s for s in args.stragglers if s == 0 or d in args.stragglers_datasets]
        for s in levels:
            for method, extra in methods(s, args.mus):
                flat = {
                    **base_flat(args),
                    **dataset_flat(d),
                    **extra,
                    "train.straggler-fraction": s,
                }
                name = f"{d.replace(',', '_')}-s{s:g}-{method.replace(' ', '_')}-seed{args.seed}"
                run_dir = fc.run(
                    SUITE, name, flat, engine=args.engine, fresh=args.fresh, runs=args.runs
                )
                for row in curves(run_dir, args.eval_every):
                    rows.append({"dataset": d, "stragglers": s, "method": method, **row})
                    if s == 0 and method == "FedProx mu=0":  # the same run is FedAvg's
                        rows.append({"dataset": d, "stragglers": s, "method": "FedAvg", **row})
    out = Path(args.out)
    common.write_csv(out / "fedprox.csv", rows)
    levels = sorted({r["stragglers"] for r in rows})
    plot(rows, out / "fedprox.png", args.datasets, levels)
    (out / "fedprox.md").write_text(summary(rows, args) + "\n")
    print(summary(rows, args))
    return 0


def summary(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Final numbers: mean over the last 10% of rounds (curves are noisy), per method."""
    last = max(r["round"] for r in rows)
    window = max(1, last // 10)
    table = []
    for d in args.datasets:
        for s in sorted({r["stragglers"] for r in rows if r["dataset"] == d}):
            for m in dict.fromkeys(r["method"] for r in rows if r["dataset"] == d):
                tail = [
                    r
                    for r in rows
                    if r["dataset"] == d
                    and r["stragglers"] == s
                    and r["method"] == m
                    and r["round"] > last - window
                ]
                if not tail:
                    continue
                loss = sum(r["train_loss"] for r in tail) / len(tail)
                acc = sum(r["test_accuracy"] for r in tail) / len(tail)
                table.append(
                    {
                        "dataset": label(d),
                        "stragglers": f"{s:.0%}",
                        "method": m,
                        "train loss": loss,
                        "test acc": acc,
                    }
                )
    head = (
        f"{last} rounds, 30 devices, 10 per round, E=20, B=10, lr=0.01, logistic "
        f"regression, seed {args.seed}; final = mean over rounds {last - window + 1}..{last}"
    )
    return head + "\n\n" + common.markdown_table(table)


if __name__ == "__main__":
    sys.exit(main())
