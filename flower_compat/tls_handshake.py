"""Failed TLS handshakes on the SuperLink's port, reported (asyncio's private hook).

Why: a device started with ``--insecure`` against a TLS server, or one that does not trust
the server's CA, only sees its connection closed, and the server says nothing: asyncio (the
loop under Flower's uvicorn server) logs a failed handshake in debug mode only. Its one
place that sees every handshake's outcome is the private
``asyncio.sslproto.SSLProtocol._on_handshake_complete(self, handshake_exc)``; Pollinate
wraps it to name the peer and the reason. uvloop's own TLS code has no such hook, so
inside the block uvloop cannot be imported and uvicorn runs on plain asyncio.

Stock: the handshake fails silently; everything else works. A changed signature therefore
falls back to stock with a one-line warning.
"""

from __future__ import annotations

import asyncio.sslproto as sslproto
import contextlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pollinate.flower_compat._core import mark_engaged, swapped

NAME = "SSLProtocol._on_handshake_complete"
EXPECT = ("self", "handshake_exc")


def _peer(protocol: Any) -> str:
    with contextlib.suppress(Exception):
        return str(protocol._transport.get_extra_info("peername")[0])
    return "?"


@contextmanager
def handshake_failures_reported(
    report: Callable[[str, str], None], completed: Callable[[], None] | None = None
) -> Iterator[bool]:
    """Inside the block, ``report(peer, reason)`` for each TLS handshake that fails, and
    ``completed()`` (if given) for each that succeeds on the server side (a new TLS
    connection accepted).

    Yields whether the hook is in place (False: stock asyncio, after one warning).
    """
    original = sslproto.SSLProtocol._on_handshake_complete

    def on_handshake_complete(self: Any, handshake_exc: BaseException | None) -> None:
        mark_engaged(NAME)
        if handshake_exc is None and completed is not None and getattr(self, "_server_side", True):
            completed()  # an accepted connection (this loop's own outgoing ones are not)
        # Port checks connect and hang up: asyncio then passes the ConnectionResetError
        # *class*; only real handshake failures are worth a report.
        if isinstance(handshake_exc, BaseException) and not isinstance(
            handshake_exc, ConnectionError
        ):
            reason = getattr(handshake_exc, "reason", None) or type(handshake_exc).__name__
            report(_peer(self), str(reason))
        original(self, handshake_exc)

    blocked_uvloop = "uvloop" not in sys.modules
    if blocked_uvloop:
        sys.modules["uvloop"] = None  # type: ignore[assignment]  # import fails: plain asyncio
    try:
        with swapped(
            sslproto.SSLProtocol,
            "_on_handshake_complete",
            on_handshake_complete,
            why="failed TLS handshakes are named in the server's log",
            expect=EXPECT,
            stock_fallback=True,
        ) as on:
            yield on
    finally:
        if blocked_uvloop and sys.modules.get("uvloop", 0) is None:
            del sys.modules["uvloop"]
