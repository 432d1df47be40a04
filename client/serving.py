"""The local inference service on a device (model-as-a-service): FastAPI served by uvicorn.

Start it from a node process (``pollinate node start`` / ``pollinate node serve``)::

    from pollinate.client.serving import serve, start_in_thread

    serve(model_dir, host="127.0.0.1", port=8080, user=user_id)  # blocks; Ctrl+C / SIGTERM
    # or, beside training in the same process:
    handle = start_in_thread(model_dir, port=8080, user=user_id)  # returns once listening
    ...
    handle.stop()

Both raise a one-line :class:`ServingError` when the address cannot be bound.
``create_app(model_dir)`` builds the ASGI app alone (tests, other servers).

Endpoints (every error is ``{"error": "<one line>"}``; bad input is always 4xx):

- ``POST /predict`` ``{"rows": [[f1, ..., fF], ...], "model": "personal" | "global"}``
  (``"row": [...]`` for one row; model defaults to personal) ->
  ``{"model", "user", "version": {"round", "hash"}, "predictions", "probabilities"}``;
  503 while no such model is stored yet, 413 for a body over ``max_body_bytes``.
- ``GET /models``: the served user's stored models (round, hash, metrics, architecture).
- ``GET /health``: always 200 while the process is up; ``"ready"`` says whether a model
  is loaded.
- ``GET /metrics``: Prometheus text (requests, latency, errors, predicted classes, the
  served rounds, swaps and failed reloads), from a registry private to the app.
- ``/v2/...``: the Open Inference Protocol (KServe v2), see
  :mod:`pollinate.client.openinference`; ``/predict`` also takes TF-Serving's and MLflow's
  bodies (:mod:`pollinate.client.request_formats`). ``GET /openapi.json`` describes them all.

Hardening: the ``Host`` header must name this service (DNS rebinding; 421 otherwise),
bodies are capped for every route (``BodyLimit``), a client that disconnects mid-request
is counted, not logged as an error, and outputs are finite or a 400. Below the app,
:mod:`pollinate.client.httpguard` times out slow headers and bodies, caps connections and
turns uvicorn's own error answers into JSON (``serve(..., limits=HttpLimits(...))``).

Hot swap: a watcher thread polls the store files' (mtime, size, inode) every
``reload_interval`` seconds. A changed file is loaded and verified (content hash, architecture)
off the request path, and only then is the model reference replaced, in one assignment. A
request holds the reference it started with, so none sees a half-loaded model and none fails
during a swap; a file that fails to load is logged and the previous model keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.config import LOGGING_CONFIG

from pollinate.client import openinference
from pollinate.client.httpguard import AllowedHosts, BodyLimit, HttpLimits, guarded_protocol
from pollinate.client.predictor import LoadedModel, PredictError, resolve_user
from pollinate.client.request_formats import (
    ErrorResponse,
    FormatError,
    PredictResponse,
    json_body,
    json_type,
    rows_from_request,
)
from pollinate.client.store import KINDS, StoreError, open_store

__all__ = [
    "HttpLimits",
    "ServingError",
    "ServingHandle",
    "create_app",
    "serve",
    "start_in_thread",
]

log = logging.getLogger("pollinate.serving")

#: Bodies larger than this are parsed and scored on a worker thread, off the event loop.
_INLINE_BYTES = 64 * 1024

_ENDPOINTS = ("/predict", "/models", "/health", "/metrics", "/v2")
_REASONS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    421: "wrong_host",
    503: "no_model",
    500: "internal",
}
_EXAMPLE = '{"rows": [[0.1, 0.2, ...]], "model": "personal"}'


class ServingError(ValueError):
    """The service cannot start (address in use, ambiguous user); one line."""


class _Reply(Exception):
    """An error answer: HTTP status plus a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------ metrics


class _Metrics:
    """Prometheus instruments in a registry of their own (several apps may share a process)."""

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
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, _REASONS.get(status, str(status))).inc()

    def count_classes(self, model: str, predictions: np.ndarray, num_classes: int) -> None:
        counts = np.bincount(predictions, minlength=num_classes)
        for c in np.flatnonzero(counts):
            self.predictions.labels(model, str(c)).inc(int(counts[c]))


# ------------------------------------------------------------------------ model slots


