"""The request bodies ``POST /predict`` understands: Pollinate's own, TF-Serving's and MLflow's.

Every form names the model with ``"model": "personal" | "global"`` (default personal) and
gives the rows of features in exactly one field:

- ``"rows": [[f1, ..., fF], ...]`` or ``"row": [f1, ..., fF]`` (Pollinate's);
- ``"instances": [[...], ...]`` (TF-Serving's row format; MLflow's too); an instance may
  also be ``{"features": [...]}``, the model's one named input;
- ``"inputs": [[...], ...]`` or ``{"features": [[...], ...]}`` (TF-Serving's columnar
  format, MLflow's tensor input);
- ``"dataframe_split": {"columns": [...], "data": [[...], ...]}`` and
  ``"dataframe_records": [{"c1": v, ...}, ...]`` (MLflow's scoring server; the columns are
  the features in order). MLflow's ``params`` and TF-Serving's ``signature_name``
  (``serving_default``) are accepted when they ask for nothing this model lacks.

:func:`rows_from_request` turns any of them into (model kind, rows). The pydantic models in
:mod:`pollinate.client.schemas` describe the same bodies for ``/openapi.json``; parsing
stays here, in plain Python, because the forms overlap (one field of six, ``instances``
rows or objects, ...) and every bad body must get a one-line message naming the field and
the fix, which pydantic's union errors cannot give.
"""

from __future__ import annotations

import json
from typing import Any

from pollinate.client.store import KINDS

__all__ = ["FORMAT_FIELDS", "FormatError", "json_body", "json_type", "rows_from_request"]

#: The fields that carry rows, one per request.
FORMAT_FIELDS = ("rows", "row", "instances", "inputs", "dataframe_split", "dataframe_records")
_OTHER_FIELDS = ("model", "params", "signature_name")
INPUT_NAME = "features"
_EXAMPLE = '{"rows": [[0.1, 0.2, ...]], "model": "personal"}'


class FormatError(ValueError):
    """A /predict body that fits none of the forms; the message is one line."""


def json_body(body: bytes, empty: str) -> Any:
    """The parsed JSON of a request body, or a one-line :class:`FormatError` (``empty`` if
    there is no body) saying what is wrong with it."""
    if not body.strip():
        raise FormatError(empty)
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise FormatError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:
        raise FormatError("malformed JSON: the body is not UTF-8 text") from None
    except RecursionError:
        raise FormatError("malformed JSON: nested too deeply") from None
    except ValueError:  # e.g. an integer longer than Python's 4300-digit conversion limit
        raise FormatError("malformed JSON: a number has too many digits") from None


def rows_from_request(request: dict[str, Any]) -> tuple[str, list[Any]]:
    """(model kind, rows) from a parsed /predict body, or a :class:`FormatError`."""
    unknown = [k for k in request if k not in FORMAT_FIELDS and k not in _OTHER_FIELDS]
    if unknown:
        if unknown[0] in ("id", "parameters", "outputs") and _looks_v2(request):
            raise FormatError(
                "this is an Open Inference Protocol (KServe v2) request: POST it to "
                "/v2/models/personal/infer (or /v2/models/global/infer)"
            )
        raise FormatError(
            f"unknown field {unknown[0]!r}; expected model and one of: {', '.join(FORMAT_FIELDS)}"
        )
    kind = request.get("model", "personal")
    if kind not in KINDS:
        raise FormatError(f"unknown model {kind!r}; choose one of: {', '.join(KINDS)}")
    _check_extras(request)
    given = [f for f in FORMAT_FIELDS if f in request]
    if not given:
        raise FormatError(f"missing field 'rows'; send JSON like {_EXAMPLE}")
    if len(given) > 1:
        raise FormatError(f"give one of {' or '.join(given)}, not both")
    field = given[0]
    value = request[field]
    if field == "row":
        rows: Any = [value]
    elif field == "rows":
        rows = value
    elif field == "instances":
        rows = _instances(value)
    elif field == "inputs":
        rows = _inputs(value)
    elif field == "dataframe_split":
        rows = _dataframe_split(value)
    else:
        rows = _dataframe_records(value)
    if not isinstance(rows, list):
        raise FormatError(f"{field} must be a list of rows, got a JSON {json_type(rows)}")
    if not rows:
        raise FormatError(f"{field} is empty; send at least one row of features")
    return kind, rows


