"""The report of a run with failed nodes, opened in Chromium (Flower's simulation engine).

One of three users holds a label its 5-class model cannot score, so its node's ClientApp
raises every round: Flower turns that into an error reply, the round goes on with the
other two users, and the rounds table counts the failure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sklearn.datasets import load_digits

from pollinate import config
from pollinate.server.metrics import read_rounds
from pollinate.server.report import write_report
from pollinate.simulation.engine import run_simulation


def failing_user_file(path: Path) -> Path:
    x, y = load_digits(return_X_y=True)
    table = pd.DataFrame(x[:240], columns=[f"p{i}" for i in range(64)])
    labels = y[:240] % 5
    labels[200:] = 9  # user "c": a label the 5-class model has no output for
    table["label"] = labels
    table.insert(0, "user", ["a"] * 100 + ["b"] * 100 + ["c"] * 40)
    table.to_csv(path, index=False)
    return path


@pytest.mark.slow  # Flower's engine and worker processes: ~10 s on 2 cores
def test_report_of_a_run_with_failures_renders(
    tmp_path: Path, open_report: Callable[[Path], dict[str, Any]]
) -> None:
    cfg = config.resolve(
        {
            "run.dir": str(tmp_path / "run"),
            "run.num-rounds": 2,
            "data.dataset": "file",
            "data.path": str(failing_user_file(tmp_path / "users.csv")),
            "model.name": "logreg",
            "model.in-features": 64,
            "model.num-classes": 5,
            "strategy.fraction-train": 1.0,
            "simulation.num-nodes": 3,  # one user per node: only c's node fails
            "personalization.method": "finetune",
        }
    )
    run_dir = run_simulation(cfg)
    rounds = read_rounds(run_dir)
    assert (rounds["failures"].iloc[1:] >= 1).all()
    assert (rounds["train_users"].iloc[1:] == 2).all()
    out = write_report([run_dir], tmp_path / "report.html")
    page = out.read_text()
    assert "failed node replies" in page
    seen = open_report(out)
    assert seen["errors"] == []
    assert seen["charts"] == seen["rendered"] == 8  # no central test: the same charts
