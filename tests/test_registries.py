"""Registries as the single source: registering a model, strategy, personalization method or
dataset makes it selectable from a config with its own options, documented and validated
once; the README's key table and pyproject's mirror are generated from the same schema."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import tomllib
import torch
from torch import nn

from pollinate import config, configdoc
from pollinate.cli import main
from pollinate.client import personalization
from pollinate.client.personalization import METHODS, Method, register_method
from pollinate.client.steps import RoundContext, Workbench, evaluate_user
from pollinate.client.store import ModelStore
from pollinate.config import ConfigError
from pollinate.data import (
    DATASETS,
    DataSpec,
    FederatedDataset,
    UserData,
    load_federated_dataset,
    register_dataset,
)
from pollinate.models import MODELS, create_model, register_model
from pollinate.registry import Option, Options, Range, Registry
from pollinate.server.strategies import STRATEGIES, build_strategy, register_strategy
from pollinate.server.strategy import CohortFedAvg, UserCohorts

ROOT = Path(__file__).resolve().parents[1]
ALL: tuple[Registry[Any], ...] = (MODELS, DATASETS, STRATEGIES, METHODS)


@pytest.fixture
def registries() -> Iterator[None]:
    """Whatever a test registers is gone after it."""
    saved = [dict(r._entries) for r in ALL]
    yield
    for registry, entries in zip(ALL, saved, strict=True):
        registry._entries = entries


def one_line_error(flat: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as info:
        config.resolve(flat)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------ generated text


def test_readme_table_and_pyproject_mirror_are_generated_from_the_schema() -> None:
    stale = configdoc.stale()
    assert not stale, f"{', '.join(stale)} out of date: run `{configdoc.FIX}` and commit"


def test_generated_blocks_follow_a_schema_change(tmp_path: Path, registries: None) -> None:
    for name in ("README.md", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)

    @register_model("wide", options={"width": Option(8, "hidden width", Range(1, 512))})
    def wide(*, in_features: int, num_classes: int, width: int = 8) -> tuple[nn.Module, nn.Module]:
        return nn.Linear(in_features, width), nn.Linear(width, num_classes)

    assert configdoc.stale(tmp_path) == ["README.md", "pyproject.toml"]
    assert configdoc.write(tmp_path) == ["README.md", "pyproject.toml"]
    assert configdoc.stale(tmp_path) == []
    readme = (tmp_path / "README.md").read_text()
    assert "| `model.width` | `8` | 1..512 | (`wide`) hidden width |" in readme
    assert "| `model.name` | `wide` |" in readme
    with (tmp_path / "pyproject.toml").open("rb") as fh:
        flower = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert flower["model"]["width"] == 8
    # What was around the markers is untouched.
    assert (tmp_path / "README.md").read_text().split("<!-- config-table:start -->")[0] == (
        (ROOT / "README.md").read_text().split("<!-- config-table:start -->")[0]
    )


def test_config_command_checks_and_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--check"]) == 0
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "| `strategy.proximal-mu` | `0.01` | [0, 1000] | (`fedprox`)" in out
    assert main(["config", "--format", "toml"]) == 0
    assert config.resolve(config.flatten(tomllib.loads(capsys.readouterr().out)))


def test_every_key_has_help_and_every_number_a_range() -> None:
    for name, key in config.schema().items():
        assert key.help, f"{name} has no help text"
        numeric = isinstance(key.default, int | float) and not isinstance(key.default, bool)
        assert numeric == (key.range is not None), name
        if key.range is not None:
            assert key.default in key.range, name


def test_unknown_key_points_to_the_key_table() -> None:
    message = one_line_error({"zzz.qqq": 1})
    assert "README.md" in message and "pollinate config" in message


# ------------------------------------------------------------------------------ models


def test_a_registered_model_is_chosen_from_a_config_with_its_own_options(
    registries: None,
) -> None:
    @register_model("tiny", options={"base-width": Option(4, "width", Range(1, 64))})
    def tiny(
        *, in_features: int, num_classes: int, base_width: int = 4
    ) -> tuple[nn.Module, nn.Module]:
        return nn.Sequential(nn.Linear(in_features, base_width), nn.Tanh()), nn.Linear(
            base_width, num_classes
        )

    cfg = config.resolve({"model.name": "tiny", "model.base-width": 7})
    assert config.model_kwargs(cfg) == {"base_width": 7}
    model = create_model("tiny", in_features=5, num_classes=3, **config.model_kwargs(cfg))
    assert model(torch.randn(2, 5)).shape == (2, 3)
    # mlp's options stay mlp's: a tiny model is not given model.hidden.
    assert config.model_kwargs(config.resolve({"model.name": "mlp"})) == {"hidden": 64, "depth": 1}
    assert "model.base-width must be an integer in 1..64" in one_line_error(
        {"model.name": "tiny", "model.base-width": 65}
    )
    assert "tiny" in one_line_error({"model.name": "tinny"})


def test_model_option_must_match_the_builder(registries: None) -> None:
    def builder(*, in_features: int, num_classes: int, width: int = 4) -> Any:
        return nn.Identity(), nn.Identity()

    with pytest.raises(ValueError, match="default 5"):
        register_model("bad", options={"width": Option(5, "w", Range(1, 9))})(builder)
    with pytest.raises(ValueError, match="parameter depth"):
        register_model("bad", options={"depth": Option(4, "w", Range(1, 9))})(builder)
    assert "bad" not in MODELS


def test_a_shared_option_key_must_mean_the_same(registries: None) -> None:
    def builder(*, in_features: int, num_classes: int, hidden: int = 32) -> Any:
        return nn.Identity(), nn.Identity()

    with pytest.raises(ValueError, match="option 'hidden' differs from the one 'mlp'"):
        register_model("other", options={"hidden": Option(32, "w", Range(1, 9))})(builder)


def test_a_numeric_option_needs_a_range() -> None:
    with pytest.raises(ValueError, match="range="):
        Option(3, "epochs")


# -------------------------------------------------------------------------- strategies


def test_every_strategy_name_builds_its_own_strategy() -> None:
    seen = set()
    for name in STRATEGIES.names():
        strategy = build_strategy(config.resolve({"strategy.name": name}))
        assert isinstance(strategy, UserCohorts)
        seen.add(type(strategy).__name__)
    assert len(seen) == len(STRATEGIES.names())  # no name falls back to another's class


def test_a_registered_strategy_is_chosen_with_its_own_options(registries: None) -> None:
    built: list[float] = []

    @register_strategy(
        "fedhalf",
        help="FedAvg over half the users (a test)",
        options={"half-rate": Option(0.5, "the rate", Range(0, 1))},
    )
    def fedhalf(common: dict[str, Any], o: Options, cfg: config.RunConfig) -> UserCohorts:
        built.append(o.number("half-rate"))
        return CohortFedAvg(**{**common, "fraction_train": o.number("half-rate")})

    strategy = build_strategy(
        config.resolve({"strategy.name": "fedhalf", "strategy.half-rate": 0.25})
    )
    assert built == [0.25] and strategy.fraction_train == 0.25
    assert "fedhalf" in one_line_error({"strategy.name": "fedhalff"})
    assert "strategy.half-rate must be a finite number in [0, 1]" in one_line_error(
        {"strategy.half-rate": 2.0}
    )


def test_a_hand_built_config_with_an_unknown_strategy_is_refused() -> None:
    import dataclasses

    cfg = config.resolve({})
    forged = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, name="nope"))
    with pytest.raises(ConfigError, match="choose one of: fedavg, fedprox"):
        build_strategy(forged)


def test_krum_round_size_is_checked_by_its_registry_entry() -> None:
    cfg = config.resolve({"strategy.name": "krum", "strategy.krum-byzantine": 3})
    with pytest.raises(ConfigError, match="needs at least 9 users per round"):
        config.check_against_data(cfg, num_users=8, num_features=64, num_classes=10, num_nodes=1)
    fedavg = config.resolve({"strategy.name": "fedavg", "strategy.krum-byzantine": 3})
    config.check_against_data(fedavg, num_users=8, num_features=64, num_classes=10, num_nodes=1)


# --------------------------------------------------------------------- personalization


def _round(tmp_path: Path, flat: dict[str, object]) -> tuple[RoundContext, UserData]:
    cfg = config.resolve({"model.name": "logreg", "data.num-users": 2, **flat})
    user = load_federated_dataset(config.data_spec(cfg)).user("user-0000")
    model = create_model("logreg", in_features=64, num_classes=10, seed=0)
    ctx = RoundContext(
        cfg=cfg,
        spec=model.spec,
        global_weights=model.state_dict(),
        server_round=1,
        store=ModelStore(tmp_path),
    )
    return ctx, user


def test_a_registered_personalization_method_runs_with_its_own_options(
    tmp_path: Path, registries: None
) -> None:
    @register_method
    class Scaled(Method):
        """The personal model: the global one scaled by a factor (a test)."""

        name = "scaled"
        help = "global weights times a factor"
        options: ClassVar[dict[str, Option]] = {"scale-by": Option(1.0, "the factor", Range(0, 10))}

        def personalize(
            self, bench: Workbench, ctx: RoundContext, user: UserData, model: Any
        ) -> int | None:
            factor = ctx.cfg.personalization.options.number("scale-by")
            model.load_state_dict({k: v * factor for k, v in model.state_dict().items()})
            return ctx.server_round

    ctx, user = _round(
        tmp_path, {"personalization.method": "scaled", "personalization.scale-by": 0.0}
    )
    metrics = evaluate_user(Workbench(), ctx, user)
    # All-zero weights predict class 0 everywhere: the personal accuracy is class 0's share.
    assert metrics["personal-accuracy"] == pytest.approx(float(np.mean(user.y_test == 0)))
    assert metrics["global-accuracy"] != metrics["personal-accuracy"]
    assert "scaled" in one_line_error({"personalization.method": "scaledd"})


def test_none_reuses_the_global_evaluation(tmp_path: Path) -> None:
    ctx, user = _round(tmp_path, {"personalization.method": "none"})
    metrics = evaluate_user(Workbench(), ctx, user)
    assert metrics["personal-accuracy"] == metrics["global-accuracy"]
    assert isinstance(personalization.method_of(ctx.cfg), personalization.NoPersonalization)


# ---------------------------------------------------------------------------- datasets


def test_a_registered_dataset_is_chosen_with_its_own_options(registries: None) -> None:
    @register_dataset(
        "blobs",
        help="two Gaussian blobs per user (a test)",
        uses=("num-users",),
        options={"blob-gap": Option(3.0, "distance between the blobs", Range(0, 100))},
    )
    def blobs(spec: DataSpec) -> FederatedDataset:
        gap = spec.options.number("blob-gap")
        ids = [f"u{k}" for k in range(spec.num_users)]

        def build(k: int) -> UserData:
            rng = np.random.default_rng(k)
            y = rng.integers(0, 2, 20)
            x = (rng.normal(size=(20, 2)) + gap * y[:, None]).astype(np.float32)
            return UserData(ids[k], x[:15], y[:15], x[15:], y[15:])

        return FederatedDataset(
            name="blobs", num_features=2, num_classes=2, user_ids=ids, build=build
        )

    cfg = config.resolve({"data.dataset": "blobs", "data.num-users": 3, "data.blob-gap": 9.0})
    dataset = load_federated_dataset(config.data_spec(cfg))
    assert len(dataset) == 3 and cfg.data.options == {"blob-gap": 9.0}
    x = dataset.user("u1").x_train
    assert x.max() > 5  # the gap it was given, not the default
    assert "data.blob-gap must be a finite number in [0, 100]" in one_line_error(
        {"data.blob-gap": -1.0}
    )


def test_data_keys_follow_one_rule_set() -> None:
    # The config refuses what the data loader refuses, with the same line.
    cases: list[tuple[dict[str, object], DataSpec]] = [
        ({"data.label-column": "user"}, DataSpec(label_column="user")),
        ({"data.dataset": "file"}, DataSpec(dataset="file")),
        ({"data.dataset": "mnist"}, DataSpec(dataset="mnist")),
        ({"data.alpha": 0.0}, DataSpec(alpha=0.0)),
    ]
    for flat, spec in cases:
        with pytest.raises(ValueError) as from_data:
            spec.validate()
        assert one_line_error(flat) == str(from_data.value)


def test_plugins_named_in_the_environment_register_from_the_cli(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    registries: None,
) -> None:
    (tmp_path / "mylab_models.py").write_text(
        "from torch import nn\n"
        "from pollinate.models import register_model\n"
        "from pollinate.registry import Option, Range\n"
        "@register_model('lab', options={'lab-width': Option(3, 'w', Range(1, 9))})\n"
        "def lab(*, in_features, num_classes, lab_width=3):\n"
        "    return nn.Linear(in_features, lab_width), nn.Linear(lab_width, num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(config.PLUGINS_ENV, "mylab_models")
    monkeypatch.delitem(__import__("sys").modules, "mylab_models", raising=False)
    assert (
        config.resolve({"model.name": "lab", "model.lab-width": 5}).model.options["lab-width"] == 5
    )
    monkeypatch.setenv(config.PLUGINS_ENV, "no_such_module_here")
    assert main(["config"]) == 2
    assert "POLLINATE_PLUGINS names module 'no_such_module_here'" in capsys.readouterr().err
