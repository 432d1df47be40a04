"""The run's summary for a terminal: the final-round table and the metrics plot.

``summary_table`` is what ``pollinate run`` and ``pollinate server start`` print at the end;
``plot_rounds`` is ``pollinate metrics --plot``. The HTML report is :mod:`.report`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the callers hand over a frame they already read
    import pandas as pd

__all__ = ["PLOT_SUFFIXES", "plot_rounds", "summary_table"]

#: File types ``plot_rounds`` writes (matplotlib picks the format from the suffix).
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def summary_table(rounds: pd.DataFrame) -> str:
    """Final round: global vs personal accuracy, mean and worst 10% of users."""
    last = rounds.iloc[-1]

    def f(v: float) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    lines = [
        f"final round {int(last['round'])}",
        f"{'model':<10} {'mean acc':>10} {'worst 10%':>10} {'loss':>10}",
        f"{'global':<10} {f(last['global_accuracy']):>10} "
        f"{f(last['global_accuracy_worst10']):>10} {f(last['global_loss']):>10}",
        f"{'personal':<10} {f(last['personal_accuracy']):>10} "
        f"{f(last['personal_accuracy_worst10']):>10} {f(last['personal_loss']):>10}",
    ]
    if not math.isnan(last["server_accuracy"]):
        lines.append(
            f"{'central':<10} {f(last['server_accuracy']):>10} {'':>10} "
            f"{f(last['server_loss']):>10}   (global model, held-out central test set)"
        )
    eps = rounds["epsilon"].dropna() if "epsilon" in rounds else rounds.iloc[:0, 0]
    if len(eps):  # [privacy]: the ε spent (the run's, or the largest user's; README "Privacy")
        mean = rounds.loc[eps.index[-1], "epsilon_mean"]
        spread = f" (mean over users {mean:.3f})" if abs(mean - eps.iloc[-1]) > 1e-9 else ""
        lines.append(f"privacy    ε = {eps.iloc[-1]:.3f} spent{spread}")
    rejected = int(rounds["rejected"].sum()) if "rejected" in rounds else 0
    if rejected:  # update validation refused some updates (reasons: metrics --clients)
        worst = rounds.loc[rounds["rejected"].idxmax()]
        lines.append(
            f"rejected   {rejected} update(s) over the run, at most "
            f"{int(worst['rejected'])} in a round (round {int(worst['round'])})"
        )
    return "\n".join(lines)


def plot_rounds(rounds: pd.DataFrame, path: Path) -> None:
    """Accuracy and loss over rounds, global vs personal (and central, if measured)."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"plot '{path}' must end in {', '.join(PLOT_SUFFIXES)}")
    # Lazy: matplotlib.pyplot is the heaviest import of `pollinate metrics` (4.4 s against
    # pandas' 1.1 s, python -X importtime, best of 3, 2 shared cores under load), paid only
    # by --plot; every `pollinate` command imports this module.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    series = [("global", "tab:blue"), ("personal", "tab:orange")]
    for name, color in series:
        acc.plot(
            rounds["round"],
            rounds[f"{name}_accuracy"],
            marker="o",
            color=color,
            label=f"{name} (mean over users)",
        )
        acc.plot(
            rounds["round"],
            rounds[f"{name}_accuracy_worst10"],
            ls="--",
            color=color,
            label=f"{name} (worst 10% of users)",
        )
        loss.plot(rounds["round"], rounds[f"{name}_loss"], marker="o", color=color, label=name)
    if rounds["server_accuracy"].notna().any():
        acc.plot(
            rounds["round"],
            rounds["server_accuracy"],
            color="black",
            ls=":",
            label="global (central test)",
        )
        loss.plot(rounds["round"], rounds["server_loss"], color="black", ls=":", label="central")
    acc.set(xlabel="round", ylabel="accuracy", title="Accuracy")
    loss.set(xlabel="round", ylabel="loss", title="Loss")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
