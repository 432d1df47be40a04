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


class DataError(ValueError):
    """Bad data or data settings; the message is one line that says how to fix it."""


def config_key(field_name: str) -> str:
    """The run-config key of a `DataSpec` field: ``min_samples`` -> ``data.min-samples``."""
    return "data." + field_name.replace("_", "-")


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
        _int_at_least("num_users", self.num_users, 1)
        _int_at_least("shards_per_user", self.shards_per_user, 1)
        _int_at_least("min_samples", self.min_samples, 2, why=" (1 train + 1 test sample)")
        _int_at_least("seed", self.seed, 0)
        _positive("alpha", self.alpha)
        _non_negative("synthetic_alpha", self.synthetic_alpha)
        _non_negative("synthetic_beta", self.synthetic_beta)
        _fraction("test_fraction", self.test_fraction)
        _fraction("central_test_fraction", self.central_test_fraction)
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


def _int_at_least(name: str, value: object, low: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"{config_key(name)} must be an integer >= {low}{why}, got {value!r}")


def _number(name: str, value: object, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{config_key(name)} must be a number {rule}, got {value!r}")
    return float(value)


def _positive(name: str, value: object) -> None:
    if _number(name, value, "> 0") <= 0:
        raise DataError(f"{config_key(name)} must be a number > 0, got {value!r}")


def _non_negative(name: str, value: object) -> None:
    if _number(name, value, ">= 0") < 0:
        raise DataError(f"{config_key(name)} must be a number >= 0, got {value!r}")


def _fraction(name: str, value: object) -> None:
    if not 0 < _number(name, value, "strictly between 0 and 1") < 1:
        raise DataError(
            f"{config_key(name)} must be a number strictly between 0 and 1, got {value!r}"
        )
