"""A real deployment on loopback: TLS + authenticated server, three devices, two rounds.

Each device then answers ``/predict`` from its round-2 global model and its own personal
model (the versions match the stored artifacts), and ``pollinate metrics`` shows both rounds.
"""

from __future__ import annotations

import json

import pytest
from deployhelp import Deployment, predict, write_device_files
from sklearn.datasets import load_digits

from pollinate.client.store import ModelStore
from pollinate.deploy.proc import free_port
from pollinate.models import load_artifact

pytestmark = pytest.mark.slow


def test_tls_server_three_devices_two_rounds(deployment: Deployment, port: int) -> None:
    dep = deployment
    files = write_device_files(dep.root, 3)
    dep.make_certs()
    keys = [dep.make_key(f"device{i}") for i in range(3)]
    config = dep.write_config(
        "e2e",
        run={"name": "e2e", "num-rounds": 2},
        model={"name": "mlp", "in-features": 64, "num-classes": 10, "hidden": 32},
        strategy={"min-nodes": 3},
        server={"node-wait-timeout": 120.0, "round-timeout": 120.0},
    )
    # Two keys admitted before the server runs, the third while it runs.
    for key in keys[:2]:
        out = dep.register(key)
        assert out.returncode == 0 and "registered when the server starts" in out.stdout
    server = dep.start(*dep.server_argv(config, port), name="server")
    server.wait_for(r"listening on 127\.0\.0\.1:\d+ \(TLS, node authentication on\)", 60)
    server.wait_for(r"run \d+ 'e2e'", 60)
    out = dep.register(keys[2])
    assert out.returncode == 0 and "as node" in out.stdout, out.stdout + out.stderr

    serve_ports = [free_port() for _ in range(3)]
    nodes = dep.start_devices(port, keys, serve_ports)

    server.wait_for(r"run finished", 180)
    assert server.wait(30) == 0, server.output
    assert "round 2/2 | 3 users trained, 3 evaluated, 0 failed" in server.output

    # Every device serves its round-2 global model and its own personal model.
    rows = load_digits().data[:4].tolist()
    for i, node in enumerate(nodes):
        store = ModelStore(dep.root / f"node{i}" / "models")
        assert store.users() == [f"user{i}"]
        for kind in ("global", "personal"):
            body = predict(serve_ports[i], kind, rows, want_round=2)
            stored = load_artifact(store.path(f"user{i}", kind))
            assert stored.round == 2
            assert body["version"] == {"round": 2, "hash": stored.content_hash}
            assert body["user"] == f"user{i}"
            assert len(body["predictions"]) == 4
        assert node.popen.poll() is None, node.output  # devices stay up between runs
    # All devices got the same global model; each has its own personal model.
    hashes = {
        load_artifact(
            ModelStore(dep.root / f"node{i}" / "models").path(f"user{i}", "global")
        ).content_hash
        for i in range(3)
    }
    assert len(hashes) == 1

    metrics = dep.cli("metrics", str(dep.root / "run"), "--format", "json")
    assert metrics.returncode == 0, metrics.stderr
    rounds = json.loads(metrics.stdout)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["train_users"] for r in rounds[1:]] == [3, 3]
    assert all(r["global_accuracy"] > 0 for r in rounds[1:])
    table = dep.cli("metrics", str(dep.root / "run"))
    assert table.returncode == 0 and "personal_accuracy" in table.stdout

    status = dep.cli("server", "status", "--state-dir", str(dep.server_state))
    assert "not running" in status.stdout and "finished, round 2/2" in status.stdout, status.stdout

    for node in nodes:
        assert node.stop() == 0, node.output
    assert files  # the devices' data never left them: only their paths were configured
