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
from pollinate.data.spec import DATA_RANGES, MAX_CLASSES, Range

Scalar = bool | int | float | str

MODELS = ("cnn", "logreg", "mlp")
STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)
PERSONALIZATION = ("none", "finetune", "fedper", "ditto")
BACKENDS = ("auto", "local", "ray")
SAVE_MODELS = ("every-round", "final-round")
# pollinate.models.attacks.ATTACKS (tests/models/test_models_checks.py keeps them equal).
ATTACKS = ("none", "sign-flip", "scaling", "gaussian", "label-flip", "nan")


class ConfigError(ValueError):
    """A bad run config; the message is one line saying what to change."""


@dataclass(frozen=True)
class RunSection:
    name: str = "default"
    num_rounds: int = 10
    seed: int = 0
    # Where results go; empty means runs/<name> under the working directory.
    dir: str = ""
    # Continue the run in run.dir from its last completed round (`pollinate run --resume`).
    resume: bool = False
    # Replace an earlier run in run.dir (only Pollinate's own files there are removed).
    overwrite: bool = False


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
    # Krum, Multi-Krum and Bulyan: the number of malicious users assumed (f).
    krum_byzantine: int = 0
    # Multi-Krum: how many of the best-scored updates are averaged; 0 = n - f.
    multikrum_select: int = 0


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


# Allowed values of every numeric key (`Range`: ``lo..hi`` for ints, an interval for
# floats; NaN and infinities are outside every range). Sizes are bounded here, before
# anything is allocated; the `data.*` keys' ranges live beside their definition
# (pollinate.data.spec.DATA_RANGES). A new numeric key needs a line here
# (tests/test_config.py checks that every one has a range).
DAY = 86_400.0
RANGES: dict[str, Range] = {
    "run.num-rounds": Range(1, 100_000),
    "run.seed": DATA_RANGES["seed"],
    "model.hidden": Range(1, 16_384),
    "model.depth": Range(1, 64),
    "model.in-features": Range(0, 1_000_000),  # 0 = from the data
    "model.num-classes": Range(0, MAX_CLASSES),  # 0 = from the data
    "train.epochs": Range(0, 10_000),
    "train.batch-size": Range(-1, 1_000_000),  # <= 0: full batch
    "train.lr": Range(0, 10, open_lo=True),
    "train.momentum": Range(0, 1, open_hi=True),
    "train.weight-decay": Range(0, 10),
    "train.straggler-fraction": Range(0, 1),
    "train.stack-users": Range(0, 4_096),  # 0 or 1 = one user at a time
    "strategy.fraction-train": Range(0, 1, open_lo=True),
    "strategy.fraction-evaluate": Range(0, 1),
    "strategy.min-train-users": Range(1, 1_000_000),
    "strategy.min-evaluate-users": Range(0, 1_000_000),
    "strategy.min-nodes": Range(1, 100_000),
    "strategy.proximal-mu": Range(0, 1_000),
    "strategy.server-lr": Range(0, 10, open_lo=True),
    "strategy.beta-1": Range(0, 1, open_hi=True),
    "strategy.beta-2": Range(0, 1, open_hi=True),
    "strategy.tau": Range(0, 10, open_lo=True),
    # It trims this fraction at each end: 0.5 would trim every user.
    "strategy.trim-beta": Range(0, 0.5, open_lo=True, open_hi=True),
    "strategy.krum-byzantine": Range(0, 100_000),
    "strategy.multikrum-select": Range(0, 100_000),  # 0 = n - f
    "validation.max-examples": Range(0, 10**12),  # 0 = no cap
    "validation.norm-bound": Range(0, 1e30),  # 0 = off
    "validation.norm-bound-median-multiple": Range(0, 1e6),  # 0 = off, else >= 1
    "attack.fraction": Range(0, 1),
    "attack.seed": DATA_RANGES["seed"],
    "attack.scale": Range(0, 1e12),
    "attack.noise-std": Range(0, 1e12),
    "personalization.finetune-epochs": Range(0, 10_000),
    "personalization.finetune-lr": Range(0, 10),  # 0 = train.lr
    "personalization.ditto-lambda": Range(0, 1_000),
    "personalization.ditto-epochs": Range(1, 10_000),
    "simulation.num-nodes": Range(0, 100_000),  # 0 = auto
    "simulation.cpus-per-node": Range(0, 1_024, open_lo=True),
    "server.node-wait-timeout": Range(0, 30 * DAY, open_lo=True),
    "server.round-timeout": Range(0, 30 * DAY, open_lo=True),
    **{f"data.{name.replace('_', '-')}": r for name, r in DATA_RANGES.items() if name != "seed"},
}


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
class ValidationSection:
    # Every update is checked before aggregation (finite, the model's size and dtype, a
    # positive whole example count); these bound it further. 0 = off.
    # The largest num-examples believed from one user (a cohort mean: per user).
    max_examples: int = 1_000_000
    # Reject an update with ||w_user - w_global|| above this.
    norm_bound: float = 0.0
    # Reject an update whose norm is above this multiple of the round's median update
    # norm (>= 1). Users then send their own updates, not their cohort's mean.
    norm_bound_median_multiple: float = 0.0


@dataclass(frozen=True)
class AttackSection:
    # Simulated attackers, to measure defences (pollinate.models.attacks): this fraction
    # of the users (chosen by `seed`) poison their updates. Off by default.
    kind: str = "none"
    fraction: float = 0.0
    seed: int = 0
    # sign-flip sends w_g - scale * delta, scaling w_g + scale * delta.
    scale: float = 10.0
    # gaussian sends w_g + N(0, noise-std^2).
    noise_std: float = 1.0


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
    validation: ValidationSection = field(default_factory=ValidationSection)
    attack: AttackSection = field(default_factory=AttackSection)

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
            try:
                return float(value)
            except OverflowError:  # an integer literal beyond any float
                raise ConfigError(f"config key '{key}' = {value} is too large") from None
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


