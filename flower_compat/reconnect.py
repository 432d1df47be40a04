"""While the SuperLink is down (restarting), the SuperNode retries every few seconds.

Why: Flower 1.42 backs off exponentially up to 20 s between tries: the HTTP retry invoker's
wait generator reads ``flwr.supercore.retry.http_retry.MAX_RETRY_DELAY`` at each retry, and
the heartbeat sender calls ``flwr.supercore.heartbeat.exponential(base_delay, multiplier,
max_delay)`` with ``max_delay=20``. Pollinate lowers the cap for both, so a restarted server
has its devices back within seconds.

Stock: up to 20 s between tries; correct, only slower to recover. A changed name or
signature falls back to that with a one-line warning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pollinate.flower_compat._core import mark_engaged, parameters, swapped
from pollinate.flower_compat._names import flower_module, stock_instead

RETRY_MODULE = "flwr.supercore.retry.http_retry"
HEARTBEAT_MODULE = "flwr.supercore.heartbeat"
BACKOFF = f"{HEARTBEAT_MODULE}.exponential"
EXPECT = ("base_delay", "multiplier", "max_delay")


@contextmanager
def reconnect_within(seconds: float) -> Iterator[bool]:
    """Inside the block, retries are at most ``seconds`` apart; yields whether they are."""
    retry = flower_module(RETRY_MODULE)
    heartbeat = flower_module(HEARTBEAT_MODULE)
    why = "a restarted server has its devices back within seconds"
    exponential = getattr(heartbeat, "exponential", None)
    if not isinstance(getattr(retry, "MAX_RETRY_DELAY", None), (int, float)):
        stock_instead(f"{RETRY_MODULE}.MAX_RETRY_DELAY", "is gone", why)
        yield False
        return
    if exponential is None or parameters(exponential) != EXPECT:
        stock_instead(BACKOFF, f"does not take ({', '.join(EXPECT)})", why)
        yield False
        return

    def capped(*args: Any, max_delay: float | None = None, **kwargs: Any) -> Any:
        mark_engaged(BACKOFF)
        limit = seconds if max_delay is None else min(max_delay, seconds)
        return exponential(*args, max_delay=limit, **kwargs)

    with (
        swapped(retry, "MAX_RETRY_DELAY", seconds, why=why),
        swapped(heartbeat, "exponential", capped, why=why, expect=EXPECT),
    ):
        yield True
