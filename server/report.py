"""``pollinate report``: one self-contained HTML file about one run, or several side by side.

The file embeds plotly.js once (about 4.6 MB) and every chart's data, so it opens in any
browser without a network. Sections, in order:

- **runs**: folder, status, rounds, start time, duration (and the error of a failed run);
- **summary**: the final round's global / personal / central accuracy and loss;
- **accuracy** and **loss** per round: mean over users, worst 10% of users, central test;
- **per-user accuracy**: the distribution over users of each round's accuracy (box plots);
- **personal vs global**: each user's gain of the personal model over the global one in
  the last evaluated round (who benefits, who loses);
- **participation**: users trained and evaluated, failed nodes (and rejected updates,
  where the rounds table records them) per round;
- **cost**: bytes sent and received, and seconds, per round;
- **data split**: samples per user and a users x labels heatmap, with each user's
  total-variation distance to the global label distribution (``data-split.json``, written
  by the server at the start of a simulation; a deployment has none);
- **config**: every key, those that differ from the defaults marked; with several runs,
  the keys that differ between them become the runs' labels.

:func:`write_report` is the entry point (``pollinate report`` and ``pollinate sweep`` call
it); :func:`load_run` reads one run folder through :mod:`pollinate.server.metrics`.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
import plotly.io as pio
import tomllib
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from pollinate.config import default_flat, flatten
from pollinate.data.stats import LabelCounts
from pollinate.models import atomic_write
from pollinate.server.datasplit import read_data_split
from pollinate.server.metrics import MetricsError, read_clients, read_rounds, read_run_info

if TYPE_CHECKING:
    import pandas as pd
# Keys that differ between any two runs by construction: never a run's label.
_NOT_LABELS = ("run.dir", "store.dir", "run.name")
# Above this many users the heatmap stops naming every one of them.
HEATMAP_NAMED = 60
# Above this many (round, user) evaluations the box plots carry quartiles, not every point
# (a page stays a few MB for 10,000 users x 100 rounds).
BOX_POINTS_MAX = 20_000
# One colour per metric when one run is shown; one per run (and a dash per metric) otherwise.
METRIC_COLORS = {"global": "#1f77b4", "personal": "#ff7f0e", "central": "#222222"}
METRIC_DASH = {"global": "solid", "personal": "dash", "central": "dashdot"}
RUN_COLORS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)


@dataclass
class RunData:
    """One run folder, as the report reads it."""

    path: Path
    rounds: pd.DataFrame
    clients: pd.DataFrame
    info: dict[str, str]
    config: dict[str, Any]
    split: LabelCounts | None
    split_meta: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def status(self) -> str:
        return self.info.get("status", "unknown")

    def final_round(self) -> pd.Series | None:
        return None if self.rounds.empty else self.rounds.iloc[-1]

    def evaluated(self) -> pd.DataFrame:
        """Per-user rows with both models' accuracy measured."""
        c = self.clients
        return c[c["global_accuracy"].notna() & c["personal_accuracy"].notna()]


def load_run(run_dir: str | Path) -> RunData:
    """Read a run folder; raises `MetricsError` (one line) if it is not a readable run."""
    path = Path(run_dir)
    rounds = read_rounds(path)
    clients = read_clients(path)
    info = read_run_info(path)
    split, meta = read_data_split(path)
    return RunData(path, rounds, clients, info, _run_config(path, info), split, meta)


def _run_config(path: Path, info: dict[str, str]) -> dict[str, Any]:
    """The run's resolved config, flat (``section.key``), from metrics.db or config.toml."""
    text = info.get("config", "")
    if not text and (path / "config.toml").is_file():
        text = (path / "config.toml").read_text()
    try:
        return flatten(tomllib.loads(text)) if text else {}
    except tomllib.TOMLDecodeError:
        return {}


