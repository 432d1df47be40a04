"""Replies picked up as they arrive on a deployed SuperLink, and never waited for in vain.

Flower 1.42's ``HttpGrid`` (the grid a deployed ServerApp gets) has two waits that matter:

- ``send_and_receive`` checks for replies every 3 s, so every message exchange of a round
  costs at least 3 s however fast the devices answer;
- a reply is listed before its arrays are fully uploaded, and the download of those arrays
  retries after 1 s, 2 s, ... up to 10 s apart, for as long as the upload session lives
  (180 s). A device that dies mid-upload so stalls the whole round for three minutes.

:func:`responsive` (for one run, undone after) swaps in the same push-then-pull loop with a
short poll (``POLL_SHARE`` of the time waited so far, 20 ms to 1 s) built on the public
``push_messages`` / ``pull_messages``, makes the array download retry after 50 ms, and gives
up on a reply's arrays once they have not progressed for ``STALL`` seconds *and* a node this
exchange waits on has gone offline (that reply becomes an error, and the round goes on with
the others, as for a node that never answered). Simulation's in-memory grid is left alone
(the engine gives it a short poll). The Flower internals involved:
:mod:`pollinate.flower_compat.http_grid`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from pollinate.flower_compat.exchange import push_and_pull
from pollinate.flower_compat.http_grid import (
    ObjectPullError,
    ObjectUnavailableError,
    guarded_object_pull,
    is_http_grid,
)

POLL_MIN = 0.02
POLL_MAX = 1.0
# A reply is noticed at most this share of the exchange's time late: a 0.5 s exchange
# polls every 50 ms, a minute-long one every second. (Backing off 1.5x per poll, as
# before, let the last reply of a 1 s exchange wait up to 0.5 s.)
POLL_SHARE = 0.1
# A reply is listed before its node has uploaded its arrays, which takes ~0.1-0.2 s on a
# busy SuperLink: retry after 20 ms, doubling to at most OBJECT_RETRY_CAP (Flower's default
# doubles to 1 s and so picked a reply up ~0.2 s after its upload ended). Each retry is a
# request to the SuperLink, so not faster.
OBJECT_RETRY = 0.02
OBJECT_RETRY_CAP = 0.1
STALL = 5.0

# The grid and the destination nodes of the exchange in progress, for the download guard.
_exchange = threading.local()


def send_and_receive(
    grid: Grid, messages: Iterable[Message], *, timeout: float | None = None
) -> list[Message]:
    """``Grid.send_and_receive`` with a poll that keeps up with the exchange, not a fixed 3 s."""
    messages = list(messages)
    _exchange.current = (grid, {m.metadata.dst_node_id for m in messages})
    try:
        return push_and_pull(grid, messages, timeout, _growing_poll)
    finally:
        _exchange.current = None


def _growing_poll(elapsed: float, left: float | None) -> None:
    poll = min(max(POLL_MIN, elapsed * POLL_SHARE), POLL_MAX)
    time.sleep(poll if left is None else min(poll, left))


def _sender_gone(stalled_since: float, exchange: tuple[Grid, set[int]] | None) -> bool:
    """True if the download stalled for STALL s while a node we wait on is offline."""
    if exchange is None or time.monotonic() - stalled_since < STALL:
        return False
    grid, nodes = exchange
    return not nodes <= set(grid.get_node_ids())


def _guarded_pull_objects(
    flower_pull_objects: Callable[..., dict[str, bytes]],
    object_ids: list[str],
    pull_object_fn: Callable[[str], bytes],
    **kwargs: Any,
) -> dict[str, bytes]:
    progress = [time.monotonic()]
    exchange = getattr(_exchange, "current", None)  # read here: pulls run in other threads

    def pull(object_id: str) -> bytes:
        try:
            content = pull_object_fn(object_id)
        except ObjectUnavailableError:
            if _sender_gone(progress[0], exchange):
                raise ObjectPullError(
                    object_id, "the sending node went offline before its upload finished"
                ) from None
            raise
        progress[0] = time.monotonic()
        return content

    kwargs.setdefault("initial_backoff", OBJECT_RETRY)
    kwargs.setdefault("backoff_cap", OBJECT_RETRY_CAP)
    return flower_pull_objects(object_ids, pull_object_fn=pull, **kwargs)


def is_deployed(grid: Grid) -> bool:
    """True for a grid that talks to a deployed SuperLink (the server then has no data)."""
    return is_http_grid(grid)


@contextmanager
def responsive(grid: Grid) -> Iterator[Grid]:
    """``grid``, polling for replies quickly if it talks to a SuperLink over HTTP.

    Both changes (the poll loop on this grid, the guarded array download in Flower's
    ``http_grid``) are undone when the block ends.
    """
    if not is_http_grid(grid):
        yield grid
        return
    with guarded_object_pull(_guarded_pull_objects):
        grid.send_and_receive = partial(send_and_receive, grid)  # type: ignore[method-assign]
        try:
            yield grid
        finally:
            del grid.send_and_receive  # the class's own method again
