"""Differential privacy end to end through `pollinate run` (simulation): configs/privacy.toml
runs, ε is in every round's metrics and the summary, the budget stops users."""

from __future__ import annotations

from pathlib import Path

import pytest

from pollinate.cli import main
from pollinate.server.metrics import read_clients, read_rounds, read_run_info

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_the_privacy_example_config_runs_within_its_target(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    argv = ["run", str(ROOT / "configs" / "privacy.toml"), "--run-dir", str(run_dir)]
    assert main([*argv, "--set", "run.num-rounds=3", "--set", "data.num-users=8"]) == 0
    rounds = read_rounds(run_dir)
    done = rounds[rounds["round"] > 0]
    eps = done["epsilon"].tolist()
    assert eps == sorted(eps) and eps[0] > 0 and eps[-1] <= 8.0  # target-epsilon = 8
    assert eps[-1] > 7.5  # the derived noise spends (almost) all of the target, no more
    assert (done["train_users"] == 4).all()  # fraction-train 0.5 of 8 users
    assert "privacy    ε = " in capsys.readouterr().out
    assert read_run_info(run_dir)["status"] == "finished"


def test_local_dp_accounts_per_user_and_the_budget_stops_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "local"
    sets = [
        "data.num-users=4",
        "run.num-rounds=3",
        "model.name=mlp",
        "train.epochs=1",
        "train.stack-users=4",  # falls back to one user at a time under DP-SGD
        "personalization.method=ditto",
        "privacy.method=local",
        "privacy.noise-multiplier=1.0",
        "privacy.epsilon-budget=4.0",
    ]
    argv = ["run", str(ROOT / "configs" / "quickstart.toml"), "--run-dir", str(run_dir)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    rounds = read_rounds(run_dir).set_index("round")
    clients = read_clients(run_dir)
    trained = clients[clients["train_examples"].notna()]
    # Every user's ε is its own; the round's epsilon is the largest, epsilon_mean the mean.
    for r, group in trained.groupby("round"):
        assert rounds.loc[r, "epsilon"] == pytest.approx(group["epsilon"].max())
    assert (clients["epsilon"].dropna() <= 4.0).all()  # nobody passed the budget
    assert rounds.loc[3, "train_users"] < rounds.loc[1, "train_users"]  # some were stopped
