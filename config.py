"""The run configuration: one home for every default, validated once at the entry point.

A run config is a flat mapping of dotted keys (``"train.lr"``) to scalars, exactly the
shape Flower's run config has (``[tool.flwr.app.config]`` in pyproject.toml, or
``flwr run . --run-config FILE.toml``). Experiment files in ``configs/`` override only the
keys they name. :func:`resolve` turns a flat mapping into a frozen, typed
:class:`RunConfig`, and every mistake becomes one :class:`ConfigError` line that says how
to fix it.

Key names are the dataclass field names with ``_`` written as ``-`` and prefixed by their
section, e.g. ``personalization.finetune-epochs``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeAlias

import tomllib

from pollinate.data import DATASETS, PARTITIONERS, DataOptions, DataSpec

Scalar = bool | int | float | str

MODELS = ("cnn", "logreg", "mlp")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
PERSONALIZATION = ("none", "finetune", "fedper", "ditto")
BACKENDS = ("auto", "local", "ray")
SAVE_MODELS = ("every-round", "final-round")


class ConfigError(ValueError):
    """A bad run config; the message is one line saying what to change."""


@dataclass(frozen=True)
class RunSection:
    name: str = "default"
    num_rounds: int = 10
    seed: int = 0
    # Where results go; empty means runs/<name> under the working directory.
    dir: str = ""


# `[data]`: defined, with each key's meaning, next to the data it describes
# (pollinate.data.DataSpec, which adds the run's seed).
DataSection: TypeAlias = DataOptions


@dataclass(frozen=True)
class ModelSection:
    name: str = "cnn"
    hidden: int = 64
    depth: int = 1
    # 0 = infer from the dataset. A deployed server has no data: set both there.
    in_features: int = 0
    num_classes: int = 0


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 1
    # <= 0 means full batch (FedSGD when epochs = 1).
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    # Systems heterogeneity (FedProx, Li et al. 2020, Sec. 5.2): this fraction of the
    # sampled users are stragglers that train a random 1..epochs epochs (seeded per user
    # and round); with drop-stragglers they send nothing (FedAvg's rule in the paper).
    straggler_fraction: float = 0.0
    drop_stragglers: bool = False
    # Train up to this many of a node's users at once, their models stacked (vmap): the
    # same results up to float32 rounding, several times faster for small models. 0 or 1 =
    # one user at a time. Models it cannot stack fall back to one at a time (logged once).
    stack_users: int = 0


@dataclass(frozen=True)
class StrategySection:
    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_users: int = 1
    min_evaluate_users: int = 1
    # Flower nodes (devices, or simulated nodes) that must be connected before a round.
    min_nodes: int = 1
    proximal_mu: float = 0.01
    # FedAdam / FedYogi server optimizer (Reddi et al. 2021).
    server_lr: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2
    krum_byzantine: int = 0


@dataclass(frozen=True)
class PersonalizationSection:
    method: str = "finetune"
    finetune_epochs: int = 2
    # Fine-tuning step size; 0 = train.lr. Smaller than train.lr: the global model is a
    # good start and a user's few samples are easy to overfit.
    finetune_lr: float = 0.0
    # Fine-tune only the head (the body stays global): steadier on very small users.
    finetune_head_only: bool = False
    ditto_lambda: float = 0.1
    ditto_epochs: int = 1


@dataclass(frozen=True)
class SimulationSection:
    # Flower nodes in the simulation; each hosts a cohort of users. 0 = auto: one node per
    # Ray worker slot (cpus / cpus-per-node); data.num-users = one node per user.
    num_nodes: int = 0
    cpus_per_node: float = 1.0
    # Where the ClientApps run: "local" = worker processes on this machine (start in
    # milliseconds), "ray" = Ray actors (a local Ray, or the cluster at ray-address),
    # "auto" = "ray" when ray-address is set, else "local".
    backend: str = "auto"
    # Attach to an existing Ray cluster ("HOST:PORT"); empty starts a local one.
    ray_address: str = ""


@dataclass(frozen=True)
class ServerSection:
    # Seconds to wait for strategy.min-nodes nodes before giving up with an error.
    node_wait_timeout: float = 120.0
    # Seconds a round waits for replies before aggregating what arrived.
    round_timeout: float = 3600.0


@dataclass(frozen=True)
class StoreSection:
    # Per-user model store; empty means <run dir>/users.
    dir: str = ""
    # When evaluation writes each evaluated user's global and personal model to the store:
    # "every-round" (devices serve the newest models) or "final-round" (large simulations:
    # two file writes per evaluated user per round add up at thousands of users). State a
    # method keeps between rounds (FedPer's head, Ditto's personal model) is always saved.
    save_models: str = "every-round"


@dataclass(frozen=True)
class TrackingSection:
    # Opt-in export of every round's metrics, the config and the final models
    # (server/tracking.py); needs `pip install 'pollinate[tracking]'`. Nothing is imported
    # while both are off.
    tensorboard: bool = False
    # TensorBoard event files; empty means <run dir>/tensorboard.
    tensorboard_dir: str = ""
    mlflow: bool = False
    # An MLflow tracking URI (http://HOST:5000, file:///PATH); empty means a file store
    # in <run dir>/mlruns.
    mlflow_uri: str = ""
    # The MLflow experiment the run is logged under; empty means "pollinate".
    mlflow_experiment: str = ""


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    personalization: PersonalizationSection = field(default_factory=PersonalizationSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    server: ServerSection = field(default_factory=ServerSection)
    store: StoreSection = field(default_factory=StoreSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def to_flat(self) -> dict[str, Scalar]:
        """The flat ``section.key`` mapping (Flower's run-config shape)."""
        flat: dict[str, Scalar] = {}
        for section in fields(self):
            values = getattr(self, section.name)
            for f in fields(values):
                flat[_key(section.name, f.name)] = getattr(values, f.name)
        return flat

    def diff_from_defaults(self) -> dict[str, Scalar]:
        """Only the keys whose value differs from the default (what a user set)."""
        defaults = RunConfig().to_flat()
        return {k: v for k, v in self.to_flat().items() if defaults[k] != v}

    def replace(self, **overrides: Scalar) -> RunConfig:
        """A copy with flat overrides applied, e.g. ``cfg.replace(**{"train.lr": 0.1})``."""
        return resolve({**self.to_flat(), **overrides})

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    @property
    def store_dir(self) -> Path:
        return Path(self.store.dir) if self.store.dir else self.run_dir / "users"


def _key(section: str, name: str) -> str:
    return f"{section}.{name.replace('_', '-')}"


def default_flat() -> dict[str, Scalar]:
    return RunConfig().to_flat()


def _coerce(key: str, value: Any, default: Scalar) -> Scalar:
    """Check one value against its default's type; ints are accepted where floats are."""
    expected = type(default)
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    raise ConfigError(
        f"config key '{key}' must be {expected.__name__} (like {default!r}), got {value!r}"
    )


def resolve(flat: Mapping[str, Any], *, ignore_unknown: bool = False) -> RunConfig:
    """Validate a flat mapping (defaults filled in) into a :class:`RunConfig`."""
    defaults = default_flat()
    values: dict[str, Scalar] = dict(defaults)
    for key, value in flat.items():
        if key not in defaults:
            if ignore_unknown:
                continue
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see configs/README.md"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        values[key] = _coerce(key, value, defaults[key])
    sections: dict[str, Any] = {}
    for section in fields(RunConfig):
        cls = section.default_factory
        kwargs = {
            f.name: values[_key(section.name, f.name)]
            for f in fields(cls)  # type: ignore[arg-type]
        }
        sections[section.name] = cls(**kwargs)  # type: ignore[operator]
    cfg = RunConfig(**sections)
    _check(cfg)
    return cfg


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"{key} = '{value}' is not known{hint}; choose one of: {', '.join(choices)}"
        )


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key} must be {bound}, got {value}")


