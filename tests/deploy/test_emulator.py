"""The device emulator against a real SuperLink (TLS + node authentication), and the
SuperLink's gated middleware chain."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from deployhelp import Deployment

import pollinate.flower_compat as fc
from pollinate.client.app import app as client_app
from pollinate.deploy.certs import create_certs
from pollinate.deploy.emulator import (
    STOCK,
    TUNED,
    Emulator,
    device_specs,
    register_devices,
    wait_until,
)
from pollinate.deploy.emulator_pool import EmulatorPool
from pollinate.deploy.proc import port_in_use
from pollinate.flower_compat import fleet, link_middleware


def start_superlink(dep: Deployment, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    """Pollinate's SuperLink launcher alone: TLS, node auth, state in memory."""
    certs = dep.root / "certs"
    create_certs(certs)
    home = dep.root / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "t"\n[superlink.t]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n'
    )
    argv = [
        sys.executable, "-m", "pollinate.deploy.superlink", "--host", "127.0.0.1",
        "--port", str(port), "--database", ":flwr-in-memory:",
        "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
    ]  # fmt: skip
    log = (dep.root / "superlink.txt").open("wb")
    env = {**dep.env, "PATH": f"{Path(sys.executable).parent}:{dep.env.get('PATH', '')}"}
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    assert wait_until(lambda: port_in_use("127.0.0.1", port), 60), "no SuperLink"
    return proc, home


def test_registered_keys_activate_and_an_unknown_key_is_refused(
    deployment: Deployment, port: int
) -> None:
    link, home = start_superlink(deployment, port)
    try:
        devices = device_specs(deployment.root / "fleet", 3, keys=True)
        assert register_devices(home, "t", devices[:2]) == 2  # the third is unknown
        ca = (deployment.root / "certs" / "ca.crt").read_bytes()
        emulator = Emulator(
            devices, f"127.0.0.1:{port}", client_app=client_app, root_certificates=ca
        )
        with emulator:
            assert wait_until(lambda: emulator.active == 2, 30)
            assert wait_until(lambda: emulator.stats.requests["PullMessages"] >= 4, 30)
            assert [d.node is not None for d in emulator.devices] == [True, True, False]
            assert emulator.stats.request_errors >= 1  # the refused activations
            ids = {d.node.node_id for d in emulator.devices[:2]}
            assert len(ids) == 2  # two identities, two nodes
    finally:
        link.send_signal(signal.SIGTERM)
        link.wait(30)


def test_poll_policies() -> None:
    # Stock: Flower's SuperNode sleeps 3 s after every empty pull and pulls at once after
    # a message; tuned: sleeps most of the last wait, then polls a share of the idle time.
    assert STOCK.idle_sleep(0.0) == STOCK.idle_sleep(100.0) == 3.0
    assert STOCK.first_sleep(20.0) == 0.0
    assert TUNED.first_sleep(10.0) == pytest.approx(8.0)
    assert TUNED.first_sleep(1e6) == TUNED.expect_max
    assert TUNED.idle_sleep(0.0) == TUNED.idle_min
    assert TUNED.idle_sleep(10.0) == pytest.approx(1.5)
    assert TUNED.idle_sleep(1e6) == TUNED.idle_max < 5.0  # under uvicorn's keep-alive


def test_tuned_requests_per_round_do_not_grow_with_the_round() -> None:
    # Polls and heartbeats in one idle wait of W s (after the 80% first sleep): with a
    # rhythm, about the same for a 10 s round as for a 600 s one; stock's grow with W.
    def requests(policy: Any, wait: float) -> float:
        t, polls = policy.first_sleep(wait), 1
        while t < wait:
            t += policy.idle_sleep(t, wait)
            polls += 1
        heartbeats = wait / (0.8 * (policy.heartbeat_interval(wait) - 5))
        return polls + heartbeats

    tuned = [requests(TUNED, w) for w in (10.0, 100.0, 600.0)]
    assert max(tuned) / min(tuned) < 1.5, tuned
    assert requests(STOCK, 600.0) > 10 * requests(STOCK, 10.0)
    assert STOCK.heartbeat_interval(600.0) == STOCK.heartbeat == 30
    assert 10 <= TUNED.heartbeat_interval(0.0) <= TUNED.heartbeat_interval(1e6) <= 1800


class _Spy:
    calls: ClassVar[list[str]] = []

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        _Spy.calls.append(scope["path"])
        await self.app(scope, receive, send)


