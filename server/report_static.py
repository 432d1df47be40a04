"""Static (matplotlib) versions of the report's charts: ``pollinate report --plot FILE.png``
and ``pollinate data CONFIG --plot FILE.png``, for papers, slides and terminals without a
browser. Same series as :mod:`pollinate.server.report`, fewer of them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollinate.data.stats import LabelCounts
from pollinate.server.report import METRIC_COLORS, RUN_COLORS, RunData, user_gains

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` beside ``path`` and rename it over ``path`` (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    tmp.replace(path)


def plot_runs(runs: Sequence[RunData], path: Path) -> Path:
    """Six panels: accuracy, loss, per-user accuracy (last round), gains, users, seconds."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    acc, loss, users, gain, part, secs = axes.ravel()
    many = len(runs) > 1
    for i, run in enumerate(runs):
        r = run.rounds
        prefix = f"{run.label}: " if many else ""
        for metric in ("global", "personal"):
            color = RUN_COLORS[i % len(RUN_COLORS)] if many else METRIC_COLORS[metric]
            style = "--" if many and metric == "personal" else "-"
            acc.plot(
                r["round"],
                r[f"{metric}_accuracy"],
                style,
                marker="o",
                ms=3,
                color=color,
                label=f"{prefix}{metric} (mean)",
            )
            acc.plot(
                r["round"],
                r[f"{metric}_accuracy_worst10"],
                ":",
                color=color,
                label=f"{prefix}{metric} (worst 10%)",
            )
            loss.plot(
                r["round"],
                r[f"{metric}_loss"],
                style,
                marker="o",
                ms=3,
                color=color,
                label=f"{prefix}{metric}",
            )
        if r["server_accuracy"].notna().any():
            color = RUN_COLORS[i % len(RUN_COLORS)] if many else METRIC_COLORS["central"]
            acc.plot(
                r["round"], r["server_accuracy"], "-.", color=color, label=f"{prefix}central test"
            )
            loss.plot(r["round"], r["server_loss"], "-.", color=color, label=f"{prefix}central")
        trained = r[r["round"] > 0]
        color = RUN_COLORS[i % len(RUN_COLORS)]
        part.plot(
            trained["round"],
            trained["train_users"],
            "-o",
            ms=3,
            color=color,
            label=f"{prefix}trained",
        )
        part.plot(
            trained["round"],
            trained["failures"],
            "x--",
            color=color,
            label=f"{prefix}failed replies",
        )
        if "rejected" in trained and trained["rejected"].fillna(0).any():
            part.plot(
                trained["round"],
                trained["rejected"],
                "s:",
                ms=3,
                color=color,
                label=f"{prefix}rejected",
            )
        secs.plot(
            trained["round"],
            trained["round_seconds"],
            "-o",
            ms=3,
            color=color,
            label=prefix + "seconds",
        )
        gains = user_gains(run)
        if not gains.empty:
            gain.plot(
                range(len(gains)),
                gains["gain"],
                "-o",
                ms=3,
                color=color,
                label=f"{prefix}round {int(gains['round'].iloc[0])}",
            )
    _user_boxes(users, runs)
    gain.axhline(0, color="#999", lw=0.8)
    titles = [
        (acc, "Accuracy", "accuracy"),
        (loss, "Loss", "loss"),
        (users, "Per-user accuracy, last evaluated round", "accuracy"),
        (gain, "Personal minus global accuracy, per user (sorted)", "gain"),
        (part, "Users trained and failures per round", "count"),
        (secs, "Seconds per round", "seconds"),
    ]
    for ax, title, ylabel in titles:
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in (acc, loss, part, secs):
        ax.set_xlabel("round")
    gain.set_xlabel("user")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def _user_boxes(ax: Any, runs: Sequence[RunData]) -> None:
    """Box per run and model of the last evaluated round's per-user accuracies."""
    data, names, colors = [], [], []
    for i, run in enumerate(runs):
        ev = run.evaluated()
        if ev.empty:
            continue
        last = ev[ev["round"] == ev["round"].max()]
        for metric in ("global", "personal"):
            data.append(last[f"{metric}_accuracy"].to_numpy())
            names.append(f"{run.label}\n{metric}" if len(runs) > 1 else metric)
            colors.append(METRIC_COLORS[metric] if len(runs) == 1 else RUN_COLORS[i % 10])
    if not data:
        ax.text(0.5, 0.5, "no per-user evaluations", ha="center", transform=ax.transAxes)
        return
    boxes = ax.boxplot(data, patch_artist=True)
    ax.set_xticks(range(1, len(names) + 1), names, fontsize=7)
    for patch, color in zip(boxes["boxes"], colors, strict=True):
        patch.set_facecolor(color)
        patch.set_alpha(0.5)


def plot_data_split(counts: LabelCounts, path: Path, title: str = "") -> Path:
    """Samples per user (train/test) and the users x labels heatmap of label shares."""
    plt = _pyplot()
    n = len(counts.user_ids)
    fig, (sizes, heat) = plt.subplots(
        1, 2, figsize=(14, max(4.0, 1.5 + 0.22 * n)), gridspec_kw={"width_ratios": [1, 1.2]}
    )
    rows = range(n)
    train, test = counts.train.sum(axis=1), counts.test.sum(axis=1)
    sizes.barh(rows, train, color="#1f77b4", label="train")
    sizes.barh(rows, test, left=train, color="#9ecae1", label="test")
    sizes.set_yticks(rows, counts.user_ids, fontsize=7)
    sizes.invert_yaxis()
    sizes.set(xlabel="samples", title="Samples per user")
    sizes.legend(fontsize=8)
    image = heat.imshow(counts.user_distributions(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
    tv = counts.tv_distances()
    heat.set_yticks(
        rows, [f"{u} (TV {d:.2f})" for u, d in zip(counts.user_ids, tv, strict=True)], fontsize=7
    )
    heat.set_xticks(range(counts.num_classes), [str(c) for c in range(counts.num_classes)])
    heat.set(xlabel="label", title=f"Label share per user (mean TV distance {counts.mean_tv:.3f})")
    fig.colorbar(image, ax=heat, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return path
