"""Secure aggregation on a real deployment: TLS server + three devices, two rounds, SecAgg+.

Every round's training is the four SecAgg+ exchanges (setup, share keys, masked vectors,
unmask) between the SuperLink and the devices' real ClientApp workers; the devices then
serve their round-2 global and personal models, and all hold the same global model.
"""

from __future__ import annotations

import json
import re

import pytest
from deployhelp import Deployment, predict, write_device_files
from sklearn.datasets import load_digits

from pollinate.client.store import ModelStore
from pollinate.deploy.proc import free_port
from pollinate.models import load_artifact

pytestmark = pytest.mark.slow


def test_secure_aggregation_tls_three_devices_two_rounds(deployment: Deployment, port: int) -> None:
    dep = deployment
    write_device_files(dep.root, 3)
    dep.make_certs()
    config = dep.write_config(
        "secagg",
        run={"name": "secagg", "num-rounds": 2},
        model={"name": "mlp", "in-features": 64, "num-classes": 10, "hidden": 32},
        strategy={"min-nodes": 3},
        server={"node-wait-timeout": 120.0, "round-timeout": 120.0},
        # Three shares per secret (every device), two rebuild one: a device may drop.
        privacy={"secure-aggregation": True, "secagg-reconstruction-threshold": 2},
    )
    keys = dep.register_keys(3)
    server = dep.start(*dep.server_argv(config, port), name="server")
    server.wait_for(r"listening on 127\.0\.0\.1:\d+ \(TLS, node authentication on\)", 60)
    server.wait_for(r"run \d+ 'secagg'", 60)  # every key is admitted by then
    serve_ports = [free_port() for _ in range(3)]
    nodes = dep.start_devices(port, keys, serve_ports)
    server.wait_for(r"run finished", 240)
    assert server.wait(30) == 0, server.output
    assert "round 2/2 | 3 users trained, 3 evaluated, 0 failed" in server.output
    assert "secure aggregation" not in server.output  # no dropout, no halt warnings

    rows = load_digits().data[:4].tolist()
    hashes = set()
    for i in range(3):
        store = ModelStore(dep.root / f"node{i}" / "models")
        for kind in ("global", "personal"):
            body = predict(serve_ports[i], kind, rows, want_round=2)
            stored = load_artifact(store.path(f"user{i}", kind))
            assert stored.round == 2
            assert body["version"]["hash"] == stored.content_hash
            assert len(body["predictions"]) == 4
        hashes.add(load_artifact(store.path(f"user{i}", "global")).content_hash)
    assert len(hashes) == 1  # one aggregate, the same on every device

    metrics = dep.cli("metrics", str(dep.root / "run"), "--format", "json")
    assert metrics.returncode == 0, metrics.stderr
    rounds = json.loads(metrics.stdout)
    assert [r["train_users"] for r in rounds[1:]] == [3, 3]
    assert all(r["global_accuracy"] > 0 for r in rounds[1:])  # the devices' own test splits
    # No device's quantization clipped (the defaults fit a small MLP's updates).
    for node in nodes:
        assert not re.search(r"secure aggregation: .* clips", node.output), node.output
        assert node.stop() == 0, node.output
