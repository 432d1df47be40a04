"""Faults with real processes: the server killed with SIGKILL and restarted, a device killed
mid-round and restarted, every device lost. Short timeouts keep each test under a minute
or two on 2 cores."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from typing import Any

import pytest
from deployhelp import TAG, Deployment, Proc, command_line, tagged_pids, write_device_files

pytestmark = pytest.mark.slow

SMALL_MODEL = {"name": "mlp", "in-features": 64, "num-classes": 10, "hidden": 16}
# Everything `pollinate server start` runs; none may outlive it.
SERVER_SIDE = ("pollinate.deploy.superlink", "flower-superexec", "flwr-serverapp", "server start")


def server_side_pids(dep: Deployment) -> list[str]:
    """Command lines of the live processes of this test that belong to a server."""
    found = []
    for pid in tagged_pids(dep.env[TAG]):
        cmdline = command_line(pid)
        if any(name in cmdline for name in SERVER_SIDE):
            found.append(f"{pid}: {cmdline[:100]}")
    return found


def rounds_of(dep: Deployment) -> list[dict[str, Any]]:
    out = dep.cli("metrics", str(dep.root / "run"), "--format", "json")
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


# The restarted server's command line: a fresh run of the same experiment in the same
# folder (which holds the killed run, so it needs --overwrite), or the killed run resumed
# from its last checkpoint. Every assertion below holds for both (same devices, same final
# round, nothing left running).
RESTARTS = [
    pytest.param(("--overwrite",), id="fresh"),
    pytest.param(("--resume",), id="resume"),
]


@pytest.mark.parametrize("restart_args", RESTARTS)
def test_a_server_killed_with_sigkill_leaves_nothing_and_gets_its_devices_back(
    deployment: Deployment, port: int, restart_args: tuple[str, ...]
) -> None:
    dep = deployment
    write_device_files(dep.root, 2)
    dep.make_certs()
    keys = dep.register_keys(2)
    config = dep.write_config(
        "restart",
        run={"name": "restart", "num-rounds": 6},
        model=SMALL_MODEL,
        strategy={"min-nodes": 2},
        server={"node-wait-timeout": 90.0, "round-timeout": 60.0},
    )
    server = dep.start(*dep.server_argv(config, port), name="server")
    server.wait_for(r"run \d+ 'restart'", 60)
    nodes = [
        dep.start(*dep.node_argv(i, port, key=keys[i], serve=None), name=f"node{i}")
        for i in range(2)
    ]
    server.wait_for(r"round 1/6", 120)
    # The server prints a round when its watcher next reads the metrics file, so on a
    # loaded machine it can be several rounds further on; with the devices stopped it
    # cannot finish the run before the kill lands (CI saw "finished, round 4/4" once).
    for node in nodes:
        node.pause()

    os.kill(server.popen.pid, signal.SIGKILL)  # no chance to clean up
    server.popen.wait(10)
    killed_at = time.monotonic()
    while (left := server_side_pids(dep)) and time.monotonic() - killed_at < 5:
        time.sleep(0.1)
    assert not left, f"outlived `server start` by 5 s: {left}"
    status = dep.cli("server", "status", "--state-dir", str(dep.server_state))
    assert "not running" in status.stdout and "interrupted" in status.stdout, status.stdout
    for node in nodes:
        node.resume()

    again = dep.start(*dep.server_argv(config, port, *restart_args), name="server-again")
    assert again.wait(180) == 0, again.output
    assert re.search(r"previous server \(pid \d+\) ended without cleaning up", again.output)
    assert "run finished" in again.output
    rounds = rounds_of(dep)
    assert rounds[-1]["round"] == 6
    assert [r["round"] for r in rounds] == list(range(rounds[0]["round"], 7)), rounds
    assert (rounds[-1]["train_users"], rounds[-1]["eval_users"]) == (2, 2), rounds
    for node in nodes:  # the same device processes answered: none was restarted
        assert node.popen.poll() is None, node.output
        assert len(re.findall("joined the federation", node.output)) == 1, node.output
        assert node.stop() == 0


def test_a_device_killed_mid_round_rejoins_as_a_new_node_and_is_sampled_again(
    deployment: Deployment, port: int
) -> None:
    # --insecure devices are a new node (a fresh key) each time they start, so the
    # server must move the user to the new node id.
    dep = deployment
    write_device_files(dep.root, 2)
    config = dep.write_config(
        "rejoin",
        run={"name": "rejoin", "num-rounds": 4},
        model=SMALL_MODEL,
        strategy={"min-nodes": 2},
        server={"node-wait-timeout": 90.0, "round-timeout": 60.0},
    )
    server = dep.start(*dep.server_argv(config, port, "--insecure"), name="server")
    server.wait_for(r"run \d+ 'rejoin'", 60)
    steady = dep.start(*dep.node_argv(0, port, key=None, serve=None), name="node0")
    victim = dep.start(*dep.node_argv(1, port, key=None, serve=None), name="node1")
    old_id = victim.wait_for(r"joined the federation as node (\d+)", 90).group(1)
    victim.wait_for(r"round 1 evaluate \+ round 2 train done", 90)
    victim.crash()  # SIGKILL to every process of the device at once

    again = dep.start(*dep.node_argv(1, port, key=None, serve=None), name="node1-again")
    new_id = again.wait_for(r"joined the federation as node (\d+)", 90).group(1)
    assert new_id != old_id
    assert server.wait(240) == 0, server.output
    rounds = rounds_of(dep)
    assert any(int(r["failures"]) >= 1 for r in rounds[1:4]), rounds  # the crash hit a round
    # Later rounds sample the restarted device's user again, under its new node id.
    assert (rounds[-1]["train_users"], rounds[-1]["eval_users"]) == (2, 2), rounds
    assert re.search(r"round 4 (train|evaluate) done", again.output), again.output
    for node in (steady, again):
        assert node.stop() == 0


def test_losing_every_device_fails_the_run_with_the_reason(
    deployment: Deployment, port: int
) -> None:
    dep = deployment
    write_device_files(dep.root, 2)
    config = dep.write_config(
        "lost",
        run={"name": "lost", "num-rounds": 50},
        model=SMALL_MODEL,
        strategy={"min-nodes": 2},
        server={"node-wait-timeout": 8.0, "round-timeout": 8.0},
    )
    server = dep.start(*dep.server_argv(config, port, "--insecure"), name="server")
    server.wait_for(r"run \d+ 'lost'", 60)
    nodes: list[Proc] = [
        dep.start(*dep.node_argv(i, port, key=None, serve=None), name=f"node{i}") for i in range(2)
    ]
    server.wait_for(r"round 1/50", 120)
    for node in nodes:
        node.crash()

    assert server.wait(90) == 1, server.output
    reason = server.wait_for(
        r"error: the run failed: (round \d+: all 2 node\(s\) asked to \w+ failed .*"
        r"|only 0 of the 2 nodes required .*)",
        1,
    ).group(1)
    assert "run finished" not in server.output
    status = dep.cli("server", "status", "--state-dir", str(dep.server_state))
    assert "failed" in status.stdout and reason.split(":")[0] in status.stdout, status.stdout
