"""The run config: one home for defaults, validated once, errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from pollinate import config
from pollinate.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_flower_config_mirrors_the_defaults() -> None:
    # `flwr run .` reads defaults from pyproject; `pollinate run` from config.py: same values.
    with (ROOT / "pyproject.toml").open("rb") as fh:
        flower = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert config.flatten(flower) == config.default_flat()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_resolves_and_says_how_to_run_it(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.run.name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# pollinate run configs/") or first.startswith("# flwr run")


def test_overrides_apply_in_order(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text('[train]\nlr = 0.2\n[run]\nname = "x"\n')
    cfg = config.load(f, ["train.lr=0.3", 'strategy.name="fedprox"', "data.dataset=synthetic"])
    assert cfg.train.lr == 0.3
    assert cfg.strategy.name == "fedprox"
    assert cfg.data.dataset == "synthetic"  # a bare word is a string
    assert cfg.diff_from_defaults()["run.name"] == "x"


def test_int_accepted_for_float_but_not_reverse() -> None:
    assert config.resolve({"train.lr": 1}).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"train\.epochs.*must be int"):
        config.resolve({"train.epochs": 1.5})


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"trian.lr": 0.1}, "did you mean 'train.lr'"),
        ({"data.dataset": "mnist"}, "choose one of: digits"),
        ({"data.partitioner": "dirichlett"}, "did you mean 'dirichlet'"),
        ({"model.name": "resnet"}, "model.name"),
        ({"strategy.name": "fedsgd"}, "strategy.name"),
        ({"personalization.method": "maml"}, "personalization.method"),
        (
            {"strategy.fraction-train": 0.0},
            "strategy.fraction-train must be a finite number in (0, 1]",
        ),
        ({"data.alpha": -1.0}, "data.alpha must be a finite number in (0, "),
        ({"run.num-rounds": 0}, "run.num-rounds must be an integer in 1..100000, got 0"),
        ({"data.dataset": "file"}, "data.path"),
        ({"strategy.trim-beta": 0.5}, "strategy.trim-beta"),
        ({"train.lr": "fast"}, "train.lr' must be float"),
    ],
)
def test_bad_values_give_one_line_errors(flat: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.resolve(flat)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="key=value"):
        config.load(None, ["train.lr"])


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = config.load(None, ["train.lr=0.3", 'run.name="a \\"quoted\\" name"'])
    f = tmp_path / "c.toml"
    f.write_text(config.to_toml(cfg))
    assert config.load(f) == cfg
