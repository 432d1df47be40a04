"""Config and data limits: every number finite and in range, every size bounded before
anything is allocated, impossible combinations refused, each as one line and exit 2."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest

from pollinate import config
from pollinate.cli import main
from pollinate.data import DataSpec
from pollinate.data.spec import DATA_RANGES

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")


def expect_bad_input(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI; assert exit 2 with one ``error:`` line on stderr; return that line."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    return lines[0]


def test_every_numeric_key_has_a_range() -> None:
    numeric = {
        k
        for k, v in config.default_flat().items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    assert numeric == set(config.RANGES), "add the missing keys to config.RANGES"
    assert {f.name for f in fields(DataSpec) if f.type in ("int", "float")} == set(DATA_RANGES)


def test_every_default_is_inside_its_range() -> None:
    flat = config.default_flat()
    for key, allowed in config.RANGES.items():
        assert flat[key] in allowed, key


BAD_OVERRIDES = [
    # not finite
    ("train.lr=nan", "train.lr must be a finite number in (0, 10], got nan"),
    ("train.lr=inf", "train.lr must be a finite number in (0, 10], got inf"),
    ("train.lr=-inf", "train.lr"),
    ("train.momentum=nan", "train.momentum must be a finite number in [0, 1)"),
    ("strategy.server-lr=nan", "strategy.server-lr"),
    ("strategy.tau=nan", "strategy.tau"),
    ("strategy.proximal-mu=inf", "strategy.proximal-mu"),
    ("personalization.ditto-lambda=nan", "personalization.ditto-lambda"),
    ("server.round-timeout=inf", "server.round-timeout"),
    ("data.alpha=nan", "data.alpha"),
    ("simulation.cpus-per-node=nan", "simulation.cpus-per-node"),
    # out of range
    ("train.momentum=1.0", "train.momentum"),
    ("strategy.beta-2=1.5", "strategy.beta-2"),
    ("train.lr=1e300", "train.lr"),
    ("train.lr=1" + "0" * 400, "train.lr' = 1000"),
    # sizes, bounded before anything is allocated
    ("model.hidden=100000000", "model.hidden must be an integer in 1..16384, got 100000000"),
    ("model.depth=100000", "model.depth must be an integer in 1..64"),
    ("run.seed=1e23", "run.seed must be an integer in 0..4294967295"),
    ("run.seed=-1", "run.seed"),
    ("run.num-rounds=1000000000", "run.num-rounds must be an integer in 1..100000"),
    ("data.num-users=1000000000", "data.num-users must be an integer in 1..1000000"),
    ("train.batch-size=10000000000", "train.batch-size"),
    ("train.epochs=10000000", "train.epochs"),
    ("model.num-classes=1000000000000", "model.num-classes must be an integer in 0..10000"),
    ("model.in-features=1000000000", "model.in-features"),
    ("strategy.min-train-users=1000000000", "strategy.min-train-users"),
    # the product of allowed sizes is bounded too
    ("model.hidden=16384 --set model.depth=64 --set model.name=mlp", "parameters, more than"),
    # impossible for the data (20 users): refused once the data is read, before a process starts
    ("strategy.min-train-users=1000", "strategy.min-train-users = 1000 but the data has 20 users"),
    ("strategy.min-evaluate-users=21", "strategy.min-evaluate-users = 21"),
    (
        "strategy.name=krum --set strategy.krum-byzantine=100",
        "strategy.krum-byzantine = 100 needs at least 203 users per round",
    ),
    ("strategy.name=krum --set strategy.krum-byzantine=9", "set it to at most 8"),
    ("strategy.min-nodes=50", "strategy.min-nodes = 50"),
    ("strategy.trim-beta=0.5", "strategy.trim-beta"),
]


@pytest.mark.parametrize(("override", "needle"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_values_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, override: str, needle: str
) -> None:
    sets = [a for part in override.split(" --set ") for a in ("--set", part)]
    run_dir = tmp_path / "run"
    line = expect_bad_input(capsys, "run", QUICKSTART, *sets, "--run-dir", str(run_dir))
    assert needle in line, line
    assert not run_dir.exists()  # nothing was started or written


def test_krum_with_enough_users_is_accepted() -> None:
    cfg = config.load(QUICKSTART, ["strategy.name=krum", "strategy.krum-byzantine=8"])
    config.check_against_data(cfg, num_users=20, num_features=64, num_classes=10, num_nodes=2)


def test_a_huge_model_from_the_data_sizes_is_refused() -> None:
    cfg = config.load(QUICKSTART, ["model.name=mlp", "model.hidden=8192"])
    with pytest.raises(config.ConfigError, match="parameters, more than"):
        config.check_against_data(
            cfg, num_users=20, num_features=900_000, num_classes=10, num_nodes=2
        )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (bytes(range(256)) * 4, "is not UTF-8 text"),
        (b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 64, "not valid TOML"),
        (b"[train]\nlr = nan\n", "train.lr must be a finite number"),
        (b"[model]\nhidden = 1e12\n", "model.hidden must be an integer in 1..16384"),
    ],
    ids=["binary", "elf-header", "nan-in-file", "huge-in-file"],
)
def test_bad_config_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, needle: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    line = expect_bad_input(capsys, "run", str(path), "--run-dir", str(tmp_path / "run"))
    assert needle in line, line


# ------------------------------------------------------------------------------ data files


def users_file(tmp_path: Path, **column: list[object]) -> Path:
    rows = {"user": ["a"] * 3 + ["b"] * 3, "f": [0.5] * 6, "label": [0, 1, 0, 1, 0, 1]}
    rows.update(column)
    path = tmp_path / "users.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("column", "needle"),
    [
        (
            {"f": [0.5, 1e300, 0.5, 0.5, 0.5, 0.5]},
            "beyond float32 range (e.g. 1e+300 at data row 2",
        ),
        ({"f": [0.5, 0.5, 0.5, -4e38, 0.5, 0.5]}, "beyond float32 range"),
        ({"label": [0, 1, 10**12, 1, 0, 1]}, "at most 10000 classes"),
        ({"label": [0, 1, 10_000, 1, 0, 1]}, "at most 10000 classes"),
    ],
    ids=["1e300", "-4e38", "label-1e12", "label-10000"],
)
def test_bad_data_files_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, column: dict[str, list[object]], needle: str
) -> None:
    path = users_file(tmp_path, **column)
    line = expect_bad_input(
        capsys,
        "run",
        QUICKSTART,
        "--set",
        "data.dataset=file",
        "--set",
        f"data.path={str(path)!r}",
        "--set",
        "model.name=mlp",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert needle in line, line
