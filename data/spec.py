"""The data section of the run config: which dataset, how it is split over users.

`DataSpec` is built from the ``[data]`` table of the run config (keys in kebab case:
``data.num-users`` is ``DataSpec.num_users``) and validated once, at the entry point, by
`load_federated_dataset`. Every bad input raises `DataError` with a one-line message that
says what is wrong and how to fix it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DATASETS = ("digits", "synthetic", "synthetic-iid", "file")
PARTITIONERS = ("iid", "dirichlet", "shards")

#: Most classes a dataset may have (labels 0..C-1): the model's head is (D, C) and
#: confusion counts are (C,), so a label like 10**12 would be a multi-terabyte allocation.
MAX_CLASSES = 10_000


class DataError(ValueError):
    """Bad data or data settings; the message is one line that says how to fix it."""


def config_key(field_name: str) -> str:
    """The run-config key of a `DataSpec` field: ``min_samples`` -> ``data.min-samples``."""
    return "data." + field_name.replace("_", "-")


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric setting: ``lo..hi``, each end closed unless open.

    Every value must also be finite (NaN and infinities are outside every range). Printed as
    ``1..1000`` for integer settings and as an interval, e.g. ``(0, 1]``, for float ones.
    """

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.open_lo else value >= self.lo
        below = value < self.hi if self.open_hi else value <= self.hi
        return above and below

    def describe(self, integer: bool) -> str:
        if integer:
            return f"an integer in {int(self.lo)}..{int(self.hi)}"
        lo, hi = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
        return f"a finite number in {lo}{self.lo:g}, {self.hi:g}{hi}"

    def problem(self, key: str, value: object, integer: bool) -> str | None:
        """The one-line error for ``value``, or None if it is allowed."""
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if value in self and (is_int or not integer):
            return None
        return f"{key} must be {self.describe(integer)}, got {value!r}"


@dataclass(frozen=True)
class DataOptions:
    """The run config's ``[data]`` table: every `DataSpec` field but the seed (the run's)."""

    dataset: str = "digits"
    num_users: int = 20
    partitioner: str = "dirichlet"
    alpha: float = 0.5
    shards_per_user: int = 2
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    path: str = ""
    user_column: str = "user"
    label_column: str = "label"
    test_fraction: float = 0.2
    central_test_fraction: float = 0.2
    min_samples: int = 4


#: Allowed values of every numeric `DataSpec` field (the ``data.*`` config keys and the seed).
#: Sizes are bounded before anything is allocated; floats must be finite.
DATA_RANGES: dict[str, Range] = {
    "num_users": Range(1, 1_000_000),
    "alpha": Range(0, 1e6, open_lo=True),
    "shards_per_user": Range(1, 10_000),
    "synthetic_alpha": Range(0, 100),
    "synthetic_beta": Range(0, 100),
    "test_fraction": Range(0, 1, open_lo=True, open_hi=True),
    "central_test_fraction": Range(0, 1, open_lo=True, open_hi=True),
    "min_samples": Range(2, 1_000_000),  # 1 train + 1 test sample at least
    "seed": Range(0, 2**32 - 1),  # numpy's and torch's seeds stay in range
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
        _choice("dataset", self.dataset, DATASETS)
        _choice("partitioner", self.partitioner, PARTITIONERS)
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


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DataError(
            f"unknown {config_key(name)} {value!r}; choose one of: {', '.join(choices)}"
        )
