"""The HTML report (server/report.py) of real runs: its sections, numbers and comparisons.

The runs are real federations in this process (digits, a few users, three rounds);
the browser test (test_report_browser.py) opens the same kind of file in Chromium.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runhelp import digits_config

from pollinate import config
from pollinate.data import load_federated_dataset
from pollinate.data.stats import label_counts
from pollinate.server.datasplit import (
    DATA_SPLIT_NAME,
    NOT_RECORDED_DEPLOYMENT,
    read_data_split,
    start_data_split,
    write_data_split,
)
from pollinate.server.metrics import MetricsError, MetricsRecorder, read_clients, read_rounds
from pollinate.server.report import (
    load_run,
    run_labels,
    sampled_for_training,
    user_gains,
    write_report,
)
from pollinate.server.report_static import plot_runs

SECTIONS = [
    "runs",
    "summary",
    "accuracy",
    "loss",
    "user-accuracy",
    "gain",
    "participation",
    "cost",
    "data",
    "config",
]
CHARTS = ["accuracy", "loss", "user-accuracy", "gain", "participation", "cost", "samples", "labels"]


@pytest.fixture
def runs(report_runs: dict[str, Path]) -> dict[str, Path]:
    return report_runs


def charts_of(page: str) -> list[str]:
    return re.findall(r'<div class="chart" data-chart="([^"]+)">', page)


def test_every_section_and_chart_of_a_digits_run(runs: dict[str, Path], tmp_path: Path) -> None:
    out = write_report([runs["fedavg"]], tmp_path / "r.html")
    page = out.read_text()
    assert re.findall(r'<section id="([^"]+)">', page) == SECTIONS
    assert charts_of(page) == CHARTS
    assert f'<meta name="pollinate-charts" content="{len(CHARTS)}">' in page
    # One Plotly.newPlot per chart, each with its own div.
    assert page.count("Plotly.newPlot(") == len(CHARTS)
    # The final-round table carries the stored numbers.
    last = read_rounds(runs["fedavg"]).iloc[-1]
    for column in ("global_accuracy", "personal_accuracy", "server_accuracy"):
        assert f"<td>{last[column]:.4f}</td>" in page
    # The config: keys that differ from the defaults are marked, the rest folded away.
    assert "<tr class='changed'><td>data.num-users</td><td class='text'>6</td>" in page
    assert "<tr class=''><td>train.momentum</td>" in page


def test_html_needs_no_network(runs: dict[str, Path], tmp_path: Path) -> None:
    page = write_report([runs["fedavg"]], tmp_path / "r.html").read_text()
    tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", page)
    assert tags  # the inline plotly.js and the chart scripts
    assert not [t for t in tags if re.search(r"\b(?:src|href)\s*=", t)], tags
    assert page.count("<script") == 1 + len(CHARTS)  # plotly.js once, then one per chart
    assert len(page) > 3_000_000  # plotly.js itself is inside


def test_data_split_is_what_the_users_trained_on(runs: dict[str, Path]) -> None:
    split, meta = read_data_split(runs["fedavg"])
    assert split is not None and meta["dataset"] == "digits" and meta["central_test"] > 0
    cfg = digits_config(runs["fedavg"])
    expected = label_counts(load_federated_dataset(config.data_spec(cfg)))
    assert split.user_ids == expected.user_ids
    assert np.array_equal(split.train, expected.train)
    assert np.array_equal(split.test, expected.test)
    # The ClientApps' own reports agree: each user's test examples are its split's.
    clients = read_clients(runs["fedavg"])
    evaluated = clients[clients["test_examples"].notna()]
    tests = dict(zip(split.user_ids, split.test.sum(axis=1), strict=True))
    assert len(evaluated) > 0
    for user, n in zip(evaluated["user"], evaluated["test_examples"], strict=True):
        assert n == tests[user]


def test_compare_runs_side_by_side(runs: dict[str, Path], tmp_path: Path) -> None:
    loaded = [load_run(runs["fedavg"]), load_run(runs["fedprox"])]
    labels = run_labels(loaded)
    assert labels == [
        "strategy.name=fedavg, strategy.proximal-mu=0.01",
        "strategy.name=fedprox, strategy.proximal-mu=0.1",
    ]
    page = write_report([runs["fedavg"], runs["fedprox"]], tmp_path / "ab.html").read_text()
    # Both runs' curves in the shared charts, their final numbers in one table.
    for label in labels:
        assert f"{label}: global (mean over users)" in page
        assert f"<tr><td>{label}</td>" in page
    compare = page.split("<table class='compare'>")[1].split("</table>")[0]
    assert compare.count("<tr><td>") == 2
    for run in runs.values():
        assert f"<td>{read_rounds(run).iloc[-1]['personal_accuracy']:.4f}</td>" in compare
    # Same data split: shown once. Per-run charts: once per run.
    assert "All runs have the same data split." in page
    assert charts_of(page).count("labels") == 1
    assert charts_of(page).count("gain") == 2
    assert "<tr class='varies'><td>strategy.name</td>" in page


def test_gain_is_personal_minus_global_in_the_last_evaluated_round(
    runs: dict[str, Path],
) -> None:
    gains = user_gains(load_run(runs["fedavg"]))
    clients = read_clients(runs["fedavg"])
    last = clients[clients["round"] == clients["round"].max()].set_index("user")
    assert len(gains) == len(last) == 6
    assert list(gains["gain"]) == sorted(gains["gain"])
    for row in gains.itertuples():
        expected = last.loc[row.user, "personal_accuracy"] - last.loc[row.user, "global_accuracy"]
        assert row.gain == pytest.approx(expected)


def test_participation_shows_sampled_and_trained_users(runs: dict[str, Path]) -> None:
    run = load_run(runs["fedavg"])
    assert sampled_for_training(run) == 6  # fraction-train 1.0 of 6 users
    trained = run.rounds["train_users"].iloc[1:]
    assert (trained <= 6).all() and (trained < 6).any()  # the dropped stragglers
    page = write_report([runs["fedavg"]], runs["fedavg"] / "r.html").read_text()
    assert "users sampled for training" in page and "dropped stragglers" in page
    half = load_run(runs["fedavg"])
    half.config = {**half.config, "strategy.fraction-train": 0.5, "strategy.min-train-users": 4}
    assert sampled_for_training(half) == 4
    half.split = None  # a deployment: the users are not known
    assert sampled_for_training(half) is None


def test_deployment_run_shows_the_split_is_not_recorded(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "deployed"
    shutil.copytree(runs["fedavg"], run)
    write_data_split(run, None)  # what a deployed server writes
    assert json.loads((run / DATA_SPLIT_NAME).read_text())["recorded"] is False
    page = write_report([run], tmp_path / "d.html").read_text()
    assert NOT_RECORDED_DEPLOYMENT in page
    assert "samples" not in charts_of(page) and "labels" not in charts_of(page)
    (run / DATA_SPLIT_NAME).unlink()  # a run from before the split was recorded
    assert "is missing" in write_report([run], tmp_path / "d.html").read_text()


def test_rejected_column_is_shown_when_the_rounds_table_has_it(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "rejected"
    shutil.copytree(runs["fedavg"], run)
    assert "rejected updates" not in write_report([run], tmp_path / "a.html").read_text()
    with sqlite3.connect(run / "metrics.db") as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(rounds)")}
        if "rejected" not in columns:  # a metrics.db from before update validation
            db.execute("ALTER TABLE rounds ADD COLUMN rejected REAL")
        db.execute("UPDATE rounds SET rejected = round % 2")
    assert "rejected updates" in write_report([run], tmp_path / "b.html").read_text()


def test_missing_or_non_run_folder_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")
    with pytest.raises(MetricsError, match=r"no metrics\.db"):
        write_report([tmp_path], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_static_plot_of_two_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    loaded = [load_run(runs["fedavg"]), load_run(runs["fedprox"])]
    out = plot_runs(loaded, tmp_path / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 50_000


def test_report_renders_in_chromium(
    runs: dict[str, Path], tmp_path: Path, open_report: Callable[[Path], dict[str, Any]]
) -> None:
    one = open_report(write_report([runs["fedavg"]], tmp_path / "one.html"))
    assert one["errors"] == []
    assert one["sections"] == SECTIONS
    assert one["charts"] == one["rendered"] == len(CHARTS)
    assert one["requests"] == [(tmp_path / "one.html").resolve().as_uri()]  # nothing else
    two = open_report(write_report([runs["fedavg"], runs["fedprox"]], tmp_path / "two.html"))
    assert two["errors"] == []
    # Shared charts once, per-run charts (per-user, gain, participation) per run, split once.
    assert two["charts"] == two["rendered"] == len(CHARTS) + 3


def test_a_split_that_cannot_be_counted_says_why(tmp_path: Path) -> None:
    (tmp_path / DATA_SPLIT_NAME).write_text('{"recorded": true}')  # an earlier run's
    spec = config.data_spec(
        digits_config(tmp_path, **{"data.dataset": "file", "data.path": str(tmp_path / "x.csv")})
    )
    start_data_split(tmp_path, spec).join()
    split, meta = read_data_split(tmp_path)
    assert split is None and meta["reason"].startswith("not recorded: ")
    assert "x.csv" in meta["reason"]


def test_a_run_that_just_started(tmp_path: Path) -> None:
    recorder = MetricsRecorder(tmp_path / "run")
    recorder.start(config_toml=config.to_toml(digits_config(tmp_path / "run")), num_rounds=3)
    page = write_report([tmp_path / "run"], tmp_path / "r.html").read_text()
    assert "status-running" in page and "no rounds" in page
    recorder.end_round(0, {"loss": 2.3, "accuracy": 0.1})  # the initial model only
    page = write_report([tmp_path / "run"], tmp_path / "r.html").read_text()
    assert "<td>0.1000</td>" in page and "No per-user evaluations recorded." in page
    recorder.close()


def test_many_evaluations_are_drawn_as_quartiles(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ev = load_run(runs["fedavg"]).evaluated()
    # The charts' data follow the head (plotly.js, which names every attribute, is in it).
    points = write_report([runs["fedavg"]], tmp_path / "points.html").read_text()
    assert '"q1"' not in points.split("</head>")[1]
    monkeypatch.setattr("pollinate.server.report.BOX_POINTS_MAX", len(ev) - 1)
    page = write_report([runs["fedavg"]], tmp_path / "q.html").read_text()
    body = page.split("</head>")[1]
    assert '"q1"' in body and '"lowerfence"' in body and "user-accuracy" in charts_of(page)
    assert len(page) < len(points)  # no per-user points
