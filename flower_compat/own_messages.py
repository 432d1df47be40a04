"""A device's pull looks only at the messages addressed to it (Flower's in-memory state).

Why: Flower 1.42's ``InMemoryLinkState.get_message_ins(node_id, ...)``, which answers every
device's PullMessages, walks every stored message and, before it looks at the message's
destination, re-checks each one's expiry and federation (``_check_stored_messages``: the
clock, the run's federation). A pull therefore costs O(messages in flight): in a round of
1,000 devices, 1,000 checks per pull. A py-spy profile of the SuperLink at 1,000 devices
(``benchmarks/bench_scale_deploy.py --profile``, idle connections kept) put it at 11% of
the busy time; at 10 devices it is nothing. It is the cost per request that grows most
with the number of devices.

:func:`pulls_find_own_messages` keeps, per state, the ids of each node's undelivered
messages in the order they were stored (``store_message_ins`` adds each one it stores),
and answers a pull from that list: each message still in the store, undelivered and of
the run asked for gets Flower's own check (``_check_stored_messages``), in Flower's
order, and the ones returned are marked delivered, as Flower does. What a node gets is
unchanged. Ids of messages deleted elsewhere (run ended, expired, replied) fall out of the
list at the node's next pull. A node that never pulls again (a device gone for good)
would keep its ids, so every so often a store sweeps out the ids no longer stored
(:func:`_sweep_if_due`): the lists hold at most the messages in the store plus as many
again (at least ``SWEEP_FLOOR``), for O(1) a store, amortized. What is no longer done on
every pull: deleting other nodes' expired messages on the way. Those are still deleted
when their node pulls, and when the ServerApp pulls replies (Flower checks the messages it
asks about).

Stock fallback (either method's parameters changed, or the state has no
``_check_stored_messages``): Flower's methods, with a one-line warning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flwr.supercore.date import now  # the clock Flower's state marks deliveries with

from pollinate.flower_compat._core import (
    mark_engaged,
    signature_matches,
    swapped_together,
    warn_fallback,
)
from pollinate.flower_compat._names import flower_module

MODULE = "flwr.server.superlink.linkstate.in_memory_linkstate"
PULL = "InMemoryLinkState.get_message_ins"
STORE = "InMemoryLinkState.store_message_ins"
PULL_EXPECT = ("self", "node_id", "limit", "run_id")
STORE_EXPECT = ("self", "message")
INDEX = "_pollinate_undelivered"  # node id -> {message id: None}, in the order stored
SINCE_SWEEP = "_pollinate_stored_since_sweep"
SWEEP_FLOOR = 1024  # a sweep at most every this many stores, however few are in flight


def _undelivered(state: Any) -> dict[int, dict[str, None]]:
    index: dict[int, dict[str, None]] = state.__dict__.setdefault(INDEX, {})
    return index


def _sweep_if_due(state: Any) -> None:
    """Drop the ids of messages no longer stored (deleted for a node that never pulls),
    once as many messages have been stored since the last sweep as are stored now (and at
    least ``SWEEP_FLOOR``): a sweep walks the lists, which by then hold at most the stored
    messages plus those stored since, so each store pays for O(1) of it. Under the lock."""
    since = state.__dict__.get(SINCE_SWEEP, 0) + 1
    if since < max(SWEEP_FLOOR, len(state.message_ins_store)):
        state.__dict__[SINCE_SWEEP] = since
        return
    state.__dict__[SINCE_SWEEP] = 0
    index = _undelivered(state)
    stored = state.message_ins_store
    for node in list(index):
        kept = {msg_id: None for msg_id in index[node] if msg_id in stored}
        if kept:
            index[node] = kept
        else:
            del index[node]


def _stored_and_indexed(store: Any) -> Any:
    def store_message_ins(self: Any, message: Any) -> str | None:
        message_id: str | None = store(self, message)
        if message_id is not None:
            with self.lock:
                stored = self.message_ins_store.get(message_id)
                if stored is not None:
                    node = stored.metadata.dst_node_id
                    _undelivered(self).setdefault(node, {})[message_id] = None
                _sweep_if_due(self)
        return message_id

    return store_message_ins


def get_own_message_ins(
    self: Any, node_id: int, limit: int | None, *, run_id: int | None = None
) -> list[Any]:
    """``InMemoryLinkState.get_message_ins``, looking only at ``node_id``'s messages."""
    mark_engaged(PULL)
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found: list[Any] = []
    with self.lock:
        index = _undelivered(self)
        mine = index.get(node_id, {})
        for msg_id in list(mine):
            message = self.message_ins_store.get(msg_id)
            if message is None or message.metadata.delivered_at != "":
                del mine[msg_id]  # deleted or delivered elsewhere: never pulled again
                continue
            if run_id is not None and message.metadata.run_id != run_id:
                continue
            self._check_stored_messages({msg_id})  # Flower's expiry / federation check
            if msg_id not in self.message_ins_store:  # it was invalid, and is deleted
                del mine[msg_id]
                continue
            found.append(message)
            del mine[msg_id]
            if limit and len(found) == limit:
                break
        if not mine:
            index.pop(node_id, None)
        delivered_at = now().isoformat()
        for message in found:
            message.metadata.delivered_at = delivered_at
    return found


@contextmanager
def pulls_find_own_messages() -> Iterator[bool]:
    """Inside the block each pull of Flower's in-memory state looks only at the pulling
    node's messages. Yields whether both methods are replaced (False: stock, after a
    one-line warning). Only states whose messages were all stored inside the block may
    be pulled from inside it (the SuperLink's, made when it starts)."""
    state = flower_module(MODULE).InMemoryLinkState
    why = "every pull re-checks every stored message: O(messages in flight) per pull"
    if not callable(getattr(state, "_check_stored_messages", None)):
        warn_fallback(PULL, f"{MODULE}.InMemoryLinkState has no _check_stored_messages ({why})")
        yield False
        return
    # Both or neither: pulls from the list need every store to fill it.
    if not (
        signature_matches(state.store_message_ins, STORE_EXPECT, what=STORE, why=why)
        and signature_matches(state.get_message_ins, PULL_EXPECT, what=PULL, why=why)
    ):
        yield False
        return
    replacements = [
        ("store_message_ins", _stored_and_indexed(state.store_message_ins), STORE_EXPECT),
        ("get_message_ins", get_own_message_ins, PULL_EXPECT),
    ]
    with swapped_together(state, replacements, why=why) as on:
        yield on


__all__ = ["get_own_message_ins", "pulls_find_own_messages"]
