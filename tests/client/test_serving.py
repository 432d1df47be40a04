"""The local inference service: endpoints, bad input, hot swap, and a real server process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from pollinate.client import load_model
from pollinate.client.serving import ServingError, create_app, start_in_thread
from pollinate.client.store import ModelStore
from pollinate.models import ModelArtifact, create_model, save_artifact

with warnings.catch_warnings():  # starlette suggests httpx2; httpx is what is installed
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

F, C = 8, 3
FAST = 0.05  # reload interval in tests, seconds
LOCAL = "http://localhost"  # the service answers only to its own host names


def save(
    root: Path, user: str = "alice", kind: str = "personal", round: int = 1, seed: int = 0
) -> ModelArtifact:
    model = create_model("mlp", in_features=F, num_classes=C, hidden=16, seed=seed)
    return ModelStore(root).save(
        user,
        kind,
        spec=model.spec,
        state_dict=model.state_dict(),
        round=round,
        metrics={"accuracy": 0.5 + round / 100},
    )


def rows(n: int = 2, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, F)).round(4).tolist()


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def assert_error(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"], body
    for needle in needles:
        assert needle in body["error"], body


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    save(root, kind="personal", round=2, seed=1)
    save(root, kind="global", round=3, seed=2)
    return root


@pytest.fixture
def client(store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(store, reload_interval=FAST), base_url=LOCAL) as c:
        yield c


# ---------------------------------------------------------------------------------- endpoints


def test_predict_matches_load_model(client: TestClient, store: Path) -> None:
    x = rows(5)
    for kind, body in [
        ("personal", {"rows": x}),
        ("personal", {"rows": x, "model": "personal"}),
        ("global", {"rows": x, "model": "global"}),
    ]:
        r = client.post("/predict", json=body)
        assert r.status_code == 200, r.text
        model = load_model(store, kind)
        got = r.json()
        assert got["model"] == kind and got["user"] == "alice"
        assert got["version"] == model.version
        np.testing.assert_allclose(got["probabilities"], model.predict_proba(x), rtol=1e-6)
        assert got["predictions"] == model.predict(x).tolist()

    one = client.post("/predict", json={"row": x[0], "model": "global"}).json()
    assert one["predictions"] == load_model(store, "global").predict([x[0]]).tolist()
    assert len(one["probabilities"]) == 1


def test_models_health_and_metrics(client: TestClient, store: Path) -> None:
    models = client.get("/models").json()
    assert models["user"] == "alice" and models["model_dir"] == str(store)
    by_kind = {m["kind"]: m for m in models["models"]}
    personal = load_model(store, "personal")
    assert by_kind["personal"]["round"] == 2 and by_kind["global"]["round"] == 3
    assert by_kind["personal"]["hash"] == personal.content_hash
    assert by_kind["personal"]["metrics"] == {"accuracy": 0.52}
    assert by_kind["personal"]["status"] == "serving"

    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["ready"] is True
    assert health.json()["models"]["personal"] == personal.version

    predictions = []
    for i in range(3):
        answer = client.post("/predict", json={"rows": rows(4, seed=i)}).json()
        predictions += answer["predictions"]
    client.post("/predict", content=b"{")
    client.get("/nowhere")

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = metric_values(r.text)
    assert m["pollinate_serving_requests_total", "/predict", "personal", "200"] == 3
    assert m["pollinate_serving_requests_total", "/predict", "-", "400"] == 1
    assert m["pollinate_serving_errors_total", "/predict", "bad_request"] == 1
    assert m["pollinate_serving_errors_total", "other", "not_found"] == 1
    assert m["pollinate_serving_request_duration_seconds_count", "/predict", "personal"] == 3
    for c in set(predictions):
        assert m["pollinate_serving_predictions_total", str(c), "personal"] == predictions.count(c)
    assert m["pollinate_serving_model_round", "global"] == 3
    assert m["pollinate_serving_model_round", "personal"] == 2


def metric_values(text: str) -> dict[tuple[str, ...], float]:
    """Prometheus text as {(sample name, *label values by sorted label name): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *(s.labels[k] for k in sorted(s.labels)))] = s.value
    return out


