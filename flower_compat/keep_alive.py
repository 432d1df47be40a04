"""Idle Fleet API connections kept for a device's next poll, not dropped after 5 s.

Why: both ends of Flower 1.42's Fleet API drop a connection after 5 s idle (uvicorn's
``timeout_keep_alive`` on the SuperLink, httpx's ``keepalive_expiry`` in every
SuperNode's client), and neither is an option. In a round of 10 devices a device's
requests come under a second apart, so it keeps one connection; in a round of 1,000 they
come tens of seconds apart, so nearly every idle poll and heartbeat opens a new TLS
connection, and the SuperLink pays a handshake (and the asyncio and uvicorn set-up of a
connection) for a request that finds nothing. A py-spy profile at 1,000 devices put new
connections at ~15% of the SuperLink's busy time. It is the one cost per request that
grows with the number of devices.

Two stand-ins, in the style of :mod:`pollinate.flower_compat.supernode_poll`:

- on the SuperLink, the ``uvicorn`` that ``flwr.superlink.cli.flower_superlink`` calls
  ``uvicorn.run`` on, whose ``run`` adds ``timeout_keep_alive`` (:data:`SERVER_KEEP_ALIVE`)
  and ``timeout_graceful_shutdown`` (:data:`SHUTDOWN_GRACE`, see below);
- on a device, the ``httpx`` that ``flwr.supercore.protobuf.client`` (the Fleet client's
  base) builds its ``httpx.Client`` from, whose ``Client`` keeps idle connections
  :data:`CLIENT_KEEP_ALIVE`. That is under the server's, so a device closes an idle
  connection before the server does, and its request cannot cross the server's close
  (with 5 s at both ends a device now and then got "Server disconnected without sending
  a response" and retried).

The shutdown grace: a kept connection that is idle when the SuperLink stops is closed
with a TLS close_notify, and asyncio waits up to 30 s for the device's own, which an idle
httpx client never sends; uvicorn waits for every connection to close. With 5 s
keep-alive few connections are open at the stop, with 75 s every device's is: a stop took
30 s. So uvicorn gets :data:`SHUTDOWN_GRACE` s, after which it cancels what is left and
exits. Its "Cancel 0 running task(s), timeout graceful shutdown exceeded" error (no
request was cut short, only idle connections' goodbyes) is dropped from the log; a stop
that does cut requests short is still logged.

Stock: the 5 s at both ends; correct, only a handshake more per idle request. A changed
``uvicorn.run`` or a ``flwr`` module without these names falls back to that with a
one-line warning.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from pollinate.flower_compat._core import mark_engaged
from pollinate.flower_compat._names import ModuleStandIn, module_stood_in, stock_instead

SERVER_MODULE = "flwr.superlink.cli.flower_superlink"
CLIENT_MODULE = "flwr.supercore.protobuf.client"
SERVER_NAME = f"{SERVER_MODULE}.uvicorn"
CLIENT_NAME = f"{CLIENT_MODULE}.httpx"

# nginx's default keep-alive is 75 s, browsers keep an idle connection about a minute: both
# are far under the idle timeouts of NATs for established TCP (RFC 5382: at least 2 h).
SERVER_KEEP_ALIVE = 75  # s (uvicorn takes whole seconds)
CLIENT_KEEP_ALIVE = 60.0  # s, under the server's
SHUTDOWN_GRACE = 3  # s for in-flight requests once the SuperLink is told to stop
UVICORN_OPTIONS = ("timeout_keep_alive", "timeout_graceful_shutdown")


class IdleGoodbyesUnlogged(logging.Filter):
    """Drops uvicorn's "Cancel 0 running task(s)" error: the grace ran out on idle
    connections only (:data:`SHUTDOWN_GRACE`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        cancelled_none = record.args == (0,) and str(record.msg).startswith("Cancel %s running")
        return not cancelled_none


class StandInUvicorn(ModuleStandIn):
    """Stands in for ``uvicorn`` in Flower's SuperLink launcher: only ``run`` differs."""

    def __init__(self, keep_alive: int, shutdown_grace: int) -> None:
        super().__init__(uvicorn)
        self._options = {
            "timeout_keep_alive": keep_alive,
            "timeout_graceful_shutdown": shutdown_grace,
        }

    def run(self, *args: Any, **kwargs: Any) -> None:
        mark_engaged(SERVER_NAME)
        quiet = IdleGoodbyesUnlogged()
        logger = logging.getLogger("uvicorn.error")
        logger.addFilter(quiet)  # kept by the log config uvicorn applies (it adds, not resets)
        try:
            uvicorn.run(*args, **{**self._options, **kwargs})  # Flower's own choices win
        finally:
            logger.removeFilter(quiet)


class StandInHttpx(ModuleStandIn):
    """Stands in for ``httpx`` in Flower's protobuf client: only ``Client`` differs."""

    def __init__(self, keep_alive: float) -> None:
        super().__init__(httpx)
        # httpx's default limits, but for the expiry
        self._limits = httpx.Limits(
            max_connections=100, max_keepalive_connections=20, keepalive_expiry=keep_alive
        )

    def Client(self, *args: Any, **kwargs: Any) -> httpx.Client:  # httpx's name
        mark_engaged(CLIENT_NAME)
        kwargs.setdefault("limits", self._limits)  # Flower's own choice wins
        return httpx.Client(*args, **kwargs)


WHY = "an idle device's next poll reuses its TLS connection instead of a new handshake"


@contextmanager
def server_keeps_connections(
    keep_alive: int = SERVER_KEEP_ALIVE, shutdown_grace: int = SHUTDOWN_GRACE
) -> Iterator[bool]:
    """Inside the block Flower's SuperLink keeps an idle connection ``keep_alive`` s.

    Yields whether it does (False: stock 5 s, after one warning)."""
    options = inspect.signature(uvicorn.run).parameters
    if not all(option in options for option in UVICORN_OPTIONS):
        stock_instead(SERVER_NAME, f"uvicorn.run takes no {' or '.join(UVICORN_OPTIONS)}", WHY)
        yield False
        return
    stand_in = StandInUvicorn(keep_alive, shutdown_grace)
    with module_stood_in(SERVER_MODULE, "uvicorn", stand_in, name=SERVER_NAME, why=WHY) as on:
        yield on


@contextmanager
def clients_keep_connections(keep_alive: float = CLIENT_KEEP_ALIVE) -> Iterator[bool]:
    """Fleet API clients made inside the block keep an idle connection ``keep_alive`` s.

    Yields whether they do (False: httpx's 5 s, after one warning)."""
    stand_in = StandInHttpx(keep_alive)
    with module_stood_in(CLIENT_MODULE, "httpx", stand_in, name=CLIENT_NAME, why=WHY) as on:
        yield on


__all__ = [
    "CLIENT_KEEP_ALIVE",
    "SERVER_KEEP_ALIVE",
    "SHUTDOWN_GRACE",
    "clients_keep_connections",
    "server_keeps_connections",
]
