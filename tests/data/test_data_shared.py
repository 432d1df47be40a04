"""shared_federated_dataset: one parse per process, read again when the file changes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pollinate.data import DataError, DataSpec, shared_federated_dataset


def _write(path: Path, label: int, rows: int = 8) -> None:
    df = pd.DataFrame({"user": ["a", "b"] * (rows // 2), "label": label, "f": range(rows)})
    df.to_csv(path, index=False)


def _labels(spec: DataSpec) -> set[int]:
    dataset = shared_federated_dataset(spec)
    return {int(v) for u in dataset.users() for v in np.concatenate([u.y_train, u.y_test])}


def test_the_same_spec_gives_the_same_dataset(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    _write(path, 1)
    spec = DataSpec(dataset="file", path=str(path))
    assert shared_federated_dataset(spec) is shared_federated_dataset(spec)
    other = DataSpec(dataset="file", path=str(path), test_fraction=0.5)
    assert shared_federated_dataset(other) is not shared_federated_dataset(spec)


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    _write(path, 1)
    spec = DataSpec(dataset="file", path=str(path))
    first = shared_federated_dataset(spec)
    assert _labels(spec) == {1}
    _write(path, 2, rows=10)  # another size
    assert _labels(spec) == {2}
    assert shared_federated_dataset(spec) is not first
    stat = path.stat()
    _write(path, 3, rows=10)  # the same size: the modification time tells
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _labels(spec) == {3}


def test_errors_are_raised_each_time_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "later.csv"
    spec = DataSpec(dataset="file", path=str(path))
    for _ in range(2):
        with pytest.raises(DataError, match="does not exist"):
            shared_federated_dataset(spec)
    _write(path, 4)
    assert _labels(spec) == {4}


def test_generated_datasets_are_shared_too() -> None:
    spec = DataSpec(dataset="synthetic", num_users=5)
    assert shared_federated_dataset(spec) is shared_federated_dataset(spec)
