"""Faults with real processes: a refused node, a TLS mismatch, too few nodes, a node that
crashes mid-round and comes back."""

from __future__ import annotations

import json
import re

import pytest
from deployhelp import Deployment, write_device_files

from pollinate.client.store import ModelStore
from pollinate.models import load_artifact

pytestmark = pytest.mark.slow

SMALL_MODEL = {"name": "mlp", "in-features": 64, "num-classes": 10, "hidden": 16}


def test_unregistered_key_and_insecure_node_are_refused_on_both_sides(
    deployment: Deployment, port: int
) -> None:
    dep = deployment
    write_device_files(dep.root, 2)
    dep.make_certs()
    rogue = dep.make_key("rogue")  # never registered
    config = dep.write_config("refuse", run={"name": "refuse", "num-rounds": 1}, model=SMALL_MODEL)
    server = dep.start(*dep.server_argv(config, port), name="server")
    server.wait_for(r"run \d+ 'refuse'", 60)

    node = dep.start(*dep.node_argv(0, port, key=rogue, serve=None), name="rogue")
    assert node.wait(60) == 2, node.output
    line = node.wait_for(
        r"error: the server at \S+ refused this node's key (SHA256:\S+): it is "
        r"not registered\. On the server run: pollinate server register-node "
        r"rogue\.pub",
        1,
    )
    fingerprint = line.group(1)
    server.wait_for(rf"refused a node with an unregistered key {re.escape(fingerprint)}", 10)

    plain = dep.start(*dep.node_argv(1, port, key=None, serve=None), name="plain")
    assert plain.wait(60) == 2, plain.output
    assert "uses TLS but this node was started with --insecure" in plain.output
    server.wait_for(r"refused a connection from 127\.0\.0\.1: it spoke plain HTTP", 10)
    assert "Traceback" not in node.output + plain.output

    assert server.stop() == 130
    assert "SIGTERM: stopping run" in server.output


def test_tls_node_against_insecure_server_is_refused(deployment: Deployment, port: int) -> None:
    dep = deployment
    write_device_files(dep.root, 1)
    dep.make_certs()
    key = dep.make_key("device0")
    config = dep.write_config("plain", run={"name": "plain", "num-rounds": 1}, model=SMALL_MODEL)
    server = dep.start(*dep.server_argv(config, port, "--insecure"), name="server")
    server.wait_for(r"WARNING: --insecure", 30)
    server.wait_for(r"listening on \S+ \(INSECURE\)", 60)
    node = dep.start(*dep.node_argv(0, port, key=key, serve=None), name="node")
    assert node.wait(60) == 2, node.output
    assert "does not use TLS (started with --insecure?)" in node.output
    assert server.stop() == 130


def test_too_few_nodes_ends_after_the_wait_timeout(deployment: Deployment, port: int) -> None:
    dep = deployment
    dep.make_certs()
    config = dep.write_config(
        "few",
        run={"name": "few", "num-rounds": 2},
        model=SMALL_MODEL,
        strategy={"min-nodes": 2},
        server={"node-wait-timeout": 8.0},
    )
    server = dep.start(*dep.server_argv(config, port), name="server")
    server.wait_for(r"run \d+ 'few'.*waiting up to 8 s for 2 node\(s\)", 60)

    status = dep.cli("server", "status", "--state-dir", str(dep.server_state), "--format", "json")
    live = json.loads(status.stdout)
    assert live["running"] is True and live["nodes"] == [] and live["min_nodes"] == 2

    assert server.wait(90) == 1, server.output
    expected = (
        "error: the run failed: only 0 of the 2 nodes required (strategy.min-nodes) connected "
        "within 8 s (server.node-wait-timeout); start more nodes or lower strategy.min-nodes"
    )
    assert expected in server.output

    after = dep.cli("server", "status", "--state-dir", str(dep.server_state))
    assert "not running" in after.stdout and "run:" in after.stdout and "failed" in after.stdout
    assert "only 0 of the 2 nodes required" in after.stdout
    metrics = dep.cli("metrics", str(dep.root / "run"))
    assert metrics.returncode == 0, metrics.stderr  # round 0 only, readable


def test_node_killed_mid_round_rejoins_as_itself_with_its_store(
    deployment: Deployment, port: int
) -> None:
    dep = deployment
    write_device_files(dep.root, 3)
    dep.make_certs()
    keys = dep.register_keys(3)
    config = dep.write_config(
        "crash",
        run={"name": "crash", "num-rounds": 4},
        model=SMALL_MODEL,
        strategy={"min-nodes": 3},
        server={"node-wait-timeout": 120.0, "round-timeout": 120.0},
    )
    server = dep.start(*dep.server_argv(config, port), name="server")
    server.wait_for(r"run \d+ 'crash'", 60)
    nodes = [
        dep.start(*dep.node_argv(i, port, key=keys[i], serve=None), name=f"node{i}")
        for i in range(3)
    ]
    victim = nodes[2]
    node_id = victim.wait_for(r"joined the federation as node (\d+)", 90).group(1)

    victim.wait_for(r"round 1 evaluate( \+ round 2 train)? done", 90)
    victim.crash()  # SIGKILL to every process of the device at once
    store = ModelStore(dep.root / "node2" / "models")
    for kind in ("global", "personal"):
        assert load_artifact(store.path("user2", kind)).round == 1  # intact, hash verified

    again = dep.start(*dep.node_argv(2, port, key=keys[2], serve=None), name="node2-again")
    again.wait_for(r"previous session ended without saying goodbye", 30)
    rejoined = again.wait_for(r"joined the federation as node (\d+)", 90).group(1)
    assert rejoined == node_id

    server.wait_for(r"run finished", 180)
    assert server.wait(30) == 0, server.output
    rounds = json.loads(dep.cli("metrics", str(dep.root / "run"), "--format", "json").stdout)
    # The crash hit the reply in flight (round 1's evaluation and, folded into it, round 2's
    # training) or the next message (round 2's evaluation and round 3's training): those
    # went on with the other two devices.
    hit = [r for r in rounds[1:4] if r["failures"] >= 1]
    assert hit and hit[0]["train_users"] + hit[0]["eval_users"] < 6, rounds
    assert (rounds[-1]["train_users"], rounds[-1]["eval_users"]) == (3, 3), rounds  # it is back
    for kind in ("global", "personal"):
        assert load_artifact(store.path("user2", kind)).round == 4
    for node in (nodes[0], nodes[1], again):
        assert node.stop() == 0
