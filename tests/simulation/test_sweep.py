"""`pollinate sweep`: the grid checked before anything runs, then every run and one table."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pollinate.cli import main
from pollinate.server.metrics import read_rounds, read_run_info
from pollinate.simulation.sweep import Axis, core_shares, parse_grid, plan_sweep

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")
TINY = ["data.num-users=3", "run.num-rounds=1", "model.name=logreg", "train.epochs=1"]


def sets(*items: str) -> list[str]:
    return [a for s in [*TINY, *items] for a in ("--set", s)]


@pytest.mark.parametrize(
    ("grid", "needle"),
    [
        (["train.lr"], "must look like key=value1,value2"),
        (["train.lr="], "must look like key=value1,value2"),
        (["train.lr=0.1,,0.2"], "must look like key=value1,value2"),
        (["trian.lr=0.1,0.2"], "did you mean 'train.lr'"),
        (["train.lr=0.1,fast"], "train.lr"),
        (["strategy.name=fedavg,fedsgd"], "strategy.name"),
        (["run.dir=a,b"], "the sweep sets each run's folder"),
        (["train.lr=0.1", "train.lr=0.2"], "given twice"),
        (["train.lr=0.1,0.1"], "repeats a value"),
    ],
)
def test_a_bad_grid_is_one_line_and_exit_2_before_anything_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, grid: list[str], needle: str
) -> None:
    argv = ["sweep", QUICKSTART, "--out", str(tmp_path / "sw"), *sets()]
    for g in grid:
        argv += ["--grid", g]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "sw").exists()


def test_bad_seeds_and_parallel(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = ["sweep", QUICKSTART, "--out", str(tmp_path / "sw"), "--grid", "train.lr=0.1,0.2"]
    for extra, needle in (
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--parallel", "0"], "--parallel must be >= 1"),
        (["--grid", "run.seed=1,2", "--seeds", "2"], "use one of them"),
        (["--set", "data.num-users=100000"], "users"),  # a data error, found before running
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "sw").exists()


def test_plan_names_runs_by_the_varied_keys(tmp_path: Path) -> None:
    axes = parse_grid(["strategy.name=fedavg,fedprox", "train.lr=0.1,0.01", "model.name=mlp"])
    runs = plan_sweep(QUICKSTART, axes, seeds=2, sets=TINY, out_dir=tmp_path, name="s")
    assert len(runs) == 2 * 2 * 1 * 2
    labels = [r.label for r in runs]
    assert len(set(labels)) == len(labels)
    # `name` is both strategy.name and model.name: those keep their full key.
    assert labels[0] == "strategy.name=fedavg_lr=0.1_model.name=mlp_seed=0"
    assert {r.seed for r in runs} == {0, 1}
    assert all(r.run_dir == tmp_path / r.label for r in runs)
    assert axes[1] == Axis("train.lr", ("0.1", "0.01"))


def test_core_shares_split_the_cores() -> None:
    assert core_shares(2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert core_shares(3, [0, 1]) == [[0], [1], [0]]
    assert core_shares(1, [5, 7]) == [[5, 7]]


@pytest.mark.slow
def test_a_2x2_sweep_runs_every_point_in_its_folder_and_writes_one_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "sw"
    argv = ["sweep", QUICKSTART, "--out", str(out), "--name", "t", "--parallel", "2", *sets()]
    argv += ["--grid", "strategy.name=fedavg,fedprox", "--grid", "train.lr=0.1,0.02"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    with (out / "runs.csv").open() as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == 4 and {r["status"] for r in runs} == {"finished"}
    for r in runs:
        run_dir = Path(r["run_dir"])
        assert run_dir.parent == out
        info = read_run_info(run_dir)
        assert info["status"] == "finished"
        final = read_rounds(run_dir).iloc[-1]
        assert float(r["global_acc"]) == pytest.approx(final["global_accuracy"])
        cfg_text = (run_dir / "config.toml").read_text()
        assert f'name = "{r["strategy.name"]}"' in cfg_text and f"lr = {r['train.lr']}" in cfg_text
        assert (out / "logs" / f"{run_dir.name}.log").is_file()
    with (out / "sweep.csv").open() as fh:
        points = list(csv.DictReader(fh))
    assert {(p["strategy.name"], p["train.lr"]) for p in points} == {
        ("fedavg", "0.1"), ("fedavg", "0.02"), ("fedprox", "0.1"), ("fedprox", "0.02")
    }  # fmt: skip
    assert all(p["runs"] == "1/1" and 0 <= float(p["personal_acc_mean"]) <= 1 for p in points)
    assert printed.count("[") >= 4 and "personal_acc" in printed and "sweep.csv" in printed
