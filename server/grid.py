"""Replies picked up as they arrive on a deployed SuperLink.

Flower 1.42's ``HttpGrid.send_and_receive`` (the grid a deployed ServerApp gets) checks for
replies every 3 s, so every message exchange of a round costs at least 3 s however fast
the devices answer. :func:`responsive` swaps in the same push-then-pull loop with a short,
backing-off poll (20 ms growing to 1 s), using only the public ``push_messages`` /
``pull_messages`` of the Grid API, and makes the reply-object download retry after 20 ms
instead of 1 s. Simulation's in-memory grid (0.1 s poll) is left alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import partial

from flwr.app import Message
from flwr.serverapp import Grid

POLL_MIN = 0.02
POLL_MAX = 1.0


def send_and_receive(
    grid: Grid, messages: Iterable[Message], *, timeout: float | None = None
) -> list[Message]:
    """``Grid.send_and_receive`` with a short backing-off poll instead of a fixed 3 s."""
    pending = set(grid.push_messages(messages))
    end = time.monotonic() + (timeout if timeout is not None else 0.0)
    replies: list[Message] = []
    poll = POLL_MIN
    while timeout is None or time.monotonic() < end:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending:
            break
        time.sleep(poll if timeout is None else max(0.0, min(poll, end - time.monotonic())))
        poll = min(poll * 1.5, POLL_MAX)
    return replies


def responsive(grid: Grid) -> Grid:
    """``grid``, polling for replies quickly if it talks to a SuperLink over HTTP."""
    from flwr.superlink.grid import http_grid

    if isinstance(grid, http_grid.HttpGrid):
        grid.send_and_receive = partial(send_and_receive, grid)  # type: ignore[method-assign]
        # A reply is listed before all of its objects are uploaded; Flower's object pull
        # then waits a whole second before retrying. Retry after 20 ms instead.
        if not isinstance(http_grid.pull_objects, partial):
            http_grid.pull_objects = partial(  # type: ignore[attr-defined]
                http_grid.pull_objects, initial_backoff=POLL_MIN, backoff_cap=POLL_MAX
            )
    return grid
