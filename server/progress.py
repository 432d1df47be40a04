"""Live progress of a run on a terminal: round i/N, users trained, ETA, latest accuracies.

The ServerApp logs one record per round on the ``pollinate`` logger with the round's metrics
row attached (``extra={"round_row": ..., "num_rounds": ...}``). On a terminal
:class:`LiveProgress` (a logging handler) prints each round's line above a `rich
<https://rich.readthedocs.io>`_ progress bar that shows the newest round, the users it
trained, the time since the start, the ETA and the newest accuracies; elsewhere (a pipe, a
file, CI) :func:`plain_handler` prints the same lines and nothing else, as tests and logs
read them.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text


def plain_handler(stream: IO[str] | None = None) -> logging.Handler:
    """One plain line per record: what a pipe, a file or CI gets."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def estimate_eta(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left if the remaining rounds take the mean time of those done; None if unknown."""
    if done <= 0 or total <= done:
        return None if done <= 0 else 0.0
    return elapsed / done * (total - done)


def format_seconds(seconds: float | None) -> str:
    """``1:02:03``, ``4:05``; ``-:--`` when unknown."""
    if seconds is None or math.isnan(seconds):
        return "-:--"
    s = round(max(0.0, seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _EtaColumn(ProgressColumn):
    """``ETA 1:23``, counting down between rounds (refreshed several times a second)."""

    def render(self, task: Task) -> Text:
        eta_at = task.fields.get("eta_at")
        left = None if eta_at is None else eta_at - time.monotonic()
        return Text(f"ETA {format_seconds(left)}", style="progress.remaining")


def _accuracy(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(v) else f"{v:.3f}"


def round_fields(row: Mapping[str, Any]) -> dict[str, str]:
    """The progress line's text for one metrics row."""
    users = row.get("train_users", 0)
    failures = int(row.get("failures", 0) or 0)
    trained = f"{int(users)} users trained" + (f", {failures} failed" if failures else "")
    if int(row.get("round", 0)) == 0:
        trained = "initial model"  # round 0 evaluates the starting point, no one trains
    accs = (
        f"global {_accuracy(row.get('global_accuracy'))} | "
        f"personal {_accuracy(row.get('personal_accuracy'))}"
    )
    central = _accuracy(row.get("server_accuracy"))
    if central != "-":
        accs += f" | central {central}"
    return {"trained": trained, "accs": accs}


class LiveProgress(logging.Handler):
    """A logging handler that keeps a rich progress bar under the log lines.

    Use as a context manager around the run: the bar starts on entry, and on exit it stops
    and leaves the terminal as it was (cursor shown, the last state printed once).
    """

    def __init__(self, num_rounds: int, console: Console | None = None) -> None:
        super().__init__()
        self.console = console or Console()
        self.num_rounds = num_rounds
        self.progress = Progress(
            TextColumn("[bold]round {task.completed}/{task.total}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[trained]}"),
            TimeElapsedColumn(),
            _EtaColumn(),
            TextColumn("{task.fields[accs]}"),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "run", total=num_rounds, trained="starting", accs="", eta_at=None
        )
        self.first_round_at: float | None = None
        self.round_seconds: list[float] = []

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.console.print(record.getMessage(), markup=False, highlight=False)
            row = getattr(record, "round_row", None)
            if isinstance(row, Mapping):
                self.update(row)
        except Exception:  # a display must never stop the run
            self.handleError(record)

    def update(self, row: Mapping[str, Any]) -> None:
        """Show the metrics row of a finished round."""
        done = int(row.get("round", 0))
        now = time.monotonic()
        # Round 0 is the initial evaluation, after start-up: time rounds from there. Where
        # no round 0 was seen (a deployment's console), the rounds' own durations.
        if done == 0:
            self.first_round_at = now
        seconds = float(row.get("round_seconds", math.nan))
        if done > 0 and not math.isnan(seconds):
            self.round_seconds.append(seconds)
        if self.first_round_at is not None:
            eta = estimate_eta(now - self.first_round_at, done, self.num_rounds)
        elif self.round_seconds:
            mean = sum(self.round_seconds) / len(self.round_seconds)
            eta = mean * max(0, self.num_rounds - done)
        else:
            eta = None
        fields: dict[str, Any] = {"eta_at": None if eta is None else now + eta}
        fields.update(round_fields(row))
        self.progress.update(self.task, completed=min(done, self.num_rounds), **fields)
        # Draw it now: the refresh thread may not get the GIL before the next round (or
        # the end of the run), and the lines printed meanwhile repeat the last drawn bar.
        self.progress.refresh()
