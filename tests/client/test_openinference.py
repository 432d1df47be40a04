"""The Open Inference Protocol (KServe v2), the TF-Serving/MLflow bodies of /predict, and a
schemathesis fuzz of every endpoint in /openapi.json."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pollinate.client import load_model
from pollinate.client.openinference import version_string
from pollinate.client.serving import create_app
from pollinate.client.store import ModelStore
from pollinate.models import create_model

with warnings.catch_warnings():  # starlette suggests httpx2; httpx is what is installed
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

F, C = 8, 3
LOCAL = "http://127.0.0.1"  # a Host the service answers to (DNS rebinding protection)


def save(root: Path, kind: str, round: int, seed: int, user: str = "alice") -> None:
    model = create_model("mlp", in_features=F, num_classes=C, hidden=16, seed=seed)
    ModelStore(root).save(user, kind, spec=model.spec, state_dict=model.state_dict(), round=round)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    save(root, "personal", round=2, seed=1)
    save(root, "global", round=3, seed=2)
    return root


@pytest.fixture
def client(store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(store), base_url=LOCAL) as c:
        yield c


def x_rows(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, F)).round(4)


def assert_error(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"], body
    for needle in needles:
        assert needle in body["error"], body


# ------------------------------------------------------------------------ KServe v2 requests


def test_infer_request_built_from_the_spec(client: TestClient, store: Path) -> None:
    x = x_rows(3)
    # Exactly the $inference_request of the spec: id, parameters, inputs, outputs.
    body = (
        '{"id": "42", "parameters": {"trace": true}, "inputs": [{"name": "features", '
        f'"shape": [3, {F}], "datatype": "FP32", "parameters": {{}}, '
        f'"data": {json.dumps(x.ravel().tolist())}}}], '
        '"outputs": [{"name": "probabilities"}, {"name": "label", "parameters": {}}]}'
    )
    r = client.post(
        "/v2/models/personal/infer", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    got = r.json()
    model = load_model(store, "personal")
    expected = model.predict_proba(x)
    assert list(got) == ["model_name", "model_version", "id", "parameters", "outputs"]
    assert got["model_name"] == "personal" and got["id"] == "42"
    assert got["model_version"] == version_string(model) == f"2-{model.content_hash[:12]}"
    assert got["parameters"] == {"round": 2, "hash": model.content_hash, "user": "alice"}
    proba, label = got["outputs"]
    assert proba == {
        "name": "probabilities",
        "shape": [3, C],
        "datatype": "FP32",
        "data": proba["data"],
    }
    np.testing.assert_allclose(np.reshape(proba["data"], (3, C)), expected, rtol=1e-6)
    assert label == {
        "name": "label",
        "shape": [3],
        "datatype": "INT64",
        "data": expected.argmax(axis=1).tolist(),
    }


@pytest.mark.parametrize("datatype", ["FP64", "FP16", "INT32", "UINT8"])
def test_infer_nested_data_other_datatypes_versions_and_output_choice(
    client: TestClient, store: Path, datatype: str
) -> None:
    x = np.arange(2 * F).reshape(2, F) % 5  # small integers: exact in every datatype
    body: dict[str, Any] = {
        "inputs": [{"name": "features", "shape": [2, F], "datatype": datatype, "data": x.tolist()}],
        "outputs": [{"name": "label"}],
    }
    model = load_model(store, "global")
    for path in (
        "/v2/models/global/infer",
        f"/v2/models/global/versions/{version_string(model)}/infer",
        "/v2/models/global/versions/3/infer",  # the round alone names the version too
    ):
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert "id" not in got  # none given, none returned
        assert [o["name"] for o in got["outputs"]] == ["label"]
        assert got["outputs"][0]["data"] == model.predict(x).tolist()


def test_model_metadata_and_ready(client: TestClient, store: Path) -> None:
    for kind, round in (("personal", 2), ("global", 3)):
        model = load_model(store, kind)
        meta = client.get(f"/v2/models/{kind}")
        assert meta.status_code == 200
        assert meta.json() == {
            "name": kind,
            "versions": [f"{round}-{model.content_hash[:12]}"],
            "platform": "pytorch_statedict",
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, F]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, C]},
                {"name": "label", "datatype": "INT64", "shape": [-1]},
            ],
            "parameters": {"round": round, "hash": model.content_hash, "user": "alice"},
        }
        versioned = client.get(f"/v2/models/{kind}/versions/{version_string(model)}")
        assert versioned.json() == meta.json()
        ready = client.get(f"/v2/models/{kind}/ready")
        assert ready.status_code == 200 and ready.json() == {"name": kind, "ready": True}
    server = client.get("/v2").json()
    assert server["name"] == "pollinate" and server["extensions"] == []
    assert isinstance(server["version"], str) and server["version"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert_error(client.get("/v2/models/best"), 404, "unknown model 'best'")
    assert_error(client.get("/v2/models/best/ready"), 404, "unknown model 'best'")
    assert_error(client.get("/v2/models/global/versions/9"), 404, "not served", "3-")


def test_not_ready_until_the_models_land(tmp_path: Path) -> None:
    root = tmp_path / "models"
    with TestClient(create_app(root, reload_interval=0.05), base_url=LOCAL) as c:
        assert c.get("/v2/health/live").status_code == 200
        r = c.get("/v2/health/ready")
        assert r.status_code == 400 and r.json()["ready"] is False
        r = c.get("/v2/models/personal/ready")
        assert r.status_code == 400 and r.json()["ready"] is False
        assert_error(c.get("/v2/models/personal"), 503, "no personal model stored yet")
        save(root, "personal", round=1, seed=0)
        c.app.state.models.poll()  # type: ignore[attr-defined]
        assert c.get("/v2/models/personal/ready").json() == {"name": "personal", "ready": True}
        # Ready means every stored model is loaded: here the one personal model.
        assert c.get("/v2/health/ready").status_code == 200


def tensor(**override: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"name": "features", "shape": [1, F], "datatype": "FP32", "data": [0.5] * F}
    t.update(override)
    return {"inputs": [t]}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("", "empty request body"),
        ("{", "malformed JSON"),
        ("[]", "got a JSON array"),
        ("{}", "inputs: Field required"),
        ('{"inputs": [], "extra": 1}', "extra: Extra inputs are not permitted"),
        (tensor(name="x"), "unknown input 'x'"),
        (tensor(datatype="BOOL", data=[True] * F), "'BOOL' is not a number type"),
        (tensor(datatype="BYTES", data=["a"] * F), "'BYTES' is not a number type"),
        (tensor(datatype="FP128"), "'FP128' is not a datatype"),
        (tensor(shape=[F]), f"shape [{F}] does not fit the model's [-1, {F}]"),
        (tensor(shape=[1, F + 1], data=[0.5] * (F + 1)), "does not fit"),
        (tensor(shape=[0, F], data=[]), "does not fit"),
        (tensor(shape=["1", F]), "shape.0: Input should be a valid integer"),
        (tensor(data=[0.5] * (F - 1)), f"{F - 1} values given; shape [1, {F}] needs {F}"),
        (tensor(shape=[2, F], data=[[0.5] * F, [0.5] * 3]), "nested data does not match shape"),
        (tensor(data=["a"] * F), "element 0 is a JSON string"),
        (tensor(data=[None] * F), "element 0 is a JSON null"),
        (tensor(datatype="INT8", data=[300] * F), "outside the INT8 range"),
        (tensor(datatype="INT32", data=[0.5] * F), "not an INT32"),
        (tensor(datatype="FP16", data=[1e6] * F), "beyond FP16 range"),
        (tensor(data=[1e300] * F), "element 0 (1e+300) is beyond FP32 range"),
        (tensor(datatype="FP64", data=[1e300] * F), "beyond float32 range"),
        ({**tensor(), "outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
        ({"inputs": tensor()["inputs"] * 2}, "takes one input"),
        ({**tensor(), "id": 42}, "id: Input should be a valid string"),
    ],
)
def test_bad_tensors_are_one_line_400s(client: TestClient, body: Any, needle: str) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = client.post(
        "/v2/models/personal/infer", content=content, headers={"content-type": "application/json"}
    )
    assert_error(r, 400, needle)


def test_unknown_model_and_version_on_infer(client: TestClient) -> None:
    assert_error(client.post("/v2/models/best/infer", json=tensor()), 404, "unknown model")
    assert_error(
        client.post("/v2/models/personal/versions/0-abc/infer", json=tensor()), 404, "not served"
    )


def test_large_infer_bodies_are_refused_with_413(store: Path) -> None:
    with TestClient(create_app(store, max_body_bytes=1000), base_url=LOCAL) as c:
        big = tensor(shape=[100, F], data=[0.5] * (100 * F))
        assert_error(c.post("/v2/models/personal/infer", json=big), 413, "limit")


# ------------------------------------------------------------------ /predict's other bodies


@pytest.mark.parametrize(
    "make",
    [
        lambda x: {"instances": x.tolist()},  # TF-Serving rows / MLflow instances
        lambda x: {"instances": [{"features": r} for r in x.tolist()]},
        lambda x: {"inputs": x.tolist()},  # TF-Serving columnar / MLflow tensor inputs
        lambda x: {"inputs": {"features": x.tolist()}, "signature_name": "serving_default"},
        lambda x: {  # MLflow scoring server
            "dataframe_split": {"columns": [f"f{j}" for j in range(F)], "data": x.tolist()},
            "params": {},
        },
        lambda x: {"dataframe_records": [{f"f{j}": v for j, v in enumerate(r)} for r in x]},
    ],
)
def test_predict_accepts_tf_serving_and_mlflow_bodies(
    client: TestClient, store: Path, make: Any
) -> None:
    x = x_rows(4)
    r = client.post("/predict", json={"model": "global", **make(x)})
    assert r.status_code == 200, r.text
    expected = load_model(store, "global").predict_proba(x)
    got = r.json()
    assert got["predictions"] == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose(got["probabilities"], expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"rows": [[0.0] * F], "instances": [[0.0] * F]}, "give one of rows or instances"),
        ({"instances": [{"x": [0.0] * F}]}, "the model has one input, 'features'"),
        ({"inputs": {"a": [], "b": []}}, "inputs is an object with keys"),
        ({"dataframe_split": {"columns": ["a"], "data": [[0.0] * F]}}, "8 values for 1 columns"),
        ({"dataframe_split": [1]}, "must be an object with columns and data"),
        ({"dataframe_records": [{"a": 1.0}, {"b": 1.0}]}, "item 1 has columns"),
        ({"dataframe_records": [{"a": 1.0}]}, "row 0 has 1 features"),
        ({"instances": [], "params": {"k": 1}}, "unknown param 'k'"),
        ({"instances": [[0.0] * F], "signature_name": "x"}, "unknown signature_name"),
        ({"inputs": [{"name": "features", "datatype": "FP32"}], "id": "1"}, "/v2/models/"),
        ({"instances": []}, "instances is empty"),
    ],
)
def test_predict_format_errors(client: TestClient, body: dict[str, Any], needle: str) -> None:
    assert_error(client.post("/predict", json=body), 400, needle)


# -------------------------------------------------------------------------------- OpenAPI


def test_openapi_describes_every_endpoint_and_body(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/predict",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    ):
        assert path in paths, path
    ref = paths["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]
    assert ref["schema"] == {"$ref": "#/components/schemas/InferenceRequest"}
    components = schema["components"]["schemas"]
    assert set(components["InferenceRequest"]["properties"]) == {
        "id",
        "parameters",
        "inputs",
        "outputs",
    }
    assert set(components["RequestInput"]["required"]) == {"name", "shape", "datatype", "data"}
    predict_body = paths["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert predict_body["schema"] == {"$ref": "#/components/schemas/PredictRequest"}
    assert {"rows", "instances", "inputs", "dataframe_split", "dataframe_records"} <= set(
        components["PredictRequest"]["properties"]
    )


@pytest.mark.slow  # ~20 s on a loaded 2-core machine
def test_fuzz_every_endpoint_from_the_schema(store: Path) -> None:
    """schemathesis generates requests from /openapi.json (valid and not); none may get a 5xx
    or a body that is not JSON."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error

    # schemathesis' ASGI client says Host: testserver; the Host check itself is not fuzzed.
    app = create_app(store, allowed_hosts=["testserver"])
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [op.ok() for op in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 13
    seen = 0
    answered: dict[int, int] = {}  # status -> count
    with TestClient(app):  # the lifespan: the model watcher runs as under uvicorn
        for operation in operations:

            @hypothesis.settings(
                max_examples=25,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.given(case=operation.as_strategy())
            def fuzz(case: Any) -> None:
                nonlocal seen
                response = case.call()
                seen += 1
                answered[response.status_code] = answered.get(response.status_code, 0) + 1
                case.validate_response(response, checks=[not_a_server_error])
                content_type = response.headers.get("content-type", [""])[0]
                if content_type.startswith("application/json"):
                    json.loads(response.content)  # valid JSON, no NaN

            fuzz()
    assert seen >= 13 * 5
    # Not refused at the door (the Host check answers 421): the routes themselves answered.
    assert 421 not in answered and answered.get(200, 0) >= 5 and answered.get(400, 0) >= 5, answered
