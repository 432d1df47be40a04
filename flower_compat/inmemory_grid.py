"""Simulation's in-memory grid, polling for replies every few milliseconds.

Why: Flower's ``InMemoryGrid`` (the grid a ServerApp gets in simulation) checks for replies
every ``pull_interval`` = 0.1 s, paid on every message exchange of every round, and
Flower's simulation runtime builds it with that default. :func:`fast_in_memory_poll` makes
the grid the runtime builds inside the block start with a shorter interval, for any
ServerApp, and is undone after. Stock fallback (the constructor changed): Flower's 0.1 s,
with a one-line warning.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pollinate.flower_compat._core import mark_engaged, signature_matches, swapped

# The module of Flower's simulation runtime (``flwr.simulation.run_simulation`` the
# attribute is the public function of the same name, not this module).
_runtime = importlib.import_module("flwr.simulation.run_simulation")

IN_MEMORY_GRID = f"{_runtime.__name__}.InMemoryGrid"
IN_MEMORY_GRID_PARAMS = ("state_factory", "pull_interval")


@contextmanager
def fast_in_memory_poll(poll: float) -> Iterator[bool]:
    """Simulation grids built in the block poll every ``poll`` s; yields if applied."""
    flower_grid = _runtime.InMemoryGrid  # what the runtime would build
    why = "the ServerApp then checks for replies every 0.1 s"
    if not signature_matches(flower_grid, IN_MEMORY_GRID_PARAMS, what=IN_MEMORY_GRID, why=why):
        yield False
        return

    class FastPollGrid(flower_grid):  # type: ignore[misc, valid-type]
        """Flower's InMemoryGrid with a shorter reply poll."""

        def __init__(self, state_factory: Any, pull_interval: float = 0.1) -> None:
            mark_engaged(IN_MEMORY_GRID)
            super().__init__(state_factory=state_factory, pull_interval=min(pull_interval, poll))

    with swapped(_runtime, "InMemoryGrid", FastPollGrid, why=why):
        yield True
