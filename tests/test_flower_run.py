"""The same app the Flower way: `flwr run . --run-config FILE.toml`, no runtime installs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pollinate.server.metrics import read_rounds, read_run_info

ROOT = Path(__file__).resolve().parents[1]
# The flwr CLI installed beside this interpreter (a venv's bin/ need not be on PATH).
FLWR = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")


def processes_mentioning(needle: str) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if needle in " ".join(proc.info["cmdline"] or []):
            pids.append(proc.pid)
    return pids


@pytest.mark.slow
@pytest.mark.skipif(FLWR is None, reason="flwr CLI not installed")
def test_flwr_run_with_a_run_config_file(tmp_path: Path) -> None:
    assert FLWR is not None
    flwr_home = tmp_path / "flwr-home"
    run_dir = tmp_path / "run"
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        f'[run]\nname = "via-flwr"\nnum-rounds = 2\ndir = "{run_dir}"\n'
        '[data]\nnum-users = 4\n[model]\nname = "mlp"\n'
    )
    env = {
        **os.environ,
        # flwr starts flower-superlink / flwr-simulation from PATH: use this venv's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    try:
        done = subprocess.run(
            [FLWR, "run", str(ROOT), "--run-config", str(cfg), "--stream"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        # --stream returns when the run ends; the ServerApp may still be closing the db.
        deadline = time.monotonic() + 30
        while read_run_info(run_dir).get("status") != "finished":
            assert time.monotonic() < deadline, read_run_info(run_dir)
            time.sleep(0.5)
        assert read_rounds(run_dir)["round"].tolist() == [0, 1, 2]
    finally:
        # `flwr run` leaves its local SuperLink running (Flower's design); stop ours.
        for pid in processes_mentioning(str(flwr_home)):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while processes_mentioning(str(flwr_home)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in processes_mentioning(str(flwr_home)):
            os.kill(pid, signal.SIGKILL)
    assert not processes_mentioning(str(flwr_home))
    # The project tree is untouched (flwr moves legacy federation tables out of pyproject).
    assert "[tool.flwr.app.components]" in (ROOT / "pyproject.toml").read_text()
