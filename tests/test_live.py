"""A run in progress: `metrics --follow` and the live display on a terminal.

The run (on a pseudo-terminal) and the follower are real processes; the follower starts
before the run has written anything, and must print each round while the run goes on and
stop when it ends. Plain lines off a terminal: tests/server/test_server_tracking.py.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from pollinate.cli import main
from pollinate.server.metrics import MetricsRecorder, read_rounds

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")
ROUNDS = 4
SETS = [
    "data.num-users=4",
    f"run.num-rounds={ROUNDS}",
    "model.name=mlp",
    "train.epochs=2",
    "personalization.finetune-epochs=1",
]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}

# The run, driven through the CLI's main() so the same process can report what it imported.
RUN_SCRIPT = """
import json, sys
from pollinate.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "mlflow")
                or m.startswith("torch.utils.tensorboard"))
print(json.dumps({"code": code, "loaded": loaded}), flush=True)
"""


class Lines:
    """A process's output lines with the time each arrived."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in iter(stream.readline, ""):
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> list[str]:
        self.thread.join(10)
        return [line for _, line in self.lines]


def run_argv(run_dir: Path) -> list[str]:
    argv = ["run", QUICKSTART, "--run-dir", str(run_dir)]
    for s in SETS:
        argv += ["--set", s]
    return argv


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


@dataclass
class Followed:
    run_dir: Path
    run_code: int | None
    raw: str  # what the run wrote to its terminal, escape codes and all
    text: str  # the same without escape codes
    printed_at: dict[int, float]  # when the run's own line for each round appeared
    run_ended: float
    follow_out: Lines
    follow_err: list[str]
    follow_code: int | None
    follow_ended: float


def read_terminal(
    master: int, proc: subprocess.Popen[bytes], printed_at: dict[int, float]
) -> list[bytes]:
    """Everything the process writes to its terminal, noting when each round line shows."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break  # it exited and said all (its forked workers may hold the tty longer)
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
        text = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
        for m in re.finditer(r"round\s+(\d+) \| server acc", text):
            printed_at.setdefault(int(m.group(1)), time.monotonic())
    return chunks


@pytest.fixture(scope="module")
def followed(tmp_path_factory: pytest.TempPathFactory) -> Followed:
    """A run on a terminal (a pty), followed from another process started before it."""
    import fcntl
    import struct
    import termios

    run_dir = tmp_path_factory.mktemp("live") / "run"
    follow = subprocess.Popen(
        [sys.executable, "-m", "pollinate", "metrics", str(run_dir), "--follow", "--format", "csv"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert follow.stdout is not None and follow.stderr is not None
    follow_out, follow_err = Lines(follow.stdout), Lines(follow.stderr)
    time.sleep(0.5)  # the follower is waiting for a metrics.db that does not exist yet
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    run = subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, *run_argv(run_dir)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={k: v for k, v in ENV.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")},
        close_fds=True,
    )
    os.close(slave)
    printed_at: dict[int, float] = {}
    try:
        chunks = read_terminal(master, run, printed_at)
        run.wait(60)
        run_ended = time.monotonic()
        follow.wait(60)
        follow_ended = time.monotonic()
    finally:
        os.close(master)
        for proc in (run, follow):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    raw = b"".join(chunks).decode(errors="replace")
    return Followed(
        run_dir,
        run.returncode,
        raw,
        ANSI.sub("", raw),
        printed_at,
        run_ended,
        follow_out,
        follow_err.text(),
        follow.returncode,
        follow_ended,
    )


def test_follow_prints_each_round_as_it_lands_and_exits_with_the_run(followed: Followed) -> None:
    lines = followed.follow_out.text()
    assert lines[0].split(",")[:2] == ["round", "server_loss"]
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == list(range(ROUNDS + 1))
    # Each row is what the run wrote ...
    stored = read_rounds(followed.run_dir)
    assert [float(r[5]) for r in rows[1:]] == pytest.approx(stored["global_accuracy"][1:].tolist())
    # ... and it came while the run was going: within a few polls of the run's own line.
    followed_at = [t for t, _ in followed.follow_out.lines[1:]]
    for r, t in enumerate(followed_at):
        assert t - followed.printed_at[r] < 5.0, (r, t - followed.printed_at[r])
    assert followed_at[0] < followed.run_ended
    # It stops by itself once the run is no longer running.
    assert followed.follow_code == 0
    assert followed.follow_ended - followed.run_ended < 10
    err = followed.follow_err
    assert any("waiting for" in line for line in err) and err[-1] == "run finished"


def test_on_a_terminal_the_run_shows_live_progress_and_ends_cleanly(followed: Followed) -> None:
    raw, text = followed.raw, followed.text
    assert followed.run_code == 0, text[-3000:]
    assert "\x1b[?25l" in raw and raw.rfind("\x1b[?25h") > raw.rfind("\x1b[?25l")  # cursor back
    bars = re.findall(r"round (\d+)/(\d+)", text)
    assert (str(ROUNDS), str(ROUNDS)) in bars and ("1", str(ROUNDS)) in bars
    assert re.search(r"ETA \d+:\d\d", text)
    assert "4 users trained" in text and "global 0." in text and "personal 0." in text
    assert sorted(followed.printed_at) == list(range(ROUNDS + 1))  # lines scroll above the bar
    assert "final round 4" in text.split(f"round {ROUNDS}/{ROUNDS}")[-1]  # summary after it
    # [tracking] is off: the run's process never imported TensorBoard or MLflow.
    assert json.loads(text.strip().splitlines()[-1]) == {"code": 0, "loaded": []}


def test_follow_gives_up_when_the_writer_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real writer process that dies mid-run: its status stays 'running'.
    script = (
        "import os, sys\n"
        "from pollinate.server.metrics import MetricsRecorder\n"
        "r = MetricsRecorder(sys.argv[1]); r.start(config_toml='', num_rounds=5)\n"
        "r.end_round(0, {'loss': 1.0, 'accuracy': 0.5}); os._exit(9)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False, timeout=60)
    code = main(["metrics", str(tmp_path), "--follow", "--columns", "round,server_accuracy"])
    out, err = capsys.readouterr()
    assert code == 1
    assert [line.split() for line in out.splitlines()] == [
        ["round", "server_accuracy"],
        ["0", "0.5000"],
    ]
    assert err.count("\n") == 1 and "process is gone" in err and "'running'" in err


def test_follow_of_a_finished_run_prints_it_and_exits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder = MetricsRecorder(tmp_path)
    recorder.start(config_toml="", num_rounds=1)
    recorder.end_round(0)
    recorder.end_round(1)
    recorder.finish("failed", error="boom")
    recorder.close()
    code = main(["metrics", str(tmp_path), "--follow", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 1  # the run did not finish
    assert [json.loads(line)["round"] for line in out.splitlines()] == [0, 1]
    assert err.strip() == "run failed: boom"
