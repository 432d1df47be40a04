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

:func:`check_middleware` checks that the chain is still the one this was written for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import flwr.superlink.main as superlink_main
from flwr.superlink.routers.control.middlewares import (
    ControlAuthenticationMiddleware,
    ControlEventLogMiddleware,
    ControlLicenseMiddleware,
    ControlSensitiveResponseMiddleware,
)
from flwr.superlink.routers.fleet.middlewares import FleetEventLogMiddleware
from flwr.superlink.routers.fleet.node_auth import NodeAuthMiddleware
from starlette.middleware import Middleware

from pollinate.flower_compat._core import (
    FlowerIncompatible,
    flower_version,
    mark_engaged,
    swapped,
)

CONTROL = "/v1/control/"
FLEET = "/v1/fleet/"


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


class _Gate:
    """Plain ASGI: HTTP requests for which ``applies(scope)`` is false skip ``layer``."""

    def __init__(
        self, app: Any, *, layer: type, applies: Callable[[dict[str, Any]], bool], **kw: Any
    ) -> None:
        self.app = app
        self.layer = layer(app, **kw)
        self.applies = applies

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.applies(scope):
            await self.app(scope, receive, send)
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


__all__ = ["GATES", "check_middleware", "gated_link_middleware", "gated_middleware"]
