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

The parts: the bodies are pydantic models (:mod:`.schemas`), requests are counted and timed
once by :class:`~.serving_metrics.MetricsMiddleware`, and the models are loaded, verified and
hot-swapped by :class:`~.model_slot.ModelSlots` (a watcher thread polls the store every
``reload_interval`` seconds; a request holds the model it started with, so none fails during
a swap). This module wires them into one app and runs it (:func:`serve`).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.config import LOGGING_CONFIG

from pollinate.client import openinference
from pollinate.client.httpguard import AllowedHosts, BodyLimit, HttpLimits, guarded_protocol
from pollinate.client.model_slot import ModelSlots, Watcher
from pollinate.client.predictor import LoadedModel, PredictError
from pollinate.client.request_formats import FormatError, json_body, json_type, rows_from_request
from pollinate.client.schemas import (
    ErrorResponse,
    HealthResponse,
    ModelEntry,
    ModelsResponse,
    PredictResponse,
    to_json,
)
from pollinate.client.serving_metrics import (
    ENDPOINTS,
    MetricsMiddleware,
    ServingMetrics,
    count_disconnect,
    label_model,
)
from pollinate.client.store import KINDS, StoreError
from pollinate.text import one_line

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

_EXAMPLE = '{"rows": [[0.1, 0.2, ...]], "model": "personal"}'


class ServingError(ValueError):
    """The service cannot start (address in use, ambiguous user); one line."""


class _Reply(Exception):
    """An error answer: HTTP status plus a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
    _check_app_args(user, reload_interval, max_body_bytes)
    metrics = ServingMetrics()
    try:
        models = ModelSlots(Path(model_dir).expanduser(), user, metrics)
    except StoreError as e:
        raise ServingError(str(e)) from None
    models.poll()  # serve what is there from the first request on
    if models.problem:
        raise ServingError(models.problem)
    watcher = Watcher(models, reload_interval)

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
    app.state.metrics = metrics
    app.state.metrics_registry = metrics.registry
    # The last added runs first: a foreign Host is refused before the body is looked at, and
    # what those two refuse is not counted (it never reached the service).
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(AllowedHosts, bound_host=host, extra=tuple(allowed_hosts))
    _add_routes(app, max_body_bytes)
    _add_error_handlers(app)
    return app


def _check_app_args(user: str | None, reload_interval: float, max_body_bytes: int) -> None:
    if not reload_interval > 0:
        raise ServingError(f"reload_interval must be > 0 seconds, got {reload_interval}")
    if (
        isinstance(max_body_bytes, bool)
        or not isinstance(max_body_bytes, int)
        or max_body_bytes <= 0
    ):
        raise ServingError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
    if user is not None and (not isinstance(user, str) or not user):
        raise ServingError(f"user must be a non-empty string, got {user!r}")


def _add_routes(app: FastAPI, max_body_bytes: int) -> None:
    app.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        openapi_extra=openinference.predict_openapi(),
        responses={200: {"model": PredictResponse}, 400: {"model": ErrorResponse}},
    )
    app.add_api_route("/models", list_models, methods=["GET"], response_model=ModelsResponse)
    app.add_api_route("/health", health, methods=["GET"], response_model=HealthResponse)
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"])
    # The Open Inference Protocol (KServe v2) beside /predict, and the bodies in /openapi.json.
    models, metrics = app.state.models, app.state.metrics
    app.include_router(openinference.v2_router(models, metrics, max_body_bytes=max_body_bytes))
    openinference.document_bodies(app)


def _add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClientDisconnect, client_left)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


# ---------------------------------------------------------------------------- handlers


async def predict(request: Request) -> Response:
    """``POST /predict``: scores the rows with the asked-for model (module docstring)."""
    models: ModelSlots = request.app.state.models
    metrics: ServingMetrics = request.app.state.metrics
    try:
        body = await _read_body(request)
        if len(body) <= _INLINE_BYTES:  # small: cheaper than a thread hop
            status, payload, kind = _answer(body, models, metrics)
        else:
            status, payload, kind = await run_in_threadpool(_answer, body, models, metrics)
    except ClientDisconnect:  # the client left mid-body: nobody to answer, not an error
        count_disconnect(metrics, request)
        return Response(status_code=204)
    except StarletteHTTPException:  # e.g. BodyLimit's 413: answered by http_error
        raise
    except Exception as e:  # a bug, not bad input: say so, keep serving
        log.exception("/predict failed")
        reason = one_line(f"{type(e).__name__}: {e}")
        status, payload, kind = 500, {"error": f"internal error: {reason}"}, "-"
    label_model(request, kind)
    return _json(status, payload)


def _answer(
    body: bytes, models: ModelSlots, metrics: ServingMetrics
) -> tuple[int, dict[str, Any], str]:
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
    # A plain dict, not PredictResponse(...): a pydantic pass over (B, C) floats would cost
    # more than scoring them; the schema documents this exact shape.
    payload = {
        "model": kind,
        "user": model.user,
        "version": model.version,
        "predictions": predictions.tolist(),
        "probabilities": proba.tolist(),
    }
    return 200, payload, kind


async def list_models(request: Request) -> Response:
    """``GET /models``: the served user's stored models (round, hash, metrics, architecture)."""
    models: ModelSlots = request.app.state.models
    loaded = models.loaded()
    entries = []
    for kind in KINDS:
        model = loaded.get(kind)
        entry = ModelEntry.model_validate(
            {
                **(model.info() if model else {"kind": kind, "user": models.user}),
                "status": "serving" if model else "not stored yet",
            }
        )
        if kind in models.reload_errors:
            entry.reload_error = models.reload_errors[kind]
        entries.append(entry)
    answer = ModelsResponse(
        model_dir=str(models.store.root),
        user=models.user,
        models=entries,
        users_in_store=models.store.users(),
    )
    if models.problem:
        answer.problem = models.problem
    return _json(200, to_json(answer))


