"""A deployed ServerApp's HTTP grid: its array download, guarded for one run.

Why: a deployed ServerApp's ``HttpGrid`` downloads a reply's arrays with
``inflatable_utils.pull_objects`` (as ``http_grid.pull_objects``), retrying after 1 s, 2 s,
... 10 s for as long as the upload session lives (180 s): a device that dies mid-upload
stalls the round for three minutes. :func:`guarded_object_pull` wraps the function
``http_grid`` calls, for one run (a caller-given wrapper: shorter retries, give up once the
sender is gone), and undoes it after. Stock fallback (its signature changed): Flower's
retries, with a one-line warning. The errors it raises are re-exported for that wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError
from flwr.superlink.grid import http_grid

from pollinate.flower_compat._core import mark_engaged, swapped

PULL_OBJECTS = f"{http_grid.__name__}.pull_objects"
PULL_OBJECTS_PARAMS = (
    "object_ids",
    "pull_object_fn",
    "max_concurrent_pulls",
    "max_time",
    "max_tries_per_object",
    "initial_backoff",
    "backoff_cap",
)


def is_http_grid(grid: Grid) -> bool:
    """True for the grid of a ServerApp that talks to a deployed SuperLink over HTTP."""
    return isinstance(grid, http_grid.HttpGrid)


@contextmanager
def guarded_object_pull(wrapper: Callable[..., dict[str, bytes]]) -> Iterator[bool]:
    """``http_grid``'s array download as ``wrapper(flower_pull_objects, ...)`` in the block.

    ``wrapper`` gets Flower's ``pull_objects`` first, then its arguments. Yields whether
    the wrapper is in place.
    """
    flower_pull = vars(http_grid)["pull_objects"]  # imported there from inflatable_utils

    def pull_objects(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        mark_engaged(PULL_OBJECTS)
        return partial(wrapper, flower_pull)(*args, **kwargs)

    with swapped(
        http_grid,
        "pull_objects",
        pull_objects,
        why="a reply whose sender died mid-upload then stalls the round up to 180 s",
        expect=PULL_OBJECTS_PARAMS,
        stock_fallback=True,
    ) as applied:
        yield applied


__all__ = [
    "PULL_OBJECTS",
    "ObjectPullError",
    "ObjectUnavailableError",
    "guarded_object_pull",
    "is_http_grid",
]
