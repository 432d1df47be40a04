"""Two ``start``s on one state folder at the same moment: exactly one wins."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

CONTENDER = """
import sys, time
from pathlib import Path
from pollinate.deploy.certs import DeployError
from pollinate.deploy.state import single_instance
info, go = Path(sys.argv[1]), Path(sys.argv[2])
Path(sys.argv[3]).touch()  # imported, ready
while not go.exists():  # all contenders start together
    time.sleep(0.001)
try:
    with single_instance(info, "server"):
        print("won", flush=True)
        time.sleep(1.5)  # hold it while the others try
except DeployError as err:
    print("refused:", err, flush=True)
"""


def test_concurrent_starts_cannot_both_win(tmp_path: Path) -> None:
    info, go = tmp_path / "server.json", tmp_path / "go"
    contenders = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(info), str(go), str(tmp_path / f"ready{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(4)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready*"))) < len(contenders):
            assert time.monotonic() < deadline, "the contenders did not start"
            time.sleep(0.01)
        go.touch()
        outputs = [c.communicate(timeout=60)[0] for c in contenders]
    finally:
        for c in contenders:
            c.kill()
    won = [out for out in outputs if out.startswith("won")]
    refused = [out for out in outputs if out.startswith("refused:")]
    assert len(won) == 1 and len(refused) == 3, outputs
    assert all("another server is running" in out for out in refused)
