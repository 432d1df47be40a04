"""``python -m pollinate.deploy.superlink ARGS``: ``flower-superlink ARGS``, hardened and legible.

Flower 1.42 serves its Fleet API (devices), Control API (admin: register nodes, start and
stop runs) and Runtime API (the ServerApp) on one port. This launcher runs Flower's own
``flower_superlink()`` with these changes:

- **admin APIs on loopback only**: requests to anything but ``/v1/fleet/`` and ``/health``
  from a non-loopback address get 403, so exposing the port to devices does not let them
  register keys, start runs (which would run their code on this host) or act as the
  ServerApp. ``pollinate server ...`` and ``flwr ... `` on this host are unaffected;
- **refusals are named**: a TLS handshake that fails (e.g. a node started with
  ``--insecure`` talking plain HTTP to this TLS port, or one that does not trust our CA),
  and a node key that is not registered, produce one event line each (once a minute per
  peer, :mod:`pollinate.deploy.events`), which ``pollinate server start`` turns into a
  message; so do nodes joining and leaving, learnt from Flower's Fleet handlers, not from
  its log text;
- **less CPU per device request**: Flower's middleware layers run only for the requests
  they act on, and for Fleet and Runtime API calls without a task group and stream each
  (``POLLINATE_TASKGROUP_MIDDLEWARE=1``: Starlette's driver); each node signature is
  verified once, not on every request that carries it (devices reuse a signature for a
  minute); and with the state in memory the Fleet and Runtime API handlers run on the
  event loop instead of hopping to a worker thread each (``POLLINATE_THREADED_HANDLERS=1``:
  Flower's threads, for side-by-side runs); an idle connection is kept 75 s, not 5 s, so
  a device's next poll needs no new TLS handshake, and a stop waits at most 3 s for
  in-flight requests (``POLLINATE_SHORT_KEEPALIVE=1``: uvicorn's 5 s); each TLS
  connection reads into 64 KiB, not asyncio's 256 KiB, resident while it is open
  (``POLLINATE_STOCK_TLS_BUFFER=1``: 256 KiB); with the state in
  memory a device's pull looks only at its own messages, not at every stored one
  (``POLLINATE_FULL_SCAN_PULLS=1``: Flower's scan);
- **idle devices are told when to poll again**: a pull that finds no message carries the
  expected wait's share in Flower's ``reconnect`` field (:mod:`pollinate.deploy.pacing`),
  which Pollinate's devices follow and stock ones ignore;
- log lines carry timestamps and no colour codes (they go to a file);
- it dies when its parent (``pollinate server start``) dies, however that dies, and takes
  the ``flower-superexec`` and ``flwr-serverapp`` it started along
  (:func:`pollinate.deploy.proc.guard_tree`).

Each change to Flower is one module of :mod:`pollinate.flower_compat`, saying why.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import ExitStack, contextmanager
from typing import Any

from pollinate.deploy import events
from pollinate.deploy.certs import key_fingerprint
from pollinate.deploy.pacing import PollAdvisor
from pollinate.deploy.proc import guard_tree
from pollinate.flower_compat.console import plain_console
from pollinate.flower_compat.entry_points import flower_superlink
from pollinate.flower_compat.fleet_activation import ActivationEvents, activation_observed
from pollinate.flower_compat.inline_handlers import MEMORY_DATABASE, handlers_inline
from pollinate.flower_compat.keep_alive import server_keeps_connections
from pollinate.flower_compat.link_middleware import gated_link_middleware
from pollinate.flower_compat.node_auth_cache import node_signatures_remembered
from pollinate.flower_compat.own_messages import pulls_find_own_messages
from pollinate.flower_compat.poll_advice import poll_advice_given
from pollinate.flower_compat.superlink_app import wrapped_superlink_app
from pollinate.flower_compat.tls_buffer import tls_reads_into
from pollinate.flower_compat.tls_handshake import handshake_failures_reported

PUBLIC_PREFIXES = ("/v1/fleet/", "/health")
LOOPBACK = ("127.", "::1", "localhost")
REPEAT_AFTER = events.REPEAT_AFTER

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]

# ``POLLINATE_REQUEST_STATS=1``: count requests per path and print the counts every
# STATS_EVERY s (benchmarks read the last line: the SuperLink's CPU is spent per request),
# and the TLS handshakes (new connections) so far.
REQUESTS = "pollinate: requests"
HANDSHAKES = "pollinate: tls handshakes"
STATS_EVERY = 1.0
_requests: dict[str, int] | None = None
_handshakes = 0


def _handshake_done() -> None:
    global _handshakes
    _handshakes += 1


def _is_loopback(client: tuple[str, int] | None) -> bool:
    if client is None:  # unix socket
        return True
    return client[0].startswith(LOOPBACK) or client[0] == "::ffff:127.0.0.1"


class LoopbackAdmin:
    """ASGI middleware: the Control and Runtime APIs answer loopback clients only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if _requests is not None and scope["type"] == "http":
            _requests[scope["path"]] = _requests.get(scope["path"], 0) + 1
        if scope["type"] == "http" and not scope["path"].startswith(PUBLIC_PREFIXES):
            client = scope.get("client")
            server = scope.get("server")
            # Same host: loopback, or the very address it connected to (--address <own IP>).
            same_host = client is not None and server is not None and client[0] == server[0]
            if not (_is_loopback(client) or same_host):
                peer = client[0] if client else "?"
                events.say_at_most_every(
                    REPEAT_AFTER, events.ADMIN_REFUSED, peer=peer, path=scope["path"]
                )
                body = b'{"detail": "this API answers only on the server host"}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _tls_refused(peer: str, reason: str) -> None:
    events.say_at_most_every(REPEAT_AFTER, events.TLS_REFUSED, peer=peer, reason=reason)


