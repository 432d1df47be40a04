"""The Open Inference Protocol (KServe v2 REST; also Triton's and MLServer's) for the device.

:func:`v2_router` adds these endpoints to the inference service
(:func:`pollinate.client.serving.create_app`); the two models are ``global`` and
``personal``, each with one version, the one being served (``"<round>-<hash[:12]>"``):

======  =================================================  ================================
GET     ``/v2``                                            server metadata
GET     ``/v2/health/live``                                200 ``{"live": true}``
GET     ``/v2/health/ready``                               200 when every stored model is
                                                           loaded, else 400
GET     ``/v2/models/{name}[/versions/{v}]``               model metadata
GET     ``/v2/models/{name}[/versions/{v}]/ready``         200 / 400 ``{"name", "ready"}``
POST    ``/v2/models/{name}[/versions/{v}]/infer``         inference
======  =================================================  ================================

A request for the personal model's probabilities and labels, built from the spec::

    POST /v2/models/personal/infer
    {"id": "42",
     "inputs": [{"name": "features", "shape": [2, 64], "datatype": "FP32",
                 "data": [0.0, 1.0, ...]}],               # 128 values, flat or nested
     "outputs": [{"name": "probabilities"}, {"name": "label"}]}   # optional: default both
    -> {"model_name": "personal", "model_version": "7-3f2a9c1d0e4b", "id": "42",
        "parameters": {"round": 7, "hash": "3f2a...", "user": "alice"},
        "outputs": [{"name": "probabilities", "shape": [2, 10], "datatype": "FP32",
                     "data": [...20 values...]},
                    {"name": "label", "shape": [2], "datatype": "INT64", "data": [3, 7]}]}

The input may be FP32, FP64, FP16 or any INT/UINT type (converted to float32); BOOL and
BYTES are refused. Errors are ``{"error": "<one line>"}``: 400 for a bad request, 404 for an
unknown model or version, 413 for a body over the service's limit, 503 while the model is
not stored yet.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from importlib import metadata
from typing import Any, Protocol

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool

from pollinate.client.predictor import LoadedModel, PredictError
from pollinate.client.request_formats import INPUT_NAME, FormatError, json_body, json_type
from pollinate.client.schemas import ErrorResponse, PredictRequest, PredictResponse
from pollinate.client.store import KINDS

__all__ = [
    "InferenceRequest",
    "InferenceResponse",
    "MetadataModelResponse",
    "document_bodies",
    "v2_router",
    "version_string",
]

PLATFORM = "pytorch_statedict"  # the spec's "<project>_<format>"; its list has no state dicts
OUTPUTS = ("probabilities", "label")
_FLOATS = {"FP16": 65504.0, "FP32": float(np.finfo(np.float32).max), "FP64": math.inf}
_INTS = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}
_INLINE_BYTES = 64 * 1024  # larger bodies are parsed on a worker thread, off the event loop


class ModelSource(Protocol):
    """What the router needs of the service's model slots (:class:`.model_slot.ModelSlots`)."""

    user: str | None

    def get(self, kind: str) -> LoadedModel | None: ...
    def missing_message(self, kind: str) -> str: ...
    def stored_kinds(self) -> list[str]: ...


class Observer(Protocol):
    """The service's predicted-class counter (:class:`.serving_metrics.ServingMetrics`);
    requests are timed and counted by the app's metrics middleware, not here."""

    def count_classes(self, model: str, predictions: np.ndarray, num_classes: int) -> None: ...


# --------------------------------------------------------------------- the spec's objects

Parameters = dict[str, Any]


class MetadataServerResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class MetadataModelResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: Parameters | None = None


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    parameters: Parameters | None = None
    data: list[Any] = Field(description="row-major values, flat or nested to the shape")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class _Reply(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def version_string(model: LoadedModel) -> str:
    """The model's v2 version: ``"<round>-<first 12 hex of the weights' hash>"``."""
    return f"{model.round}-{model.content_hash[:12]}"


# ------------------------------------------------------------------------------ the router


def v2_router(models: ModelSource, metrics: Observer, *, max_body_bytes: int) -> APIRouter:
    """The v2 endpoints over the service's models (see the module docstring)."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 404, 413, 503)
    }

    def served(name: str, version: str | None) -> LoadedModel:
        if name not in KINDS:
            raise _Reply(404, f"unknown model {name!r}; this service has: {', '.join(KINDS)}")
        model = models.get(name)
        if model is None:
            raise _Reply(503, models.missing_message(name))
        if version is not None and version not in (version_string(model), str(model.round)):
            raise _Reply(
                404,
                f"version {version!r} of model {name!r} is not served; the served version is "
                f"{version_string(model)!r}",
            )
        return model

    def answered(handler: Callable[[], tuple[int, Any]]) -> Response:
        try:
            status, payload = handler()
        except _Reply as e:
            status, payload = e.status, {"error": e.message}
        return _json(status, payload)

    @router.get("", response_model=MetadataServerResponse, summary="Server metadata")
    async def server_metadata() -> Response:
        return answered(lambda: (200, _server_metadata()))

    @router.get("/health/live", response_model=LiveResponse, summary="Server live")
    async def live() -> Response:
        return answered(lambda: (200, {"live": True}))

    @router.get(
        "/health/ready", response_model=ReadyResponse, responses=errors, summary="Server ready"
    )
    async def ready() -> Response:
        def answer() -> tuple[int, Any]:
            stored = models.stored_kinds()
            waiting = [k for k in KINDS if k in stored and models.get(k) is None]
            if not stored or waiting:
                kind = waiting[0] if waiting else KINDS[-1]
                return 400, {"ready": False, "error": models.missing_message(kind)}
            return 200, {"ready": True}

        return answered(answer)

    def model_ready(name: str, version: str | None = None) -> Response:
        def answer() -> tuple[int, Any]:
            try:
                served(name, version)
            except _Reply as e:
                if e.status == 404:
                    raise
                return 400, {"name": name, "ready": False, "error": e.message}
            return 200, {"name": name, "ready": True}

        return answered(answer)

    def model_metadata(name: str, version: str | None = None) -> Response:
        return answered(lambda: (200, _model_metadata(served(name, version))))

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        try:
            body = await _read_body(request, max_body_bytes)
            if len(body) <= _INLINE_BYTES:
                status, payload = _answer(body, name, version, served, metrics)
            else:
                status, payload = await run_in_threadpool(
                    _answer, body, name, version, served, metrics
                )
        except _Reply as e:
            status, payload = e.status, {"error": e.message}
        return _json(status, payload)

    infer_doc: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}
            },
        }
    }
    for path, v in (("/models/{name}", False), ("/models/{name}/versions/{version}", True)):
        suffix = " (a version)" if v else ""
        router.add_api_route(
            path + "/ready",
            model_ready,
            methods=["GET"],
            response_model=ModelReadyResponse,
            responses=errors,
            summary="Model ready" + suffix,
        )
        router.add_api_route(
            path,
            model_metadata,
            methods=["GET"],
            response_model=MetadataModelResponse,
            responses=errors,
            summary="Model metadata" + suffix,
        )
        router.add_api_route(
            path + "/infer",
            infer,
            methods=["POST"],
            response_model=InferenceResponse,
            responses=errors,
            openapi_extra=infer_doc,
            summary="Inference" + suffix,
        )
    return router


def _server_metadata() -> dict[str, Any]:
    try:
        version = metadata.version("pollinate")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        version = "0"
    return {"name": "pollinate", "version": version, "extensions": []}


def _model_metadata(model: LoadedModel) -> dict[str, Any]:
    return {
        "name": model.kind,
        "versions": [version_string(model)],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, model.num_features]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, model.num_classes]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
        "parameters": _parameters(model),
    }


def _parameters(model: LoadedModel) -> dict[str, Any]:
    params: dict[str, Any] = {"round": model.round, "hash": model.content_hash}
    if model.user is not None:
        params["user"] = model.user
    return params


# ------------------------------------------------------------------------------ inference


def _answer(
    body: bytes,
    name: str,
    version: str | None,
    served: Callable[[str, str | None], LoadedModel],
    metrics: Observer,
) -> tuple[int, dict[str, Any]]:
    """(status, payload) for an infer body; ``_Reply`` for every bad request."""
    model = served(name, version)
    request = _parse(body)
    if len(request.inputs) != 1:
        raise _Reply(
            400,
            f"model {name!r} takes one input, {INPUT_NAME!r}; the request has "
            f"{len(request.inputs)}",
        )
    x = _features(request.inputs[0], model)  # (B, F) float32
    wanted = _wanted_outputs(request.outputs)
    proba = model.predict_proba(x)  # (B, C)
    if not np.isfinite(proba).all():
        raise _Reply(500, f"the {name} model produced non-finite probabilities; retrain it")
    labels = proba.argmax(axis=1)  # (B,)
    metrics.count_classes(model.kind, labels, model.num_classes)
    tensors = {
        "probabilities": {
            "name": "probabilities",
            "shape": list(proba.shape),
            "datatype": "FP32",
            "data": proba.ravel().tolist(),
        },
        "label": {
            "name": "label",
            "shape": [len(labels)],
            "datatype": "INT64",
            "data": labels.tolist(),
        },
    }
    payload: dict[str, Any] = {
        "model_name": model.kind,
        "model_version": version_string(model),
    }
    if request.id is not None:
        payload["id"] = request.id
    payload["parameters"] = _parameters(model)
    payload["outputs"] = [tensors[o] for o in wanted]
    return 200, payload


def _parse(body: bytes) -> InferenceRequest:
    try:
        obj = json_body(body, "empty request body; send an inference request object")
    except FormatError as e:
        raise _Reply(400, str(e)) from None
    if not isinstance(obj, dict):
        raise _Reply(
            400, f"the body must be an inference request object, got a JSON {json_type(obj)}"
        )
    try:
        return InferenceRequest.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        message = " ".join(f"invalid inference request: {where}: {first['msg']}".split())
        raise _Reply(400, message) from None
    except RecursionError:
        raise _Reply(400, "invalid inference request: nested too deeply") from None


def _wanted_outputs(outputs: list[RequestOutput] | None) -> list[str]:
    if outputs is None:
        return list(OUTPUTS)
    names: list[str] = []
    for o in outputs:
        if o.name not in OUTPUTS:
            raise _Reply(400, f"unknown output {o.name!r}; the outputs are: {', '.join(OUTPUTS)}")
        if o.name not in names:
            names.append(o.name)
    if not names:
        raise _Reply(400, "outputs is empty; leave it out for all outputs, or name some")
    return names


def _features(tensor: RequestInput, model: LoadedModel) -> np.ndarray:
    """The input tensor as float32 (B, F), or a 400 saying what does not fit."""
    where = f"input {tensor.name!r}"
    if tensor.name != INPUT_NAME:
        raise _Reply(400, f"unknown input {tensor.name!r}; the model's input is {INPUT_NAME!r}")
    dtype = tensor.datatype
    if dtype not in _FLOATS and dtype not in _INTS:
        known = ", ".join([*_FLOATS, *_INTS])
        what = "is not a number type" if dtype in ("BOOL", "BYTES") else "is not a datatype"
        raise _Reply(400, f"{where}: {dtype!r} {what}; send features as one of: {known}")
    shape = tensor.shape
    f = model.num_features
    if len(shape) != 2 or shape[0] < 1 or shape[1] != f:
        raise _Reply(
            400, f"{where}: shape {shape} does not fit the model's [-1, {f}] (rows, {f} features)"
        )
    flat = _flatten(tensor.data, shape, where)
    if dtype in _INTS:
        lo, hi = _INTS[dtype]
        bad = next((i for i, v in enumerate(flat) if type(v) is not int), None)
        if bad is not None:
            raise _Reply(400, f"{where}: element {bad} is {_value(flat[bad])}, not an {dtype}")
        if min(flat) < lo or max(flat) > hi:
            v = min(flat) if min(flat) < lo else max(flat)
            raise _Reply(400, f"{where}: {v} is outside the {dtype} range {lo}..{hi}")
    else:
        bad = next((i for i, v in enumerate(flat) if type(v) not in (int, float)), None)
        if bad is not None:
            raise _Reply(400, f"{where}: element {bad} is {_value(flat[bad])}, not a number")
    try:
        x = np.array(flat, dtype=np.float64).reshape(shape)  # (B, F)
    except OverflowError:
        raise _Reply(400, f"{where}: an integer is beyond float range") from None
    with np.errstate(invalid="ignore"):
        too_big = np.abs(x) > _FLOATS.get(dtype, math.inf)
    if too_big.any():
        i = int(np.argmax(too_big.ravel()))
        raise _Reply(400, f"{where}: element {i} ({float(x.ravel()[i])!r}) is beyond {dtype} range")
    try:
        return model.check(x)  # NaN, inf, beyond float32
    except PredictError as e:
        raise _Reply(400, f"{where}: {e}") from None


def _flatten(data: list[Any], shape: list[int], where: str) -> list[Any]:
    """Row-major elements of flat or nested ``data`` that must hold exactly ``shape``."""
    size = math.prod(shape)
    if not any(isinstance(v, list) for v in data):
        if len(data) != size:
            raise _Reply(400, f"{where}: {len(data)} values given; shape {shape} needs {size}")
        return data
    nodes: list[Any] = [data]
    for depth, dim in enumerate(shape):
        below: list[Any] = []
        for node in nodes:
            if not isinstance(node, list) or len(node) != dim:
                got = f"{len(node)} items" if isinstance(node, list) else _value(node)
                raise _Reply(
                    400,
                    f"{where}: nested data does not match shape {shape} (level {depth} has "
                    f"{got} where {dim} belong); or send the {size} values flat",
                )
            below.extend(node)
        nodes = below
    return nodes


def _value(v: object) -> str:
    text = json.dumps(v)
    return f"a JSON {json_type(v)} ({text[:40]}{'...' if len(text) > 40 else ''})"


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Reply(413, f"request body is {int(declared)} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Reply(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(status: int, payload: Any) -> Response:
    try:  # finite numbers only: NaN / Infinity are not JSON
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except ValueError:
        status, body = (
            500,
            json.dumps({"error": "internal error: a non-finite number in the reply"}),
        )
    return Response(body, status_code=status, media_type="application/json")


# ------------------------------------------------------------------------------- OpenAPI


def document_bodies(app: FastAPI) -> None:
    """Put the request bodies the routes parse themselves into ``/openapi.json``.

    The /predict and infer routes read raw JSON (one-line 400s, no pydantic pass over
    large arrays), so FastAPI cannot see their bodies; their ``openapi_extra`` refers to
    ``#/components/schemas/<Model>``, and this adds those schemas there.
    """
    original = app.openapi
    bodies: list[type[BaseModel]] = [InferenceRequest, PredictRequest, PredictResponse]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for body in bodies:
            spec = body.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in spec.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components.setdefault(body.__name__, spec)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def predict_openapi() -> dict[str, Any]:
    """``openapi_extra`` for ``POST /predict``: its body and answer."""
    ref = {"$ref": "#/components/schemas/PredictRequest"}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
    }
