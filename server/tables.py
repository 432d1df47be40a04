"""Metrics as text tables that a person reads: the ``pollinate metrics`` table.

Counts print as integers (``3``, not ``3.0``, also where a missing value made pandas store
the column as float), epoch seconds as local ISO time, other numbers with 4 decimals, a
missing value as ``-``. A table wider than the terminal is cut into column blocks that each
fit, the key columns (``round``, ``user``) repeated in every block, as a reader lines rows up
by them; a cell longer than :data:`MAX_CELL` characters (a long user id) is shortened.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pollinate.server.metrics import CLIENT_COUNTS, ROUND_COLUMNS, ROUND_COUNTS, MetricsError

if TYPE_CHECKING:
    import pandas as pd

# Columns that hold counts, whatever dtype the database handed back.
COUNT_COLUMNS = frozenset(ROUND_COUNTS + CLIENT_COUNTS)
# Columns that hold Unix time stamps.
TIME_COLUMNS = frozenset({"finished_at", "started_at"})
# Columns a reader lines rows up by: repeated in every block of a wrapped table.
KEY_COLUMNS = ("round", "user")
MAX_CELL = 24
GAP = "  "


class ColumnError(MetricsError):
    """A ``--columns`` name the table does not have."""


def select_columns(df: pd.DataFrame, columns: str | Sequence[str] | None) -> pd.DataFrame:
    """The columns named (comma-separated or a list), in that order; all when None."""
    if columns is None:
        return df
    names = [c.strip() for c in columns.split(",")] if isinstance(columns, str) else list(columns)
    names = [c for c in names if c]
    unknown = [c for c in names if c not in df.columns]
    if unknown or not names:
        what = f"unknown column '{unknown[0]}'" if unknown else "--columns names no column"
        raise ColumnError(f"{what}; choose from: {', '.join(map(str, df.columns))}")
    return df[names]


def format_cell(column: str, value: object) -> str:
    """One value as the table shows it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value if len(value) <= MAX_CELL else value[: MAX_CELL - 1] + "…"
    if isinstance(value, bool):
        return str(value)
    number = float(value)  # type: ignore[arg-type]
    if column in TIME_COLUMNS:
        return local_iso(number)
    if column in COUNT_COLUMNS or (isinstance(value, int) and not isinstance(value, bool)):
        return str(round(number))
    return f"{number:.4f}"


def local_iso(epoch_seconds: float) -> str:
    """``2026-12-01T09:14:03+01:00``: the machine's local time, to the second."""
    return datetime.fromtimestamp(epoch_seconds).astimezone().isoformat(timespec="seconds")


def terminal_width() -> int | None:
    """Columns of the terminal stdout is, ``$COLUMNS`` if set; None when not a terminal."""
    if os.environ.get("COLUMNS") or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None  # a pipe or a file: one block, whatever its width


def format_table(df: pd.DataFrame, width: int | None = None) -> str:
    """``df`` as aligned text, wrapped into column blocks no wider than ``width``.

    Text columns (user ids, a sweep's grid values) are left-aligned, numbers right-aligned.
    """
    if df.empty:
        return "(no rows yet)\n"
    columns = [str(c) for c in df.columns]
    left = {str(c) for c in df.columns if _is_text(df[c].tolist())}
    cells = {c: [format_cell(c, v) for v in df[c].tolist()] for c in columns}
    widths = {c: max(len(c), *(len(s) for s in cells[c])) for c in columns}
    blocks = _blocks(columns, widths, width)
    out: list[str] = []
    for i, block in enumerate(blocks):
        if i:
            out.append("")
        out.append(_line(block, widths, {c: c for c in block}, left))
        for r in range(len(df)):
            out.append(_line(block, widths, {c: cells[c][r] for c in block}, left))
    return "\n".join(out) + "\n"


def _line(
    block: list[str],
    widths: dict[str, int],
    values: dict[str, str],
    left: frozenset[str] | set[str] = frozenset({"user"}),
) -> str:
    parts = [values[c].ljust(widths[c]) if c in left else values[c].rjust(widths[c]) for c in block]
    return GAP.join(parts).rstrip()