class _Models:
    """The models being served, swapped atomically as newer files land in the store."""

    def __init__(self, root: Path, user: str | None, metrics: _Metrics) -> None:
        try:
            self.store = open_store(root, user)  # a store, or one user's folder in it
        except StoreError as e:
            raise ServingError(str(e)) from None
        self.user = user
        self.problem: str | None = None  # why nothing can be served (e.g. several users)
        self.reload_errors: dict[str, str] = {}  # kind -> why the latest file was rejected
        self._metrics = metrics
        # Copy-on-write: readers take self._models once; a swap assigns a new dict.
        self._models: dict[str, LoadedModel] = {}
        self._stamps: dict[str, tuple[int, int, int] | None] = {}
        self._poll_lock = threading.Lock()

    def get(self, kind: str) -> LoadedModel | None:
        return self._models.get(kind)

    def stored_kinds(self) -> list[str]:
        """The kinds with a file in the store (loaded or not)."""
        if self.user is None:
            return []
        return [k for k in KINDS if self.store.path(self.user, k).exists()]

    def loaded(self) -> dict[str, LoadedModel]:
        return self._models

    def missing_message(self, kind: str) -> str:
        if self.problem:
            return self.problem
        where = f"{self.store.root}" + (f" for user {self.user!r}" if self.user else "")
        other = [k for k in KINDS if k != kind and k in self._models]
        alt = f', or ask for "model": "{other[0]}"' if other else ""
        return (
            f"no {kind} model stored yet in {where}; the device writes it after its first "
            f"federated round (GET /models lists what is stored{alt})"
        )

    def poll(self) -> None:
        """Load every changed model file; swap in those that verify. Never raises for bad files."""
        with self._poll_lock:
            if self.user is None and not self._adopt_user():
                return
            assert self.user is not None
            for kind in KINDS:
                self._poll_kind(kind, self.store.path(self.user, kind))

    def _adopt_user(self) -> bool:
        try:
            self.user = resolve_user(self.store, None)
        except PredictError as e:  # none yet, or several: wait, and say why
            users = self.store.users()
            self.problem = None if not users else f"{e}; restart the service with --user ID"
            return False
        self.problem = None
        log.info("serving models of user %r from %s", self.user, self.store.root)
        return True

    def _poll_kind(self, kind: str, path: Path) -> None:
        try:
            st = os.stat(path)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if kind in self._stamps and stamp == self._stamps[kind]:
            return
        self._stamps[kind] = stamp
        if stamp is None:
            if kind in self._models:
                log.warning(
                    "%s disappeared; still serving %s round %d",
                    path,
                    kind,
                    self._models[kind].round,
                )
            return
        try:
            model = LoadedModel.from_file(path)
            if model.kind != kind:
                raise PredictError(f"{path} holds a {model.kind!r} model, expected {kind!r}")
        except Exception as e:  # corrupt, truncated, tampered, unreadable: keep the old model
            reason = " ".join(str(e).split()) or type(e).__name__
            self.reload_errors[kind] = reason
            self._metrics.reload_failures.labels(kind).inc()
            old = self._models.get(kind)
            keep = f"; still serving round {old.round}" if old else ""
            log.warning("could not load %s model: %s%s", kind, reason, keep)
            return
        self.reload_errors.pop(kind, None)
        old = self._models.get(kind)
        if old is not None and old.version == model.version:
            return  # rewritten with identical weights and round
        self._models = {**self._models, kind: model}  # the swap: one reference assignment
        self._metrics.model_round.labels(kind).set(model.round)
        if old is not None:
            self._metrics.swaps.labels(kind).inc()
        log.info(
            "serving %s model round %d (hash %s) of user %r",
            kind,
            model.round,
            model.content_hash[:12],
            model.user,
        )


@dataclass
class _Watcher:
    """Polls the store every ``interval`` seconds on a daemon thread until stopped."""

    models: _Models
    interval: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="pollinate-model-watcher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.models.poll()
            except Exception:  # the watcher must outlive any surprise (e.g. a vanished disk)
                log.exception("model watcher: unexpected error; retrying")


# --------------------------------------------------------------------------------- app


