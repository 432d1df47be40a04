"""TLS read buffers: a real asyncio TLS server (the loop under the SuperLink's uvicorn) with
the project's own certificates, inside and outside the block."""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import hashlib
import logging
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest

import pollinate.flower_compat as fc
from pollinate.deploy.certs import create_certs
from pollinate.flower_compat import _names
from pollinate.flower_compat import tls_buffer as tb

ASYNCIO_SIZE = 256 * 1024  # asyncio's own, in every Python this project supports


@pytest.fixture(autouse=True)
def _warnings_said_again() -> None:
    _names._said.clear()
    fc._core._warned.clear()


def _upload(tmp_path: Path, payload: bytes) -> tuple[int, str]:
    """``payload`` sent to a fresh asyncio TLS server; returns the size of the read buffer
    the server's side of the connection held, and the SHA-256 of what the server got."""
    paths, _ = create_certs(tmp_path)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(paths.server_cert, paths.server_key)
    seen: dict[str, Any] = {}
    ready, done = threading.Event(), threading.Event()

    async def take_in(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["buffer"] = len(writer.transport._ssl_protocol._ssl_buffer)  # type: ignore[attr-defined]
        digest = hashlib.sha256()
        while chunk := await reader.read(1 << 16):
            digest.update(chunk)
        seen["sha"] = digest.hexdigest()
        writer.close()
        done.set()

    async def serve() -> None:
        server = await asyncio.start_server(take_in, "127.0.0.1", 0, ssl=server_side)
        seen["port"] = server.sockets[0].getsockname()[1]
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.01)
        server.close()

    thread = threading.Thread(target=lambda: asyncio.run(serve()))
    thread.start()
    try:
        assert ready.wait(10)
        client_side = ssl.create_default_context(cafile=str(paths.ca_cert))
        raw = socket.create_connection(("127.0.0.1", seen["port"]))
        with client_side.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(payload)
            sock.unwrap()  # close_notify: the server reads to the end
        assert done.wait(30)
    finally:
        done.set()
        thread.join(10)
    return seen["buffer"], seen["sha"]


def test_connections_made_inside_hold_the_smaller_buffer_and_get_every_byte(
    tmp_path: Path,
) -> None:
    payload = os.urandom(8 * 2**20 + 12345)  # many reads of a full buffer, and a ragged end
    want = hashlib.sha256(payload).hexdigest()
    with tb.tls_reads_into() as on:
        assert on
        assert "SSLProtocol.max_size" in fc.active_patches()
        inside, sha = _upload(tmp_path / "in", payload)
    assert inside == tb.READ_BUFFER < ASYNCIO_SIZE
    assert sha == want
    outside, sha = _upload(tmp_path / "out", payload)
    assert outside == ASYNCIO_SIZE and sha == want  # undone: asyncio's own again
    assert sslproto.SSLProtocol.max_size == ASYNCIO_SIZE
    assert not fc.active_patches()


def test_an_asyncio_without_an_int_size_falls_back_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sslproto.SSLProtocol, "max_size", None)
    with caplog.at_level(logging.WARNING, "pollinate.flower_compat"):
        for _ in range(2):
            with tb.tls_reads_into() as on:
                assert not on
                assert sslproto.SSLProtocol.max_size is None
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and tb.NAME in warned[0] and "stock Flower's path" in warned[0]


@pytest.mark.parametrize("stock", [False, True])
def test_the_superlink_launcher_sets_it_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch, stock: bool
) -> None:
    from pollinate.deploy import superlink

    if stock:
        monkeypatch.setenv("POLLINATE_STOCK_TLS_BUFFER", "1")
    else:
        monkeypatch.delenv("POLLINATE_STOCK_TLS_BUFFER", raising=False)
    with superlink.patched_flower([]):
        assert (sslproto.SSLProtocol.max_size == tb.READ_BUFFER) is not stock
    assert sslproto.SSLProtocol.max_size == ASYNCIO_SIZE
