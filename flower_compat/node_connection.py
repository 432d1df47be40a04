"""The SuperNode's connection to the SuperLink, reported to Pollinate as it happens.

Why: ``pollinate node start`` says when its device joined (and as which node), that the
server refused its key, or that the server cannot be reached yet. Flower 1.42 says so only
in log lines ("SuperNode ID: ...", "Failed to activate SuperNode", "Connection attempt
failed ...") and exits with the same status (305) for every failed start. So Pollinate
wraps the two places that know: ``flwr.supernode.fleet_http_client.FleetHttpClient
.ActivateNode(self, request)`` (its reply holds the node id; HTTP 412 is the SuperLink's
"activation failed": an unregistered key, or one whose session is still open), and the
retry invoker ``flwr.supernode.fleet_http_connection.make_simple_http_retry_invoker()``
builds for the connection (its ``on_backoff`` runs for each failed attempt).

Stock: the same connection; Pollinate could not tell the device's owner what happened.
The node's messages depend on it, so a changed signature is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from pollinate.flower_compat._core import mark_engaged, swapped
from pollinate.flower_compat._names import flower_attribute, flower_module

CLIENT_MODULE = "flwr.supernode.fleet_http_client"
CONNECTION_MODULE = "flwr.supernode.fleet_http_connection"
ACTIVATE = f"{CLIENT_MODULE}.FleetHttpClient.ActivateNode"
RETRIES = f"{CONNECTION_MODULE}.make_simple_http_retry_invoker"
ACTIVATION_FAILED = 412  # HTTP status of Flower's FLEET_NODE_ACTIVATION_FAILED


@dataclass(frozen=True)
class ConnectionEvents:
    """What to call: joined as node ``id``; refused; an attempt to connect failed."""

    joined: Callable[[int], None]
    refused: Callable[[], None]
    attempt_failed: Callable[[], None]


@contextmanager
def connection_observed(events: ConnectionEvents) -> Iterator[None]:
    """Inside the block, the SuperNode's activation and failed attempts go to ``events``."""
    client_class = flower_attribute(flower_module(CLIENT_MODULE), "FleetHttpClient")
    connection = flower_module(CONNECTION_MODULE)
    activate = flower_attribute(client_class, "ActivateNode")
    make_invoker = flower_attribute(connection, "make_simple_http_retry_invoker")

    def activate_node(self: Any, request: Any) -> Any:
        mark_engaged(ACTIVATE)
        try:
            response = activate(self, request)
        except httpx.HTTPStatusError as err:
            if err.response.status_code == ACTIVATION_FAILED:
                events.refused()
            raise
        events.joined(int(response.node_id))
        return response

    def make_reporting_invoker() -> Any:
        mark_engaged(RETRIES)
        invoker = make_invoker()
        flower_on_backoff = invoker.on_backoff

        def on_backoff(state: Any) -> None:
            events.attempt_failed()
            if flower_on_backoff is not None:
                flower_on_backoff(state)

        invoker.on_backoff = on_backoff
        return invoker

    why = "`pollinate node start` says when the device joined, was refused or cannot connect"
    with (
        swapped(client_class, "ActivateNode", activate_node, why=why, expect=("self", "request")),
        swapped(connection, "make_simple_http_retry_invoker", make_reporting_invoker, why=why,
                expect=()),
    ):  # fmt: skip
        yield
