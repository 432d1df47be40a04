"""The report of a real deployment (insecure loopback server, two devices, two rounds),
opened in Chromium: it renders, and says the data split was not recorded (the server
has no data and the devices do not send their label counts)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from deployhelp import Deployment, write_device_files

from pollinate.server.datasplit import DATA_SPLIT_NAME, NOT_RECORDED_DEPLOYMENT
from pollinate.server.report import write_report

pytestmark = pytest.mark.slow


def test_report_of_a_deployment_renders(
    deployment: Deployment, port: int, open_report: Callable[[Path], dict[str, Any]]
) -> None:
    dep = deployment
    write_device_files(dep.root, 2)
    config = dep.write_config(
        "deployed",
        run={"name": "deployed", "num-rounds": 2},
        model={"name": "mlp", "in-features": 64, "num-classes": 10, "hidden": 16},
        strategy={"min-nodes": 2},
        personalization={"method": "finetune"},
        server={"node-wait-timeout": 120.0, "round-timeout": 120.0},
    )
    server = dep.start(*dep.server_argv(config, port, "--insecure"), name="server")
    server.wait_for(r"run \d+ 'deployed'", 60)
    for i in range(2):
        dep.start(*dep.node_argv(i, port, key=None, serve=None), name=f"node{i}")
    server.wait_for(r"run finished", 180)
    assert server.wait(30) == 0, server.output

    run_dir = dep.root / "run"
    split = json.loads((run_dir / DATA_SPLIT_NAME).read_text())
    assert split == {"recorded": False, "reason": NOT_RECORDED_DEPLOYMENT}
    out = write_report([run_dir], dep.root / "report.html")
    page = out.read_text()
    assert NOT_RECORDED_DEPLOYMENT in page
    seen = open_report(out)
    assert seen["errors"] == []
    # No data split charts, no central test: the six run charts, all drawn.
    assert seen["charts"] == seen["rendered"] == 6
    assert "user-accuracy" in seen["sections"] and "gain" in seen["sections"]
