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
  and a node key that is not registered, produce one ``pollinate:`` log line each (once a
  minute per peer), which ``pollinate server start`` turns into a message;
- log lines carry timestamps and no colour codes (they go to a file);
- it dies when its parent (``pollinate server start``) dies, however that dies, and takes
  the ``flower-superexec`` and ``flwr-serverapp`` it started along
  (:func:`pollinate.deploy.proc.guard_tree`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("pollinate.superlink")

PUBLIC_PREFIXES = ("/v1/fleet/", "/health")
LOOPBACK = ("127.", "::1", "localhost")
REPEAT_AFTER = 60.0

# Markers `pollinate server start` looks for in this process's output.
TLS_REFUSED = "pollinate: tls-refused"
KEY_REFUSED = "pollinate: key-refused"
ADMIN_REFUSED = "pollinate: admin-refused"

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]

_last_said: dict[tuple[str, str], float] = {}

# ``POLLINATE_REQUEST_STATS=1``: count requests per path and print the counts every
# STATS_EVERY s (benchmarks read the last line: the SuperLink's CPU is spent per request).
REQUESTS = "pollinate: requests"
STATS_EVERY = 1.0
_requests: dict[str, int] | None = None


def _say(marker: str, peer: str, detail: str) -> None:
    """One line per (peer, detail) per minute; a retrying client does not flood the log."""
    now = time.monotonic()
    if now - _last_said.get((peer, detail), -REPEAT_AFTER) >= REPEAT_AFTER:
        _last_said[(peer, detail)] = now
        print(f"{marker} peer={peer} {detail}", flush=True)


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
                _say(ADMIN_REFUSED, peer, f"path={scope['path']}")
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


def _patch_tls_logging() -> None:
    """Log failed TLS handshakes (asyncio only logs them in debug mode)."""
    import asyncio.sslproto as sslproto

    original = sslproto.SSLProtocol._on_handshake_complete

    def on_handshake_complete(self: Any, handshake_exc: BaseException | None) -> None:
        # Flower's and our own port checks connect and hang up: asyncio then passes the
        # ConnectionResetError *class*; only real handshake failures are worth a line.
        if isinstance(handshake_exc, BaseException) and not isinstance(
            handshake_exc, ConnectionError
        ):
            peer = "?"
            with contextlib.suppress(Exception):
                peer = str(self._transport.get_extra_info("peername")[0])
            reason = getattr(handshake_exc, "reason", None) or type(handshake_exc).__name__
            _say(TLS_REFUSED, peer, f"reason={reason}")
        original(self, handshake_exc)

    sslproto.SSLProtocol._on_handshake_complete = on_handshake_complete  # type: ignore[method-assign]


def _patch_activation_logging() -> None:
    from flwr.superlink.servicer.fleet import fleet_handlers

    from pollinate.deploy.certs import key_fingerprint

    original = fleet_handlers.activate_node

    def activate_node(request: Any, state: Any) -> Any:
        try:
            return original(request=request, state=state)
        except Exception as err:
            try:
                key = key_fingerprint(request.public_key)
            except Exception:
                key = "?"
            why = "unregistered" if "No SuperNode found" in str(err) else "still-online"
            _say(KEY_REFUSED, "-", f"why={why} key={key}")
            raise

    fleet_handlers.activate_node = activate_node


def _print_request_stats() -> None:
    """Every STATS_EVERY s, one line with the request counts so far (if they changed)."""
    import threading

    global _requests
    _requests = {}

    def report() -> None:
        last: dict[str, int] = {}
        while True:
            time.sleep(STATS_EVERY)
            now = dict(_requests or {})
            if now != last:
                counts = " ".join(f"{path}={n}" for path, n in sorted(now.items()))
                print(f"{REQUESTS} total={sum(now.values())} {counts}", flush=True)
                last = now

    threading.Thread(target=report, name="request-stats", daemon=True).start()


def patch_flower() -> None:
    # Plain asyncio rather than uvloop, so failed TLS handshakes can be logged.
    sys.modules.setdefault("uvloop", None)  # type: ignore[arg-type]
    import flwr.superlink.main as superlink_main
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=False)
    create_app = superlink_main.create_app

    def create_hardened_app(*args: Any, **kwargs: Any) -> Any:
        return LoopbackAdmin(create_app(*args, **kwargs))

    superlink_main.create_app = create_hardened_app
    if not os.environ.get("POLLINATE_STOCK_MIDDLEWARE"):  # see flower_compat.link_middleware
        from pollinate.flower_compat.link_middleware import gated_get_middleware

        superlink_main._get_middleware = gated_get_middleware
    _patch_tls_logging()
    _patch_activation_logging()
    if os.environ.get("POLLINATE_REQUEST_STATS"):
        _print_request_stats()


def parse_refusal(line: str) -> tuple[str, dict[str, str]] | None:
    """(marker, fields) for a line this launcher printed, else None."""
    for marker in (TLS_REFUSED, KEY_REFUSED, ADMIN_REFUSED):
        if line.startswith(marker):
            fields = dict(re.findall(r"(\w+)=(\S+)", line[len(marker) :]))
            return marker, fields
    return None


def main(argv: list[str]) -> None:
    from pollinate.deploy.proc import guard_tree

    guard_tree()  # before anything is started: nothing outlives `pollinate ... start`
    patch_flower()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *argv]
    flower_superlink()


__all__ = ["LoopbackAdmin", "main", "parse_refusal", "patch_flower"]

if __name__ == "__main__":
    main(sys.argv[1:])
