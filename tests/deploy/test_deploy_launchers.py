"""Pollinate's SuperLink and SuperNode launchers, as real processes: their patches engage.

What ``pollinate server start`` / ``node start`` learn from them comes from Pollinate's own
event lines (:mod:`pollinate.deploy.events`), which only the patched Flower functions
print: a line here proves that patch ran in the real process.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from deployhelp import TAG, Deployment

from pollinate.deploy import events
from pollinate.deploy.proc import Child, Supervisor, child_env, free_port, wait_for_port


def _event(child: Child, event: str, within: float) -> dict[str, str]:
    """The fields of the first ``event`` line ``child`` printed, waiting up to ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for line in list(child.tail):
            parsed = events.parse(line)
            if parsed is not None and parsed[0] == event:
                return parsed[1]
        time.sleep(0.1)
    raise AssertionError(f"no {event!r} from {child.name}: {list(child.tail)[-5:]}")


def _until(check: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow  # ~20 s: a SuperLink and a SuperNode start
def test_launchers_report_join_and_leave_and_wrap_the_superlink_app(
    deployment: Deployment, tmp_path: Path
) -> None:
    port, runtime_port = free_port(), free_port()
    env = child_env({TAG: deployment.env[TAG], "POLLINATE_REQUEST_STATS": "1"})
    superlink = [
        sys.executable, "-m", "pollinate.deploy.superlink", "--insecure",
        "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:",
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    supernode = [
        sys.executable, "-m", "pollinate.deploy.supernode", "--insecure",
        "--superlink", f"127.0.0.1:{port}", "--isolation", "process",
        "--host", "127.0.0.1", "--port", str(runtime_port),
    ]  # fmt: skip
    with Supervisor(tmp_path / "logs") as sup:
        link = sup.start("superlink", superlink, env=env)
        assert wait_for_port("127.0.0.1", port, 90, link.running), list(link.tail)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        # Counted by Pollinate's middleware: Flower built its app through the patch.
        stats = _event(link, "requests", 30)
        assert int(stats["total"]) >= 1 and "/health" in " ".join(link.tail)
        node = sup.start("supernode", supernode, env=env)
        joined = _event(node, events.NODE_JOINED, 90)["node_id"]
        assert _event(link, events.NODE_ACTIVATED, 10)["node_id"] == joined
        sup.stop_child(node)  # SIGTERM: Flower's SuperNode says goodbye
        assert _event(link, events.NODE_DEACTIVATED, 30)["node_id"] == joined
        # Flower's log lines are still in the log file, untouched, with timestamps.
        assert _until(lambda: "SuperNode ID" in (tmp_path / "logs/supernode.log").read_text(), 5)