async def health(request: Request) -> Response:
    """``GET /health``: always 200 while the process is up; ``ready`` once a model is loaded."""
    models: ModelSlots = request.app.state.models
    loaded = models.loaded()
    answer = HealthResponse.model_validate(
        {
            "status": "ok" if loaded else "waiting for a model",
            "ready": bool(loaded),
            "user": models.user,
            "models": {k: (loaded[k].version if k in loaded else None) for k in KINDS},
        }
    )
    if models.problem:
        answer.problem = models.problem
    return _json(200, to_json(answer))


async def prometheus_metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text, counts up to the previous request."""
    text = generate_latest(request.app.state.metrics.registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------- error answers


def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    path = request.url.path
    if status == 404:
        message = f"no endpoint {request.method} {path}; use " + ", ".join(ENDPOINTS)
    elif status == 405:
        message = f"method {request.method} is not allowed on {path}"
    else:
        message = one_line(str(exc.detail))
    return _json(status, {"error": message}, headers=getattr(exc, "headers", None))


def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = f"invalid request: {where}: {first.get('msg', 'invalid')}"
    return _json(422, {"error": one_line(message)})


def internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return _json(500, {"error": f"internal error: {type(exc).__name__}"})


def client_left(request: Request, exc: Exception) -> Response:
    # Any route's body read: counted, no traceback, no 500 (nobody is listening).
    count_disconnect(request.app.state.metrics, request)
    return Response(status_code=204)


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
    service = _Service.prepare(
        model_dir,
        host,
        port,
        user=user,
        reload_interval=reload_interval,
        max_body_bytes=max_body_bytes,
        allowed_hosts=allowed_hosts,
        limits=limits,
        log_level=log_level,
        log_config=LOGGING_CONFIG,
    )
    if announce is not None:
        announce(service.url)
    service.run()


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
    service = _Service.prepare(
        model_dir,
        host,
        port,
        user=user,
        reload_interval=reload_interval,
        max_body_bytes=max_body_bytes,
        allowed_hosts=allowed_hosts,
        limits=limits,
        log_level=log_level,
        log_config=None,  # the host process's logging configuration
    )
    return service.start_thread(startup_timeout)


@dataclass
class _Service:
    """The app, its uvicorn server and its bound socket: what :func:`serve` and
    :func:`start_in_thread` share, up to where one blocks and the other starts a thread."""

    app: FastAPI
    server: uvicorn.Server
    sock: socket.socket
    host: str

    @classmethod
    def prepare(
        cls,
        model_dir: str | os.PathLike[str],
        host: str,
        port: int,
        *,
        user: str | None,
        reload_interval: float,
        max_body_bytes: int,
        allowed_hosts: Iterable[str],
        limits: HttpLimits | None,
        log_level: str,
        log_config: dict[str, Any] | None,
    ) -> _Service:
        app = create_app(
            model_dir,
            user=user,
            reload_interval=reload_interval,
            max_body_bytes=max_body_bytes,
            host=host,
            allowed_hosts=allowed_hosts,
        )
        sock = _bind(host, port)
        server = uvicorn.Server(_config(app, log_level, log_config, limits))
        return cls(app=app, server=server, sock=sock, host=host)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (or ``server.should_exit``); closes the socket."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start_thread(self, startup_timeout: float) -> ServingHandle:
        """:meth:`run` on a daemon thread; returns once the server accepts requests."""
        port = self.port
        thread = threading.Thread(target=self.run, name=f"pollinate-serving-{port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self.server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                thread.join(5)
                raise ServingError(
                    f"the inference service on {self.host}:{port} did not start "
                    f"within {startup_timeout:g} s (see the log above)"
                )
            time.sleep(0.01)
        return ServingHandle(
            url=self.url,
            host=self.host,
            port=port,
            app=self.app,
            _server=self.server,
            _thread=thread,
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
