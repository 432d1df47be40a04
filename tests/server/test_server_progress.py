"""The live progress display, rendered by rich to an in-memory terminal."""

from __future__ import annotations

import io
import logging
import re

import pytest
from rich.console import Console

from pollinate.server.progress import LiveProgress, estimate_eta, format_seconds

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def row(r: int, seconds: float = 2.0, **extra: float) -> dict[str, float]:
    return {
        "round": r,
        "train_users": 5,
        "failures": 0,
        "global_accuracy": 0.5,
        "personal_accuracy": 0.75,
        "server_accuracy": float("nan"),
        "round_seconds": seconds,
        **extra,
    }


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=140, color_system=None), out


def test_eta_is_the_mean_round_time_times_the_rounds_left() -> None:
    assert estimate_eta(10.0, 2, 10) == pytest.approx(40.0)
    assert estimate_eta(10.0, 0, 10) is None and estimate_eta(9.0, 3, 3) == 0.0
    assert format_seconds(65) == "1:05" and format_seconds(3725) == "1:02:05"
    assert format_seconds(None) == "-:--"


def test_log_lines_print_above_and_the_bar_shows_the_newest_round() -> None:
    console, out = terminal()
    log = logging.getLogger("pollinate.test-progress")
    with LiveProgress(4, console=console) as live:
        log.handlers = [live]
        log.propagate = False
        log.warning("round   0 | plain line", extra={"round_row": row(0)})
        log.warning("round   1 | plain line", extra={"round_row": row(1, failures=2)})
        log.warning("a message without a row")
    text = ANSI.sub("", out.getvalue())
    assert "round   0 | plain line" in text and "a message without a row" in text
    final = text.rsplit("round 1/4", 1)[1]  # the bar's last frame
    assert "5 users trained, 2 failed" in final
    assert re.search(r"ETA \d+:\d\d", final)
    assert "global 0.500 | personal 0.750" in final and "central" not in final


def test_without_round_zero_the_eta_comes_from_the_rounds_durations() -> None:
    console, _ = terminal()
    live = LiveProgress(5, console=console)
    live.update(row(2, seconds=10.0))  # a deployment's console joins at round 2
    eta_at = live.progress.tasks[0].fields["eta_at"]
    import time

    assert eta_at - time.monotonic() == pytest.approx(30.0, abs=1.0)  # 3 rounds x 10 s
