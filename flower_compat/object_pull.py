"""The SuperNode's download of a message's arrays retries after tens of ms, not a second.

Why: the SuperLink lists a message before all of its objects are uploaded, and
``flwr.supernode.start_client_internal`` calls ``pull_objects(object_ids, pull_object_fn,
max_concurrent_pulls, max_time, max_tries_per_object, initial_backoff, backoff_cap)``
(imported from ``flwr.supercore.inflatable.inflatable_utils``) with its defaults: a missing
object is retried after a whole second. Pollinate passes a short ``initial_backoff`` and
``backoff_cap`` (each retry is a request to the SuperLink, so not shorter than needed).

Stock: a second's wait per message whose arrays were still uploading; correct, only
slower. A changed signature falls back to that with a one-line warning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pollinate.flower_compat._core import mark_engaged, swapped
from pollinate.flower_compat._names import flower_module
from pollinate.flower_compat.http_grid import PULL_OBJECTS_PARAMS
from pollinate.flower_compat.supernode_poll import MODULE

NAME = f"{MODULE}.pull_objects"
# The same Flower function (inflatable_utils.pull_objects) the deployed grid's patch wraps.
EXPECT = PULL_OBJECTS_PARAMS


@contextmanager
def fast_object_pull(initial_backoff: float, backoff_cap: float) -> Iterator[bool]:
    """Inside the block the SuperNode retries a missing object after ``initial_backoff`` s,
    growing to ``backoff_cap`` s. Yields whether it does (False: stock, after a warning)."""
    loop = flower_module(MODULE)
    pull_objects = loop.pull_objects

    def pull_objects_soon(*args: Any, **kwargs: Any) -> Any:
        mark_engaged(NAME)
        kwargs.setdefault("initial_backoff", initial_backoff)
        kwargs.setdefault("backoff_cap", backoff_cap)
        return pull_objects(*args, **kwargs)

    with swapped(
        loop,
        "pull_objects",
        pull_objects_soon,
        why="a message's arrays are picked up within tens of ms of their upload",
        expect=EXPECT,
        stock_fallback=True,
    ) as on:
        yield on
