"""The CLI: bad input is one line on stderr and exit 2, before any training starts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pollinate.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def users_csv(tmp_path: Path, rows: list[dict[str, object]], name: str = "users.csv") -> str:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def good_rows(users: int = 2, per_user: int = 6) -> list[dict[str, object]]:
    return [
        {"user": f"u{u}", "f1": float(i), "f2": float(u), "label": i % 2}
        for u in range(users)
        for i in range(per_user)
    ]


def expect_bad_input(capsys: pytest.CaptureFixture[str], needle: str, *argv: str) -> None:
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.dataset=mnist", "data.dataset"),
        ("data.partitioner=kmeans", "data.partitioner"),
        ("model.name=resnet", "model.name"),
        ("strategy.name=fedsgd", "strategy.name"),
        ("data.num-users=100000", "users"),
        ("trian.lr=0.1", "did you mean 'train.lr'"),
    ],
)
def test_bad_config_values(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, override: str, needle: str
) -> None:
    expect_bad_input(
        capsys, needle, "run", QUICKSTART, "--set", override, "--run-dir", str(tmp_path / "run")
    )
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    expect_bad_input(capsys, "does not exist", "run", str(tmp_path / "nope.toml"))


def file_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, path: str, needle: str, *extra: str
) -> None:
    expect_bad_input(
        capsys,
        needle,
        "run",
        QUICKSTART,
        "--set",
        "data.dataset=file",
        "--set",
        f'data.path="{path}"',
        *extra,
        "--run-dir",
        str(tmp_path / "r"),
    )


def test_missing_data_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    file_run(capsys, tmp_path, str(tmp_path / "none.csv"), "none.csv")


def test_missing_column(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "label"} for r in good_rows()]
    file_run(capsys, tmp_path, users_csv(tmp_path, rows), "label")


def test_non_numeric_feature(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rows = good_rows()
    rows[3]["f1"] = "seven"
    file_run(capsys, tmp_path, users_csv(tmp_path, rows), "f1")


def test_nan_label(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rows = good_rows()
    rows[2]["label"] = float("nan")
    file_run(capsys, tmp_path, users_csv(tmp_path, rows), "label")


def test_user_below_min_samples(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rows = [*good_rows(), {"user": "tiny", "f1": 0.0, "f2": 0.0, "label": 1}]
    file_run(capsys, tmp_path, users_csv(tmp_path, rows), "tiny")


def test_metrics_on_a_folder_that_is_no_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    expect_bad_input(capsys, "metrics.db", "metrics", str(tmp_path))
