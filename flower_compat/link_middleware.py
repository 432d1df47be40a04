"""The SuperLink's middleware chain, each layer run only for the requests it acts on.

Why: Flower 1.42's SuperLink wraps every request in eight Starlette ``BaseHTTPMiddleware``
layers (``flwr/superlink/main.py``, ``_get_middleware``). Each layer costs a task group,
memory streams and a wrapped request even when it only passes the request on, and a
py-spy profile of a SuperLink serving emulated devices puts about half of its CPU per
request there (``benchmarks/bench_scale_deploy.py --profile``). Four of the layers act on
Control API paths only (``/v1/control/``: they check ``_is_control_path`` first), and two
on Fleet API paths only (``/v1/fleet/``); the Fleet event log acts only with an event-log
plugin configured. :func:`gated_middleware` gives each layer a plain-ASGI gate that sends
every other request straight to the next layer, so a device's request passes three layers
(error translation, protobuf translation, node authentication) and the ServerApp's
Runtime API requests two. What each layer does to the requests it acts on is unchanged.

For a Fleet or Runtime API request (one protobuf request, one protobuf response) each of
those layers runs its ``dispatch`` through :class:`_Buffered`: ``call_next`` runs the rest
of the chain to its end and hands back the buffered response, where Starlette's
``BaseHTTPMiddleware`` starts a task group, a memory stream, and a task per layer to
stream it. The dispatch functions are Flower's own, unchanged; exceptions reach them
from ``call_next`` as they do in Starlette. Other requests (the Control API's log and
event streams, the Runtime API's response stream) keep Starlette's driver.
``POLLINATE_TASKGROUP_MIDDLEWARE=1`` keeps it for every request (side-by-side runs).

:func:`check_middleware` checks that the chain is still the one this was written for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import flwr.superlink.main as superlink_main
from flwr.supercore.error.http import http_error_translator
from flwr.supercore.protobuf.translation import (
    PROTOBUF_REQUEST_TYPES,
    ProtobufTranslationMiddleware,
)
from flwr.superlink.routers.control.middlewares import (
    ControlAuthenticationMiddleware,
    ControlEventLogMiddleware,
    ControlLicenseMiddleware,
    ControlSensitiveResponseMiddleware,
)
from flwr.superlink.routers.fleet.middlewares import FleetEventLogMiddleware
from flwr.superlink.routers.fleet.node_auth import NodeAuthMiddleware
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from pollinate.flower_compat._core import (
    FlowerIncompatible,
    flower_version,
    mark_engaged,
    swapped,
)

CONTROL = "/v1/control/"
FLEET = "/v1/fleet/"
RUNTIME = "/v1/runtime/"


def _fleet_event_log_on(scope: dict[str, Any]) -> bool:
    app = scope.get("app")
    return getattr(getattr(app, "state", None), "fleet_event_log_plugin", None) is not None


# Layer -> when it must run (a request it would only pass on skips it).
GATES: dict[type, Callable[[dict[str, Any]], bool]] = {
    ControlSensitiveResponseMiddleware: lambda s: s["path"].startswith(CONTROL),
    ControlAuthenticationMiddleware: lambda s: s["path"].startswith(CONTROL),
    ControlLicenseMiddleware: lambda s: s["path"].startswith(CONTROL),
    ControlEventLogMiddleware: lambda s: s["path"].startswith(CONTROL),
    NodeAuthMiddleware: lambda s: s["path"].startswith(FLEET),
    FleetEventLogMiddleware: lambda s: s["path"].startswith(FLEET) and _fleet_event_log_on(s),
}


def _always(scope: dict[str, Any]) -> bool:
    return True


def is_unary(scope: dict[str, Any]) -> bool:
    """A Fleet or Runtime API call: one protobuf request, answered by one response."""
    path = scope["path"]
    route = (scope.get("method"), path)
    return path.startswith((FLEET, RUNTIME)) and route in PROTOBUF_REQUEST_TYPES


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives ``body`` once, then what ``receive`` gives (a disconnect)."""
    given = False

    async def replay() -> dict[str, Any]:
        nonlocal given
        if given:
            return dict(await receive())
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _whole_body(receive: Any) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _run_to_end(app: Any, scope: dict[str, Any], receive: Any) -> Response:
    """``app``'s response to the request, buffered whole."""
    start: dict[str, Any] | None = None
    parts: list[bytes] = []

    async def keep(message: dict[str, Any]) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    await app(scope, receive, keep)
    if start is None:
        raise RuntimeError("No response returned.")
    response = Response(b"".join(parts), status_code=start["status"])
    response.raw_headers = list(start.get("headers", []))
    return response