def _looks_v2(request: dict[str, Any]) -> bool:
    inputs = request.get("inputs")
    return isinstance(inputs, list) and any(isinstance(i, dict) and "datatype" in i for i in inputs)


def _check_extras(request: dict[str, Any]) -> None:
    params = request.get("params")
    if params is not None and params != {}:
        if not isinstance(params, dict):
            raise FormatError(f"params must be a JSON object, got a JSON {json_type(params)}")
        raise FormatError(f"unknown param {next(iter(params))!r}; this model takes no params")
    signature = request.get("signature_name", "serving_default")
    if signature != "serving_default":
        raise FormatError(
            f"unknown signature_name {signature!r}; the one signature is serving_default"
        )


def _instances(value: Any) -> Any:
    """TF-Serving rows: a list of rows, or of ``{"features": row}`` objects."""
    if not isinstance(value, list):
        return value
    rows = []
    for i, instance in enumerate(value):
        if isinstance(instance, dict):
            if list(instance) != [INPUT_NAME]:
                raise FormatError(
                    f"instance {i} is an object with keys {sorted(instance)!r}; the model has "
                    f"one input, {INPUT_NAME!r}: send [{{{INPUT_NAME!r}: [...]}}] or plain rows"
                )
            instance = instance[INPUT_NAME]
        rows.append(instance)
    return rows


def _inputs(value: Any) -> Any:
    """TF-Serving columnar / MLflow tensor input: the batch, or ``{"features": batch}``."""
    if isinstance(value, dict):
        if list(value) != [INPUT_NAME]:
            raise FormatError(
                f"inputs is an object with keys {sorted(value)!r}; the model has one input, "
                f"{INPUT_NAME!r}: send {{{INPUT_NAME!r}: [[...], ...]}} or a list of rows"
            )
        return value[INPUT_NAME]
    return value


def _dataframe_split(value: Any) -> list[Any]:
    """MLflow's pandas split orient: ``{"columns": [...], "data": [[...]], "index": [...]}``."""
    if not isinstance(value, dict):
        raise FormatError(
            "dataframe_split must be an object with columns and data, got a JSON "
            f"{json_type(value)}"
        )
    extra = [k for k in value if k not in ("columns", "data", "index")]
    if extra:
        raise FormatError(f"dataframe_split has unknown key {extra[0]!r}; expected columns, data")
    data = value.get("data")
    if not isinstance(data, list):
        raise FormatError(f"dataframe_split.data must be a list of rows, got {json_type(data)}")
    columns = value.get("columns")
    if columns is not None:
        if not isinstance(columns, list):
            raise FormatError(f"dataframe_split.columns must be a list, got {json_type(columns)}")
        for i, row in enumerate(data):
            if isinstance(row, list) and len(row) != len(columns):
                raise FormatError(
                    f"dataframe_split row {i} has {len(row)} values for {len(columns)} columns"
                )
    return data


def _dataframe_records(value: Any) -> list[Any]:
    """MLflow's pandas records orient: one object per row, the same keys in each."""
    if not isinstance(value, list):
        raise FormatError(f"dataframe_records must be a list of objects, got {json_type(value)}")
    rows: list[Any] = []
    columns: list[str] | None = None
    for i, record in enumerate(value):
        if not isinstance(record, dict):
            raise FormatError(
                f"dataframe_records item {i} must be an object, got {json_type(record)}"
            )
        if columns is None:
            columns = list(record)
        elif set(record) != set(columns):
            raise FormatError(
                f"dataframe_records item {i} has columns {sorted(record)!r}; item 0 has "
                f"{sorted(columns)!r}"
            )
        rows.append([record[c] for c in columns])
    return rows


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    return {
        bool: "boolean",
        str: "string",
        dict: "object",
        list: "array",
        int: "number",
        float: "number",
    }.get(type(value), type(value).__name__)
