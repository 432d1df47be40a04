"""A run in progress: `metrics --follow`, the live display on a terminal, plain lines off one.

The run and the follower are real processes; the follower starts before the run has
written anything, and must print each round while the run goes on and stop when it ends.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
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
    "train.epochs=10",
    "personalization.finetune-epochs=5",
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


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@dataclass
class Followed:
    run_dir: Path
    run_out: Lines
    run_ended: float
    follow_out: Lines
    follow_err: list[str]
    follow_code: int | None
    follow_ended: float


@pytest.fixture(scope="module")
def followed(tmp_path_factory: pytest.TempPathFactory) -> Followed:
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
    run = subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, *run_argv(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    assert run.stdout is not None
    run_out = Lines(run.stdout)
    try:
        run.wait(300)
        run_ended = time.monotonic()
        follow.wait(60)
        follow_ended = time.monotonic()
    finally:
        stop(run)
        stop(follow)
    return Followed(
        run_dir, run_out, run_ended, follow_out, follow_err.text(), follow.returncode, follow_ended
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
    printed_by_run = {
        int(m.group(1)): t
        for t, line in followed.run_out.lines
        if (m := re.match(r"round\s+(\d+) \|", line))
    }
    followed_at = [t for t, _ in followed.follow_out.lines[1:]]
    for r, t in enumerate(followed_at):
        assert t - printed_by_run[r] < 5.0, (r, t - printed_by_run[r])
    assert followed_at[0] < followed.run_ended
    # It stops by itself once the run is no longer running.
    assert followed.follow_code == 0
    assert followed.follow_ended - followed.run_ended < 10
    err = followed.follow_err
    assert any("waiting for" in line for line in err) and err[-1] == "run finished"


def test_off_a_terminal_the_run_prints_plain_lines_and_imports_no_tracker(
    followed: Followed,
) -> None:
    lines = followed.run_out.text()
    assert not any("\x1b" in line for line in lines)  # no escape codes in a pipe
    round_lines = [line for line in lines if re.match(r"round\s+\d+ \| server acc", line)]
    assert len(round_lines) == ROUNDS + 1
    assert json.loads(lines[-1]) == {"code": 0, "loaded": []}  # [tracking] off: not imported


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def test_on_a_terminal_the_run_shows_live_progress_and_ends_cleanly(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pollinate", *run_argv(tmp_path / "run")],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={k: v for k, v in ENV.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")},
        close_fds=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(60)
    finally:
        os.close(master)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    raw = b"".join(chunks).decode(errors="replace")
    text = ANSI.sub("", raw)
    assert code == 0, text[-3000:]
    assert "\x1b[?25l" in raw and raw.rfind("\x1b[?25h") > raw.rfind("\x1b[?25l")  # cursor back
    bars = re.findall(r"round (\d+)/(\d+)", text)
    assert (str(ROUNDS), str(ROUNDS)) in bars and ("1", str(ROUNDS)) in bars
    assert re.search(r"ETA \d+:\d\d", text)
    assert "4 users trained" in text and "global 0." in text and "personal 0." in text
    assert re.search(r"round\s+2 \| server acc", text)  # the round lines scroll above the bar
    assert "final round 4" in text.split(f"round {ROUNDS}/{ROUNDS}")[-1]  # summary after it


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
