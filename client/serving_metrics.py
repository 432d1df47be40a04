"""The inference service's Prometheus metrics, and the one middleware that times requests.

:class:`ServingMetrics` holds the instruments in a registry private to one app (several
apps may share a process). :class:`MetricsMiddleware` wraps the app: every request the app
answers is counted and timed there, once, by endpoint, model and status; handlers only
name the model that answered (:func:`label_model`) or say that the client left
(:func:`count_disconnect`, counted apart and not as a request). Requests refused by the
middlewares outside it (a foreign ``Host``, a declared body over the limit) never reach it.
"""

from __future__ import annotations

import re
import time

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pollinate.client.store import KINDS

__all__ = [
    "ENDPOINTS",
    "MetricsMiddleware",
    "ServingMetrics",
    "count_disconnect",
    "endpoint_label",
    "label_model",
]

#: The service's own top-level paths; any other unmatched path is counted as "other".
ENDPOINTS = ("/predict", "/models", "/health", "/metrics", "/v2")

#: The ``reason`` label of ``pollinate_serving_errors`` per status.
REASONS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    421: "wrong_host",
    422: "invalid",
    503: "no_model",
    500: "internal",
}

# /v2/models/{name}[/versions/{version}][/ready|/infer]: one label per operation, the
# versioned and unversioned routes together (as KServe's own metrics count them).
_V2_MODEL = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/[^/]+)?(?P<op>/ready|/infer)?$")
_V2_FIXED = frozenset(("/v2", "/v2/health/live", "/v2/health/ready"))

# Keys of the per-request record the middleware keeps in the ASGI scope.
_MODEL = "pollinate.model"
_UNCOUNTED = "pollinate.uncounted"


class ServingMetrics:
    """Prometheus instruments in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter(
            "pollinate_serving_requests",
            "HTTP requests answered",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "pollinate_serving_request_duration_seconds",
            "Time to answer a request",
            ["endpoint", "model"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.errors = Counter(
            "pollinate_serving_errors",
            "Requests answered with an error",
            ["endpoint", "reason"],
            registry=r,
        )
        self.predictions = Counter(
            "pollinate_serving_predictions",
            "Rows predicted, by model and predicted class",
            ["model", "class"],
            registry=r,
        )
        self.model_round = Gauge(
            "pollinate_serving_model_round",
            "Round of the model being served (-1: none loaded)",
            ["model"],
            registry=r,
        )
        self.swaps = Counter(
            "pollinate_serving_model_swaps", "Newer models swapped in", ["model"], registry=r
        )
        self.reload_failures = Counter(
            "pollinate_serving_model_reload_failures",
            "Model files that failed to load or verify (the previous model kept serving)",
            ["model"],
            registry=r,
        )
        self.disconnects = Counter(
            "pollinate_serving_client_disconnects",
            "Requests whose client closed the connection before they were answered",
            ["endpoint"],
            registry=r,
        )
        for kind in KINDS:
            self.model_round.labels(kind).set(-1)

    def observe(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        """One answered request."""
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, REASONS.get(status, str(status))).inc()

    def count_classes(self, model: str, predictions: np.ndarray, num_classes: int) -> None:
        """Rows predicted per class; ``predictions`` (B,) class indices."""
        counts = np.bincount(predictions, minlength=num_classes)
        for c in np.flatnonzero(counts):
            self.predictions.labels(model, str(c)).inc(int(counts[c]))

    # The model slots' observer (pollinate.client.model_slot.SwapObserver).

    def served_round(self, kind: str, round: int, *, swapped: bool) -> None:
        self.model_round.labels(kind).set(round)
        if swapped:
            self.swaps.labels(kind).inc()

    def reload_failed(self, kind: str) -> None:
        self.reload_failures.labels(kind).inc()


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label of a request path: the route, not the concrete URL."""
    if path in ENDPOINTS or path in _V2_FIXED:
        return path
    v2 = _V2_MODEL.match(path)
    if v2 is not None:
        return "/v2/models/{name}" + (v2["op"] or "")
    return "other"


def _default_model(path: str) -> str:
    """A v2 model route names its model in the path; everything else answers for none."""
    v2 = _V2_MODEL.match(path)
    return v2["name"] if v2 is not None and v2["name"] in KINDS else "-"


def label_model(request: Request, kind: str) -> None:
    """Name the model that answered ``request`` (the ``model`` label; "-" for none)."""
    request.scope[_MODEL] = kind


def count_disconnect(metrics: ServingMetrics, request: Request) -> None:
    """The client left before its answer: counted as a disconnect, not as a request."""
    request.scope[_UNCOUNTED] = True
    metrics.disconnects.labels(endpoint_label(request.url.path)).inc()


class MetricsMiddleware:
    """Count and time every request the wrapped app answers (pure ASGI: no body copies).

    The clock runs from the request's arrival to the last byte of the answer handed to the
    server; an exception escaping the app is counted as a 500 and re-raised.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if not scope.get(_UNCOUNTED):
                path = scope["path"]
                model = scope.get(_MODEL) or _default_model(path)
                self.metrics.observe(endpoint_label(path), model, status, time.perf_counter() - t0)
