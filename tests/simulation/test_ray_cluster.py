"""Attach to an existing Ray cluster (``simulation.ray-address``).

The test starts its own one-machine cluster with ``ray start --head`` and always stops it.
It stops it by its process group, not with ``ray stop --force``: ``ray stop`` kills every
Ray process of the user on the machine, including other runs' clusters.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simhelpers import small_config

from pollinate.server.metrics import read_rounds, read_run_info
from pollinate.simulation.engine import run_simulation

pytestmark = pytest.mark.slow  # `ray start` alone takes seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _live_processes(pgid: int, marker: str) -> list[str]:
    """Processes (zombies aside) still in the cluster's process group or naming its folder."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    live = []
    for line in out.splitlines():
        pid, group, stat, args = line.split(None, 3)
        if stat.startswith("Z") or int(pid) == os.getpid():
            continue
        if int(group) == pgid or marker in args:
            live.append(line.strip())
    return live


def _stop(pgid: int, marker: str) -> list[str]:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _live_processes(pgid, marker):
            time.sleep(0.2)
    return _live_processes(pgid, marker)


@pytest.fixture
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh ``ray start --head`` cluster (2 CPUs); yields its address."""
    port = _free_port()
    # Ray's socket paths must stay short: a short folder of our own under /tmp.
    temp_dir = Path(f"/tmp/pollinate-ray-{os.getpid()}-{port}")
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--temp-dir",
            str(temp_dir),
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # every process of the cluster is in this group
    )
    pgid = start.pid
    try:
        output, _ = start.communicate(timeout=180)
        assert start.returncode == 0, output
        yield f"127.0.0.1:{port}"
    finally:
        left = _stop(pgid, str(temp_dir))
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
        assert not left, f"Ray processes left running: {left}"


def test_simulation_attaches_to_an_existing_ray_cluster(ray_cluster: str, tmp_path: Path) -> None:
    cfg = small_config(
        tmp_path / "run",
        **{"simulation.ray-address": ray_cluster, "strategy.fraction-evaluate": 1.0},
    )
    run_dir = run_simulation(cfg)
    rounds = read_rounds(run_dir)
    assert rounds["round"].tolist() == [0, 1, 2]
    assert rounds["train_users"].tolist()[1:] == [6, 6]
    assert rounds["global_accuracy"].iloc[1:].between(0, 1).all()
    assert read_run_info(run_dir)["status"] == "finished"
    # This process was a driver of that cluster: the cluster logged it as one.
    port = ray_cluster.rsplit(":", 1)[1]
    logs = Path(f"/tmp/pollinate-ray-{os.getpid()}-{port}").glob("session_*/logs/*")
    assert any(
        p.name.startswith("python-core-driver-") and p.name.endswith(f"_{os.getpid()}.log")
        for p in logs
    )
