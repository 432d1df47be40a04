"""The data section of the run config: which dataset, how it is split over users.

`DataSpec` is built from the ``[data]`` table of the run config (keys in kebab case:
``data.num-users`` is ``DataSpec.num_users``) and validated once, at the entry point, by
`load_federated_dataset`. Every bad input raises `DataError` with a one-line message that
says what is wrong and how to fix it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from pollinate.registry import Option, Options, Range, Registry, Scalar

if TYPE_CHECKING:
    import numpy as np

    from .federated import FederatedDataset

__all__ = [
    "DATASETS",
    "DATA_RANGES",
    "MAX_CLASSES",
    "PARTITIONERS",
    "DataError",
    "DataOptions",
    "DataSpec",
    "DatasetEntry",
    "PartitionerEntry",
    "Range",
    "config_key",
]

#: Most classes a dataset may have (labels 0..C-1): the model's head is (D, C) and
#: confusion counts are (C,), so a label like 10**12 would be a multi-terabyte allocation.
MAX_CLASSES = 10_000


class DataError(ValueError):
    """Bad data or data settings; the message is one line that says how to fix it."""


def config_key(field_name: str) -> str:
    """The run-config key of a `DataSpec` field: ``min_samples`` -> ``data.min-samples``."""
    return "data." + field_name.replace("_", "-")


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: ``load(spec)`` builds its users from a validated `DataSpec`.

    ``uses`` names the ``data.*`` keys it reads (for the README's table); ``options`` are
    keys of its own (``data.<option>``, read from ``spec.options``).
    """

    name: str
    help: str
    load: Callable[[DataSpec], FederatedDataset]
    uses: tuple[str, ...] = ()
    options: dict[str, Option] = field(default_factory=dict)


@dataclass(frozen=True)
class PartitionerEntry:
    """A registered way to split ``digits`` over users: ``split(labels, spec, rng)``
    returns each user's sample indices and a few words for `describe`."""

    name: str
    help: str
    split: Callable[[np.ndarray, DataSpec, np.random.Generator], tuple[list[np.ndarray], str]]
    uses: tuple[str, ...] = ()
    options: dict[str, Option] = field(default_factory=dict)


#: Every dataset (the choices of ``data.dataset``), registered in :mod:`.federated`.
DATASETS: Registry[DatasetEntry] = Registry("data.dataset")
#: Every partitioner (``data.partitioner``), registered in :mod:`.federated`.
PARTITIONERS: Registry[PartitionerEntry] = Registry("data.partitioner")


def _opt(default: Scalar, help: str, range: Range | None = None, **meta: Any) -> Any:
    """A `DataOptions` field: its default, its help (the README's table) and its range."""
    return field(default=default, metadata={"help": help, "range": range, **meta})


@dataclass(frozen=True)
class DataOptions:
    """The run config's ``[data]`` table: every `DataSpec` field but the seed (the run's).

    Each field's metadata holds its help text and allowed range: the one rule set for the
    ``data.*`` keys, which `DataSpec.validate` applies and the run config documents.
    """

    dataset: str = _opt(
        "digits", "which users' data; see the datasets below", registry=lambda: DATASETS
    )
    num_users: int = _opt(
        20, "number of users (`digits`, `synthetic*`; a `file` has its own)", Range(1, 1_000_000)
    )
    partitioner: str = _opt(
        "dirichlet", "how `digits` is split over users", registry=lambda: PARTITIONERS
    )
    alpha: float = _opt(
        0.5, "Dirichlet concentration: small = very skewed labels", Range(0, 1e6, open_lo=True)
    )
    shards_per_user: int = _opt(2, "label-sorted shards per user (`shards`)", Range(1, 10_000))
    synthetic_alpha: float = _opt(
        1.0, "Synthetic(alpha, beta): spread of the per-user models", Range(0, 100)
    )
    synthetic_beta: float = _opt(
        1.0, "Synthetic(alpha, beta): spread of the per-user feature means", Range(0, 100)
    )
    path: str = _opt("", "the CSV/Parquet table of `file` (one row per sample)")
    user_column: str = _opt("user", "`file`: the column naming each row's user")
    label_column: str = _opt("label", "`file`: the class label column; the rest are features")
    test_fraction: float = _opt(
        0.2,
        "fraction of each user's samples held out as its test set",
        Range(0, 1, open_lo=True, open_hi=True),
    )
    central_test_fraction: float = _opt(
        0.2,
        "`digits`: stratified fraction held out before partitioning (server-side test)",
        Range(0, 1, open_lo=True, open_hi=True),
    )
    # 1 train + 1 test sample at least
    min_samples: int = _opt(4, "fewest samples a user may hold", Range(2, 1_000_000))
    # A registered dataset's own options (data.<option>): none for the built-in ones.
    options: Options = field(
        default_factory=lambda: Options(
            {key: option.default for key, (option, _) in DATASETS.options().items()}
        ),
        metadata={"registry": lambda: DATASETS},
    )


