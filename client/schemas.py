"""The inference service's request and response bodies, as pydantic models.

FastAPI publishes them in ``/openapi.json`` and the handlers build their answers from them
(``GET /health``, ``GET /models``). ``POST /predict``'s bodies are parsed by
:mod:`pollinate.client.request_formats` (one-line errors for six overlapping forms); the
Open Inference Protocol's are in :mod:`pollinate.client.openinference`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ErrorResponse",
    "HealthResponse",
    "ModelEntry",
    "ModelsResponse",
    "PredictRequest",
    "PredictResponse",
    "Version",
    "to_json",
]


Row = list[float]
Kind = Literal["personal", "global"]


class DataframeSplit(BaseModel):
    """pandas ``orient="split"``: column names and rows of values."""

    model_config = ConfigDict(extra="forbid")
    columns: list[str] | None = None
    data: list[Row]
    index: list[Any] | None = None


class PredictRequest(BaseModel):
    """A ``POST /predict`` body: ``model`` plus exactly one of the row fields."""

    model_config = ConfigDict(extra="forbid")
    model: Kind = "personal"
    rows: list[Row] | None = Field(default=None, description="Pollinate: rows of F features")
    row: Row | None = Field(default=None, description="Pollinate: one row")
    instances: list[Row | dict[str, Row]] | None = Field(
        default=None,
        description='TF-Serving row format / MLflow: rows, or {"features": row} objects',
    )
    inputs: list[Row] | dict[str, list[Row]] | None = Field(
        default=None, description='TF-Serving columnar format / MLflow: rows, or {"features": rows}'
    )
    dataframe_split: DataframeSplit | None = Field(default=None, description="MLflow: pandas split")
    dataframe_records: list[dict[str, float]] | None = Field(
        default=None, description="MLflow: pandas records"
    )
    params: dict[str, Any] | None = Field(
        default=None, description="MLflow params (none are defined)"
    )
    signature_name: Literal["serving_default"] | None = None


class Version(BaseModel):
    round: int
    hash: str


class PredictResponse(BaseModel):
    """A ``POST /predict`` answer (``predictions`` as TF-Serving and MLflow name it)."""

    model: Kind
    user: str | None
    version: Version
    predictions: list[int] = Field(description="predicted class per row")
    probabilities: list[list[float]] = Field(description="(rows, classes) probabilities")


class ErrorResponse(BaseModel):
    """Every error: one line."""

    error: str


class ModelEntry(BaseModel):
    """One kind's slot in ``GET /models``: the stored model's description, or why none."""

    model_config = ConfigDict(extra="allow")  # LoadedModel.info(): round, hash, metrics, ...
    kind: Kind
    user: str | None
    status: Literal["serving", "not stored yet"]
    reload_error: str | None = Field(default=None, description="why the newest file was rejected")


class ModelsResponse(BaseModel):
    """``GET /models``: the served user's models and who else is in the store."""

    model_dir: str
    user: str | None
    models: list[ModelEntry]
    users_in_store: list[str]
    problem: str | None = Field(default=None, description="why nothing can be served")


class HealthResponse(BaseModel):
    """``GET /health``: 200 while the process is up; ``ready`` once a model is loaded."""

    status: Literal["ok", "waiting for a model"]
    ready: bool
    user: str | None
    models: dict[str, Version | None]
    problem: str | None = Field(default=None, description="why nothing can be served")


def to_json(body: BaseModel) -> dict[str, Any]:
    """A response model as the JSON object the service sends (unset optional fields left out)."""
    return body.model_dump(mode="json", exclude_unset=True)
