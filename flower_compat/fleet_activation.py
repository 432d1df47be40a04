"""Each node's activation, refusal and deactivation on the SuperLink, as calls to Pollinate.

Why: Flower 1.42's Fleet handlers ``activate_node(request, state)`` and
``deactivate_node(request, state)`` (``flwr.superlink.servicer.fleet.fleet_handlers``, called
by the Fleet router through the module) only log a line, and a refused key raises a
``FlowerError`` whose text is all that says why. Pollinate's server tells its operator which
node joined or left and why a key was refused, so it wraps both handlers: the outcome comes
from the handler's return value and the reason from the LinkState itself
(``state.get_node_id_by_public_key``: is the key registered at all?), not from log text.

Stock Flower: the same handlers; the operator sees only Flower's log. The server's messages
depend on it, so a changed signature is an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pollinate.flower_compat._core import mark_engaged, swapped
from pollinate.flower_compat._names import flower_module

MODULE = "flwr.superlink.servicer.fleet.fleet_handlers"
ACTIVATE = f"{MODULE}.activate_node"
DEACTIVATE = f"{MODULE}.deactivate_node"
EXPECT = ("request", "state")


@dataclass(frozen=True)
class ActivationEvents:
    """What to call: a node joined (its id), left (its id), or was refused.

    ``refused(public_key, registered)``: ``registered`` is False for a key the SuperLink
    does not know, True for a known key it would not activate (its session is still open).
    """

    joined: Callable[[int], None]
    left: Callable[[int], None]
    refused: Callable[[bytes, bool], None]


def _is_registered(state: Any, public_key: bytes) -> bool:
    with contextlib.suppress(Exception):
        return state.get_node_id_by_public_key(public_key) is not None
    return False


@contextmanager
def activation_observed(events: ActivationEvents) -> Iterator[None]:
    """Inside the block, every node activation and deactivation is reported to ``events``."""
    handlers = flower_module(MODULE)
    activate = handlers.activate_node
    deactivate = handlers.deactivate_node

    def activate_node(request: Any, state: Any) -> Any:
        mark_engaged(ACTIVATE)
        try:
            response = activate(request=request, state=state)
        except Exception:
            events.refused(bytes(request.public_key), _is_registered(state, request.public_key))
            raise
        events.joined(int(response.node_id))
        return response

    def deactivate_node(request: Any, state: Any) -> Any:
        mark_engaged(DEACTIVATE)
        response = deactivate(request=request, state=state)
        events.left(int(request.node_id))
        return response

    why = "the server names nodes that join, leave or are refused"
    with (
        swapped(handlers, "activate_node", activate_node, why=why, expect=EXPECT),
        swapped(handlers, "deactivate_node", deactivate_node, why=why, expect=EXPECT),
    ):
        yield
