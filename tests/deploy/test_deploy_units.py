"""The deployment pieces that need no Flower processes: fast."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from pollinate.config import ConfigError, RunConfig, default_flat, resolve
from pollinate.deploy.appdir import pyproject_text, write_app_dir
from pollinate.deploy.certs import DeployError, create_certs
from pollinate.deploy.link import _last_json, _one_line
from pollinate.deploy.node import NodeOptions, explain_probe, node_config, probe
from pollinate.deploy.proc import Supervisor, alive, descendants, parse_address
from pollinate.deploy.server import (
    ServerOptions,
    deployment_config,
    refusal_message,
    superlink_argv,
)
from pollinate.deploy.state import NodeDir, ServerDir
from pollinate.deploy.superlink import LoopbackAdmin

# ------------------------------------------------------------------------- app folder


def test_app_folder_declares_every_config_key_and_builds_a_fab(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import flatten_dict

    app = write_app_dir(tmp_path)
    config, _warnings = load_and_validate(app / "pyproject.toml")
    declared = flatten_dict(config["tool"]["flwr"]["app"]["config"])
    assert declared == default_flat()  # any key a run config may override exists
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == "pollinate.client.app:app"
    assert build_fab_from_disk(app)[:2] == b"PK"
    assert pyproject_text() == (app / "pyproject.toml").read_text()


def test_deployment_config_needs_model_sizes_and_pins_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="a deployed server has no data"):
        deployment_config(RunConfig())
    cfg = resolve({"model.in-features": 64, "model.num-classes": 10, "run.name": "x"})
    monkeypatch.chdir(tmp_path)
    assert deployment_config(cfg).run.dir == str(tmp_path / "runs" / "x")
    assert deployment_config(cfg, "elsewhere").run.dir == str(tmp_path / "elsewhere")


# ------------------------------------------------------------------------ node config


def _node(tmp_path: Path, data: Path, user: str | None = None) -> NodeOptions:
    return NodeOptions(
        server="127.0.0.1:1",
        data=data,
        users=["u"],
        user_id=user,
        state=NodeDir(tmp_path),
        model_dir=tmp_path / "my models",
        key=None,
        root_cert=None,
        serve=None,
    )


@pytest.mark.parametrize("name", ["plain.csv", "with space.csv", "it's.csv", 'say "hi".csv'])
def test_node_config_round_trips_through_flowers_parser(tmp_path: Path, name: str) -> None:
    from flwr.common.config import parse_config_args

    opts = _node(tmp_path, tmp_path / name, user="007")
    parsed = parse_config_args([node_config(opts)])
    assert parsed == {
        "data-file": str(tmp_path / name),
        "model-dir": str(tmp_path / "my models"),
        "user-id": "007",
    }


def test_node_start_device_reaches_the_clientapp_s_node_config(tmp_path: Path) -> None:
    from dataclasses import replace

    from flwr.common.config import parse_config_args

    from pollinate import protocol

    opts = replace(_node(tmp_path, tmp_path / "d.csv"), device="cpu")
    parsed = parse_config_args([node_config(opts)])
    assert protocol.read_node_config(parsed).device == "cpu"
    assert "device" not in parse_config_args([node_config(_node(tmp_path, tmp_path / "d.csv"))])


def test_node_config_refuses_both_quotes(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="both kinds of quote"):
        node_config(_node(tmp_path, tmp_path / 'it\'s "x".csv'))


# ---------------------------------------------------------------------------- probe


@pytest.fixture
def plain_http() -> object:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def tls_server(tmp_path: Path) -> object:
    paths, _ = create_certs(tmp_path / "certs")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(paths.server_cert, paths.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], paths.ca_cert
    stop.set()
    thread.join(2)
    listener.close()


def test_probe_names_each_mismatch(
    plain_http: int, tls_server: tuple[int, Path], tmp_path: Path
) -> None:
    tls_port, ca = tls_server
    assert probe("127.0.0.1", plain_http, tls=False, root_cert=None) == "ok"
    assert probe("127.0.0.1", plain_http, tls=True, root_cert=ca) == "server-not-tls"
    assert probe("127.0.0.1", tls_port, tls=True, root_cert=ca) == "ok"
    assert probe("127.0.0.1", tls_port, tls=False, root_cert=None) == "server-uses-tls"
    other, _ = create_certs(tmp_path / "other")
    assert probe("127.0.0.1", tls_port, tls=True, root_cert=other.ca_cert).startswith("untrusted")
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    unused = free.getsockname()[1]
    free.close()
    assert probe("127.0.0.1", unused, tls=True, root_cert=ca) == "unreachable"
    opts = _node(tmp_path, tmp_path / "d.csv")
    assert "drop --insecure" in str(explain_probe("server-uses-tls", opts))
    assert "start this node with --insecure" in str(explain_probe("server-not-tls", opts))
    assert explain_probe("unreachable", opts) is None


# --------------------------------------------------------------------- server pieces


def test_refusal_lines_become_messages(tmp_path: Path) -> None:
    state = ServerDir(tmp_path)
    msg = refusal_message("pollinate: tls-refused peer=10.0.0.7 reason=HTTP_REQUEST", state)
    assert msg is not None and "10.0.0.7" in msg and "plain HTTP" in msg
    msg = refusal_message("pollinate: key-refused peer=- why=unregistered key=SHA256:abc", state)
    assert msg is not None and "unregistered key SHA256:abc" in msg and "register-node" in msg
    assert refusal_message("pollinate: node-activated node_id=42", state) == "node 42 joined"
    assert refusal_message("pollinate: node-deactivated node_id=42", state) == "node 42 left"
    # Flower's own log text says nothing to Pollinate, even where it reads the same.
    assert refusal_message("INFO 2026: [Fleet.ActivateNode] Activated node_id=42", state) is None
    assert refusal_message("INFO 2026: something else", state) is None


def test_admin_apis_answer_only_loopback() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})

    async def call(client: str, path: str, server: str = "link") -> int:
        transport = httpx.ASGITransport(app=LoopbackAdmin(app), client=(client, 5000))
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{server}") as http:
            return (await http.post(path)).status_code

    async def main() -> None:
        assert await call("10.1.2.3", "/v1/control/start-run") == 403
        assert await call("10.1.2.3", "/v1/runtime/pull-messages") == 403
        assert await call("10.1.2.3", "/v1/fleet/pull-messages") == 200
        assert await call("127.0.0.1", "/v1/control/start-run") == 200
        assert await call("::1", "/v1/runtime/pull-messages") == 200
        # --address <own IP>: this host's own tools connect from that very address.
        assert await call("192.0.2.2", "/v1/control/start-run", server="192.0.2.2") == 200
        assert await call("192.0.2.9", "/v1/control/start-run", server="192.0.2.2") == 403

    asyncio.run(main())


def test_parse_address() -> None:
    assert parse_address("example.org:9092") == ("example.org", 9092)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("nohost", "h:0", "h:x", "h:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)


def test_flwr_output_parsing() -> None:
    assert _last_json('Loading...\n{"success": true, "x": 1}\n') == {"success": True, "x": 1}
    assert _last_json("no json") is None
    message = "Using SuperLink: pollinate (x)\n\n[code: 23] Public key already in use."
    assert _one_line(message) == "[code: 23] Public key already in use."


# ----------------------------------------------------------------------- supervisor


def test_supervisor_stops_children_and_orphaned_grandchildren(tmp_path: Path) -> None:
    # The child starts a detached grandchild (own session, like flower-superexec) and
    # exits at once, orphaning it; the supervisor must still find and stop it.
    script = (
        "import subprocess, sys, time;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
        " start_new_session=True);"
        "time.sleep(300)"
    )
    with Supervisor(tmp_path) as sup:
        child = sup.start("child", [sys.executable, "-c", script])
        deadline = time.monotonic() + 10
        while len(descendants(child.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = [child.pid, *descendants(child.pid)]
        assert len(tree) == 2
    assert not any(alive(pid) for pid in tree)
    assert not descendants(os.getpid()) or all(not alive(p) for p in descendants(os.getpid()))


def test_supervisor_reports_the_first_child_to_exit(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
        quick = sup.start("quick", [sys.executable, "-c", "print('bye'); raise SystemExit(3)"])
        quick.popen.wait(10)
        assert sup.exited() is quick and quick.popen.returncode == 3
    assert (tmp_path / "quick.log").read_text().strip() == "bye"


# ---------------------------------------------------------------------- grid polling


class FakeGrid:
    """push/pull like a SuperLink whose replies arrive after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.pulls = 0

    def push_messages(self, messages: list) -> list[str]:
        self.sent = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids: set[str]) -> list:
        self.pulls += 1
        if time.monotonic() - self.sent < self.delay:
            return []

        class Reply:
            class metadata:
                pass

        out = []
        for i in sorted(ids):
            r = Reply()
            r.metadata = type("M", (), {"reply_to_message_id": i})()
            out.append(r)
        return out


