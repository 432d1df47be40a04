"""The metrics table: counts as integers, times as local ISO time, column subsets, widths."""

from __future__ import annotations

import math
from datetime import datetime

import pandas as pd
import pytest

from pollinate.server.tables import (
    ColumnError,
    follow_printer,
    format_cell,
    format_table,
    select_columns,
)

STAMP = 1796116234.0  # 2026-12-01


def rounds_frame() -> pd.DataFrame:
    # train_users holds a NaN, so pandas stores it as float: it must still print as "4".
    return pd.DataFrame(
        {
            "round": [0, 1, 2],
            "global_accuracy": [math.nan, 0.8472222, 0.95],
            "train_users": [math.nan, 4.0, 4.0],
            "bytes_sent": [0, 77500, 38750],
            "finished_at": [STAMP, STAMP + 1, STAMP + 2],
        }
    )


def test_counts_print_as_integers_and_missing_as_a_dash() -> None:
    lines = format_table(rounds_frame()).splitlines()
    assert lines[0].split() == [
        "round", "global_accuracy", "train_users", "bytes_sent", "finished_at"
    ]  # fmt: skip
    first, second = lines[1].split(), lines[2].split()
    assert first[:4] == ["0", "-", "-", "0"]
    assert second[:4] == ["1", "0.8472", "4", "77500"]
    assert "4.0" not in lines[2] and "77500.0" not in lines[2]


def test_times_are_local_iso_to_the_second() -> None:
    cell = format_cell("finished_at", STAMP)
    parsed = datetime.fromisoformat(cell)
    assert parsed.tzinfo is not None and parsed.timestamp() == STAMP
    assert cell == datetime.fromtimestamp(STAMP).astimezone().isoformat(timespec="seconds")


def test_column_subset_in_the_order_given() -> None:
    df = select_columns(rounds_frame(), "train_users, round")
    assert list(df.columns) == ["train_users", "round"]


@pytest.mark.parametrize("spec", ["round,nope", "", " , "])
def test_unknown_or_no_column_names_the_choices(spec: str) -> None:
    with pytest.raises(ColumnError) as err:
        select_columns(rounds_frame(), spec)
    message = str(err.value)
    assert "\n" not in message and "round, global_accuracy, train_users" in message
    if "nope" in spec:
        assert "unknown column 'nope'" in message


def test_a_wide_table_wraps_into_blocks_that_fit_each_led_by_the_key_column() -> None:
    df = rounds_frame()
    full = format_table(df, width=None)
    assert max(len(line) for line in full.splitlines()) > 40
    wrapped = format_table(df, width=40)
    blocks = wrapped.strip("\n").split("\n\n")
    assert len(blocks) > 1
    for block in blocks:
        lines = block.splitlines()
        assert all(len(line) <= 40 for line in lines), block
        assert lines[0].split()[0] == "round"
        assert [ln.split()[0] for ln in lines[1:]] == ["0", "1", "2"]
    shown = {name for block in blocks for name in block.splitlines()[0].split()}
    assert shown == set(df.columns)  # nothing lost by wrapping


def test_long_user_ids_are_shortened() -> None:
    df = pd.DataFrame({"round": [1], "user": ["u" * 60], "global_accuracy": [0.5]})
    line = format_table(df).splitlines()[1]
    assert "u" * 60 not in line and "…" in line and len(line) < 60


def test_empty_table() -> None:
    assert format_table(rounds_frame().iloc[0:0]) == "(no rows yet)\n"


def test_follow_printer_prints_a_header_then_one_line_per_row(
    capsys: pytest.CaptureFixture[str],
) -> None:
    emit = follow_printer("table", "round,train_users,global_accuracy", width=None)
    emit({"round": 0, "train_users": 0.0, "global_accuracy": math.nan})
    emit({"round": 1, "train_users": 4.0, "global_accuracy": 0.84722})
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split() for ln in lines] == [
        ["round", "train_users", "global_accuracy"],
        ["0", "0", "-"],
        ["1", "4", "0.8472"],
    ]
    csv_emit = follow_printer("csv", "round,global_accuracy", width=None)
    csv_emit({"round": 1, "global_accuracy": 0.5})
    assert capsys.readouterr().out.splitlines() == ["round,global_accuracy", "1,0.5"]
    with pytest.raises(ColumnError, match="choose from: round, server_loss"):
        follow_printer("table", "round,user", width=None)


def test_follow_table_on_a_narrow_terminal_keeps_the_compact_columns(
    capsys: pytest.CaptureFixture[str],
) -> None:
    row = {c: 1.0 for c in ("round", "server_loss", "finished_at")}
    emit = follow_printer("table", None, width=80)
    from pollinate.server.metrics import ROUND_COLUMNS

    emit({c: row.get(c, 0.5) for c in ROUND_COLUMNS})
    header = capsys.readouterr().out.splitlines()[0]
    assert len(header) <= 80 and header.split()[0] == "round"


def test_words_are_left_aligned_and_numbers_right_aligned() -> None:
    df = pd.DataFrame({"user": ["a", "bbbbbb"], "grid": ["0.1", "10"], "acc": [0.5, 0.25]})
    lines = format_table(df).splitlines()
    assert lines[0].startswith("user  ") and lines[1].startswith("a     ")
    assert lines[1].split("  ")[-1] == "0.5000"
    assert "   0.1" in lines[1] and "    10" in lines[2]  # numbers as text: right-aligned