def create_app(
    model_dir: str | os.PathLike[str],
    *,
    user: str | None = None,
    reload_interval: float = 0.5,
    max_body_bytes: int = 1_000_000,
    host: str | None = None,
    allowed_hosts: Iterable[str] = (),
) -> FastAPI:
    """The inference service as an ASGI app (see the module docstring for the endpoints).

    Parameters
    ----------
    model_dir
        Model store root; it may be empty or not exist yet (the service answers 503 until
        a model lands).
    user
        Whose models to serve; None serves the store's only user, adopted once it appears.
    reload_interval
        Seconds between polls of the store for newer model files (the watcher runs while the
        app's lifespan does, i.e. under uvicorn or ``with TestClient(app)``).
    max_body_bytes
        Larger request bodies are refused with 413 before they are parsed.
    host, allowed_hosts
        DNS rebinding protection: requests must name ``localhost``, ``127.0.0.1``, ``::1``,
        the bound ``host`` or one of ``allowed_hosts`` in their ``Host`` header (else 421).
        Test clients: ``TestClient(app, base_url="http://localhost")``.

    Raises
    ------
    ServingError
        ``user`` is None and the store already holds several users, or a bad argument.
    """
    if not reload_interval > 0:
        raise ServingError(f"reload_interval must be > 0 seconds, got {reload_interval}")
    if (
        isinstance(max_body_bytes, bool)
        or not isinstance(max_body_bytes, int)
        or max_body_bytes <= 0
    ):
        raise ServingError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
    root = Path(model_dir).expanduser()
    if user is not None and (not isinstance(user, str) or not user):
        raise ServingError(f"user must be a non-empty string, got {user!r}")
    metrics = _Metrics()
    models = _Models(root, user, metrics)
    models.poll()  # serve what is there from the first request on
    if models.problem:
        raise ServingError(models.problem)
    watcher = _Watcher(models, reload_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()

    app = FastAPI(
        title="Pollinate inference service",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.models = models  # for tests and embedding: app.state.models.poll() reloads now
    # The last added runs first: a foreign Host is refused before the body is looked at.
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(AllowedHosts, bound_host=host, extra=tuple(allowed_hosts))
    app.state.metrics_registry = metrics.registry

    def answer(body: bytes) -> tuple[int, dict[str, Any], str]:
        """(status, JSON payload, model label) for a /predict body; never raises for input."""
        kind = "-"
        try:
            kind, rows = _parse_predict(body)
            model = models.get(kind)
            if model is None:
                raise _Reply(503, models.missing_message(kind))
            x = _as_matrix(rows, model)  # (B, F)
            proba = model.predict_proba(x)  # (B, C)
        except _Reply as e:
            return e.status, {"error": e.message}, kind
        except PredictError as e:
            return 400, {"error": str(e)}, kind
        predictions = proba.argmax(axis=1)  # (B,)
        metrics.count_classes(kind, predictions, model.num_classes)
        return (
            200,
            {
                "model": kind,
                "user": model.user,
                "version": model.version,
                "predictions": predictions.tolist(),
                "probabilities": proba.tolist(),
            },
            kind,
        )

    @app.post(
        "/predict",
        openapi_extra=openinference.predict_openapi(),
        responses={200: {"model": PredictResponse}, 400: {"model": ErrorResponse}},
    )
    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        kind = "-"
        try:
            body = await _read_body(request)
            if len(body) <= _INLINE_BYTES:  # small: cheaper than a thread hop
                status, payload, kind = answer(body)
            else:
                status, payload, kind = await run_in_threadpool(answer, body)
        except _Reply as e:
            status, payload = e.status, {"error": e.message}
        except ClientDisconnect:  # the client left mid-body: nobody to answer, not an error
            metrics.disconnects.labels("/predict").inc()
            return Response(status_code=204)
        except StarletteHTTPException:  # e.g. BodyLimit's 413: answered by http_error
            raise
        except Exception as e:  # a bug, not bad input: say so, keep serving
            log.exception("/predict failed")
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            status, payload = 500, {"error": f"internal error: {reason}"}
        metrics.observe("/predict", kind, status, time.perf_counter() - t0)
        return _json(status, payload)

    @app.get("/models")
    async def list_models() -> Response:
        t0 = time.perf_counter()
        loaded = models.loaded()
        entries = []
        for kind in KINDS:
            model = loaded.get(kind)
            entry = model.info() if model else {"kind": kind, "user": models.user}
            entry["status"] = "serving" if model else "not stored yet"
            if kind in models.reload_errors:
                entry["reload_error"] = models.reload_errors[kind]
            entries.append(entry)
        payload = {
            "model_dir": str(models.store.root),
            "user": models.user,
            "models": entries,
            "users_in_store": models.store.users(),
        }
        if models.problem:
            payload["problem"] = models.problem
        metrics.observe("/models", "-", 200, time.perf_counter() - t0)
        return _json(200, payload)

    @app.get("/health")
    async def health() -> Response:
        t0 = time.perf_counter()
        loaded = models.loaded()
        payload: dict[str, Any] = {
            "status": "ok" if loaded else "waiting for a model",
            "ready": bool(loaded),
            "user": models.user,
            "models": {k: (loaded[k].version if k in loaded else None) for k in KINDS},
        }
        if models.problem:
            payload["problem"] = models.problem
        metrics.observe("/health", "-", 200, time.perf_counter() - t0)
        return _json(200, payload)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        t0 = time.perf_counter()
        text = generate_latest(metrics.registry)  # counts up to the previous request
        metrics.observe("/metrics", "-", 200, time.perf_counter() - t0)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        path = request.url.path
        if status == 404:
            message = f"no endpoint {request.method} {path}; use " + ", ".join(_ENDPOINTS)
        elif status == 405:
            message = f"method {request.method} is not allowed on {path}"
        else:
            message = " ".join(str(exc.detail).split())
        endpoint = path if path in _ENDPOINTS else "other"
        metrics.observe(endpoint, "-", status, 0.0)
        return _json(status, {"error": message}, headers=getattr(exc, "headers", None))

    def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"invalid request: {where}: {first.get('msg', 'invalid')}"
        return _json(422, {"error": " ".join(message.split())})

    def internal_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _json(500, {"error": f"internal error: {type(exc).__name__}"})

    def client_left(request: Request, exc: Exception) -> Response:
        # Any route's body read: counted, no traceback, no 500 (nobody is listening).
        path = request.url.path
        metrics.disconnects.labels(path if path in _ENDPOINTS else "other").inc()
        return Response(status_code=204)

    app.add_exception_handler(ClientDisconnect, client_left)
    # The Open Inference Protocol (KServe v2) beside /predict, and the bodies in /openapi.json.
    app.include_router(openinference.v2_router(models, metrics, max_body_bytes=max_body_bytes))
    openinference.document_bodies(app)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    return app


def _json(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    # allow_nan=False: NaN/Infinity are not JSON; /predict checks outputs before this.
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _read_body(request: Request) -> bytes:
    """The request body; the app's `BodyLimit` refuses it with 413 beyond ``limit`` bytes."""
    return b"".join([chunk async for chunk in request.stream()])


def _parse_predict(body: bytes) -> tuple[str, list[Any]]:
    """(model kind, rows) from a /predict body, or a 400 ``_Reply`` saying what is wrong."""
    try:
        request = json_body(body, f"empty request body; send JSON like {_EXAMPLE}")
    except FormatError as e:
        raise _Reply(400, str(e)) from None
    if not isinstance(request, dict):
        raise _Reply(
            400, f"the body must be a JSON object like {_EXAMPLE}, got a JSON {json_type(request)}"
        )
    try:  # rows, row, instances, inputs, dataframe_split, dataframe_records
        return rows_from_request(request)
    except FormatError as e:
        raise _Reply(400, str(e)) from None


def _as_matrix(rows: list[Any], model: LoadedModel) -> np.ndarray:
    """Rows of JSON numbers as a float32 (B, F) array; 400 for anything else."""
    n = model.num_features
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise _Reply(400, f"row {i} must be a list of {n} numbers, got a JSON {json_type(row)}")
        if len(row) != n:
            raise _Reply(
                400, f"row {i} has {len(row)} features; the {model.kind} model expects {n}"
            )
        # JSON true/false would pass numpy as 1/0; only int and float are numbers here.
        if not all(type(v) is float or type(v) is int for v in row):
            j, v = next((j, v) for j, v in enumerate(row) if type(v) not in (float, int))
            raise _Reply(400, f"row {i} feature {j} is {_json_value(v)}, not a number")
    try:
        # float64 first, so check() can name a value that float32 cannot hold.
        x = np.array(rows, dtype=np.float64)  # (B, F)
    except OverflowError:
        raise _Reply(400, "a feature is an integer beyond float32 range") from None
    return model.check(x)  # NaN / inf / out of float32 range -> PredictError -> 400


def _json_value(value: object) -> str:
    text = json.dumps(value)
    return f"a JSON {json_type(value)} ({text[:40]}{'...' if len(text) > 40 else ''})"


# ------------------------------------------------------------------------------ running


@dataclass
class ServingHandle:
    """A service running on a background thread; ``stop()`` shuts it down gracefully."""

    url: str
    host: str
    port: int
    app: FastAPI
    _server: uvicorn.Server
    _thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting requests, finish those in flight, stop the watcher; idempotent."""
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> ServingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    model_dir: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    user: str | None = None,
    threads: int = 1,
    log_level: str = "warning",
    reload_interval: float = 0.5,
    max_body_bytes: int = 1_000_000,
    announce: Callable[[str], None] | None = None,
    allowed_hosts: Iterable[str] = (),
    limits: HttpLimits | None = None,
) -> None:
    """Run the inference service in this process until SIGINT/SIGTERM (blocking).

    Parameters
    ----------
    model_dir, user, reload_interval, max_body_bytes
        As for :func:`create_app`.
    host, port
        Where to listen; loopback only by default. Port 0 picks a free port.
    threads
        ``torch.set_num_threads`` for this process: 1 suits a one-core device and small
        models (thread hand-offs cost more than they save).
    log_level
        uvicorn's log level; per-request access logs are off (``/metrics`` counts requests).
    announce
        Called with the URL once the socket is bound (e.g. ``print``).
    allowed_hosts
        More names the service answers to in the ``Host`` header (see :func:`create_app`).
    limits
        Header/body deadlines, connection cap and header size (:class:`HttpLimits`;
        defaults: 10 s, 30 s, 256, 64 KiB).

    Raises
    ------
    ServingError
        The address cannot be bound, or the user is ambiguous.
    """
    set_torch_threads(threads)
    app = create_app(
        model_dir,
        user=user,
        reload_interval=reload_interval,
        max_body_bytes=max_body_bytes,
        host=host,
        allowed_hosts=allowed_hosts,
    )
    sock = _bind(host, port)
    url = _url(host, sock.getsockname()[1])
    server = uvicorn.Server(_config(app, log_level, LOGGING_CONFIG, limits))
    if announce is not None:
        announce(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def start_in_thread(
    model_dir: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    user: str | None = None,
    threads: int | None = None,
    log_level: str = "warning",
    reload_interval: float = 0.5,
    max_body_bytes: int = 1_000_000,
    startup_timeout: float = 30.0,
    allowed_hosts: Iterable[str] = (),
    limits: HttpLimits | None = None,
) -> ServingHandle:
    """Start the inference service on a daemon thread; returns once it accepts requests.

    Same parameters as :func:`serve`, except ``threads`` defaults to None (leave torch's
    thread count to the host process, which may be training), and uvicorn's loggers
    propagate to the host process's logging configuration.

    Raises
    ------
    ServingError
        The address cannot be bound, the user is ambiguous, or startup timed out.
    """
    if threads is not None:
        set_torch_threads(threads)
    app = create_app(
        model_dir,
        user=user,
        reload_interval=reload_interval,
        max_body_bytes=max_body_bytes,
        host=host,
        allowed_hosts=allowed_hosts,
    )
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    server = uvicorn.Server(_config(app, log_level, None, limits))

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()

    thread = threading.Thread(target=run, name=f"pollinate-serving-{bound}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            raise ServingError(
                f"the inference service on {host}:{bound} did not start "
                f"within {startup_timeout:g} s (see the log above)"
            )
        time.sleep(0.01)
    return ServingHandle(
        url=_url(host, bound), host=host, port=bound, app=app, _server=server, _thread=thread
    )


def set_torch_threads(threads: int) -> None:
    """Limit torch's intra-op (and, if still possible, inter-op) threads for this process."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ServingError(f"threads must be an int >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    # Only settable before the first parallel work; harmless to skip after that.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)


def _config(
    app: FastAPI,
    log_level: str,
    log_config: dict[str, Any] | None,
    limits: HttpLimits | None = None,
) -> uvicorn.Config:
    limits = limits or HttpLimits()
    try:
        protocol = guarded_protocol(limits)
    except ValueError as e:
        raise ServingError(f"bad service limits: {e}") from None
    return uvicorn.Config(
        app,
        log_level=log_level,
        log_config=log_config,
        access_log=False,
        lifespan="on",
        ws="none",
        # Slow clients, connection cap and uvicorn's own errors as JSON (client/httpguard.py);
        # uvicorn's limit_concurrency would answer plain text, and only after the headers.
        http=protocol,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        server_header=False,
    )


def _bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket (uvicorn listens on it), or a one-line ServingError."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServingError(f"port must be an int in 0..65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServingError(f"cannot resolve host {host!r} ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform != "win32":  # quick restarts; on Windows it would allow port theft
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ServingError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); is another "
            "service using it? choose another port"
        ) from None
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