def test_send_and_receive_picks_replies_up_within_tens_of_ms() -> None:
    from pollinate.server.grid import send_and_receive

    class Msg:
        metadata = type("M", (), {"dst_node_id": 1})()

    grid = FakeGrid(delay=0.3)
    start = time.monotonic()
    replies = send_and_receive(grid, [Msg(), Msg()], timeout=10)  # type: ignore[arg-type,list-item]
    took = time.monotonic() - start
    assert len(replies) == 2 and took < 0.5  # Flower's own loop: >= 3 s
    grid = FakeGrid(delay=60)
    start = time.monotonic()
    assert send_and_receive(grid, [Msg()], timeout=0.5) == []  # type: ignore[arg-type,list-item]
    assert time.monotonic() - start < 1.0


def test_poll_interval_keeps_up_with_the_wait() -> None:
    from pollinate.deploy.proc import poll_interval

    assert poll_interval(0.0, 0.1, 0.01, 0.5) == 0.01  # a fresh wait polls fast
    assert poll_interval(0.6, 0.1, 0.01, 0.5) == pytest.approx(0.06)  # late by <= 10%
    assert poll_interval(60.0, 0.1, 0.01, 0.5) == 0.5  # an idle device polls rarely


def test_superlink_keeps_a_state_database_unless_asked_for_memory(tmp_path: Path) -> None:
    from pollinate.deploy.certs import CertPaths

    state = ServerDir(tmp_path / "server")
    certs = CertPaths.in_dir(tmp_path / "certs")
    opts = ServerOptions(resolve({}), "127.0.0.1", 9092, state, certs)

    def value(argv: list[str], flag: str) -> str:
        return argv[argv.index(flag) + 1]

    secure = superlink_argv(opts, state)
    assert value(secure, "--database") == str(state.database)  # survives a restart
    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert value(secure, "--ssl-certfile") == str(certs.server_cert)
    memory = superlink_argv(
        ServerOptions(resolve({}), "::1", 1, state, None, memory_state=True), state
    )
    assert value(memory, "--database") == ":flwr-in-memory:"
    assert "--insecure" in memory and "--enable-supernode-auth" not in memory