def _key_refused(public_key: bytes, registered: bool) -> None:
    try:
        key = key_fingerprint(public_key)
    except Exception:
        key = "?"
    why = "still-online" if registered else "unregistered"
    events.say_at_most_every(REPEAT_AFTER, events.KEY_REFUSED, peer="-", why=why, key=key)


ACTIVATION = ActivationEvents(
    joined=lambda node_id: events.say(events.NODE_ACTIVATED, node_id=node_id),
    left=lambda node_id: events.say(events.NODE_DEACTIVATED, node_id=node_id),
    refused=_key_refused,
)


def _print_request_stats() -> None:
    """Every STATS_EVERY s, one line with the request counts so far (if they changed)."""
    global _requests
    _requests = {}

    def report() -> None:
        last: dict[str, int] = {}
        while True:
            time.sleep(STATS_EVERY)
            now = dict(_requests or {})
            if now != last:
                counts = " ".join(f"{path}={n}" for path, n in sorted(now.items()))
                print(f"{HANDSHAKES}={_handshakes}", flush=True)
                print(f"{REQUESTS} total={sum(now.values())} {counts}", flush=True)
                last = now

    threading.Thread(target=report, name="request-stats", daemon=True).start()


def _memory_state(argv: list[str]) -> bool:
    """Whether ``argv`` keeps the SuperLink's state in memory (``--database :flwr-in-memory:``)."""
    for i, arg in enumerate(argv):
        if arg == "--database" and i + 1 < len(argv):
            return argv[i + 1] == MEMORY_DATABASE
        if arg.startswith("--database="):
            return arg.partition("=")[2] == MEMORY_DATABASE
    return False


@contextmanager
def patched_flower(argv: list[str] | None = None) -> Iterator[None]:
    """Every change this launcher makes to Flower's SuperLink, undone when the block ends.

    ``argv``: the SuperLink's arguments (with ``--database`` in memory its handlers run
    on the event loop)."""
    with ExitStack() as stack:
        stack.enter_context(plain_console())  # log lines go to a file
        stack.enter_context(handshake_failures_reported(_tls_refused, _handshake_done))
        stack.enter_context(wrapped_superlink_app(LoopbackAdmin))
        stack.enter_context(activation_observed(ACTIVATION))
        stack.enter_context(gated_link_middleware())  # fewer layers per device request
        stack.enter_context(node_signatures_remembered())  # one verification per signature
        if not os.environ.get("POLLINATE_SHORT_KEEPALIVE"):  # for side-by-side benchmarks
            stack.enter_context(server_keeps_connections())  # no handshake per idle poll
        if not os.environ.get("POLLINATE_STOCK_TLS_BUFFER"):  # for side-by-side benchmarks
            stack.enter_context(tls_reads_into())  # 64 KiB, not 256, held per connection
        if not os.environ.get("POLLINATE_NO_POLL_ADVICE"):  # for side-by-side benchmarks
            advisor = PollAdvisor()
            stack.enter_context(
                poll_advice_given(advisor.advice, advisor.replied, advisor.delivered)
            )
        in_memory = _memory_state(argv or [])
        if in_memory and not os.environ.get("POLLINATE_THREADED_HANDLERS"):
            stack.enter_context(handlers_inline())  # no thread hop per handler
        if in_memory and not os.environ.get("POLLINATE_FULL_SCAN_PULLS"):
            stack.enter_context(pulls_find_own_messages())  # a pull: O(own messages)
        if os.environ.get("POLLINATE_REQUEST_STATS"):
            _print_request_stats()
        yield


def main(argv: list[str]) -> None:
    guard_tree()  # before anything is started: nothing outlives `pollinate ... start`
    with patched_flower(argv):
        flower_superlink(argv)


__all__ = ["LoopbackAdmin", "main", "patched_flower"]

if __name__ == "__main__":
    main(sys.argv[1:])