def _run_name(name: str) -> None:
    # runs/<name>: a name is one folder inside runs/, never a path out of it (run.dir is
    # the way to put a run elsewhere).
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or ":" in name:
        raise ConfigError(
            f"run.name = {name!r} must be a plain folder name (no '/', '\\', ':' or '..'); "
            "set run.dir (or --run-dir) to put the run somewhere else"
        )


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
    flat = cfg.to_flat()
    for key, allowed in RANGES.items():
        reason = allowed.problem(key, flat[key], integer=isinstance(flat[key], int))
        if reason:
            raise ConfigError(reason)
    _run_name(cfg.run.name)
    if cfg.run.resume and cfg.run.overwrite:
        raise ConfigError("run.resume and run.overwrite exclude each other: pick one")
    if cfg.data.dataset == "file" and not cfg.data.path:
        raise ConfigError("data.dataset = 'file' needs data.path = 'your-users.csv' (or .parquet)")
    _check_validation(cfg)
    _check_attack(cfg)
    _check_model_size(cfg)


def _check_validation(cfg: RunConfig) -> None:
    v = cfg.validation  # ranges: RANGES
    if v.norm_bound_median_multiple != 0 and not v.norm_bound_median_multiple >= 1:
        raise ConfigError(
            "validation.norm-bound-median-multiple must be 0 (off) or >= 1 (a multiple of "
            f"the round's median update norm), got {v.norm_bound_median_multiple}"
        )


def _check_attack(cfg: RunConfig) -> None:
    a = cfg.attack  # ranges: RANGES
    _choice("attack.kind", a.kind, ATTACKS)
    if (a.kind == "none") != (a.fraction == 0):
        raise ConfigError(
            "attack.kind and attack.fraction go together: set both (e.g. attack.kind = "
            "'sign-flip', attack.fraction = 0.2) or neither"
        )


def _check_model_size(cfg: RunConfig, in_features: int = 0, num_classes: int = 0) -> None:
    """Refuse an architecture too large to allocate, before anything is built.

    Sizes the data decides (``0`` in the config, and not given here) are taken as
    digits-sized (64 features, 10 classes) for this early check; :func:`check_against_data`
    repeats it with the data's own sizes.
    """
    from pollinate.models import MAX_PARAMETERS, parameter_count

    features = cfg.model.in_features or in_features or 64
    classes = cfg.model.num_classes or num_classes or 10
    try:
        n = parameter_count(
            cfg.model.name, in_features=features, num_classes=classes, **model_kwargs(cfg)
        )
    except ValueError:  # e.g. a cnn with non-square in-features: the builder says so later
        return
    if n > MAX_PARAMETERS:
        raise ConfigError(
            f"model {cfg.model.name!r} with {features} input features and {classes} classes "
            f"has {n:,} parameters, more than the {MAX_PARAMETERS:,} allowed; lower "
            "model.hidden / model.depth (or use fewer feature columns)"
        )


def check_against_data(
    cfg: RunConfig, *, num_users: int, num_features: int, num_classes: int, num_nodes: int
) -> None:
    """Refuse settings impossible for this data, once the users are known (one line each).

    Parameters
    ----------
    cfg
        A resolved config.
    num_users, num_features, num_classes
        What the dataset holds.
    num_nodes
        Flower nodes the simulation will host the users on.
    """
    s = cfg.strategy
    if s.min_train_users > num_users:
        raise ConfigError(
            f"strategy.min-train-users = {s.min_train_users} but the data has {num_users} "
            f"users; set it to at most {num_users}"
        )
    if s.fraction_evaluate > 0 and s.min_evaluate_users > num_users:
        raise ConfigError(
            f"strategy.min-evaluate-users = {s.min_evaluate_users} but the data has "
            f"{num_users} users; set it to at most {num_users}"
        )
    # Flower samples max(int(fraction * users), minimum) users a round (FedAvg.configure_train).
    sampled = min(max(int(s.fraction_train * num_users), s.min_train_users), num_users)
    if s.name == "krum" and s.krum_byzantine and sampled < 2 * s.krum_byzantine + 3:
        # Krum scores each update by its n - f - 2 nearest neighbours and needs n > 2f + 2
        # (Blanchard et al. 2017); with fewer it cannot tell attackers from the rest.
        raise ConfigError(
            f"strategy.krum-byzantine = {s.krum_byzantine} needs at least "
            f"{2 * s.krum_byzantine + 3} users per round (n > 2f + 2) but a round trains "
            f"{sampled} of {num_users}; set it to at most {max((sampled - 3) // 2, 0)}"
        )
    if s.min_nodes > num_nodes:
        raise ConfigError(
            f"strategy.min-nodes = {s.min_nodes} but this simulation runs {num_nodes} Flower "
            f"nodes ({num_users} users); set it to at most {num_nodes}"
        )
    _check_model_size(cfg, num_features, num_classes)


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
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file '{p}' is not UTF-8 text (byte {err.start} is {err.object[err.start]:#x});"
            " a config is a TOML text file like configs/quickstart.toml"
        ) from None


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
    "RANGES",
    "ConfigError",
    "RunConfig",
    "check_against_data",
    "default_flat",
    "flatten",
    "load",
    "parse_override",
    "read_toml",
    "resolve",
    "to_toml",
]
