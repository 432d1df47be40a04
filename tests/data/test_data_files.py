from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pollinate.data import load_user_file

TABLE = pd.DataFrame(
    {
        "user": ["b", "a", "b", "c", "a", "b"],
        "f1": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
        "label": [1, 0, 2, 0, 1, 1],
        "f0": [10, 11, 12, 13, 14, 15],
    }
)


def _write(df: pd.DataFrame, path: Path) -> str:
    if path.suffix.lower() == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return str(path)


def _load(path: str, **kw: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return load_user_file(path, user_column="user", label_column="label", **kw)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".pq", ".CSV"])
def test_loads_csv_and_parquet(tmp_path: Path, suffix: str) -> None:
    users = _load(_write(TABLE, tmp_path / f"d{suffix}"))
    assert list(users) == ["a", "b", "c"]
    x, y = users["b"]
    assert x.dtype == np.float32 and y.dtype == np.int64
    # Features in file order (f1, then f0); rows in file order within the user.
    np.testing.assert_array_equal(x, [[0.5, 10], [1.5, 12], [3.0, 15]])
    np.testing.assert_array_equal(y, [1, 2, 1])


def test_one_user(tmp_path: Path, data_error) -> None:
    path = _write(TABLE, tmp_path / "d.csv")
    users = _load(path, user_id="c")
    assert list(users) == ["c"]
    np.testing.assert_array_equal(users["c"][1], [0])
    with data_error("'zz' is not in", "a, b, c"):
        _load(path, user_id="zz")


def test_csv_user_ids_stay_text(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("user,label,f\n007,0,1\n7,1,2\n007,1,3\n")
    users = _load(str(path))
    assert sorted(users) == ["007", "7"]
    assert len(users["007"][1]) == 2


def test_integer_user_ids_become_strings(tmp_path: Path) -> None:
    df = TABLE.assign(user=[3, 1, 3, 2, 1, 3])
    assert list(_load(_write(df, tmp_path / "d.parquet"))) == ["1", "2", "3"]


def test_parquet_with_user_as_index(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    TABLE.set_index("user").to_parquet(path)
    assert list(_load(str(path))) == ["a", "b", "c"]


def test_float_labels_that_are_integers(tmp_path: Path) -> None:
    df = TABLE.assign(label=[1.0, 0.0, 2.0, 0.0, 1.0, 1.0])
    _, y = _load(_write(df, tmp_path / "d.csv"))["b"]
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, [1, 2, 1])


def test_missing_file(tmp_path: Path, data_error) -> None:
    with data_error("does not exist", "data.path"):
        _load(str(tmp_path / "nope.csv"))


def test_unsupported_suffix(tmp_path: Path, data_error) -> None:
    (tmp_path / "d.json").write_text("{}")
    with data_error("unsupported", ".csv", ".parquet"):
        _load(str(tmp_path / "d.json"))


def test_empty_and_unreadable(tmp_path: Path, data_error) -> None:
    (tmp_path / "empty.csv").write_text("")
    with data_error("is empty"):
        _load(str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("user,label,f\n")
    with data_error("no rows"):
        _load(str(tmp_path / "header.csv"))
    (tmp_path / "bad.parquet").write_text("this is not parquet\nat all\n")
    with data_error("could not read", "PARQUET"):
        _load(str(tmp_path / "bad.parquet"))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_missing_column_lists_available(tmp_path: Path, suffix: str, data_error) -> None:
    path = _write(TABLE.rename(columns={"user": "client"}), tmp_path / f"d{suffix}")
    with data_error("no column 'user'", "data.user-column", "client, f1, label, f0"):
        _load(path)
    path = _write(TABLE.drop(columns="label"), tmp_path / f"e{suffix}")
    with data_error("no column 'label'", "data.label-column"):
        _load(path)


def test_no_feature_columns(tmp_path: Path, data_error) -> None:
    with data_error("no feature columns"):
        _load(_write(TABLE[["user", "label"]], tmp_path / "d.csv"))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_non_numeric_feature(tmp_path: Path, suffix: str, data_error) -> None:
    df = TABLE.assign(f0=["1", "2", "3", "abc", "5", "6"])
    with data_error("'f0'", "not numeric", "'abc'", "data row 4"):
        _load(_write(df, tmp_path / f"d{suffix}"))


def test_numeric_text_feature_is_accepted(tmp_path: Path) -> None:
    df = TABLE.assign(f0=["1", "2", "3", "4", "5", "6.5"])
    x, _ = _load(_write(df, tmp_path / "d.parquet"))["b"]
    np.testing.assert_array_equal(x[:, 1], [1, 3, 6.5])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_missing_feature(tmp_path: Path, bad: float, data_error) -> None:
    df = TABLE.assign(f1=[0.5, 1.0, bad, 2.0, 2.5, 3.0])
    with data_error("'f1'", "missing or infinite", "data row 3"):
        _load(_write(df, tmp_path / "d.parquet"))


def test_nan_label(tmp_path: Path, data_error) -> None:
    df = TABLE.assign(label=[1, 0, None, 0, 1, 1])
    with data_error("'label'", "1 missing", "data row 3"):
        _load(_write(df, tmp_path / "d.csv"))


@pytest.mark.parametrize("bad", [1.5, -1, "cat"])
def test_non_integer_label(tmp_path: Path, bad: object, data_error) -> None:
    df = TABLE.assign(label=[1, 0, 2, bad, 1, 1])
    with data_error("integer class indices 0..C-1", repr(bad), "data row 4"):
        _load(_write(df, tmp_path / "d.csv"))


def test_missing_user_id(tmp_path: Path, data_error) -> None:
    df = TABLE.assign(user=["b", None, "b", "c", "a", "b"])
    with data_error("no user id", "data row 2"):
        _load(_write(df, tmp_path / "d.csv"))


def test_unnamed_index_column(tmp_path: Path, data_error) -> None:
    path = tmp_path / "d.csv"
    TABLE.to_csv(path)  # pandas writes the index as an unnamed first column
    with data_error("without a header name", "index=False"):
        _load(str(path))
