"""Process lifecycle with real (tiny) processes: nothing outlives a killed supervisor, and
a restart finds the dead predecessor's lock free and its leftovers gone. Fast."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pollinate.deploy.certs import DeployError
from pollinate.deploy.proc import SUPERVISOR_ENV, alive, start_time
from pollinate.deploy.state import instance_running, record_children, single_instance

SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def read_pids(path: Path, count: int) -> list[int]:
    assert wait_until(lambda: path.is_file() and len(path.read_text().split()) >= count)
    return [int(p) for p in path.read_text().split()]


def test_a_guarded_child_takes_its_detached_subtree_along_when_the_supervisor_is_killed(
    tmp_path: Path,
) -> None:
    # supervisor -> guarded child -> grandchild in its own session (like flwr-serverapp)
    pids = tmp_path / "pids"
    child = (
        "import os, subprocess, sys, time\n"
        "from pollinate.deploy.proc import guard_tree\n"
        "guard_tree()\n"
        f"g = subprocess.Popen({SLEEP!r}, start_new_session=True)\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}')\n"
        "time.sleep(120)\n"
    )
    supervisor = (
        "import os, subprocess, sys, time\n"
        f"env = dict(os.environ, {SUPERVISOR_ENV}=str(os.getpid()))\n"
        "subprocess.Popen([sys.executable, '-c', sys.argv[1]], env=env)\n"
        "time.sleep(120)\n"
    )
    sup = subprocess.Popen([sys.executable, "-c", supervisor, child])
    try:
        guarded, grandchild = read_pids(pids, 2)
        assert alive(guarded) and alive(grandchild)
        sup.kill()  # SIGKILL: the supervisor cannot clean up
        sup.wait()
        assert wait_until(lambda: not alive(guarded) and not alive(grandchild), 3.0)
    finally:
        sup.kill()
        for pid in read_pids(pids, 2):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_child_whose_supervisor_died_before_it_looked_exits_at_once() -> None:
    script = "from pollinate.deploy.proc import guard_tree; guard_tree(); print('survived')"
    env = dict(os.environ, **{SUPERVISOR_ENV: "1"})  # pid 1 is not its parent
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == -signal.SIGKILL and "survived" not in out.stdout


HOLDER = (
    "import subprocess, sys, time\n"
    "from pathlib import Path\n"
    "from pollinate.deploy.proc import start_time\n"
    "from pollinate.deploy.state import record_children, single_instance\n"
    "info = Path(sys.argv[1])\n"
    "with single_instance(info, 'server'):\n"
    f"    child = subprocess.Popen({SLEEP!r}, start_new_session=True)\n"
    "    record_children(info, [(child.pid, start_time(child.pid))])\n"
    "    print(child.pid, flush=True)\n"
    "    time.sleep(120)\n"
)


def test_the_lock_refuses_a_second_instance_and_frees_with_a_killed_holder(
    tmp_path: Path,
) -> None:
    info = tmp_path / "server.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(info)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    leftover = int(holder.stdout.readline())
    # A process that merely reuses a recorded pid (different start time) is never hit.
    bystander = subprocess.Popen(SLEEP)
    try:
        assert instance_running(info)
        with (
            pytest.raises(DeployError, match=rf"another server is running .*\(pid {holder.pid}\)"),
            single_instance(info, "server"),
        ):
            pass
        record_children(
            info, [(leftover, start_time(leftover)), (bystander.pid, start_time(os.getpid()))]
        )
        holder.kill()  # SIGKILL: no clean exit, its child survives it
        holder.wait()
        assert alive(leftover) and not instance_running(info)
        with single_instance(info, "server") as previous:
            assert previous["clean_exit"] is False and previous["pid"] == holder.pid
            assert previous["leftovers"] == 1
            assert not alive(leftover) and alive(bystander.pid)
            assert instance_running(info)
        assert not instance_running(info)
        with single_instance(info, "server") as previous:
            assert previous["clean_exit"] is True and "leftovers" not in previous
    finally:
        bystander.kill()
        holder.kill()
        if alive(leftover):
            os.kill(leftover, signal.SIGKILL)
