"""A message whose run ends while its arrays download is dropped, as Flower means to.

Why: ``flwr.supernode.start_client_internal._pull_and_store_message`` creates the message's
task, then downloads its objects with the ``pull_object`` and ``confirm_message_received``
it is given, and cleans up (message deleted, task finished as failed) on an ``Exception``.
A run that ended on the SuperLink meanwhile (the server was restarted) raises
``flwr.supercore.run.RunNotRunningException``, a ``BaseException``: the cleanup is skipped,
the task stays behind, the ClientApp waits minutes for arrays that never come, and the
SuperNode takes no other message, so a surviving device never answers the restarted
server's run. Pollinate wraps the two download functions so that this case raises
:class:`RunEnded`, an ``Exception``, and Flower's own cleanup runs.

Stock: a device that survives a server restart hangs. That is a failure, not a slower
path, so a changed signature is an error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pollinate.flower_compat._core import mark_engaged, swapped
from pollinate.flower_compat._names import flower_attribute, flower_module
from pollinate.flower_compat.supernode_poll import MODULE, PULL_EXPECT

NAME = "ended_runs_dropped"  # engagement counter; the patched name is shared with supernode_poll
DOWNLOADS = ("pull_object", "confirm_message_received")  # used after the task exists


class RunEnded(RuntimeError):
    """The run ended on the SuperLink while one of its messages was being received."""


def failing_on_ended_run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, raising :class:`RunEnded` where it raised ``RunNotRunningException``."""
    not_running = flower_attribute(flower_module("flwr.supercore.run"), "RunNotRunningException")

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except not_running:
            raise RunEnded("the run is no longer running on the SuperLink") from None

    return call


@contextmanager
def ended_runs_dropped() -> Iterator[None]:
    """Inside the block, a run ending mid-download fails that message cleanly."""
    loop = flower_module(MODULE)
    pull_and_store = loop._pull_and_store_message

    @functools.wraps(pull_and_store)
    def pull(*args: Any, **kwargs: Any) -> int | None:
        mark_engaged(NAME)
        for name in DOWNLOADS:
            if name in kwargs:
                kwargs[name] = failing_on_ended_run(kwargs[name])
        result: int | None = pull_and_store(*args, **kwargs)
        return result

    with swapped(
        loop,
        "_pull_and_store_message",
        pull,
        why="a device that survives a server restart must not hang",
        expect=PULL_EXPECT,
    ):
        yield
