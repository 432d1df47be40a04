"""The SuperNode's heartbeat every 10 s (the SuperLink's minimum) instead of 30 s.

Why: Flower 1.42 reads ``HEARTBEAT_DEFAULT_INTERVAL`` (30 s, no option) as a module constant
in ``flwr.supercore.heartbeat`` (when the next beat is due) and in
``flwr.supernode.fleet_http_connection`` (the interval announced to the SuperLink, which
declares a node dead after two missed beats). At 30 s a dead device holds a round for about
a minute; at 10 s the server notices it within ~20 s, and a restarted device whose previous
session was not closed is admitted sooner.

Stock: 30 s; correct, only slower to notice. A missing constant falls back to that with a
one-line warning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from pollinate.flower_compat._core import swapped
from pollinate.flower_compat._names import flower_module, stock_instead

MODULES = ("flwr.supercore.heartbeat", "flwr.supernode.fleet_http_connection")
CONSTANT = "HEARTBEAT_DEFAULT_INTERVAL"
MINIMUM = 10  # seconds; the SuperLink refuses a shorter interval


@contextmanager
def heartbeat_every(seconds: int) -> Iterator[bool]:
    """Inside the block SuperNodes beat every ``seconds`` s; yields whether they do."""
    if seconds < MINIMUM:
        raise ValueError(f"the SuperLink refuses heartbeats under {MINIMUM} s, not {seconds}")
    owners = [flower_module(name) for name in MODULES]
    why = "a dead device is noticed within ~20 s instead of ~60 s"
    for owner in owners:
        if not isinstance(getattr(owner, CONSTANT, None), (int, float)):
            stock_instead(f"{owner.__name__}.{CONSTANT}", "is gone", why)
            yield False
            return
    with ExitStack() as stack:
        for owner in owners:
            stack.enter_context(swapped(owner, CONSTANT, seconds, why=why))
        yield True