def test_each_app_has_its_own_metrics(store: Path) -> None:
    with (
        TestClient(create_app(store), base_url=LOCAL) as a,
        TestClient(create_app(store), base_url=LOCAL) as b,
    ):
        a.post("/predict", json={"rows": rows()})
        key = ("pollinate_serving_requests_total", "/predict", "personal", "200")
        assert metric_values(a.get("/metrics").text)[key] == 1
        assert key not in metric_values(b.get("/metrics").text)


# ---------------------------------------------------------------------------------- bad input

ROW = "[" + ",".join(["0.5"] * F) + "]"


def first_is(value: str, template: str = '{"rows": [ROW]}') -> str:
    """A request body whose first row's first feature is the raw JSON ``value``."""
    return template.replace("ROW", ROW.replace("0.5", value, 1))


BAD = [
    (b"", 400, "empty request body"),
    (b"   ", 400, "empty request body"),
    (b"{", 400, "malformed JSON"),
    (b'{"rows": [[1, 2,]]}', 400, "malformed JSON"),
    (b"\xff\xfe\xfa", 400, "malformed JSON"),
    (b"[" * 50_000 + b"]" * 50_000, 400, "malformed JSON"),
    (b'{"rows": [[1' + b"0" * 5000 + b"]]}", 400, "too many digits"),
    (b"[]", 400, "must be a JSON object"),
    (b'"rows"', 400, "must be a JSON object"),
    (b'{"rows": {"a": 1}}', 400, "rows must be a list of rows"),
    (b'{"rows": []}', 400, "rows is empty"),
    (b'{"model": "personal"}', 400, "missing field 'rows'"),
    (b'{"rowz": [[1]]}', 400, "unknown field 'rowz'"),
    (first_is("0.5", '{"rows": [ROW], "row": ROW}'), 400, "not both"),
    (b'{"rows": [[1, 2, 3]]}', 400, "row 0 has 3 features; the personal model expects 8"),
    (first_is("0.5", '{"rows": [ROW, [1]]}'), 400, "row 1 has 1 features"),
    (b'{"rows": [1, 2]}', 400, "row 0 must be a list of 8 numbers"),
    (first_is('"0.5"', '{"row": ROW}'), 400, 'feature 0 is a JSON string ("0.5")'),
    (first_is("null"), 400, "feature 0 is a JSON null"),
    (first_is("true"), 400, "feature 0 is a JSON boolean"),
    (first_is("[1]"), 400, "feature 0 is a JSON array"),
    (first_is("NaN"), 400, "row 0 feature 0 is NaN"),
    (first_is("-Infinity"), 400, "feature 0 is infinite"),
    (first_is("1e39"), 400, "beyond float32 range"),
    (first_is("1e999"), 400, "feature 0 is infinite"),
    (first_is("9" * 400), 400, "beyond float32 range"),
    (first_is("0.5", '{"rows": [ROW], "model": "best"}'), 400, "unknown model 'best'"),
    (first_is("0.5", '{"rows": [ROW], "model": 1}'), 400, "unknown model 1"),
    (first_is("0.5", '{"rows": [ROW], "model": null}'), 400, "unknown model None"),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD)
def test_bad_input_is_a_one_line_4xx(
    client: TestClient, body: bytes | str, status: int, needle: str
) -> None:
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert_error(r, status, needle)
    assert client.post("/predict", json={"rows": rows()}).status_code == 200  # still serving


def test_oversized_bodies_are_refused_before_parsing(store: Path) -> None:
    with TestClient(create_app(store, max_body_bytes=1000), base_url=LOCAL) as client:
        big = json.dumps({"rows": rows(100)}).encode()
        assert_error(client.post("/predict", content=big), 413, "limit is 1000")

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            for _ in range(100):
                yield b" " * 100

        assert_error(client.post("/predict", content=chunked()), 413, "exceeds the limit")
        assert client.post("/predict", json={"rows": rows(1)}).status_code == 200


def test_large_batches_are_scored(store: Path) -> None:
    x = rows(5000)  # > 64 KiB: parsed and scored on a worker thread
    with TestClient(create_app(store, max_body_bytes=10_000_000), base_url=LOCAL) as client:
        r = client.post("/predict", json={"rows": x})
    assert r.status_code == 200
    assert r.json()["predictions"] == load_model(store).predict(x).tolist()


