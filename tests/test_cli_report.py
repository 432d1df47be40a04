"""``pollinate report`` and ``pollinate data``: through the CLI, in this process."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from pollinate.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")
PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expect_bad_input(capsys: pytest.CaptureFixture[str], needle: str, *argv: str) -> None:
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


@pytest.fixture
def run_dir(report_runs: dict[str, Path]) -> Path:
    return report_runs["fedavg"]


# ------------------------------------------------------------------------------ data


def test_data_json_has_every_user_and_the_heterogeneity(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(capsys, "data", QUICKSTART, "--format", "json")
    assert code == 0
    body = json.loads(out)
    assert body["users"] == 20 and body["num_classes"] == 10
    assert body["dataset"].startswith("digits (dirichlet alpha=0.5")
    users = body["per_user"]
    assert [u["user"] for u in users] == [f"user-{k:04d}" for k in range(20)]
    # Every digit outside the central test set belongs to exactly one user.
    assert sum(u["samples"] for u in users) == 1797 - 359
    assert all(u["samples"] == u["train"] + u["test"] for u in users)
    assert body["mean_tv_distance"] == pytest.approx(sum(u["tv_distance"] for u in users) / 20)
    assert sum(body["global_distribution"]) == pytest.approx(1.0)
    # IID users are much closer to the whole than Dirichlet(0.5) ones.
    _, iid, _ = run_cli(
        capsys, "data", QUICKSTART, "--format", "json", "--set", "data.partitioner=iid"
    )
    assert json.loads(iid)["mean_tv_distance"] < body["mean_tv_distance"] / 2


def test_data_table_and_csv(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "data", QUICKSTART, "--set", "data.num-users=5")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("digits (dirichlet alpha=0.5, seed 0): 5 users")
    assert lines[1].startswith("label heterogeneity: mean total-variation distance")
    header = lines[3].split()
    assert header[:5] == ["user", "samples", "train", "test", "tv_distance"]
    assert header[5:] == [f"label_{c}" for c in range(10)]
    assert len(lines) == 4 + 5
    code, out, _ = run_cli(
        capsys, "data", QUICKSTART, "--set", "data.num-users=5", "--format", "csv"
    )
    table = pd.read_csv(io.StringIO(out))
    assert len(table) == 5 and table["samples"].sum() == 1797 - 359


def test_data_plot_and_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, _ = run_cli(capsys, "data", QUICKSTART, "--plot", str(tmp_path / "split.png"))
    assert code == 0 and (tmp_path / "split.png").read_bytes()[:8] == PNG
    expect_bad_input(capsys, "data.alpha", "data", QUICKSTART, "--set", "data.alpha=-1")
    expect_bad_input(capsys, "must end in .png", "data", QUICKSTART, "--plot", "x.txt")


# ---------------------------------------------------------------------------- report


def test_report_writes_into_the_run_folder(
    capsys: pytest.CaptureFixture[str], run_dir: Path, tmp_path: Path
) -> None:
    code, out, _ = run_cli(capsys, "report", str(run_dir))
    assert code == 0 and out.strip() == f"wrote {run_dir / 'report.html'}"
    assert '<section id="gain">' in (run_dir / "report.html").read_text()
    target = tmp_path / "sub" / "r.html"
    code, out, _ = run_cli(
        capsys, "report", str(run_dir), "-o", str(target), "--plot", str(tmp_path / "r.png")
    )
    assert code == 0 and target.is_file() and (tmp_path / "r.png").read_bytes()[:8] == PNG


def test_report_of_two_runs_goes_to_the_working_directory(
    capsys: pytest.CaptureFixture[str],
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_cli(capsys, "report", str(run_dir), str(run_dir))
    assert code == 0 and (tmp_path / "report.html").is_file()


def test_report_plot_only(
    capsys: pytest.CaptureFixture[str], run_dir: Path, tmp_path: Path
) -> None:
    code, _, _ = run_cli(capsys, "report", str(run_dir), "--plot", str(tmp_path / "p.png"))
    assert code == 0 and (tmp_path / "p.png").read_bytes()[:8] == PNG
    assert not list(tmp_path.glob("*.html"))


def test_report_on_a_missing_or_non_run_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    expect_bad_input(capsys, "does not exist", "report", str(tmp_path / "nope"))
    expect_bad_input(capsys, "metrics.db", "report", str(tmp_path))
    expect_bad_input(capsys, "metrics.db", "report", str(tmp_path), "--plot", "x.png")
    expect_bad_input(capsys, "must end in .png", "report", str(tmp_path), "--plot", "x.txt")