def run_labels(runs: Sequence[RunData]) -> list[str]:
    """Each run's label: the config keys whose values differ between the runs.

    ``strategy.name=fedprox, strategy.proximal-mu=0.1`` beside ``strategy.name=fedavg, ...``;
    the folder name where the configs do not tell the runs apart (or for one run).
    """
    varying = varying_keys(runs)
    labels = []
    for run in runs:
        parts = [f"{k}={_show(run.config.get(k, '-'))}" for k in varying]
        labels.append(", ".join(parts) if parts else run.path.name)
    if len(set(labels)) < len(labels):  # e.g. the same config run twice
        labels = [f"{run.path.name}: {label}" for run, label in zip(runs, labels, strict=True)]
    return labels


def varying_keys(runs: Sequence[RunData]) -> list[str]:
    """Config keys (not folders or names) whose values differ between the runs."""
    if len(runs) < 2:
        return []
    keys = sorted({k for run in runs for k in run.config} - set(_NOT_LABELS))
    return [k for k in keys if len({repr(run.config.get(k)) for run in runs}) > 1]


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write the HTML report of ``run_dirs`` (one run, or several compared) to ``out``.

    Raises `MetricsError` if a folder is not a readable run; the file is written
    atomically. Returns ``out``.
    """
    if not run_dirs:
        raise MetricsError("no run folder given: pass at least one, e.g. runs/quickstart")
    runs = [load_run(d) for d in run_dirs]
    for run, label in zip(runs, run_labels(runs), strict=True):
        run.label = label
    page = render_html(runs).encode()
    out = Path(out)
    atomic_write(out, lambda f: f.write(page), mode=0o644)
    return out


# ------------------------------------------------------------------------------- page


@dataclass
class _Page:
    """Sections of HTML, and the charts in them (each a Plotly div)."""

    sections: list[str] = field(default_factory=list)
    charts: int = 0

    def chart(self, fig: go.Figure, name: str) -> str:
        self.charts += 1
        div = pio.to_html(
            fig,
            full_html=False,
            include_plotlyjs=False,
            div_id=f"chart-{self.charts}-{name}",
            config={"displaylogo": False, "responsive": True},
        )
        return f'<div class="chart" data-chart="{html.escape(name)}">{div}</div>'

    def section(self, anchor: str, title: str, body: str) -> None:
        self.sections.append(
            f'<section id="{anchor}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'
        )


def render_html(runs: Sequence[RunData]) -> str:
    """The whole report page for ``runs`` (labelled), plotly.js inline."""
    page = _Page()
    page.section("runs", "Runs", _runs_table(runs))
    page.section("summary", "Final round", _summary_table(runs))
    page.section("accuracy", "Accuracy per round", _curves(page, runs, "accuracy"))
    page.section("loss", "Loss per round", _curves(page, runs, "loss"))
    page.section("user-accuracy", "Per-user accuracy per round", _per_run(page, runs, _box))
    page.section("gain", "Personal vs global model, per user", _per_run(page, runs, _gain))
    page.section(
        "participation", "Participation and failures", _per_run(page, runs, _participation)
    )
    page.section("cost", "Bytes and seconds per round", _cost(page, runs))
    page.section("data", "Data split", _data_splits(page, runs))
    page.section("config", "Config", _config_table(runs))
    title = "Pollinate report: " + ", ".join(r.path.name for r in runs)
    nav = " · ".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (
            ("summary", "summary"),
            ("accuracy", "accuracy"),
            ("loss", "loss"),
            ("user-accuracy", "per user"),
            ("gain", "personal vs global"),
            ("participation", "participation"),
            ("cost", "cost"),
            ("data", "data"),
            ("config", "config"),
        )
    )
    made = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="pollinate-charts" content="{page.charts}">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<header><h1>{html.escape(title)}</h1><p class="meta">written {made} · {nav}</p></header>
{"".join(page.sections)}
</body></html>
"""


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 0 24px 48px; color: #222; }
h1 { font-size: 22px; margin: 20px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 14px 0 4px; }
.meta, .note { color: #666; } .note { font-size: 13px; margin: 4px 0; }
table { border-collapse: collapse; margin: 6px 0; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f6f6f6; }
td.text { text-align: left; } tr.changed td { background: #fff4d6; }
tr.varies td { background: #e3f0ff; font-weight: 600; }
.status-failed { color: #b00020; font-weight: 600; } .status-finished { color: #1b7f3b; }
.chart { margin: 4px 0 12px; } details { margin: 6px 0; }
.good { color: #1b7f3b; } .bad { color: #b00020; }
"""


# ----------------------------------------------------------------------------- tables


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _local_time(epoch: str | None) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(epoch or "")))
    except ValueError:
        return "-"


def _runs_table(runs: Sequence[RunData]) -> str:
    rows = []
    for run in runs:
        done = int(run.rounds["round"].max()) if not run.rounds.empty else 0
        total = run.info.get("num_rounds", "?")
        try:
            took = f"{float(run.info['finished_at']) - float(run.info['started_at']):.1f} s"
        except (KeyError, ValueError):
            took = "-"
        error = run.info.get("error", "")
        rows.append(
            f"<tr><td>{html.escape(run.label)}</td><td class='text'>{html.escape(str(run.path))}"
            f"</td><td class='text status-{html.escape(run.status)}'>{html.escape(run.status)}"
            f"</td><td>{done} / {html.escape(total)}</td>"
            f"<td>{_local_time(run.info.get('started_at'))}</td>"
            f"<td>{took}</td><td class='text'>{html.escape(error)}</td></tr>"
        )
    head = "<tr><th>run</th><th>folder</th><th>status</th><th>rounds</th><th>started</th>"
    head += "<th>took</th><th>error</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def final_summary(run: RunData) -> list[dict[str, Any]]:
    """The final round's rows: model, mean accuracy, worst 10%, loss (as the CLI prints)."""
    last = run.final_round()
    if last is None:
        return []
    rows = [
        {
            "model": name,
            "accuracy": float(last[f"{name}_accuracy"]),
            "worst10": float(last[f"{name}_accuracy_worst10"]),
            "loss": float(last[f"{name}_loss"]),
        }
        for name in ("global", "personal")
    ]
    if not math.isnan(float(last["server_accuracy"])):
        rows.append(
            {
                "model": "central",
                "accuracy": float(last["server_accuracy"]),
                "worst10": math.nan,
                "loss": float(last["server_loss"]),
            }
        )
    return rows


def _comparison_table(runs: Sequence[RunData]) -> str:
    """Several runs: one row each, final accuracies and the run's total time and bytes."""
    head = (
        "<tr><th>run</th><th>rounds</th><th>global</th><th>global worst 10%</th>"
        "<th>personal</th><th>personal worst 10%</th><th>central</th><th>seconds</th>"
        "<th>MB sent + received</th></tr>"
    )
    rows = []
    for run in runs:
        last = run.final_round()
        if last is None:
            continue
        r = run.rounds
        megabytes = float((r["bytes_sent"].sum() + r["bytes_received"].sum()) / 1e6)
        cells = [
            str(int(last["round"])),
            *(
                _fmt(float(last[c]))
                for c in (
                    "global_accuracy",
                    "global_accuracy_worst10",
                    "personal_accuracy",
                    "personal_accuracy_worst10",
                    "server_accuracy",
                )
            ),
            _fmt(float(r["round_seconds"].sum()), 1),
            _fmt(megabytes, 2),
        ]
        rows.append(
            f"<tr><td>{html.escape(run.label)}</td>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    return f"<table class='compare'>{head}{''.join(rows)}</table>"


def _summary_table(runs: Sequence[RunData]) -> str:
    head = (
        "<tr><th>run</th><th>round</th><th>model</th><th>mean accuracy</th>"
        "<th>worst 10% of users</th><th>loss</th></tr>"
    )
    rows = []
    for run in runs:
        last = run.final_round()
        summary = final_summary(run)
        if last is None:
            rows.append(f"<tr><td>{html.escape(run.label)}</td><td colspan=5>no rounds</td></tr>")
        for row in summary:
            rows.append(
                f"<tr><td>{html.escape(run.label)}</td><td>{int(last['round'])}</td>"  # type: ignore[index]
                f"<td class='text'>{row['model']}</td><td>{_fmt(row['accuracy'])}</td>"
                f"<td>{_fmt(row['worst10'])}</td><td>{_fmt(row['loss'])}</td></tr>"
            )
    note = (
        "<p class='note'>Mean accuracy: example-weighted over the users evaluated in the "
        "round, each on its own test split. Central: the global model on the held-out "
        "central test set (simulations of datasets that have one).</p>"
    )
    compare = _comparison_table(runs) if len(runs) > 1 else ""
    return f"{compare}<table>{head}{''.join(rows)}</table>{note}"


def _config_table(runs: Sequence[RunData]) -> str:
    defaults = default_flat()
    varying = set(varying_keys(runs))
    keys = sorted({k for run in runs for k in run.config} | set(defaults))

    def changed(key: str) -> bool:
        return any(
            key in run.config and _show(run.config[key]) != _show(defaults.get(key)) for run in runs
        )

    def row(key: str) -> str:
        cls = "varies" if key in varying else "changed" if changed(key) else ""
        values = "".join(
            f"<td class='text'>{html.escape(_show(run.config.get(key, '-')))}</td>" for run in runs
        )
        default = html.escape(_show(defaults.get(key, "-")))
        return f"<tr class='{cls}'><td>{key}</td>{values}<td class='text'>{default}</td></tr>"

    heads = "".join(f"<th>{html.escape(run.label)}</th>" for run in runs)
    head = f"<tr><th>key</th>{heads}<th>default</th></tr>"
    set_keys = [k for k in keys if changed(k) or k in varying]
    rest = [k for k in keys if k not in set_keys]
    legend = "<span style='background:#fff4d6'>&nbsp;differs from the default&nbsp;</span>"
    if len(runs) > 1:
        legend += " <span style='background:#e3f0ff'>&nbsp;differs between the runs&nbsp;</span>"
    return (
        f"<p class='note'>{legend}</p><table>{head}{''.join(row(k) for k in set_keys)}</table>"
        f"<details><summary>all {len(keys)} keys</summary><table>{head}"
        f"{''.join(row(k) for k in rest)}</table></details>"
    )


# ----------------------------------------------------------------------------- charts


def _figure(title: str, x: str, y: str, height: int = 380) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"font": {"size": 11}},
    )
    return fig


def _round_ticks(fig: go.Figure, runs: Sequence[RunData]) -> None:
    """Whole rounds on the x axis: about ten ticks, never a round 1.5."""
    last = max((int(r.rounds["round"].max()) for r in runs if not r.rounds.empty), default=1)
    fig.update_xaxes(tick0=0, dtick=max(1, math.ceil(last / 10)))


def _style(runs: Sequence[RunData], i: int, metric: str, worst: bool = False) -> dict[str, Any]:
    """One run: colour by metric, worst-10% dotted. Several: colour by run, dash by metric."""
    if len(runs) == 1:
        return {"color": METRIC_COLORS[metric], "dash": "dot" if worst else "solid"}
    return {
        "color": RUN_COLORS[i % len(RUN_COLORS)],
        "dash": "dot" if worst else METRIC_DASH[metric],
    }


def _curves(page: _Page, runs: Sequence[RunData], kind: str) -> str:
    """Accuracy or loss per round: global and personal means (and worst 10%), central."""
    fig = _figure(f"{kind.capitalize()} per round", "round", kind)
    for i, run in enumerate(runs):
        r = run.rounds
        prefix = f"{run.label}: " if len(runs) > 1 else ""
        series: list[tuple[str, str, str, bool]] = [
            ("global", f"global_{kind}", "global (mean over users)", False),
            ("personal", f"personal_{kind}", "personal (mean over users)", False),
        ]
        if kind == "accuracy":
            series += [
                ("global", "global_accuracy_worst10", "global (worst 10% of users)", True),
                ("personal", "personal_accuracy_worst10", "personal (worst 10% of users)", True),
            ]
        series.append(("central", f"server_{kind}", "global (central test set)", False))
        for metric, column, name, worst in series:
            if column not in r or not r[column].notna().any():
                continue
            fig.add_trace(
                go.Scatter(
                    x=r["round"],
                    y=r[column],
                    mode="lines+markers",
                    name=prefix + name,
                    legendgroup=run.label,
                    line=_style(runs, i, metric, worst),
                    marker={"size": 5},
                )
            )
        if kind == "loss" and "train_loss" in r and r["train_loss"].notna().any():
            fig.add_trace(
                go.Scatter(
                    x=r["round"],
                    y=r["train_loss"],
                    mode="lines",
                    name=prefix + "training loss (mean over trained users)",
                    legendgroup=run.label,
                    line={**_style(runs, i, "global"), "dash": "longdashdot", "width": 1},
                )
            )
    note = (
        "<p class='note'>Round 0 is the initial model (central test only). A user's test "
        "accuracy in round r is of the global model after round r and of its personal "
        "model built from it.</p>"
    )
    _round_ticks(fig, runs)
    return page.chart(fig, kind) + (note if kind == "accuracy" else "")


def _per_run(page: _Page, runs: Sequence[RunData], part: Callable[[_Page, RunData], str]) -> str:
    """One block per run (a heading each when several are shown)."""
    blocks = []
    for run in runs:
        head = f"<h3>{html.escape(run.label)}</h3>" if len(runs) > 1 else ""
        blocks.append(head + part(page, run))
    return "\n".join(blocks)


def _box(page: _Page, run: RunData) -> str:
    ev = run.evaluated()
    if ev.empty:
        return "<p class='note'>No per-user evaluations recorded.</p>"
    fig = _figure("Accuracy of each user on its own test split", "round", "accuracy")
    for metric in ("global", "personal"):
        if len(ev) > BOX_POINTS_MAX:
            fig.add_trace(_quartile_box(ev, metric))
            continue
        fig.add_trace(
            go.Box(
                x=ev["round"],
                y=ev[f"{metric}_accuracy"],
                name=f"{metric} model",
                marker_color=METRIC_COLORS[metric],
                boxpoints="outliers",
                text=ev["user"],
                hovertemplate="%{text}: %{y:.3f}<extra></extra>",
            )
        )
    fig.update_layout(boxmode="group")
    _round_ticks(fig, [run])
    return page.chart(fig, "user-accuracy")


def _quartile_box(ev: pd.DataFrame, metric: str) -> go.Box:
    """A box per round from precomputed quartiles (whiskers: min and max over users)."""
    q = ev.groupby("round")[f"{metric}_accuracy"].quantile([0.0, 0.25, 0.5, 0.75, 1.0])
    q = q.unstack()
    return go.Box(
        x=list(q.index),
        lowerfence=q[0.0],
        q1=q[0.25],
        median=q[0.5],
        q3=q[0.75],
        upperfence=q[1.0],
        name=f"{metric} model",
        marker_color=METRIC_COLORS[metric],
    )


def user_gains(run: RunData) -> pd.DataFrame:
    """Last evaluated round: per user ``global``, ``personal`` accuracy and ``gain``, sorted."""
    ev = run.evaluated()
    if ev.empty:
        return ev.assign(gain=[])
    last = ev[ev["round"] == ev["round"].max()]
    out = last[["round", "user", "global_accuracy", "personal_accuracy"]].copy()
    out["gain"] = out["personal_accuracy"] - out["global_accuracy"]
    return out.sort_values(["gain", "user"]).reset_index(drop=True)


def _gain(page: _Page, run: RunData) -> str:
    gains = user_gains(run)
    if gains.empty:
        return "<p class='note'>No per-user evaluations recorded.</p>"
    r = int(gains["round"].iloc[0])
    fig = _figure(
        f"Personal minus global accuracy per user, round {r}", "user (sorted by gain)", "gain"
    )
    fig.add_trace(
        go.Bar(
            x=gains["user"],
            y=gains["gain"],
            marker_color=[
                "#1b7f3b" if g > 0 else "#b00020" if g < 0 else "#999" for g in gains["gain"]
            ],
            customdata=gains[["global_accuracy", "personal_accuracy"]].to_numpy(),
            hovertemplate=(
                "%{x}<br>gain %{y:+.3f}<br>global %{customdata[0]:.3f}"
                "<br>personal %{customdata[1]:.3f}<extra></extra>"
            ),
            name="gain",
        )
    )
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=list(gains["user"]))
    better = int((gains["gain"] > 0).sum())
    worse = int((gains["gain"] < 0).sum())
    worst = gains.iloc[0]
    text = (
        f"<p><span class='good'>{better} users gain</span> from their personal model, "
        f"<span class='bad'>{worse} lose</span>, {len(gains) - better - worse} are unchanged "
        f"(mean gain {gains['gain'].mean():+.4f}). Largest loss: {html.escape(str(worst['user']))} "
        f"({worst['gain']:+.4f}); largest gain: {html.escape(str(gains.iloc[-1]['user']))} "
        f"({gains.iloc[-1]['gain']:+.4f}).</p>"
    )
    return text + page.chart(fig, "gain")


def _participation(page: _Page, run: RunData) -> str:
    r = run.rounds[run.rounds["round"] > 0]
    if r.empty:
        return "<p class='note'>No rounds recorded.</p>"
    fig = _figure("Users and failures per round", "round", "count")
    series = [
        ("train_users", "users trained", "#1f77b4"),
        ("eval_users", "users evaluated", "#9ecae1"),
        ("failures", "failed node replies", "#b00020"),
        ("rejected", "rejected updates", "#ff7f0e"),  # recorded by newer servers only
    ]
    for column, name, color in series:
        # Rejections are rare: the bar only where validation refused an update.
        if column in r and (column != "rejected" or r[column].fillna(0).any()):
            fig.add_trace(go.Bar(x=r["round"], y=r[column], name=name, marker_color=color))
    cfg = run.config
    sampled = sampled_for_training(run)
    if sampled is not None:
        fig.add_trace(
            go.Scatter(
                x=r["round"],
                y=[sampled] * len(r),
                mode="lines",
                name="users sampled for training",
                line={"color": "#222", "dash": "dash", "width": 1},
            )
        )
    fig.update_layout(barmode="group")
    _round_ticks(fig, [run])
    notes = []
    if sampled is not None and run.split is not None:
        notes.append(
            f"{sampled} of {len(run.split.user_ids)} users are sampled for training each round "
            "(strategy.fraction-train, strategy.min-train-users); those that send no update "
            "are dropped stragglers or users on a failed node."
        )
    if float(cfg.get("train.straggler-fraction", 0) or 0) > 0:
        how = (
            "send nothing, so they show as fewer users trained"
            if cfg.get("train.drop-stragglers")
            else "train 1..epochs local epochs and are counted as trained"
        )
        notes.append(
            f"Stragglers (train.straggler-fraction = {cfg['train.straggler-fraction']}) {how}."
        )
    notes.append(
        "A failed node reply (a crashed ClientApp, a device that went away, a timeout) loses "
        "all the users it hosts for that round."
    )
    return page.chart(fig, "participation") + "".join(f"<p class='note'>{n}</p>" for n in notes)


def sampled_for_training(run: RunData) -> int | None:
    """Users Flower's strategy samples for training per round: ``max(int(U * fraction),
    min-train-users)`` of the ``U`` users (as FedAvg's ``configure_train``, which every
    Pollinate strategy uses, over users). ``None`` where ``U`` is unknown (deployments)."""
    if run.split is None:
        return None
    users = len(run.split.user_ids)
    try:
        fraction = float(run.config["strategy.fraction-train"])
        least = int(run.config["strategy.min-train-users"])
    except (KeyError, TypeError, ValueError):
        return None
    return 0 if fraction == 0 else min(users, max(int(users * fraction), least))


def _cost(page: _Page, runs: Sequence[RunData]) -> str:
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("Model bytes per round (MB)", "Seconds per round")
    )
    for i, run in enumerate(runs):
        r = run.rounds[run.rounds["round"] > 0]
        prefix = f"{run.label}: " if len(runs) > 1 else ""
        color = RUN_COLORS[i % len(RUN_COLORS)]
        for column, name, dash in (
            ("bytes_sent", "sent", "solid"),
            ("bytes_received", "received", "dash"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=r["round"],
                    y=r[column] / 1e6,
                    mode="lines+markers",
                    name=prefix + name,
                    legendgroup=run.label,
                    line={"color": color, "dash": dash},
                ),
                row=1,
                col=1,
            )
        fig.add_trace(
            go.Scatter(
                x=r["round"],
                y=r["round_seconds"],
                mode="lines+markers",
                name=prefix + "seconds",
                legendgroup=run.label,
                line={"color": color, "dash": "dot"},
            ),
            row=1,
            col=2,
        )
    fig.update_layout(template="plotly_white", height=380, margin={"l": 60, "r": 20, "t": 50})
    fig.update_xaxes(title_text="round")
    _round_ticks(fig, runs)
    note = (
        "<p class='note'>Bytes: model weights sent to and received from the nodes. "
        "Seconds: a round's evaluation and the next round's training (they share one "
        "exchange).</p>"
    )
    return page.chart(fig, "cost") + note


def _same_split(runs: Sequence[RunData]) -> bool:
    first = runs[0].split
    return first is not None and all(
        r.split is not None
        and r.split.user_ids == first.user_ids
        and r.split.train.shape == first.train.shape
        and (r.split.train == first.train).all()
        and (r.split.test == first.test).all()
        for r in runs[1:]
    )


def _data_splits(page: _Page, runs: Sequence[RunData]) -> str:
    """One split per run, or one for all when the runs share it (a strategy comparison)."""
    if len(runs) > 1 and _same_split(runs):
        return "<p class='note'>All runs have the same data split.</p>" + _data_split(page, runs[0])
    return _per_run(page, runs, _data_split)


def _data_split(page: _Page, run: RunData) -> str:
    split = run.split
    if split is None:
        reason = html.escape(str(run.split_meta.get("reason", "not recorded")))
        return f"<p class='note'>Data split {reason}.</p>"
    meta = run.split_meta
    tv = split.tv_distances()
    central = f", central test set {meta['central_test']}" if meta.get("central_test") else ""
    text = (
        f"<p>{html.escape(str(meta.get('dataset', '')))} "
        f"({html.escape(str(meta.get('detail', '')))}): "
        f"{len(split.user_ids)} users, {int(split.samples.sum())} samples "
        f"({int(split.train.sum())} train / {int(split.test.sum())} test){central}, "
        f"{split.num_classes} classes. Label heterogeneity: mean total-variation distance "
        f"to the global label distribution <b>{split.mean_tv:.3f}</b> "
        f"(0 = every user like the whole; 1 = disjoint labels).</p>"
    )
    users = split.user_ids
    sizes = _figure("Samples per user", "user", "samples", height=340)
    for part, counts, color in (("train", split.train, "#1f77b4"), ("test", split.test, "#9ecae1")):
        sizes.add_trace(
            go.Bar(
                x=users,
                y=counts.sum(axis=1),
                name=part,
                marker_color=color,
                customdata=tv,
                hovertemplate="%{x}: %{y} "
                + part
                + "<br>TV distance %{customdata:.3f}<extra></extra>",
            )
        )
    sizes.update_layout(barmode="stack")
    share = split.user_distributions()
    # Every user named up to HEATMAP_NAMED users; beyond, a bounded height and Plotly's ticks.
    named = len(users) <= HEATMAP_NAMED
    heat = _figure(
        "Labels per user (share of the user's samples)",
        "label",
        "user",
        height=80 + 20 * len(users) if named else min(1400, 80 + 4 * len(users)),
    )
    heat.add_trace(
        go.Heatmap(
            z=share,
            x=[str(c) for c in range(split.num_classes)],
            y=[f"{u} (TV {d:.2f})" for u, d in zip(users, tv, strict=True)],
            customdata=split.total,
            colorscale="Viridis",
            zmin=0,
            zmax=1,
            hovertemplate="%{y}<br>label %{x}: %{customdata} samples (%{z:.0%})<extra></extra>",
        )
    )
    heat.update_yaxes(autorange="reversed", type="category", tickfont={"size": 10})
    if named:
        heat.update_yaxes(tickmode="linear", dtick=1)
    return text + page.chart(sizes, "samples") + page.chart(heat, "labels")


__all__ = [
    "RunData",
    "final_summary",
    "load_run",
    "render_html",
    "run_labels",
    "user_gains",
    "varying_keys",
    "write_report",
]