def test_gate_runs_a_layer_only_for_its_paths() -> None:
    import asyncio

    seen: list[str] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["path"])

    gate = link_middleware._Gate(
        inner, layer=_Spy, applies=lambda s: s["path"].startswith(link_middleware.CONTROL)
    )
    _Spy.calls = []
    for path in ("/v1/fleet/pull-messages", "/v1/control/start-run", "/health"):
        asyncio.run(gate({"type": "http", "path": path}, None, None))
    assert seen == ["/v1/fleet/pull-messages", "/v1/control/start-run", "/health"]
    assert _Spy.calls == ["/v1/control/start-run"]


def test_gated_chain_keeps_every_layer_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.superlink.main as superlink_main

    monkeypatch.delenv("POLLINATE_STOCK_MIDDLEWARE", raising=False)
    stock_fn = superlink_main._get_middleware
    stock = stock_fn()
    with link_middleware.gated_link_middleware() as on:
        assert on
        gated = superlink_main._get_middleware()
        assert link_middleware.NAME in fc.active_patches()
    assert superlink_main._get_middleware is stock_fn  # undone
    assert len(gated) == len(stock)
    for s, g in zip(stock, gated, strict=True):
        assert g.kwargs.get("layer", g.cls) is s.cls
    # Each gated layer, Flower's error translator and protobuf translation (gated only to
    # run buffered).
    assert sum("layer" in g.kwargs for g in gated) == len(link_middleware.GATES) + 2


@pytest.mark.slow
def test_twelve_devices_in_two_emulator_processes_finish_five_rounds_with_tls_and_node_auth(
    deployment: Deployment, port: int
) -> None:
    n, rounds = 12, 5
    config = deployment.write_config(
        "scale",
        run={"name": "scale", "num-rounds": rounds},
        model={"name": "logreg", "in-features": 64, "num-classes": 10},
        strategy={"min-nodes": n},
        personalization={"method": "none"},
        server={"node-wait-timeout": 120.0, "round-timeout": 120.0},
    )
    deployment.make_certs()
    server = deployment.start(
        *deployment.server_argv(config, port, "--memory-state"), name="server"
    )
    server.wait_for(r"waiting up to", 90)
    devices = device_specs(deployment.root / "fleet", n, keys=True)
    assert register_devices(deployment.server_state / "flwr", "pollinate", devices) == n
    ca = (deployment.certs / "ca.crt").read_bytes()
    # Two emulator processes, six devices each (the pool the scale benchmark uses).
    emulator = EmulatorPool(
        devices,
        f"127.0.0.1:{port}",
        client_app="pollinate.client.app:app",
        root_certificates=ca,
        processes=2,
    )
    with emulator:
        assert server.wait(300) == 0, server.output
    assert [len(share) for share in emulator.shares] == [6, 6]
    assert emulator.stats.app_errors == 0
    # query + rounds x train (the evaluation rides along) + the last evaluation, per device
    assert emulator.stats.messages == n * (rounds + 2)
    with sqlite3.connect(deployment.root / "run" / "metrics.db") as db:
        rows = db.execute("SELECT round, train_users, eval_users FROM rounds ORDER BY round")
        trained = {r: t for r, t, _ in rows if r >= 1}
        users = {u for (u,) in db.execute("SELECT DISTINCT user FROM clients")}
    assert trained == dict.fromkeys(range(1, rounds + 1), n)
    assert users == {f"user{i}" for i in range(n)}  # every device's own data


def test_a_reused_signature_verifies_and_is_renewed(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import verify_signature

    key = ec.generate_private_key(ec.SECP384R1())
    auth = fleet.ReusedSignatureInterceptor(key, key.public_key(), reuse=60.0)
    clock = [1000.0]
    monkeypatch.setattr(fleet.time, "monotonic", lambda: clock[0])

    def signed() -> httpx.Headers:
        context = type("Ctx", (), {"request": httpx.Request("POST", "https://x/v1/fleet/p")})()
        auth.intercept(context, lambda c: None)
        return context.request.headers

    first, again = signed(), signed()
    clock[0] += 61.0
    renewed = signed()
    assert first == again  # within the minute: the same signed timestamp
    assert renewed["flwr-signature"] != first["flwr-signature"]
    for headers in (first, renewed):
        stamp, sig = headers["flwr-timestamp"], base64.b64decode(headers["flwr-signature"])
        assert verify_signature(key.public_key(), stamp.encode(), sig)
    with pytest.raises(ValueError, match="reuse"):
        fleet.ReusedSignatureInterceptor(key, key.public_key(), reuse=400.0)