def _is_text(values: list[object]) -> bool:
    """Whether a column holds words (user ids), not numbers or numbers as text (``"0.1"``)."""
    try:
        for v in values:
            float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True
    return False


def _blocks(columns: list[str], widths: dict[str, int], width: int | None) -> list[list[str]]:
    """Split the columns into blocks that fit ``width``, each led by the key columns."""
    keys = [c for c in KEY_COLUMNS if c in columns]
    rest = [c for c in columns if c not in keys]
    if width is None or _span([*keys, *rest], widths) <= width or not rest:
        return [columns]
    blocks: list[list[str]] = []
    current: list[str] = []
    for c in rest:
        if current and _span([*keys, *current, c], widths) > width:
            blocks.append([*keys, *current])
            current = []
        current.append(c)
    blocks.append([*keys, *current])
    return blocks


def _span(block: list[str], widths: dict[str, int]) -> int:
    return sum(widths[c] for c in block) + len(GAP) * (len(block) - 1)


# The round columns a narrow terminal gets when following a run without --columns: as
# many as fit, in this order of importance (shown in the table's own order).
FOLLOW_COLUMNS = (
    "round",
    "global_accuracy",
    "personal_accuracy",
    "server_accuracy",
    "train_users",
    "failures",
    "round_seconds",
    "eval_users",
)


def follow_printer(
    fmt: str, columns: str | None, width: int | None = None
) -> Callable[[dict[str, object]], None]:
    """A function that prints one round row at a time (header first) as ``fmt``.

    ``table``: fixed widths from the header and the first row (a stream cannot look ahead);
    without ``--columns``, the compact :data:`FOLLOW_COLUMNS` where all would not fit.
    ``csv``: a header line, then one line per row. ``json``: one JSON object per line.
    """
    names = _follow_columns(columns, width if width is not None else terminal_width())
    state: dict[str, Any] = {}

    def emit(row: dict[str, object]) -> None:
        values = {c: row[c] for c in names}
        if fmt == "json":
            line = json.dumps({c: _json_value(v) for c, v in values.items()})
        elif fmt == "csv":
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="")
            if "header" not in state:
                writer.writerow(names)
                print(out.getvalue(), flush=True)
                out = io.StringIO()
                writer = csv.writer(out, lineterminator="")
                state["header"] = True
            writer.writerow(["" if _missing(v) else v for v in values.values()])
            line = out.getvalue()
        else:
            cells = {c: format_cell(c, v) for c, v in values.items()}
            if "widths" not in state:
                state["widths"] = {c: max(len(c), len(cells[c]), 6) for c in names}
                print(_line(names, state["widths"], {c: c for c in names}), flush=True)
            line = _line(names, state["widths"], cells)
        print(line, flush=True)

    return emit


def _follow_columns(columns: str | None, width: int | None) -> list[str]:
    if columns is not None:
        names = [c.strip() for c in columns.split(",") if c.strip()]
        unknown = [c for c in names if c not in ROUND_COLUMNS]
        if unknown or not names:
            what = f"unknown column '{unknown[0]}'" if unknown else "--columns names no column"
            raise ColumnError(f"{what}; choose from: {', '.join(ROUND_COLUMNS)}")
        return names
    full = list(ROUND_COLUMNS)
    if width is None or _stream_span(full) <= width:
        return full
    chosen: list[str] = []
    for c in FOLLOW_COLUMNS:
        if not chosen or _stream_span([*chosen, c]) <= width:
            chosen.append(c)
    return [c for c in full if c in chosen]


def _stream_span(names: list[str]) -> int:
    # A number cell is at least 6 wide ("0.1234"), a time 25; names are usually wider.
    return sum(max(len(c), 25 if c in TIME_COLUMNS else 6) for c in names) + len(GAP) * (
        len(names) - 1
    )


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _json_value(value: object) -> object:
    if _missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
