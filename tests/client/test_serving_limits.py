"""The inference service under hostile or broken clients: finite JSON only, slow and
half-finished connections closed, uvicorn's own errors as JSON, foreign Host headers refused.

The socket tests run a real uvicorn server (``start_in_thread``) on 127.0.0.1 and talk to
it with raw sockets, since test clients cannot send half a request.
"""

from __future__ import annotations

import json
import logging
import selectors
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from pollinate.client.httpguard import AllowedHosts, HttpLimits, host_name
from pollinate.client.serving import ServingHandle, create_app, start_in_thread
from pollinate.client.store import ModelStore
from pollinate.models import create_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

F, C = 8, 3
LOCAL = "http://localhost"


def strict_json(text: str) -> object:
    """Parse JSON as the standard defines it: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in the response is not JSON: {text[:200]}")

    return json.loads(text, parse_constant=refuse)


def assert_json_error(status: int, body: bytes | str, want: int, needle: str = "") -> None:
    assert status == want, body
    payload = strict_json(body.decode() if isinstance(body, bytes) else body)
    assert isinstance(payload, dict) and list(payload) == ["error"], payload
    assert needle in payload["error"] and "\n" not in payload["error"], payload


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    model = create_model("mlp", in_features=F, num_classes=C, hidden=16, seed=0)
    ModelStore(root).save(
        "alice", "personal", spec=model.spec, state_dict=model.state_dict(), round=1
    )
    return root


ROW = [0.1] * F


# ------------------------------------------------------------------------- finite JSON only


@pytest.mark.parametrize("value", [3e38, -3e38, 1e30])
def test_a_huge_finite_row_is_a_4xx_never_nan_json(store: Path, value: float) -> None:
    with TestClient(create_app(store), base_url=LOCAL) as client:
        r = client.post("/predict", json={"rows": [ROW, [value] * F]})
        if r.status_code == 200:  # the network may still be finite for this row
            probabilities = strict_json(r.text)["probabilities"]  # type: ignore[index]
            assert np.isfinite(probabilities).all()
        else:
            assert_json_error(r.status_code, r.text, 400, "row 1 is not finite")
        assert client.post("/predict", json={"rows": [ROW]}).status_code == 200


def test_the_overflow_case_really_overflows(store: Path) -> None:
    # Without the output check this row answered "probabilities": [[NaN, NaN, NaN]].
    # First-layer weights of 1: any two of the row's products sum past float32's largest
    # (3.4e38), so the row overflows whatever order the matmul kernel adds in (with the
    # seeded weights the exact sums are finite, and only some CPUs' kernels overflowed).
    model = create_model("mlp", in_features=F, num_classes=C, hidden=16, seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["body.0.weight"].fill_(1.0)
    ModelStore(store).save("alice", "personal", spec=model.spec, state_dict=weights, round=2)
    with TestClient(create_app(store), base_url=LOCAL) as client:
        r = client.post("/predict", json={"rows": [[3e38] * F]})
    assert_json_error(r.status_code, r.text, 400, "too large in magnitude")


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_input_is_a_4xx(store: Path, raw: str) -> None:
    body = '{"rows": [[' + ",".join([raw] + ["0.1"] * (F - 1)) + "]]}"
    with TestClient(create_app(store), base_url=LOCAL) as client:
        r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert_json_error(r.status_code, r.text, 400, "features must be finite")


def test_a_model_file_with_nan_weights_is_not_served(store: Path) -> None:
    model = create_model("mlp", in_features=F, num_classes=C, hidden=16, seed=0)
    weights = {k: v.clone().fill_(float("nan")) for k, v in model.state_dict().items()}
    ModelStore(store).save("alice", "global", spec=model.spec, state_dict=weights, round=2)
    with TestClient(create_app(store), base_url=LOCAL) as client:
        r = client.post("/predict", json={"rows": [ROW], "model": "global"})
        assert_json_error(r.status_code, r.text, 503, "no global model")
        listed = {m["kind"]: m for m in client.get("/models").json()["models"]}
        assert "not finite" in listed["global"]["reload_error"]


# ------------------------------------------------------------------------------ Host header


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("localhost:8080", True),
        ("127.0.0.1:8080", True),
        ("[::1]:8080", True),
        ("LOCALHOST.", True),
        ("evil.example", False),
        ("evil.example:8080", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
        ("192.168.1.20", False),  # an IP this loopback service is not bound to
    ],
)
def test_host_header_against_dns_rebinding(store: Path, host: str, allowed: bool) -> None:
    with TestClient(create_app(store), base_url=LOCAL) as client:
        r = client.post("/predict", json={"rows": [ROW]}, headers={"host": host})
        if allowed:
            assert r.status_code == 200, r.text
        else:
            assert_json_error(r.status_code, r.text, 421, "DNS rebinding")
        assert client.get("/health", headers={"host": host}).status_code == (
            200 if allowed else 421
        )


def test_extra_and_bound_hosts() -> None:
    app = FastAPI()  # never called: only the Host rule is tested
    named = AllowedHosts(app, bound_host="10.0.0.5", extra=["device-1.lan"])
    assert named.allows("device-1.lan:8080") and named.allows("10.0.0.5")
    assert not named.allows("10.0.0.6") and not named.allows("evil.example")
    everywhere = AllowedHosts(app, bound_host="0.0.0.0")
    assert everywhere.allows("192.168.1.20:8080") and everywhere.allows("[fe80::1]")
    assert not everywhere.allows("evil.example")  # rebinding always comes as a DNS name
    assert host_name("[::1]:80") == "::1" and host_name("::1") == "::1"


# ------------------------------------------------------------------- a real server, sockets


@pytest.fixture
def service(store: Path) -> Iterator[ServingHandle]:
    limits = HttpLimits(header_timeout=1.0, body_timeout=1.0, max_connections=40)
    with start_in_thread(store, port=0, reload_interval=0.05, limits=limits) as handle:
        yield handle


def connect(service: ServingHandle) -> socket.socket:
    sock = socket.create_connection((service.host, service.port), timeout=5)
    return sock


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def read_until_closed(socks: list[socket.socket], deadline: float) -> list[bytes | None]:
    """What each socket receives until the server closes it, all read at once; None for
    a socket still open at ``deadline`` (monotonic), so a regression fails, never hangs."""
    received = {sock: bytearray() for sock in socks}
    closed: set[socket.socket] = set()
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    chunk = ready.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[ready] += chunk
                else:  # the server closed it
                    selector.unregister(ready)
                    closed.add(ready)
    return [bytes(received[sock]) if sock in closed else None for sock in socks]


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def metrics(service: ServingHandle) -> str:
    return httpx.get(f"{service.url}/metrics").text


def status_counts(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("pollinate_serving_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            out[status] = out.get(status, 0) + float(line.rsplit(" ", 1)[1])
    return out


def test_a_client_closing_mid_body_is_not_an_error(
    service: ServingHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with connect(service) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"rows": [[0.1, 0.2'
        )
        time.sleep(0.1)  # the app is reading the body
    deadline = time.monotonic() + 5
    while "pollinate_serving_client_disconnects_total" not in metrics(service):
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
    text = metrics(service)
    assert 'pollinate_serving_client_disconnects_total{endpoint="/predict"} 1.0' in text
    assert "500" not in status_counts(text), text
    assert httpx.post(f"{service.url}/predict", json={"rows": [ROW]}).status_code == 200
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    assert "Traceback" not in caplog.text and "Exception" not in logged, caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_slowloris_connections_are_closed_and_the_service_keeps_answering(
    service: ServingHandle,
) -> None:
    """200 connections that never finish their headers, against a 40-connection cap and a
    1 s header deadline: the excess is refused at once with a JSON 503, the rest are closed
    with a JSON 408 within the deadline, and a normal request is answered afterwards."""
    socks = []
    t0 = time.monotonic()
    try:
        for i in range(200):
            sock = connect(service)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nX-Slow-" + str(i).encode())
            socks.append(sock)
        answers = read_until_closed(socks, deadline=t0 + 1.0 + 5)
        elapsed = time.monotonic() - t0
    finally:
        for sock in socks:
            sock.close()
    statuses = []
    for raw in answers:
        assert raw is not None, "a connection was still open after the deadline"
        assert raw, "a connection was closed without an answer"
        status, headers, body = split_response(raw)
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        assert_json_error(status, body, status)
        statuses.append(status)
    assert set(statuses) == {408, 503}, statuses
    assert 0 < statuses.count(408) <= 40  # those within the cap waited for their deadline
    assert elapsed < 1.0 + 5, elapsed  # the deadline (1 s) plus generous slack on 2 cores
    r = httpx.post(f"{service.url}/predict", json={"rows": [ROW]})
    assert r.status_code == 200


def test_a_slow_body_is_timed_out(service: ServingHandle) -> None:
    with connect(service) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 500\r\n\r\n{")
        t0 = time.monotonic()
        status, _, body = split_response(read_all(sock))
        waited = time.monotonic() - t0
    assert_json_error(status, body, 408, "request body not received within 1 s")
    assert 0.5 < waited < 5
    assert "500" not in status_counts(metrics(service))
    assert httpx.post(f"{service.url}/predict", json={"rows": [ROW]}).status_code == 200


def test_an_idle_keep_alive_connection_cannot_stall_the_next_request(
    service: ServingHandle,
) -> None:
    with connect(service) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.settimeout(5)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: loc")  # the next request stalls
        status, _, body = split_response(read_all(sock))
    assert_json_error(status, body, 408, "request headers not received")


def closing(line: str, *headers: str, host: str = "localhost") -> bytes:
    """A complete request without a body that asks the server to close afterwards."""
    lines = [f"{line} HTTP/1.1", f"Host: {host}", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


def test_a_body_sent_after_an_early_answer_does_not_lift_the_header_deadline(
    service: ServingHandle,
) -> None:
    with connect(service) as sock:
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 404")  # answered before the body
        sock.sendall(b"body")  # the body completes after the answer...
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # ...and the next request stalls
        status, _, body = split_response(read_all(sock))
    assert_json_error(status, body, 408, "request headers not received")


@pytest.mark.parametrize(
    ("request_bytes", "status", "needle"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n", 400, "malformed HTTP"),
        (
            b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            431,
            "request headers exceed 65536 bytes",
        ),
        (
            closing("GET /nowhere"),
            404,
            "no endpoint GET /nowhere",
        ),
        (
            closing("PUT /predict", "Content-Length: 0"),
            405,
            "PUT",
        ),
        (
            closing("POST /predict", "Content-Length: 99999999"),
            413,
            "the limit is 1000000",
        ),
        (
            closing("GET /health", host="evil.example"),
            421,
            "evil.example",
        ),
    ],
    ids=["garbage", "bad-header", "huge-header", "404", "405", "413", "rebinding"],
)
def test_every_error_is_json_uvicorns_own_included(
    service: ServingHandle, request_bytes: bytes, status: int, needle: str
) -> None:
    with connect(service) as sock:
        sock.sendall(request_bytes)
        got, headers, body = split_response(read_all(sock, timeout=3))
    assert headers["content-type"] == "application/json", headers
    assert_json_error(got, body, status, needle)


def test_over_the_connection_cap_is_a_json_503(store: Path) -> None:
    limits = HttpLimits(header_timeout=5.0, max_connections=2)
    with start_in_thread(store, port=0, limits=limits) as service:
        held = [connect(service) for _ in range(2)]
        try:
            time.sleep(0.1)  # both accepted
            with connect(service) as third:
                third.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                status, _, body = split_response(read_all(third))
            assert_json_error(status, body, 503, "connections open")
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while True:  # once they are gone, the service answers again
            r = httpx.get(f"{service.url}/health")
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 200


@pytest.mark.slow  # a process that imports torch: seconds on a loaded machine
def test_node_serve_allow_host_through_the_cli(store: Path) -> None:
    """``pollinate node serve --allow-host NAME`` in a real process: NAME and localhost are
    answered, any other Host is 421 JSON."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "pollinate", "node", "serve", "--model-dir", str(store)]
    argv += ["--port", str(port), "--allow-host", "device-1.lan"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the service did not come up"
                time.sleep(0.1)
        for host, status in [("device-1.lan:8080", 200), ("localhost", 200), ("evil.lan", 421)]:
            r = httpx.get(f"{url}/health", headers={"host": host})
            assert r.status_code == status, (host, r.text)
        assert_json_error(421, r.text, 421, "device-1.lan")
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
