"""The SuperNode loop's sleeps, through a stand-in for the ``time`` module it uses.

Why: ``flwr.supernode.start_client_internal`` sleeps a fixed ``time.sleep(3)`` when the
SuperLink has no message for it and ``time.sleep(0.5)`` between checks for the ClientApp's
reply, with no option to change either. A federated round of a small model takes about a
second, so those sleeps dominate a deployed run. Pollinate gives that module a stand-in
``time`` whose ``sleep`` is Pollinate's (an idle poll that adapts, a fast local poll), and
wraps ``_pull_and_store_message(state, object_store, node_config, receive, get_run, get_fab,
pull_object, confirm_message_received, trusted_entities)`` to learn when a message arrived
(the idle time starts again).

Stock: a 3 s idle poll and a 0.5 s reply poll; correct, only slower. A changed signature
falls back to that with a one-line warning.
"""

from __future__ import annotations

import functools
import time as _time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pollinate.flower_compat._core import mark_engaged, swapped
from pollinate.flower_compat._names import (
    ModuleStandIn,
    flower_module,
    module_stood_in,
    stock_instead,
)

MODULE = "flwr.supernode.start_client_internal"
CLOCK = f"{MODULE}.time"
PULL = f"{MODULE}._pull_and_store_message"
PULL_EXPECT = (
    "state",
    "object_store",
    "node_config",
    "receive",
    "get_run",
    "get_fab",
    "pull_object",
    "confirm_message_received",
    "trusted_entities",
)


class StandInTime(ModuleStandIn):
    """Stands in for ``time`` inside Flower's SuperNode loop: only ``sleep`` differs."""

    def __init__(self, sleep: Callable[[float], None]) -> None:
        super().__init__(_time)
        self._sleep = sleep

    def sleep(self, seconds: float) -> None:
        mark_engaged(CLOCK)
        self._sleep(seconds)


@contextmanager
def supernode_sleeps(
    sleep: Callable[[float], None], on_message: Callable[[], None]
) -> Iterator[bool]:
    """Inside the block the SuperNode loop sleeps with ``sleep(seconds)`` (Flower asks for
    3 s when idle, 0.5 s while a reply is due) and calls ``on_message()`` for each message
    it takes. Yields whether both are in place (False: stock, after one warning)."""
    loop = flower_module(MODULE)
    pull = loop._pull_and_store_message

    @functools.wraps(pull)
    def pull_and_tell(*args: Any, **kwargs: Any) -> int | None:
        mark_engaged(PULL)
        run_id: int | None = pull(*args, **kwargs)
        if run_id is not None:
            on_message()
        return run_id

    why = "Flower's fixed 3 s idle poll dominates a round that takes a second"
    if getattr(loop, "time", None) is not _time:  # checked before the pull is wrapped
        stock_instead(CLOCK, "does not use the time module", why)
        yield False
        return
    with swapped(
        loop,
        "_pull_and_store_message",
        pull_and_tell,
        why=why,
        expect=PULL_EXPECT,
        stock_fallback=True,
    ) as on:
        if not on:
            yield False
            return
        with module_stood_in(MODULE, "time", StandInTime(sleep), name=CLOCK, why=why) as on:
            yield on
