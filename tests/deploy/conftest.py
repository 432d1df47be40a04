"""Real processes on loopback: a tagged environment and a check that none is left behind.

Every process a test starts inherits ``POLLINATE_TEST_TAG``; after the test, any process
still carrying the tag (however deep, however re-parented) fails the test and is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from deployhelp import TAG, Deployment, _describe, tagged_pids

from pollinate.deploy.proc import free_port


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    tag = uuid.uuid4().hex
    env = dict(os.environ)
    env.update(
        {
            TAG: tag,
            "POLLINATE_HOME": str(tmp_path / "home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    dep = Deployment(tmp_path, env)
    try:
        yield dep
    finally:
        for proc in reversed(dep.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
                proc.resume()  # a paused device would not act on its SIGTERM
        deadline = time.monotonic() + 30
        for proc in dep.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
        # Children notice their parent is gone within a second or two.
        leftovers = tagged_pids(tag)
        deadline = time.monotonic() + 10
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.3)
            leftovers = tagged_pids(tag)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes left behind: {_describe(leftovers)}"


@pytest.fixture
def port() -> int:
    return free_port()
