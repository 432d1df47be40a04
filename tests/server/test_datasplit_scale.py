"""A run over 100,000 users does not build every user to record its data split."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pollinate.data import DataSpec
from pollinate.server.datasplit import DATA_SPLIT_NAME, MAX_USERS, write_data_split


def test_split_of_many_users_is_not_recorded_and_costs_nothing(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    write_data_split(tmp_path, DataSpec(dataset="synthetic", num_users=100_000))
    took = time.perf_counter() - t0
    body = json.loads((tmp_path / DATA_SPLIT_NAME).read_text())
    assert body["recorded"] is False and "100,000 users" in body["reason"]
    assert took < 5  # building 100,000 synthetic users takes minutes


def test_split_up_to_the_limit_is_recorded(tmp_path: Path) -> None:
    write_data_split(tmp_path, DataSpec(dataset="synthetic", num_users=30))
    body = json.loads((tmp_path / DATA_SPLIT_NAME).read_text())
    assert body["recorded"] is True and len(body["users"]) == 30 <= MAX_USERS
