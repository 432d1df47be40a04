"""Limits for the inference service below the app: slow clients, too many connections, and
JSON for the errors uvicorn answers itself.

uvicorn (0.49) closes an idle keep-alive connection after ``timeout_keep_alive``, but only
*after a response*: a connection that sends nothing, or half a request line, or headers
one byte a minute, holds a file descriptor forever (slowloris; 1,100 such connections
starve a service under a 1,024-file limit). Its ``limit_concurrency`` does not help: it
answers 503 only once a request's headers are complete, which a slowloris client never
does. So :func:`guarded_protocol` subclasses uvicorn's httptools protocol (the one its
``auto`` setting picks, httptools being a dependency) where those events happen:

- **header deadline**: a connection must complete each request's headers within
  ``header_timeout`` seconds of connecting, or of the previous response; else 408 + close;
- **body deadline**: the body must arrive within ``body_timeout`` seconds of the headers;
  else 408 + close (the app sees a disconnect);
- **connection cap**: beyond ``max_connections`` open connections a new one is answered
  503 at once and closed, before it can hold anything;
- **header size**: more than ``max_header_bytes`` before the headers end is 431 + close;
- **JSON**: malformed HTTP (uvicorn's own 400) and uvicorn's fallback 500 are
  ``{"error": ...}`` like every answer of the app.

Everything above the protocol (Host checks, body size, 404/405, validation, 500) is the
app's: see :mod:`pollinate.client.serving`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

__all__ = [
    "LOCAL_HOSTS",
    "AllowedHosts",
    "BodyLimit",
    "HttpLimits",
    "guarded_protocol",
    "json_error_bytes",
]

#: Host names the local service always answers to.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection limits of the inference service (seconds, counts, bytes).

    Attributes
    ----------
    header_timeout
        Seconds from connecting (or from the previous response) to the end of a request's
        headers.
    body_timeout
        Seconds from the end of the headers to the end of the body.
    max_connections
        Open connections at once; more are refused with 503.
    max_header_bytes
        Bytes a request may send before its headers end.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 256
    max_header_bytes: int = 64 * 1024

    def check(self) -> None:
        """Raise ValueError naming the first bad limit."""
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value <= 3600:
                raise ValueError(f"{name} must be in (0, 3600] seconds, got {value!r}")
        for name in ("max_connections", "max_header_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 20:
                raise ValueError(f"{name} must be an int in 1..{1 << 20}, got {value!r}")


def json_error_bytes(status: int, message: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with body ``{"error": message}``."""
    body = json.dumps({"error": message}).encode()
    head = (
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n"
    )
    return STATUS_LINE[status] + head + body


