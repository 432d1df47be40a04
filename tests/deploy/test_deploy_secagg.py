"""Secure aggregation on a real deployment: TLS server + three devices, two rounds, SecAgg+.

Every round's training is the four SecAgg+ exchanges (setup, share keys, masked vectors,
unmask) between the SuperLink and the devices' real ClientApp workers; the devices then
serve their round-2 global and personal models, and all hold the same global model.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest
from deployhelp import Deployment, write_device_files
from sklearn.datasets import load_digits

from pollinate.client.store import ModelStore
from pollinate.deploy.proc import free_port
from pollinate.models import load_artifact

pytestmark = pytest.mark.slow


def test_secure_aggregation_tls_three_devices_two_rounds(deployment: Deployment, port: int) -> None:
    dep = deployment
    write_device_files(dep.root, 3)
    dep.make_certs()
    keys = [dep.make_key(f"device{i}") for i in range(3)]
    config = dep.write_config(
        "secagg",
        run={"name": "secagg", "num-rounds": 2},
        model={"name": "mlp", "in-features": 64, "num-classes": 10, "hidden": 32},
        strategy={"min-nodes": 3},
        server={"node-wait-timeout": 120.0, "round-timeout": 120.0},
        # Three shares per secret (every device), two rebuild one: a device may drop.
        privacy={"secure-aggregation": True, "secagg-reconstruction-threshold": 2},
    )
    for key in keys:
        out = subprocess.run(
            [sys.executable, "-m", "pollinate", "server", "register-node", f"{key}.pub",
             "--state-dir", str(dep.server_state)],
            env=dep.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
    server = dep.start(*dep.server_argv(config, port), name="server")
    server.wait_for(r"listening on 127\.0\.0\.1:\d+ \(TLS, node authentication on\)", 60)
    server.wait_for(r"run \d+ 'secagg'", 60)  # every key is admitted by then
    serve_ports = [free_port() for _ in range(3)]
    nodes = [
        dep.start(*dep.node_argv(i, port, key=keys[i], serve=serve_ports[i]), name=f"node{i}")
        for i in range(3)
    ]
    for node in nodes:
        node.wait_for(r"joined the federation as node \d+", 90)
    server.wait_for(r"run finished", 240)
    assert server.wait(30) == 0, server.output
    assert "round 2/2 | 3 users trained, 3 evaluated, 0 failed" in server.output
    assert "secure aggregation" not in server.output  # no dropout, no halt warnings

    rows = load_digits().data[:4].tolist()
    hashes = set()
    for i in range(3):
        store = ModelStore(dep.root / f"node{i}" / "models")
        for kind in ("global", "personal"):
            reply = httpx.post(
                f"http://127.0.0.1:{serve_ports[i]}/predict",
                json={"rows": rows, "model": kind},
                timeout=5,
            )
            body = reply.json()
            stored = load_artifact(store.path(f"user{i}", kind))
            assert reply.status_code == 200 and stored.round == 2, body
            if body["version"]["round"] == 2:  # hot-swapped already (within ~0.5 s)
                assert body["version"]["hash"] == stored.content_hash
            assert len(body["predictions"]) == 4
        hashes.add(load_artifact(store.path(f"user{i}", "global")).content_hash)
    assert len(hashes) == 1  # one aggregate, the same on every device

    metrics = subprocess.run(
        [sys.executable, "-m", "pollinate", "metrics", str(dep.root / "run"), "--format", "json"],
        env=dep.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    rounds = json.loads(metrics.stdout)
    assert [r["train_users"] for r in rounds[1:]] == [3, 3]
    assert all(r["global_accuracy"] > 0 for r in rounds[1:])  # the devices' own test splits
    # No device's quantization clipped (the defaults fit a small MLP's updates).
    for node in nodes:
        assert not re.search(r"secure aggregation: .* clips", node.output), node.output
        assert node.stop() == 0, node.output
