"""Flower's console log with timestamps and without colour codes (it goes to a log file).

Why: Pollinate runs the SuperLink and SuperNode as children whose output is written to
``logs/*.log``; Flower's console handler colours its lines and leaves out the time. The one
setter is the non-public ``flwr.supercore.logger.update_console_handler(level, timestamps,
colored)``.

Stock: coloured lines without timestamps; everything works. A changed signature falls
back to that with a one-line warning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pollinate.flower_compat._core import mark_engaged, parameters
from pollinate.flower_compat._names import flower_module, stock_instead

MODULE = "flwr.supercore.logger"
NAME = f"{MODULE}.update_console_handler"
EXPECT = ("level", "timestamps", "colored")


def _console_settings(logger_module: object) -> tuple[bool, bool]:
    """(timestamps, colored) of Flower's console handler now, to restore them after."""
    handler = getattr(logger_module, "console_handler", None)
    return bool(getattr(handler, "timestamps", False)), bool(getattr(handler, "colored", True))


@contextmanager
def plain_console() -> Iterator[bool]:
    """Inside the block Flower logs with timestamps and no colour; yields whether it does."""
    logger = flower_module(MODULE)
    update = getattr(logger, "update_console_handler", None)
    if update is None or parameters(update) != EXPECT:
        stock_instead(NAME, f"does not take ({', '.join(EXPECT)})", "log lines go to a file")
        yield False
        return
    timestamps, colored = _console_settings(logger)
    update(timestamps=True, colored=False)
    mark_engaged(NAME)
    try:
        yield True
    finally:
        update(timestamps=timestamps, colored=colored)
