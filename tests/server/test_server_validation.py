"""Update validation on the server: screening, the metrics it records, the CLI's view."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from pollinate.cli import summary_table
from pollinate.config import ValidationSection
from pollinate.server.metrics import MetricsRecorder, read_clients, read_rounds
from pollinate.server.validation import Candidate, screen_updates

MODEL = ArrayRecord({"weights": torch.zeros(4)})


def update(user: str, weights: object, metrics: dict[str, object] | None = None) -> Candidate:
    arrays = ArrayRecord({"weights": torch.as_tensor(np.asarray(weights, dtype=np.float32))})
    values = metrics if metrics is not None else {"num-examples": 10, "train-loss": 0.5}
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(values)})  # type: ignore[arg-type]
    return Candidate(user, (user,), Message(content, dst_node_id=1, message_type=MessageType.TRAIN))


def test_odd_records_are_rejected_instead_of_aborting_the_round() -> None:
    # Flower's own consistency check raises on a reply whose metric keys differ from the
    # others': the whole run would end. Screening drops that one reply instead.
    good = [update(u, [0.1, 0.2, 0.3, 0.4]) for u in "abc"]
    odd_keys = update("d", [0.1, 0.2, 0.3, 0.4], {"num-examples": 10, "evil": 1.0})
    no_examples = update("e", [0.1, 0.2, 0.3, 0.4], {"train-loss": 0.5})
    accepted, rejected = screen_updates([*good, odd_keys, no_examples], MODEL, ValidationSection())
    assert accepted == good
    assert "differ from the round's usual" in rejected[odd_keys]
    assert "num-examples" in rejected[no_examples]


def test_a_cohort_mean_may_claim_its_users_examples() -> None:
    cohort = update("a", [0.1] * 4, {"num-examples": 1500, "train-loss": 0.5})
    cohort = Candidate("a", ("a", "b"), cohort.msg)
    cfg = ValidationSection(max_examples=1000)
    assert screen_updates([cohort], MODEL, cfg)[1] == {}  # 2 users x 1000
    alone = update("a", [0.1] * 4, {"num-examples": 1500, "train-loss": 0.5})
    assert "above the cap of 1000" in screen_updates([alone], MODEL, cfg)[1][alone]


OLD_SCHEMA = """
CREATE TABLE run (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE rounds (round INTEGER PRIMARY KEY, server_loss REAL, server_accuracy REAL,
    train_loss REAL, global_loss REAL, global_accuracy REAL, personal_loss REAL,
    personal_accuracy REAL, global_accuracy_worst10 REAL, personal_accuracy_worst10 REAL,
    train_users REAL, eval_users REAL, failures REAL, round_seconds REAL, bytes_sent REAL,
    bytes_received REAL, finished_at REAL);
CREATE TABLE clients (round INTEGER NOT NULL, user TEXT NOT NULL, train_examples REAL,
    train_loss REAL, test_examples REAL, global_loss REAL, global_accuracy REAL,
    personal_loss REAL, personal_accuracy REAL, PRIMARY KEY (round, user));
INSERT INTO rounds (round, server_accuracy, train_users) VALUES (0, 0.5, 3);
INSERT INTO clients (round, user, train_examples) VALUES (1, 'a', 10);
"""


def test_a_metrics_db_from_before_validation_is_read_and_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "metrics.db")
    db.executescript(OLD_SCHEMA)
    db.close()
    # Readers fill the new columns in without writing...
    assert read_rounds(tmp_path)["rejected"].tolist() == [0]
    assert read_clients(tmp_path)["rejected_reason"].isna().all()
    assert "rejected" not in summary_table(read_rounds(tmp_path))
    # ...and a recorder brings the file up to the new schema.
    recorder = MetricsRecorder(tmp_path)
    recorder.start(config_toml="", num_rounds=1)
    recorder.user_trained(1, "a", {"num-examples": 10, "train-loss": 0.5})
    recorder.user_trained(1, "b", {"num-examples": 1e9, "train-loss": 99.0})
    recorder.user_rejected(1, "b", "num-examples 1000000000 above the cap of 1000000")
    row = recorder.end_round(1)
    recorder.close()
    assert row["rejected"] == 1 and row["train_users"] == 1 and row["train_loss"] == 0.5
    clients = read_clients(tmp_path).set_index("user")
    assert clients.loc["b", "rejected_reason"].startswith("num-examples")
    assert clients.loc["b", "train_examples"] == 1e9  # what it claimed, kept for the record
    assert "rejected   1 update(s)" in summary_table(read_rounds(tmp_path))