#: The seed is the run's (``run.seed``): numpy's and torch's seeds stay in range.
SEED_RANGE = Range(0, 2**32 - 1)

#: Allowed values of every numeric `DataSpec` field (the ``data.*`` config keys and the seed),
#: from the fields' metadata. Sizes are bounded before anything is allocated.
DATA_RANGES: dict[str, Range] = {
    **{f.name: f.metadata["range"] for f in fields(DataOptions) if f.metadata.get("range")},
    "seed": SEED_RANGE,
}


@dataclass(frozen=True)
class DataSpec(DataOptions):
    """Which data each user holds.

    Attributes
    ----------
    dataset
        ``"digits"`` (scikit-learn's bundled 8x8 digits, partitioned over users),
        ``"synthetic"`` / ``"synthetic-iid"`` (FedProx's Synthetic(alpha, beta), one natural
        partition per user, generated lazily) or ``"file"`` (a CSV/Parquet table with a
        user-id column; every distinct id is one user).
    num_users
        Number of users for ``digits`` and ``synthetic*``; ignored for ``file``.
    partitioner
        How ``digits`` is split over users: ``"iid"``, ``"dirichlet"`` (label skew) or
        ``"shards"`` (FedAvg's pathological split). Ignored by the other datasets.
    alpha
        Dirichlet concentration: small is very skewed, large approaches IID.
    shards_per_user
        Label-sorted shards per user for ``"shards"``.
    synthetic_alpha, synthetic_beta
        Standard deviations of the per-user model prior and feature-mean prior of
        Synthetic(alpha, beta); 0 is allowed (the paper's Synthetic(0, 0)).
    path, user_column, label_column
        The table for ``dataset = "file"``; every other column is a numeric feature.
    test_fraction
        Fraction of each user's own samples held out as that user's test set.
    central_test_fraction
        ``digits`` only: stratified fraction held out *before* partitioning, as a central
        test set for server-side evaluation.
    min_samples
        Fewest samples a user may hold (before its train/test split); at least 2.
    seed
        Seeds everything: the same spec gives identical arrays.
    """

    seed: int = 0

    def validate(self) -> DataSpec:
        """Raise `DataError` for the first bad value; return ``self`` so calls can chain."""
        for name in ("dataset", "partitioner", "path", "user_column", "label_column"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DataError(f"{config_key(name)} must be a string, got {value!r}")
        for registry, name in ((DATASETS, self.dataset), (PARTITIONERS, self.partitioner)):
            if name not in registry:
                raise DataError(registry.unknown(name))
        for name, allowed in DATA_RANGES.items():
            integer = isinstance(getattr(DataSpec, name), int)  # the default's type
            reason = allowed.problem(config_key(name), getattr(self, name), integer)
            if reason:
                raise DataError(reason)
        if self.dataset == "file" and not self.path:
            raise DataError(
                "data.dataset is 'file' but data.path is empty; "
                "set data.path to a .csv or .parquet file"
            )
        if not self.user_column or not self.label_column:
            raise DataError("data.user-column and data.label-column must not be empty")
        if self.user_column == self.label_column:
            raise DataError(
                f"data.user-column and data.label-column are both {self.user_column!r}; "
                "they must name different columns"
            )
        return self
