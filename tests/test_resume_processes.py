"""`pollinate run` as real processes: kill -9 and resume, Ctrl-C, two runs on one folder,
a run in which every user fails. Run folders: what is refused, what is never deleted."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pollinate.cli import main
from pollinate.models import load_artifact
from pollinate.server import rundir, runlock
from pollinate.server.metrics import read_clients, read_rounds, read_run_info

ROOT = Path(__file__).resolve().parents[1]
POLLINATE = [sys.executable, "-m", "pollinate"]
MEASURED = ["round_seconds", "finished_at", "bytes_sent"]
# Small and quick, with every kind of state a resume must restore: FedAdam's moments,
# sampled users (fraction < 1), Ditto's personal models in the store.
RESUME_TOML = """
[run]
name = "resume"
num-rounds = 5
[data]
num-users = 6
alpha = 1.0
[model]
name = "mlp"
hidden = 16
[train]
batch-size = 16
[strategy]
name = "fedadam"
fraction-train = 0.7
fraction-evaluate = 0.7
[personalization]
method = "ditto"
[simulation]
num-nodes = 2
"""


@pytest.fixture(scope="module")
def resume_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "resume.toml"
    path.write_text(RESUME_TOML)
    return path


def start(*argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*POLLINATE, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # a signal for it reaches only it (and its workers)
    )


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err


def rounds_done(run_dir: Path) -> int:
    """Rows in metrics.db's rounds table (round 0 included); 0 before it exists."""
    try:
        with sqlite3.connect(f"file:{run_dir / 'metrics.db'}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
    except sqlite3.Error:
        return 0


def wait_for_rows(proc: subprocess.Popen[str], run_dir: Path, rows: int) -> None:
    deadline = time.monotonic() + 240
    while rounds_done(run_dir) < rows:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(resume_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    code, _out, err = finish(start("run", str(resume_config), "--run-dir", str(run_dir)))
    assert code == 0, err
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_at_a_random_round_then_resume_equals_an_uninterrupted_run(
    resume_config: Path, reference: Path, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    rows, delay = rng.randint(1, 5), rng.uniform(0, 0.3)  # mid-round, not just after a row
    run_dir = tmp_path / "run"
    proc = start("run", str(resume_config), "--run-dir", str(run_dir))
    wait_for_rows(proc, run_dir, rows)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    info = read_run_info(run_dir)
    if info["status"] != "finished":  # the kill may come after the last round
        assert info["status"] == "interrupted"  # never "running": the lock holder is dead
    code, _out, err = finish(start("run", "--resume", str(run_dir)))
    assert code == 0, err
    a = load_artifact(reference / "models" / "global.pt").state_dict
    b = load_artifact(run_dir / "models" / "global.pt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        read_rounds(reference)
        .drop(columns=MEASURED)
        .equals(read_rounds(run_dir).drop(columns=MEASURED))
    )
    assert read_clients(reference).equals(read_clients(run_dir))
    for user_dir in (reference / "users").iterdir():
        for kind in ("global", "personal"):
            if (user_dir / f"{kind}.pt").exists():
                mine = load_artifact(run_dir / "users" / user_dir.name / f"{kind}.pt")
                assert mine.content_hash == load_artifact(user_dir / f"{kind}.pt").content_hash
    assert read_run_info(run_dir)["status"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_record_interrupted_and_exit_cleanly(
    resume_config: Path, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    run_dir = tmp_path / "run"
    proc = start("run", str(resume_config), "--run-dir", str(run_dir))
    wait_for_rows(proc, run_dir, 3)
    os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: the whole process group
    returncode, out, err = finish(proc)
    assert returncode == code
    assert "Traceback" not in err and "list.remove" not in err, err
    assert f"pollinate run --resume {run_dir}" in out
    info = read_run_info(run_dir)
    assert info["status"] == "interrupted" and sig.name in info["error"]
    # Nothing past the checkpoint was recorded as a round cut short by the shutdown.
    assert (read_rounds(run_dir)["failures"] == 0).all()


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_goes_on(
    resume_config: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    long = ("--set", "run.num-rounds=60")  # still running when the second one checks
    first = start("run", str(resume_config), "--run-dir", str(run_dir), *long)
    wait_for_rows(first, run_dir, 1)
    code, _out, err = finish(start("run", str(resume_config), "--run-dir", str(run_dir), *long))
    assert first.poll() is None, "the first run ended before the second one was refused"
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and f"pid {first.pid}" in err, err
    assert finish(first)[0] == 0
    assert read_rounds(run_dir)["round"].tolist() == list(range(61))
    assert (read_rounds(run_dir)["failures"] == 0).all()
    assert read_run_info(run_dir)["status"] == "finished"


@pytest.mark.slow
def test_every_user_failing_every_round_is_a_failed_run(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"  # the store cannot be made: every ClientApp call fails
    blocker.write_text("not a folder")
    code, _out, err = finish(
        start(
            "run",
            str(ROOT / "configs" / "quickstart.toml"),
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            "data.num-users=3",
            "--set",
            "run.num-rounds=2",
            "--set",
            "model.name=logreg",
            "--set",
            "personalization.method=ditto",
            "--set",
            f"store.dir={json.dumps(str(blocker / 'store'))}",
        )
    )
    assert code == 1
    # The last line is the run's one-line reason (above it: Flower's log of each failure).
    last = err.strip().splitlines()[-1]
    # The first round in which every node failed already fails the run (RoundFailed); a
    # run whose rounds each had some node answer but no user train ends as RunFailed.
    assert last.startswith(
        (
            "error: the run failed: RoundFailed: round 1: all ",
            "error: the run failed: RunFailed: every user failed in every round",
        )
    ), last
    assert "Not a directory" in last
    info = read_run_info(tmp_path / "run")
    assert info["status"] == "failed"
    assert "every user failed" in info["error"] or "node(s) asked to train failed" in info["error"]


# ------------------------------------------------------------ run folders, fast


def holder_process(run_dir: Path) -> subprocess.Popen[str]:
    """Another process holding ``run_dir``'s lock, as a running run does."""
    code = (
        "import sys, pathlib; from pollinate.server import runlock; "
        f"runlock.acquire(pathlib.Path({str(run_dir)!r})); print('held', flush=True); "
        "sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_held_folder_is_refused_naming_the_holder_and_free_once_it_dies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    proc = holder_process(run_dir)
    try:
        assert (
            main(["run", str(ROOT / "configs" / "quickstart.toml"), "--run-dir", str(run_dir)]) == 2
        )
        err = capsys.readouterr().err
        assert f"pid {proc.pid}" in err and "in use by another run" in err
        holder = runlock.holder(run_dir)
        assert holder is not None and holder["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    assert runlock.holder(run_dir) is None  # the kernel dropped the lock with the process


def test_running_with_a_dead_holder_reads_interrupted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pollinate.server.metrics import MetricsRecorder

    run_dir = tmp_path / "run"
    proc = holder_process(run_dir)
    recorder = MetricsRecorder(run_dir)
    recorder.start(config_toml="", num_rounds=3)
    recorder.close()
    assert read_run_info(run_dir)["status"] == "running"  # its holder is alive
    proc.kill()  # as kill -9: it writes nothing more
    proc.wait()
    assert read_run_info(run_dir)["status"] == "interrupted"
    assert main(["metrics", str(run_dir)]) == 0
    assert "run interrupted; continue with: pollinate run --resume" in capsys.readouterr().err


def test_foreign_files_refuse_a_run_and_overwrite_keeps_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "mine"
    (run_dir / "models").mkdir(parents=True)
    (run_dir / "models" / "global.pt").write_text("my own model, not Pollinate's")
    (run_dir / "notes.txt").write_text("keep me")
    with pytest.raises(rundir.RunDirError, match=r"did not write \(models/global.pt, notes.txt\)"):
        rundir.prepare(run_dir, resume=False, overwrite=False)
    rundir.record(run_dir, "config.toml", "users/")
    (run_dir / "config.toml").write_text("x")
    (run_dir / "users" / "u1").mkdir(parents=True)
    (run_dir / "users" / ".pollinate-manifest").write_text("u1\n../../outside\n")
    (run_dir / "users" / "u1" / "personal.pt").write_text("pollinate's")
    (run_dir / "users" / "u1" / "diary.txt").write_text("a user's")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "global.pt").write_text("far away")
    rundir.prepare(run_dir, resume=False, overwrite=True)
    assert (
        not (run_dir / "config.toml").exists() and not (run_dir / "users/u1/personal.pt").exists()
    )
    for kept in ("models/global.pt", "notes.txt", "users/u1/diary.txt"):
        assert (run_dir / kept).exists(), kept
    assert (outside / "global.pt").exists()  # a manifest never reaches out of the folder


def test_run_name_cannot_leave_runs(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("../../x", "/etc/x", "a/b", ".."):
        argv = [
            "run",
            str(ROOT / "configs" / "quickstart.toml"),
            "--set",
            f"run.name={json.dumps(name)}",
        ]
        assert main(argv) == 2
        assert "must be a plain folder name" in capsys.readouterr().err


def test_resume_needs_a_run_folder_and_keeps_its_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    (tmp_path / "config.toml").write_text("")
    assert main(["run", "--resume", str(tmp_path), "--set", "train.lr=0.3"]) == 2
    assert "keeps its config" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_server_start_checks_the_run_folder_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "deploy.toml"
    config.write_text("[model]\nin-features = 64\nnum-classes = 10\n")
    base = ["server", "start", "--insecure", "--state-dir", str(tmp_path / "state")]
    assert main([*base, "--resume"]) == 2
    assert "no earlier run to resume" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert main([*base, "--config", str(config), "--resume", "--run-dir", str(run_dir)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    (run_dir / "notes.txt").write_text("mine")
    assert main([*base, "--config", str(config), "--run-dir", str(run_dir)]) == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err
