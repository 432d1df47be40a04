"""The fork server's preload: the run's data read once, found by every worker it forks."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pollinate import protocol
from pollinate.client.local import hosted_cohort
from pollinate.config import resolve
from pollinate.simulation import preload


def _users_file(path: Path) -> Path:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(40, 3)), columns=["f0", "f1", "f2"])
    df.insert(0, "label", rng.integers(0, 3, 40))
    df.insert(0, "user", [f"u{i % 4}" for i in range(40)])
    df.to_csv(path, index=False)
    return path


def _flat(path: Path) -> dict[str, object]:
    return {"data.dataset": "file", "data.path": str(path), "model.name": "logreg"}


def test_preloaded_data_is_what_the_node_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _users_file(tmp_path / "users.csv")
    flat = _flat(path)
    monkeypatch.setenv(preload.RUN_CONFIG_ENV, json.dumps(flat))
    assert preload.preload_from_environment()
    expected = pd.read_csv(path)
    path.unlink()  # a node that read the file now would fail: it must use what was preloaded
    cfg = resolve(flat)
    users = {}
    for slot in range(2):
        cohort = hosted_cohort(cfg, protocol.simulated_node_config(slot, 2))
        users.update({u: cohort.users[u] for u in cohort.user_ids})
    assert sorted(users) == ["u0", "u1", "u2", "u3"]
    for uid, data in users.items():
        rows = expected[expected.user == uid]
        got = np.concatenate([data.x_train, data.x_test])
        want = rows[["f0", "f1", "f2"]].to_numpy(np.float32)
        # the same rows (split into train and test in some order)
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))


@pytest.mark.parametrize("text", ["", "{not json", json.dumps({"data.dataset": "nope"})])
def test_a_bad_or_missing_config_is_not_raised(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(preload.RUN_CONFIG_ENV, text)
    assert preload.preload_from_environment() is False


def test_a_missing_file_is_left_to_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(preload.RUN_CONFIG_ENV, json.dumps(_flat(tmp_path / "gone.csv")))
    assert preload.preload_from_environment() is False


@pytest.mark.parametrize(
    "flat",
    [
        {"simulation.backend": "ray"},
        {"simulation.ray-address": "127.0.0.1:6379"},  # auto + an address = Ray
        {"simulation.cpus-per-node": "two"},  # not a number: the config check says so
        {"simulation.cpus-per-node": 0},
        {"data.dataset": 3},
        {"run.name": datetime.date(2026, 12, 1)},  # a TOML date: no JSON, no config value
    ],
)
def test_no_local_workers_start_where_the_raw_config_does_not_say_local(
    flat: dict[str, object],
) -> None:
    from pollinate.simulation.engine import start_workers_from

    assert start_workers_from(flat) is False


def test_local_workers_start_from_the_raw_config(tmp_path: Path) -> None:
    from pollinate.simulation.engine import start_workers_from

    flat = {**_flat(_users_file(tmp_path / "users.csv")), "simulation.backend": "local"}
    assert start_workers_from(flat) is True
