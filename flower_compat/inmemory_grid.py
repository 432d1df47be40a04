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
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pollinate.flower_compat._core import mark_engaged, signature_matches, swapped

# The module of Flower's simulation runtime (``flwr.simulation.run_simulation`` the
# attribute is the public function of the same name, not this module).
_runtime = importlib.import_module("flwr.simulation.run_simulation")

IN_MEMORY_GRID = f"{_runtime.__name__}.InMemoryGrid"
IN_MEMORY_GRID_PARAMS = ("state_factory", "pull_interval")
ALL_NODES = f"{IN_MEMORY_GRID}:all-nodes-registered"
NODES_WAIT = 30.0


@contextmanager
def fast_in_memory_poll(poll: float, expected_nodes: int = 0) -> Iterator[bool]:
    """Simulation grids built in the block poll every ``poll`` s and, with
    ``expected_nodes``, list nodes only once that many are registered; yields if applied."""
    flower_grid = _runtime.InMemoryGrid  # what the runtime would build
    why = "the ServerApp then checks for replies every 0.1 s and may start before its nodes"
    if not signature_matches(flower_grid, IN_MEMORY_GRID_PARAMS, what=IN_MEMORY_GRID, why=why):
        yield False
        return

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

    with swapped(_runtime, "InMemoryGrid", FastPollGrid, why=why):
        yield True
