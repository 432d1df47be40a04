"""Read users' data from a CSV or Parquet table.

The table has a user-id column, a label column, and numeric feature columns (every other
column, in file order). In simulation one file holds every user; on a device in deployment
the same reader loads the one user's own file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .spec import MAX_CLASSES, DataError
from .tables import SUFFIXES, TableError, iter_table, table_kind

if TYPE_CHECKING:  # imported where used (1.1 s): a simulation worker never reads a file
    import pandas as pd


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def load_user_file(
    path: str, *, user_column: str, label_column: str, user_id: str | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load a table as ``{user id: (x, y)}``, users in sorted order.

    ``x`` is float32 of shape ``(n, F)`` (feature columns in file order), ``y`` int64 class
    indices. User ids are strings (a CSV user column is read as text, so ``007`` stays
    ``"007"``); rows keep their file order within each user. With ``user_id``, only that
    user's rows are kept and checked. Every problem raises a one-line `DataError`.
    """
    df = _read_table(path, user_column)
    name = Path(path).name
    columns = [str(c) for c in df.columns]
    for role, column in (("user", user_column), ("label", label_column)):
        if column not in columns:
            raise DataError(
                f"data file {name!r} has no column {column!r}; set data.{role}-column "
                f"to one of: {_listing(columns)}"
            )
    if user_column == label_column:
        raise DataError(f"user and label column are both {user_column!r}; they must differ")
    unnamed = [c for c in columns if c.startswith("Unnamed: ")]
    if unnamed:
        raise DataError(
            f"data file {name!r} has a column without a header name ({unnamed[0]!r}); name it "
            "or drop it (pandas writes one for the index unless to_csv(..., index=False))"
        )
    feature_columns = [c for c in columns if c not in (user_column, label_column)]
    if not feature_columns:
        raise DataError(
            f"data file {name!r} has no feature columns; besides {user_column!r} and "
            f"{label_column!r} it needs at least one numeric column"
        )
    df.columns = columns

    users = df[user_column]
    missing = users.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"data file {name!r} has {int(missing.sum())} rows with no user id in column "
            f"{user_column!r} (first at {_row(df, missing)}); fill or drop those rows"
        )
    ids = users.astype(str).to_numpy()
    if user_id is not None:
        keep = ids == str(user_id)
        if not keep.any():
            known = np.unique(ids)
            raise DataError(
                f"user {user_id!r} is not in data file {name!r} (it has {len(known)} users: "
                f"{_listing(known.tolist())}); check the user id or the file"
            )
        df, ids = df[keep], ids[keep]

    x = _features(df, feature_columns, name)
    y = _labels(df, label_column, name)
    order = np.argsort(ids, kind="stable")
    uniq, starts = np.unique(ids[order], return_index=True)
    groups = np.split(order, starts[1:])
    return {str(u): (x[g], y[g]) for u, g in zip(uniq, groups, strict=True)}


def _read_table(path: str, user_column: str) -> pd.DataFrame:
    p = Path(path)
    kind = table_kind(p)
    if kind is None:
        raise DataError(
            f"data file {str(p)!r} has unsupported type {p.suffix or '(no suffix)'!r}; "
            f"use one of: {', '.join(SUFFIXES)}"
        )
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist; set data.path to an existing file")
    try:
        # A CSV's ids are read as text so "007" and "7" stay distinct users.
        (df,) = iter_table(p, kind, text_columns=[user_column])
    except TableError as e:
        if e.empty:
            raise DataError(
                f"data file {str(p)!r} is empty; it needs a header row and data"
            ) from None
        raise DataError(
            f"could not read data file {str(p)!r} as {kind.upper()} ({e.reason}); "
            f"check that it is a valid {kind.upper()} file"
        ) from None
    if len(df) == 0:
        raise DataError(f"data file {str(p)!r} has no rows; it needs at least one sample")
    return df


def _features(df: pd.DataFrame, columns: list[str], name: str) -> np.ndarray:
    import pandas as pd

    out = np.empty((len(df), len(columns)), dtype=np.float32)  # (n, F)
    for j, column in enumerate(columns):
        raw = df[column]
        values = raw if pd.api.types.is_numeric_dtype(raw) else _to_numeric(raw)
        bad_text = (values.isna() & raw.notna()).to_numpy()
        if bad_text.any():
            raise DataError(
                f"feature column {column!r} in {name!r} is not numeric (e.g. "
                f"{_example(raw, bad_text)} at {_row(df, bad_text)}); "
                "encode it as numbers or drop the column"
            )
        col = values.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(col)
        if bad.any():
            raise DataError(
                f"feature column {column!r} in {name!r} has {int(bad.sum())} missing or "
                f"infinite values (first at {_row(df, bad)}); fill or drop those rows"
            )
        # Checked in float64: cast to float32, such a value would silently become inf.
        huge = np.abs(col) > _FLOAT32_MAX
        if huge.any():
            raise DataError(
                f"feature column {column!r} in {name!r} has {int(huge.sum())} values beyond "
                f"float32 range (e.g. {col[int(np.argmax(huge))]:g} at {_row(df, huge)}; "
                f"|x| must be <= {_FLOAT32_MAX:.4g}); rescale the column"
            )
        out[:, j] = col
    return out


def _to_numeric(raw: pd.Series) -> pd.Series:
    """Numbers stored as text become numbers; anything else becomes NaN."""
    import pandas as pd

    try:
        return pd.to_numeric(raw, errors="coerce")
    except (TypeError, ValueError):
        return pd.Series(np.nan, index=raw.index)


def _labels(df: pd.DataFrame, column: str, name: str) -> np.ndarray:
    raw = df[column]
    missing = raw.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"label column {column!r} in {name!r} has {int(missing.sum())} missing values "
            f"(first at {_row(df, missing)}); every row needs a label"
        )
    values = _to_numeric(raw).to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    bad[~bad] = (values[~bad] < 0) | (values[~bad] != np.round(values[~bad]))
    if bad.any():
        raise DataError(
            f"label column {column!r} in {name!r} has {_example(raw, bad)} at {_row(df, bad)}; "
            "labels must be integer class indices 0..C-1 (map class names to 0, 1, ...)"
        )
    # Bounded before anything is sized by the number of classes (the model's head).
    big = values >= MAX_CLASSES
    if big.any():
        raise DataError(
            f"label column {column!r} in {name!r} has {_example(raw, big)} at {_row(df, big)}; "
            f"labels must be class indices 0..C-1 with at most {MAX_CLASSES} classes "
            "(map class ids to 0, 1, ...)"
        )
    return values.astype(np.int64)


def _row(df: pd.DataFrame, mask: np.ndarray) -> str:
    """Where the first flagged row is, counted from 1 after the header."""
    return f"data row {int(df.index[int(np.argmax(mask))]) + 1}"


def _example(raw: pd.Series, mask: np.ndarray) -> str:
    value = raw.to_numpy()[int(np.argmax(mask))]
    return repr(value.item() if isinstance(value, np.generic) else value)


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
