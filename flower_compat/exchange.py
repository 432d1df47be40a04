"""One message exchange on any grid: push, then pull until every message has its reply.

Flower's ``Grid.send_and_receive`` does this with a fixed sleep between pulls (0.1 s in
simulation, 3 s deployed). Pollinate's grids differ only in how they wait between pulls:
a poll that grows with the exchange (:mod:`pollinate.server.grid`, deployed) or a
doorbell rung by each stored reply (:mod:`pollinate.flower_compat.inmemory_grid`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

# wait(elapsed, left): pause before the next pull, ``elapsed`` s into the exchange, at most
# ``left`` s (None: no timeout).
Wait = Callable[[float, float | None], None]


def push_and_pull(
    grid: Any, messages: Iterable[Any], timeout: float | None, wait: Wait
) -> list[Any]:
    """The replies to ``messages`` that ``grid`` got within ``timeout`` s (None: all of
    them, however long it takes). ``grid`` has Flower's ``push_messages`` and
    ``pull_messages``; ``timeout`` 0 pushes and pulls nothing, as Flower's does."""
    pending = set(grid.push_messages(messages))
    start = time.monotonic()
    replies: list[Any] = []
    while timeout is None or time.monotonic() < start + timeout:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending:
            break
        elapsed = time.monotonic() - start
        wait(elapsed, None if timeout is None else max(0.0, timeout - elapsed))
    return replies


__all__ = ["Wait", "push_and_pull"]