def test_unknown_paths_methods_and_validation_errors_are_one_line(store: Path) -> None:
    app = create_app(store)

    @app.get("/typed")
    def typed(n: int) -> dict[str, int]:  # a pydantic-validated route, to see the 422 shape
        return {"n": n}

    with TestClient(app, base_url=LOCAL) as client:
        assert_error(client.get("/nowhere"), 404, "no endpoint GET /nowhere", "/predict")
        assert_error(client.get("/predict"), 405, "method GET is not allowed on /predict")
        assert_error(client.delete("/models"), 405, "DELETE")
        assert_error(client.get("/typed?n=x"), 422, "invalid request: query.n")


def test_a_bug_answers_500_and_the_service_keeps_going(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = client.app.state.models.get("personal")  # type: ignore[attr-defined]

    def boom(x: object) -> None:
        raise RuntimeError("kaput")

    monkeypatch.setattr(model, "predict_proba", boom)
    assert_error(client.post("/predict", json={"rows": rows()}), 500, "internal error")
    monkeypatch.undo()
    assert client.post("/predict", json={"rows": rows()}).status_code == 200


# --------------------------------------------------------------------------- no model, users


def test_empty_store_answers_503_until_a_model_lands(tmp_path: Path) -> None:
    root = tmp_path / "not-yet"
    with TestClient(create_app(root, reload_interval=FAST), base_url=LOCAL) as client:
        assert_error(
            client.post("/predict", json={"rows": rows()}),
            503,
            f"no personal model stored yet in {root}",
        )
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["ready"] is False
        assert all(m["status"] == "not stored yet" for m in client.get("/models").json()["models"])
        # Bad input is still bad input without a model.
        assert_error(client.post("/predict", content=b"{"), 400, "malformed JSON")

        save(root, "dev-1", "global", round=1)  # the first round lands; the user is adopted
        wait_for(lambda: client.get("/health").json()["ready"])
        r = client.post("/predict", json={"rows": rows(), "model": "global"})
        assert r.status_code == 200 and r.json()["user"] == "dev-1"
        assert_error(
            client.post("/predict", json={"rows": rows()}),
            503,
            "no personal model stored yet",
            "for user 'dev-1'",
            '"model": "global"',
        )


def test_several_users_need_a_choice(tmp_path: Path) -> None:
    save(tmp_path, "alice")
    save(tmp_path, "bob", round=7)
    with pytest.raises(ServingError, match=r"holds 2 users \(alice, bob\).*--user"):
        create_app(tmp_path)
    with TestClient(create_app(tmp_path, user="bob"), base_url=LOCAL) as client:
        assert client.post("/predict", json={"rows": rows()}).json()["version"]["round"] == 7


def test_bad_arguments(tmp_path: Path) -> None:
    for kwargs in ({"reload_interval": 0}, {"max_body_bytes": 0}, {"user": ""}):
        with pytest.raises(ServingError):
            create_app(tmp_path, **kwargs)


# ---------------------------------------------------------------------------------- hot swap


def write_garbage(path: Path) -> None:
    """Replace ``path`` atomically with bytes that are not a model (as a broken trainer might)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(b"\x80\x02garbage" * 100)
    os.replace(tmp, path)


def new_round(path: Path, round: int, seed: int) -> ModelArtifact:
    model = create_model("mlp", in_features=F, num_classes=C, hidden=16, seed=seed)
    return save_artifact(path, model, round=round, kind="personal", user="alice")


class Hammer:
    """Threads that POST /predict over real HTTP until stopped, recording every answer."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answers: list[list[tuple[int, Any]]] = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self.stop.is_set():
                try:
                    r = http.post("/predict", json={"rows": rows(2, seed=i)})
                    self.answers[i].append((r.status_code, r.json().get("version")))
                except Exception as e:  # recorded as a failure, not lost in a thread
                    self.answers[i].append((-1, repr(e)))

    def rounds_seen(self) -> set[int]:
        return {v["round"] for answers in self.answers for s, v in answers if s == 200}


def test_hot_swap_under_load_fails_no_request(store: Path) -> None:
    path = ModelStore(store).path("alice", "personal")
    with (
        start_in_thread(store, port=0, reload_interval=FAST) as service,
        Hammer(service.url) as hammer,
    ):
        wait_for(lambda: 2 in hammer.rounds_seen())
        art = new_round(path, round=5, seed=9)
        t0 = time.monotonic()
        wait_for(lambda: 5 in hammer.rounds_seen(), timeout=10 * FAST + 2)
        swap_s = time.monotonic() - t0

        write_garbage(path)  # a broken file lands: logged, round 5 keeps serving
        wait_for(lambda: "personal" in service.app.state.models.reload_errors)
        seen_after_garbage = sum(len(a) for a in hammer.answers)
        wait_for(lambda: sum(len(a) for a in hammer.answers) > seen_after_garbage + 20)
        models = httpx.get(f"{service.url}/models").json()["models"]
        personal = next(m for m in models if m["kind"] == "personal")
        assert personal["round"] == 5 and "not a Pollinate model file" in personal["reload_error"]

        new_round(path, round=6, seed=10)  # a good file again: swapped in, error cleared
        wait_for(lambda: 6 in hammer.rounds_seen())
        metrics = httpx.get(f"{service.url}/metrics").text

    answers = [a for thread in hammer.answers for a in thread]
    failures = [a for a in answers if a[0] != 200]
    assert not failures, failures[:5]
    assert hammer.rounds_seen() == {2, 5, 6}  # load before, between and after the swaps
    for thread in hammer.answers:  # each client sees rounds 2 -> 5 -> 6, never back
        seen = [v["round"] for _, v in thread]
        assert seen == sorted(seen)
    assert {v["hash"] for _, v in answers if v["round"] == 5} == {art.content_hash}
    assert swap_s < 10 * FAST + 1
    m = metric_values(metrics)
    assert m["pollinate_serving_model_reload_failures_total", "personal"] == 1
    assert m["pollinate_serving_model_swaps_total", "personal"] == 2
    assert m["pollinate_serving_model_round", "personal"] == 6


def test_a_corrupt_file_at_startup_is_not_served(store: Path) -> None:
    write_garbage(ModelStore(store).path("alice", "personal"))
    with TestClient(create_app(store), base_url=LOCAL) as client:
        assert_error(client.post("/predict", json={"rows": rows()}), 503, "no personal model")
        assert client.post("/predict", json={"rows": rows(), "model": "global"}).status_code == 200
        personal = client.get("/models").json()["models"][1]
        assert personal["status"] == "not stored yet" and "reload_error" in personal


def test_start_in_thread_reports_a_busy_port(store: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServingError, match=f"cannot listen on 127.0.0.1:{port}"):
            start_in_thread(store, port=port)


# ----------------------------------------------------------------------- a real server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_real_server_process(store: Path) -> None:
    port = free_port()
    code = (
        "import sys; from pollinate.client.serving import serve; "
        "serve(sys.argv[1], port=int(sys.argv[2]), log_level='info')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(store), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
            try:
                health = httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        assert health.status_code == 200 and health.json()["ready"] is True
        with httpx.Client(base_url=url) as http:
            r = http.post("/predict", json={"rows": rows(3), "model": "global"})
            assert r.status_code == 200
            assert r.json()["version"] == load_model(store, "global").version
            assert_error(http.post("/predict", content=b"nope"), 400, "malformed JSON")
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=15)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0].decode()
    # Graceful: uvicorn drains, runs the lifespan shutdown, then re-raises SIGTERM.
    assert proc.returncode in (0, -signal.SIGTERM), out[-2000:]
    assert "Application shutdown complete" in out, out[-2000:]


def test_the_library_leaves_torch_threads_alone(store: Path) -> None:
    before = torch.get_num_threads()
    app = create_app(store)
    assert isinstance(app, FastAPI)
    with TestClient(app, base_url=LOCAL) as client:
        client.post("/predict", json={"rows": rows()})
    assert torch.get_num_threads() == before  # only serve(threads=...) sets them
