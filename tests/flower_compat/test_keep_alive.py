"""Kept Fleet API connections: a real TLS uvicorn server started the way Flower's SuperLink
launcher starts it, and Flower's own Fleet client, made the way a device makes it."""

from __future__ import annotations

import importlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest, SendNodeHeartbeatResponse

import pollinate.flower_compat as fc
from pollinate.deploy.certs import create_certs
from pollinate.flower_compat import _names, fleet
from pollinate.flower_compat import keep_alive as ka

LAUNCHER = importlib.import_module(ka.SERVER_MODULE)
STOCK_KEEP_ALIVE = 5.0  # uvicorn's and httpx's default
IDLE = STOCK_KEEP_ALIVE + 1.0


@pytest.fixture(autouse=True)
def _warnings_said_again() -> None:
    _names._said.clear()
    fc._core._warned.clear()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    paths, _ = create_certs(tmp_path_factory.mktemp("certs"))
    return paths


class Recorder:
    """An ASGI app answering any Fleet call with an empty heartbeat response, recording
    the client port of each request (a new port: a new connection)."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.body = SendNodeHeartbeatResponse().SerializeToString()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.ports.append(scope["client"][1])
        await receive()
        headers = [
            (b"content-type", b"application/protobuf"),
            (b"content-length", str(len(self.body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[uvicorn.Server]]:
    """``uvicorn.run`` runs a real server this test can stop (``should_exit``), built from
    exactly the options it was given."""
    made: list[uvicorn.Server] = []

    def run(
        app: Any,
        *,
        timeout_keep_alive: int = 5,
        timeout_graceful_shutdown: int | None = None,
        **kwargs: Any,
    ) -> None:
        config = uvicorn.Config(
            app,
            timeout_keep_alive=timeout_keep_alive,
            timeout_graceful_shutdown=timeout_graceful_shutdown,
            **kwargs,
        )
        server = uvicorn.Server(config)
        made.append(server)
        server.run()

    monkeypatch.setattr(uvicorn, "run", run)
    yield made
    for server in made:
        server.should_exit = True


def _serve(app: Recorder, certs: Any, kept: bool) -> tuple[int, threading.Thread]:
    """Start ``app`` as Flower's launcher does (``uvicorn.run`` through its module's
    ``uvicorn``), with Pollinate's stand-in or stock."""
    port = _free_port()
    block: AbstractContextManager[Any] = ka.server_keeps_connections() if kept else nullcontext()
    with block:
        run = LAUNCHER.uvicorn.run  # what flower_superlink() calls
    kwargs = {
        "host": "127.0.0.1",
        "port": port,
        "ssl_keyfile": str(certs.server_key),
        "ssl_certfile": str(certs.server_cert),
        "log_level": "warning",
    }
    thread = threading.Thread(target=run, args=(app,), kwargs=kwargs, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return port, thread
        time.sleep(0.05)
    raise AssertionError("the test server did not start")


def _device(port: int, certs: Any, kept: bool) -> Any:
    block: AbstractContextManager[Any] = ka.clients_keep_connections() if kept else nullcontext()
    with block:
        return fleet.fleet_client(f"127.0.0.1:{port}", certs.ca_cert.read_bytes(), None, None)


def test_an_idle_device_keeps_its_connection_past_the_stock_5_s(
    certs: Any, servers: list[uvicorn.Server]
) -> None:
    kept_app, stock_app = Recorder(), Recorder()
    kept_port, kept_thread = _serve(kept_app, certs, kept=True)
    stock_port, _ = _serve(stock_app, certs, kept=False)
    kept_device, stock_device = _device(kept_port, certs, True), _device(stock_port, certs, False)
    try:
        for device in (kept_device, stock_device):
            device.SendNodeHeartbeat(SendNodeHeartbeatRequest())
        time.sleep(IDLE)  # longer than either end's stock keep-alive
        for device in (kept_device, stock_device):
            device.SendNodeHeartbeat(SendNodeHeartbeatRequest())

        assert len(kept_app.ports) == 2 and kept_app.ports[0] == kept_app.ports[1]
        assert len(stock_app.ports) == 2 and stock_app.ports[0] != stock_app.ports[1]
        kept_server = next(s for s in servers if s.config.port == kept_port)
        assert kept_server.config.timeout_keep_alive == ka.SERVER_KEEP_ALIVE

        # Stopping with the device's idle connection still open: asyncio would wait 30 s
        # for a TLS close_notify that an idle client never sends.
        started = time.monotonic()
        kept_server.should_exit = True
        kept_thread.join(ka.SHUTDOWN_GRACE + 10)
        assert not kept_thread.is_alive()
        assert time.monotonic() - started < ka.SHUTDOWN_GRACE + 2
    finally:
        kept_device.close()
        stock_device.close()


def test_the_device_side_closes_first() -> None:
    """No request can cross the server's close of an idle connection."""
    assert ka.CLIENT_KEEP_ALIVE < ka.SERVER_KEEP_ALIVE


def test_stand_ins_differ_only_where_they_must() -> None:
    import httpx

    client_side = ka.StandInHttpx(30.0)
    assert client_side.Timeout is httpx.Timeout
    assert client_side.HTTPStatusError is httpx.HTTPStatusError
    with client_side.Client() as made:
        transport: Any = made._transport
        assert transport._pool._keepalive_expiry == 30.0
    own = httpx.Limits(keepalive_expiry=1.0)
    with client_side.Client(limits=own) as made:  # an explicit choice of Flower's wins
        transport = made._transport
        assert transport._pool._keepalive_expiry == 1.0
    assert ka.StandInUvicorn(75, 3).Config is uvicorn.Config


def test_uvicorns_idle_only_cancel_error_is_dropped_and_a_real_one_kept() -> None:
    quiet = ka.IdleGoodbyesUnlogged()

    def record(n: int) -> logging.LogRecord:
        return logging.LogRecord(
            "uvicorn.error",
            logging.ERROR,
            __file__,
            1,
            "Cancel %s running task(s), timeout graceful shutdown exceeded",
            (n,),
            None,
        )

    assert not quiet.filter(record(0))
    assert quiet.filter(record(2))


def test_the_stand_ins_are_undone(servers: list[uvicorn.Server]) -> None:
    client_module = importlib.import_module(ka.CLIENT_MODULE)
    with ka.server_keeps_connections() as on_server, ka.clients_keep_connections() as on_client:
        assert on_server and on_client
        assert isinstance(LAUNCHER.uvicorn, ka.StandInUvicorn)
        assert isinstance(client_module.httpx, ka.StandInHttpx)
    assert LAUNCHER.uvicorn is uvicorn
    import httpx

    assert client_module.httpx is httpx


def test_a_changed_flower_falls_back_to_stock_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pollinate.flower_compat")
    monkeypatch.setattr(LAUNCHER, "uvicorn", object())  # a launcher that no longer uses it
    with ka.server_keeps_connections() as on:
        assert not on
    client_module = importlib.import_module(ka.CLIENT_MODULE)
    monkeypatch.setattr(client_module, "httpx", object())
    with ka.clients_keep_connections() as on:
        assert not on
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("using stock Flower's path" in w for w in warnings)


def test_a_uvicorn_without_the_options_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pollinate.flower_compat")

    def old_run(app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
        raise AssertionError("not called")

    monkeypatch.setattr(uvicorn, "run", old_run)
    with ka.server_keeps_connections() as on:
        assert not on
        assert LAUNCHER.uvicorn is uvicorn
    assert any("timeout_keep_alive" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("short", [False, True])
def test_the_launchers_keep_connections_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, short: bool
) -> None:
    from pollinate.deploy import superlink, supernode

    if short:
        monkeypatch.setenv("POLLINATE_SHORT_KEEPALIVE", "1")
    else:
        monkeypatch.delenv("POLLINATE_SHORT_KEEPALIVE", raising=False)
    with superlink.patched_flower([]):
        assert (f"{ka.SERVER_MODULE}.uvicorn" in fc.active_patches()) is not short
    with supernode.patched_flower():
        assert (f"{ka.CLIENT_MODULE}.httpx" in fc.active_patches()) is not short


@pytest.mark.parametrize("policy", ["tuned", "stock"])
def test_tuned_emulated_devices_keep_connections_stock_ones_do_not(
    monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    from flwr.clientapp import ClientApp

    from pollinate.deploy.emulator import POLICIES, DeviceSpec, Emulator

    monkeypatch.delenv("POLLINATE_SHORT_KEEPALIVE", raising=False)
    emulator = Emulator(
        [DeviceSpec(None, {})],
        "127.0.0.1:9",
        client_app=ClientApp(),
        root_certificates=None,
        policy=POLICIES[policy],
    )
    # The device's httpx pool (Flower's FleetHttpClient -> ProtobufClient -> httpx.Client).
    pool = emulator.devices[0].client._inner._client._transport._pool
    expected = ka.CLIENT_KEEP_ALIVE if policy == "tuned" else STOCK_KEEP_ALIVE
    assert pool._keepalive_expiry == expected