class _Buffered:
    """Plain ASGI: a ``BaseHTTPMiddleware`` dispatch, its ``call_next`` buffering the rest
    of the chain's response (for :func:`is_unary` requests only: it does not stream)."""

    def __init__(self, app: Any, dispatch: Callable[..., Any]) -> None:
        self.app = app
        self.dispatch = dispatch

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await _whole_body(receive)

        async def call_next(request: Request) -> Response:
            return await _run_to_end(self.app, scope, _replay(body, receive))

        response = await self.dispatch(Request(scope, _replay(body, receive)), call_next)
        await response(scope, receive, send)


class _Gate:
    """Plain ASGI: HTTP requests for which ``applies(scope)`` is false skip ``layer``; a
    ``BaseHTTPMiddleware`` layer runs :func:`is_unary` requests through :class:`_Buffered`."""

    def __init__(
        self, app: Any, *, layer: type, applies: Callable[[dict[str, Any]], bool], **kw: Any
    ) -> None:
        self.app = app
        self.layer = layer(app, **kw)
        self.applies = applies
        self.buffered: _Buffered | None = None
        if isinstance(self.layer, BaseHTTPMiddleware) and not os.environ.get(
            "POLLINATE_TASKGROUP_MIDDLEWARE"
        ):
            self.buffered = _Buffered(app, self.layer.dispatch_func)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.layer(scope, receive, send)
        elif not self.applies(scope):
            await self.app(scope, receive, send)
        elif self.buffered is not None and is_unary(scope):
            await self.buffered(scope, receive, send)
        else:
            await self.layer(scope, receive, send)


def check_middleware(chain: list[Middleware]) -> None:
    """Raise ``FlowerIncompatible`` unless every gated layer is in ``chain`` exactly once."""
    classes: list[Any] = [m.cls for m in chain]
    missing = [c.__name__ for c in GATES if classes.count(c) != 1]
    if missing:
        raise FlowerIncompatible(
            f"flwr {flower_version()}: the SuperLink's middleware chain no longer has "
            f"{', '.join(missing)} once each; pollinate.flower_compat.link_middleware "
            "needs updating"
        )


def gated_middleware(chain: list[Middleware]) -> list[Middleware]:
    """``chain`` with each layer of :data:`GATES` behind its gate; order unchanged."""
    check_middleware(chain)
    out = []
    for m in chain:
        layer: Any = m.cls
        applies = GATES.get(layer)
        if layer is ProtobufTranslationMiddleware or (
            layer is BaseHTTPMiddleware and m.kwargs.get("dispatch") is http_error_translator
        ):
            applies = _always  # every request; gated only to run it buffered
        if applies is None:
            out.append(m)
        else:
            if m.args:
                raise FlowerIncompatible(f"{layer.__name__} now takes positional options")
            gate: Any = _Gate  # a plain ASGI class; Starlette's factory type wants a function
            out.append(Middleware(gate, layer=layer, applies=applies, **m.kwargs))
    return out


NAME = "flwr.superlink.main._get_middleware"


@contextmanager
def gated_link_middleware() -> Iterator[bool]:
    """Inside the block, the SuperLink Flower builds runs its middleware gated by path.

    ``POLLINATE_STOCK_MIDDLEWARE=1`` keeps Flower's own chain (for side-by-side benchmarks).
    """
    if os.environ.get("POLLINATE_STOCK_MIDDLEWARE"):
        yield False
        return
    stock = superlink_main._get_middleware

    def gated_get_middleware() -> list[Middleware]:
        mark_engaged(NAME)
        return gated_middleware(stock())

    with swapped(
        superlink_main,
        "_get_middleware",
        gated_get_middleware,
        why="fewer middleware layers per device request",
        expect=(),
        stock_fallback=True,
    ) as on:
        yield on


__all__ = ["GATES", "check_middleware", "gated_link_middleware", "gated_middleware", "is_unary"]
