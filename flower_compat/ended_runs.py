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

That message may already have reached the ClientApp (its objects arrived, then the
confirmation failed), and the ClientApp's reply to it then stays in the node's state.
Flower's loop sends replies only after it pulls a message, all that are there at that
moment, one push per message: the next message's push sends the stale reply and returns,
and the reply to the new message waits for a pull that never comes, since the SuperLink
sends nothing more until it has that reply (seen in ``tests/deploy/test_deploy_restart.py``,
a server killed and restarted). So when a pull gets nothing but a reply is waiting that
nothing has taken (:func:`waiting_reply_run`), the wrapped pull returns that reply's run
and Flower's own ``_push_messages`` sends it (the SuperLink ignores a stale one, as for any
run no longer running). In step, a pull that gets nothing finds no such reply.

Stock: a device that survives a server restart hangs. That is a failure, not a slower
path, so a changed signature, or a node state that keeps its messages differently, is an
error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pollinate.flower_compat._core import (
    SUPPORTED_RANGE,
    FlowerIncompatible,
    flower_version,
    mark_engaged,
    swapped,
)
from pollinate.flower_compat._names import flower_attribute, flower_module
from pollinate.flower_compat.supernode_poll import MODULE, PULL_EXPECT

NAME = "ended_runs_dropped"  # engagement counter; the patched name is shared with supernode_poll
SENT_WAITING = "ended_runs_dropped:waiting_reply"  # a pull that found only a waiting reply
DOWNLOADS = ("pull_object", "confirm_message_received")  # used after the task exists
STATE_MODULE = "flwr.supernode.nodestate.in_memory_nodestate"


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


def waiting_reply_run(state: Any) -> int | None:
    """The run of a reply in the node's ``state`` that nothing has taken yet, or None.

    Looks without taking: Flower's ``get_messages_legacy`` marks what it returns as taken,
    and ``_push_messages`` must still find the reply."""
    with state.lock_msg_store:
        for entry in state.msg_store.values():
            metadata = entry.message.metadata
            if not entry.is_retrieved and metadata.reply_to_message_id != "":
                return int(metadata.run_id)
    return None


def _require_message_entries() -> None:
    """Flower's in-memory node state (the SuperNode's only one) keeps what
    :func:`waiting_reply_run` reads, or :class:`FlowerIncompatible`."""
    from flwr.supercore.object_store import ObjectStoreFactory

    module = flower_module(STATE_MODULE)
    state = module.InMemoryNodeState(ObjectStoreFactory().store())
    fields = set(getattr(getattr(module, "MessageEntry", None), "__dataclass_fields__", {}))
    if not (
        isinstance(getattr(state, "msg_store", None), dict)
        and hasattr(state, "lock_msg_store")
        and {"message", "is_retrieved"} <= fields
    ):
        raise FlowerIncompatible(
            f"flwr {flower_version()}: {STATE_MODULE}.InMemoryNodeState keeps no msg_store "
            "of MessageEntry(message, is_retrieved), which Pollinate reads so that a reply "
            f"left by a failed receive cannot leave the device stuck; Pollinate supports "
            f"flwr{SUPPORTED_RANGE}"
        )


@contextmanager
def ended_runs_dropped() -> Iterator[None]:
    """Inside the block, a run ending mid-download fails that message cleanly, and a
    reply the ClientApp made to it anyway is sent on the next pull that gets nothing."""
    loop = flower_module(MODULE)
    pull_and_store = loop._pull_and_store_message
    _require_message_entries()

    @functools.wraps(pull_and_store)
    def pull(*args: Any, **kwargs: Any) -> int | None:
        mark_engaged(NAME)
        for name in DOWNLOADS:
            if name in kwargs:
                kwargs[name] = failing_on_ended_run(kwargs[name])
        result: int | None = pull_and_store(*args, **kwargs)
        if result is None:  # nothing pulled: send a reply left waiting, if there is one
            result = waiting_reply_run(kwargs["state"] if "state" in kwargs else args[0])
            if result is not None:
                mark_engaged(SENT_WAITING)  # Flower's loop now calls its _push_messages
        return result

    with swapped(
        loop,
        "_pull_and_store_message",
        pull,
        why="a device that survives a server restart must not hang",
        expect=PULL_EXPECT,
    ):
        yield