def guarded_protocol(limits: HttpLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with ``limits`` enforced (pass as ``Config(http=...)``)."""
    limits.check()

    class GuardedHttpToolsProtocol(_Guarded):
        pass

    GuardedHttpToolsProtocol.limits = limits
    return GuardedHttpToolsProtocol


class _Guarded(HttpToolsProtocol):
    limits: HttpLimits = HttpLimits()

    _deadline: asyncio.TimerHandle | None = None
    _awaiting_headers = False  # between a request's first byte (or connecting) and its headers
    _header_bytes = 0
    _refused = False

    # -- connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(
                503,
                f"the service has {self.limits.max_connections} connections open, its "
                "limit; retry shortly",
            )
            return
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, f"request headers exceed {self.limits.max_header_bytes} bytes")
                return
        super().data_received(data)

    # -- parser callbacks (httptools calls these while data_received feeds it)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._arm(self.limits.body_timeout, self._body_too_slow)
        super().on_headers_complete()
        if self.cycle is not None:
            # uvicorn's own fallback 500 (an app that returned without answering) as JSON.
            self.cycle.send_500_response = _json_500(self.cycle)  # type: ignore[method-assign]

    def on_message_complete(self) -> None:
        # The body deadline ends here; a header deadline already armed (the app answered
        # before the body was in, and the next request's headers are due) must stay.
        if not self._awaiting_headers:
            self._cancel_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        idle = not self.pipeline  # no pipelined request queued: the next one starts afresh
        super().on_response_complete()
        if idle and not self.transport.is_closing():
            self._await_headers()

    # -- answers uvicorn writes itself

    def send_400_response(self, msg: str) -> None:
        if self._refused:
            return
        self._refuse(400, f"malformed HTTP request ({msg.rstrip('.')})")

    # -- helpers

    def _await_headers(self) -> None:
        self._awaiting_headers = True
        self._header_bytes = 0
        self._arm(self.limits.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        if not self._awaiting_headers:
            return
        if self._header_bytes == 0:
            # Idle (nothing of a next request yet): close quietly, as uvicorn's keep-alive
            # timeout does; an unasked-for 408 could be read as the answer to a request a
            # client is just sending on its pooled connection.
            self.transport.close()
        else:
            self._refuse(
                408,
                f"request headers not received within {self.limits.header_timeout:g} s",
            )

    def _body_too_slow(self) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_started:
            self.transport.close()  # the app is answering; nothing more to say
            return
        cycle.disconnected = True  # the app's receive() now reports a disconnect
        cycle.message_event.set()
        self._refuse(408, f"request body not received within {self.limits.body_timeout:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error and close; the connection reads nothing more."""
        self._refused = True
        self._cancel_deadline()
        if not self.transport.is_closing():
            self.transport.write(json_error_bytes(status, message))
            self.transport.close()

    def _arm(self, seconds: float, callback: Any) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, callback)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def _json_500(cycle: Any) -> Any:
    async def send_500_response() -> None:
        body = json.dumps({"error": "internal error: the request was not answered"}).encode()
        await cycle.send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await cycle.send({"type": "http.response.body", "body": body, "more_body": False})

    return send_500_response


# ----------------------------------------------------------------------- app middleware


def host_name(header: str) -> str:
    """The host of a ``Host`` header, lowercased, without port or brackets."""
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8080
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AllowedHosts:
    """Answer 421 ``{"error": ...}`` to requests whose ``Host`` is not this service's.

    Protects a service on a loopback address against DNS rebinding: a web page on
    ``evil.example`` that re-resolves its name to 127.0.0.1 makes the browser send
    ``Host: evil.example``, which is refused. Allowed: ``localhost``, ``127.0.0.1``, ``::1``,
    the names in ``extra`` and the bound ``host``; a service bound to every interface
    (``0.0.0.0`` / ``::``) also accepts any IP literal, since a rebinding attack always
    arrives under a DNS name. A request without ``Host`` (HTTP/1.0, never a browser) passes.
    """

    def __init__(
        self, app: ASGIApp, *, bound_host: str | None = None, extra: Iterable[str] = ()
    ) -> None:
        self.app = app
        names = [*LOCAL_HOSTS, *extra]
        if bound_host and bound_host not in _WILDCARDS:
            names.append(bound_host)
        self.allowed = frozenset(host_name(n) for n in names)
        self.any_ip = bound_host in _WILDCARDS and bound_host is not None

    def allows(self, header: str) -> bool:
        host = host_name(header)
        return host in self.allowed or (self.any_ip and _is_ip(host))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = next((v for k, v in scope["headers"] if k == b"host"), None)
            if header is not None and not self.allows(header.decode("latin-1")):
                shown = header.decode("latin-1")[:100]
                await _send_json(
                    send,
                    421,
                    f"Host {shown!r} is not allowed (DNS rebinding protection); this service "
                    f"answers to {', '.join(sorted(self.allowed))}: add a name with "
                    "--allow-host NAME",
                )
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 ``{"error": ...}``.

    A declared ``Content-Length`` over the limit is answered before the app runs; a
    streamed body is counted as the app reads it, and the read that crosses the limit
    raises ``HTTPException(413)`` (answered by the app's handler).
    """

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.limit:
            await _send_json(
                send,
                413,
                f"request body is {int(declared)} bytes; the limit is {self.limit} "
                "(send fewer rows per request)",
            )
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(
                    413,
                    f"request body exceeds the limit of {self.limit} bytes "
                    "(send fewer rows per request)",
                )
            return message

        await self.app(scope, counted, send)


async def _send_json(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