def _fraction(key: str, value: float, *, allow_zero: bool = False, allow_one: bool = True) -> None:
    lo_ok = value >= 0 if allow_zero else value > 0
    hi_ok = value <= 1 if allow_one else value < 1
    if not (lo_ok and hi_ok):
        lo = "[0" if allow_zero else "(0"
        hi = "1]" if allow_one else "1)"
        raise ConfigError(f"{key} must be in {lo}, {hi}, got {value}")


def _check(cfg: RunConfig) -> None:
    """Cross-field and range checks; the message names the key to change."""
    _choice("data.dataset", cfg.data.dataset, DATASETS)
    _choice("data.partitioner", cfg.data.partitioner, PARTITIONERS)
    _choice("model.name", cfg.model.name, MODELS)
    _choice("strategy.name", cfg.strategy.name, STRATEGIES)
    _choice("personalization.method", cfg.personalization.method, PERSONALIZATION)
    _choice("simulation.backend", cfg.simulation.backend, BACKENDS)
    _choice("store.save-models", cfg.store.save_models, SAVE_MODELS)
    if cfg.simulation.backend == "local" and cfg.simulation.ray_address:
        raise ConfigError(
            "simulation.ray-address needs simulation.backend = 'ray' (or 'auto'); "
            "the 'local' backend runs on this machine only"
        )
    _positive("run.num-rounds", cfg.run.num_rounds)
    _positive("data.num-users", cfg.data.num_users)
    _positive("data.alpha", cfg.data.alpha)
    _positive("data.shards-per-user", cfg.data.shards_per_user)
    _positive("data.min-samples", cfg.data.min_samples)
    _fraction("data.test-fraction", cfg.data.test_fraction, allow_one=False)
    _fraction("data.central-test-fraction", cfg.data.central_test_fraction, allow_one=False)
    if cfg.data.dataset == "file" and not cfg.data.path:
        raise ConfigError("data.dataset = 'file' needs data.path = 'your-users.csv' (or .parquet)")
    _positive("model.hidden", cfg.model.hidden)
    _positive("model.depth", cfg.model.depth)
    _positive("model.in-features", cfg.model.in_features, allow_zero=True)
    _positive("model.num-classes", cfg.model.num_classes, allow_zero=True)
    _positive("train.epochs", cfg.train.epochs, allow_zero=True)
    _positive("train.lr", cfg.train.lr)
    _positive("train.momentum", cfg.train.momentum, allow_zero=True)
    _positive("train.weight-decay", cfg.train.weight_decay, allow_zero=True)
    _fraction("train.straggler-fraction", cfg.train.straggler_fraction, allow_zero=True)
    _positive("train.stack-users", cfg.train.stack_users, allow_zero=True)
    _fraction("strategy.fraction-train", cfg.strategy.fraction_train)
    _fraction("strategy.fraction-evaluate", cfg.strategy.fraction_evaluate, allow_zero=True)
    _positive("strategy.min-train-users", cfg.strategy.min_train_users)
    _positive("strategy.min-evaluate-users", cfg.strategy.min_evaluate_users, allow_zero=True)
    _positive("strategy.min-nodes", cfg.strategy.min_nodes)
    _positive("strategy.proximal-mu", cfg.strategy.proximal_mu, allow_zero=True)
    _positive("strategy.server-lr", cfg.strategy.server_lr)
    _fraction("strategy.beta-1", cfg.strategy.beta_1, allow_zero=True, allow_one=False)
    _fraction("strategy.beta-2", cfg.strategy.beta_2, allow_zero=True, allow_one=False)
    _positive("strategy.tau", cfg.strategy.tau)
    _fraction("strategy.trim-beta", cfg.strategy.trim_beta, allow_one=False)
    if cfg.strategy.trim_beta >= 0.5:
        raise ConfigError("strategy.trim-beta must be < 0.5 (it trims that fraction at each end)")
    _positive("strategy.krum-byzantine", cfg.strategy.krum_byzantine, allow_zero=True)
    _positive(
        "personalization.finetune-epochs", cfg.personalization.finetune_epochs, allow_zero=True
    )
    _positive("personalization.finetune-lr", cfg.personalization.finetune_lr, allow_zero=True)
    _positive("personalization.ditto-lambda", cfg.personalization.ditto_lambda, allow_zero=True)
    _positive("personalization.ditto-epochs", cfg.personalization.ditto_epochs)
    _positive("simulation.num-nodes", cfg.simulation.num_nodes, allow_zero=True)
    _positive("simulation.cpus-per-node", cfg.simulation.cpus_per_node)
    _positive("server.node-wait-timeout", cfg.server.node_wait_timeout)
    _positive("server.round-timeout", cfg.server.round_timeout)


