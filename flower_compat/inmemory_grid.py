"""Simulation's in-memory grid: a short reply poll, and every node there before it is seen.

Why: Flower's ``InMemoryGrid`` (the grid a ServerApp gets in simulation) checks for replies
every ``pull_interval`` = 0.1 s, paid on every message exchange of every round, and
Flower's simulation runtime builds it with that default. :func:`fast_in_memory_poll` makes
the grid the runtime builds inside the block start with a shorter interval, for any
ServerApp, and is undone after. The same grid's ``get_node_ids`` waits (at most
``NODES_WAIT`` s) until all the run's nodes are registered: Flower's runtime starts the
ServerApp thread before its engine registers the nodes, so a ServerApp that starts fast
(as it does here) sampled from some of them (FedAvg with ``min_available_nodes=1`` trained
2 of 3 nodes in round 1). Stock fallback (the constructor changed): Flower's 0.1 s poll and
no wait, with a one-line warning.

With doorbells (:mod:`pollinate.flower_compat.doorbell`): the grid rings ``sent`` after
storing a round's messages (the engine's scan looks at once), and its wait for replies
ends as soon as ``replied`` rings (the engine stored one) instead of at the next poll.
Fallback (one of Flower's ``send_and_receive``, ``push_messages``, ``pull_messages``
changed): the poll alone, with a one-line warning.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pollinate.flower_compat._core import mark_engaged, signature_matches, swapped
from pollinate.flower_compat.doorbell import Doorbell
from pollinate.flower_compat.exchange import push_and_pull

# The module of Flower's simulation runtime (``flwr.simulation.run_simulation`` the
# attribute is the public function of the same name, not this module).
_runtime = importlib.import_module("flwr.simulation.run_simulation")

IN_MEMORY_GRID = f"{_runtime.__name__}.InMemoryGrid"
IN_MEMORY_GRID_PARAMS = ("state_factory", "pull_interval")
ALL_NODES = f"{IN_MEMORY_GRID}:all-nodes-registered"
# The grid methods the doorbells go through, as Flower 1.42 defines them.
RUNG = {
    "send_and_receive": ("self", "messages", "timeout"),
    "push_messages": ("self", "messages"),
    "pull_messages": ("self", "message_ids"),
}
REPLY_WAIT = f"{IN_MEMORY_GRID}.send_and_receive:doorbell"
NODES_WAIT = 30.0


def _doorbells_fit(flower_grid: type) -> bool:
    """Whether the grid's push / pull / send-and-receive are the ones the doorbells wrap
    (else the stock-fallback warning, once)."""
    why = "each exchange then waits for the grid's poll, not for its doorbells"
    return all(
        signature_matches(
            getattr(flower_grid, name), params, what=f"{IN_MEMORY_GRID}.{name}", why=why
        )
        for name, params in RUNG.items()
    )


@contextmanager
def fast_in_memory_poll(
    poll: float,
    expected_nodes: int = 0,
    *,
    sent: Doorbell | None = None,
    replied: Doorbell | None = None,
) -> Iterator[bool]:
    """Simulation grids built in the block poll every ``poll`` s and, with
    ``expected_nodes``, list nodes only once that many are registered; yields if applied.
    With both doorbells, ``sent`` is rung after each push and a ring of ``replied`` ends the
    wait for replies."""
    flower_grid = _runtime.InMemoryGrid  # what the runtime would build
    why = "the ServerApp then checks for replies every 0.1 s and may start before its nodes"
    if not signature_matches(flower_grid, IN_MEMORY_GRID_PARAMS, what=IN_MEMORY_GRID, why=why):
        yield False
        return
    if (sent or replied) and not _doorbells_fit(flower_grid):
        sent = replied = None

    class FastPollGrid(flower_grid):  # type: ignore[misc, valid-type]
        """Flower's InMemoryGrid with a shorter reply poll, seen with all its nodes."""

        def __init__(self, state_factory: Any, pull_interval: float = 0.1) -> None:
            mark_engaged(IN_MEMORY_GRID)
            super().__init__(state_factory=state_factory, pull_interval=min(pull_interval, poll))
            self._all_registered = expected_nodes <= 0

        def get_node_ids(self) -> Iterable[int]:
            ids = list(super().get_node_ids())
            if self._all_registered:
                return ids
            deadline = time.monotonic() + NODES_WAIT
            while len(ids) < expected_nodes and time.monotonic() < deadline:
                time.sleep(poll)
                ids = list(super().get_node_ids())
            mark_engaged(ALL_NODES)
            self._all_registered = True  # simulated nodes never leave: wait once
            return ids

    grid = FastPollGrid if sent is None or replied is None else _rung(FastPollGrid, sent, replied)
    with swapped(_runtime, "InMemoryGrid", grid, why=why):
        yield True


def _rung(flower_grid: type, sent: Doorbell, replied: Doorbell) -> type:
    """``flower_grid`` ringing ``sent`` after each push, its wait for replies ended by
    ``replied``."""

    class RungGrid(flower_grid):
        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            ids = super().push_messages(messages)
            sent.ring()  # stored: the engine's scan may look now
            return ids

        def send_and_receive(
            self, messages: Iterable[Any], *, timeout: float | None = None
        ) -> Iterable[Any]:
            """Flower's push, then pull until every message has its reply or ``timeout``
            passes; between pulls, wait for ``replied`` (at most one poll)."""

            def until_replied(elapsed: float, left: float | None) -> None:
                replied.wait(self.pull_interval if left is None else min(self.pull_interval, left))

            return push_and_pull(self, messages, timeout, until_replied)

    return RungGrid
