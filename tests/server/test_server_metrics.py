"""The run's metrics database: what a round writes, and reading it while it is written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pollinate.server.metrics import (
    CLIENT_COLUMNS,
    ROUND_COLUMNS,
    MetricsError,
    MetricsRecorder,
    read_clients,
    read_rounds,
    read_run_info,
    weighted_mean,
    worst_fraction_mean,
)


def user_eval(acc_g: float, acc_p: float, n: int) -> dict[str, float]:
    return {
        "num-examples": n,
        "global-loss": 1 - acc_g,
        "global-accuracy": acc_g,
        "personal-loss": 1 - acc_p,
        "personal-accuracy": acc_p,
    }


def test_worst_fraction_is_mean_of_lowest_ceil_tenth() -> None:
    values = [float(v) for v in range(1, 21)]  # 20 users -> worst 2
    assert worst_fraction_mean(values) == 1.5
    assert worst_fraction_mean([0.7, 0.2, 0.9]) == 0.2  # at least one user
    assert math.isnan(worst_fraction_mean([]))


def test_weighted_mean_weights_by_examples() -> None:
    assert weighted_mean([(1.0, 1), (0.0, 3)]) == 0.25
    assert math.isnan(weighted_mean([]))


def test_round_rows_and_client_rows(tmp_path: Path) -> None:
    rec = MetricsRecorder(tmp_path)
    rec.start(config_toml="[run]\n", num_rounds=1)
    rec.end_round(0, {"loss": 2.3, "accuracy": 0.1})
    rec.begin_round(1)
    rec.user_trained(1, "u1", {"num-examples": 10, "train-loss": 0.5})
    rec.user_trained(1, "u2", {"num-examples": 30, "train-loss": 1.0})
    for i, (g, p) in enumerate([(0.5, 0.9), (1.0, 1.0)] + [(0.8, 0.8)] * 8):
        rec.user_evaluated(1, f"u{i + 1}", user_eval(g, p, 10))
    rec.add_bytes(1, sent=100, received=40)
    rec.end_round(1, {"loss": 0.4, "accuracy": 0.85})
    rec.finish()

    rounds = read_rounds(tmp_path)
    assert list(rounds.columns) == list(ROUND_COLUMNS)
    assert rounds["round"].tolist() == [0, 1]
    r1 = rounds.iloc[1]
    assert r1["train_loss"] == pytest.approx((10 * 0.5 + 30 * 1.0) / 40)
    assert r1["global_accuracy"] == pytest.approx((0.5 + 1.0 + 0.8 * 8) / 10)
    assert r1["global_accuracy_worst10"] == pytest.approx(0.5)  # 1 of 10 users
    assert r1["personal_accuracy_worst10"] == pytest.approx(0.8)
    assert (r1["bytes_sent"], r1["bytes_received"]) == (100, 40)
    assert (r1["train_users"], r1["eval_users"]) == (2, 10)
    assert math.isnan(rounds.iloc[0]["global_accuracy"])  # round 0: server side only

    clients = read_clients(tmp_path)
    assert list(clients.columns) == list(CLIENT_COLUMNS)
    assert len(clients) == 10
    u1 = clients.set_index("user").loc["u1"]
    assert u1["train_examples"] == 10 and u1["personal_accuracy"] == 0.9
    assert math.isnan(clients.set_index("user").loc["u3"]["train_loss"])  # evaluated only
    assert read_run_info(tmp_path)["status"] == "finished"


def test_readable_while_the_run_is_writing(tmp_path: Path) -> None:
    rec = MetricsRecorder(tmp_path)
    rec.start(config_toml="", num_rounds=3)
    rec.end_round(0, {"accuracy": 0.1, "loss": 2.0})
    # The writer is still open: a reader sees the finished round, and the run as running.
    assert read_rounds(tmp_path)["round"].tolist() == [0]
    assert read_run_info(tmp_path)["status"] == "running"
    rec.begin_round(1)
    rec.user_trained(1, "u", {"num-examples": 1, "train-loss": 0.1})
    assert read_rounds(tmp_path)["round"].tolist() == [0]  # an unfinished round is invisible
    rec.close()


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match="does not exist"):
        read_rounds(tmp_path / "nope")
    with pytest.raises(MetricsError, match=r"no metrics\.db"):
        read_rounds(tmp_path)
    (tmp_path / "metrics.db").write_bytes(b"garbage" * 100)
    with pytest.raises(MetricsError, match="not a readable metrics database"):
        read_rounds(tmp_path)