# ------------------------------------------------------------- derived specs


def data_spec(cfg: RunConfig) -> DataSpec:
    """The dataset spec this run config describes (seeded by run.seed)."""
    return DataSpec(**asdict(cfg.data), seed=cfg.run.seed)


def model_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Architecture keyword arguments for ``create_model`` beyond the input/output sizes."""
    if cfg.model.name == "mlp":
        return {"hidden": cfg.model.hidden, "depth": cfg.model.depth}
    return {}


# ------------------------------------------------------------------------- files


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables to dotted keys, as Flower does for its run config."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{full}."))
        elif isinstance(value, list):
            raise ConfigError(f"config key '{full}' is a list; only scalars are allowed")
        else:
            flat[full] = value
    return flat


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read an experiment file into flat keys; one-line errors for missing or bad TOML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        with p.open("rb") as fh:
            return flatten(tomllib.load(fh))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file '{p}' is not valid TOML: {err}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a TOML value (``lr=0.1``, ``name="x"``); bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}' must look like key=value, e.g. train.lr=0.1")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- experiment file <- ``--set`` overrides, validated once."""
    flat: dict[str, Any] = read_toml(path) if path is not None else {}
    for item in overrides or []:
        key, value = parse_override(item)
        flat[key] = value
    return resolve(flat)


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML, one table per section (saved next to each run)."""
    lines: list[str] = []
    for section in fields(cfg):
        lines.append(f"[{section.name}]")
        for f in fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            lines.append(f"{f.name.replace('_', '-')} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Scalar) -> str:
    """One scalar as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


__all__ = [
    "ConfigError",
    "RunConfig",
    "default_flat",
    "flatten",
    "load",
    "parse_override",
    "read_toml",
    "resolve",
    "to_toml",
]
