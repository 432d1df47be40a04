"""How a federated dataset is spread over its users: label counts and their heterogeneity.

One function counts every user's train and test labels (:func:`label_counts`); the report
of a run (:mod:`pollinate.server.report`) and ``pollinate data`` (before a run) both show
what it returns. Heterogeneity is measured as the total-variation distance of each user's
label distribution to the global one,

    TV(p_k, p) = 1/2 * sum_c |p_k(c) - p(c)|,

0 for a user whose labels are spread exactly like everyone's, ``1 - p(c)`` for a user who
holds only class ``c``; :attr:`LabelCounts.mean_tv` is its mean over users.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .federated import FederatedDataset

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True, eq=False)
class LabelCounts:
    """Per-user label counts: ``train[k, c]`` = user ``k``'s training samples of class ``c``.

    Attributes
    ----------
    user_ids
        The users, in the dataset's order (row ``k`` of the arrays).
    train, test
        int64 arrays ``(users, classes)``: the user's own train and test split.
    """

    user_ids: list[str]
    train: np.ndarray
    test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.train.shape[1])

    @property
    def total(self) -> np.ndarray:
        """``(users, classes)``: every sample a user holds, train and test."""
        return np.asarray(self.train + self.test)

    @property
    def samples(self) -> np.ndarray:
        """``(users,)``: samples per user."""
        return np.asarray(self.total.sum(axis=1))

    def global_distribution(self) -> np.ndarray:
        """``(classes,)``: the label distribution of all users' samples pooled."""
        pooled = self.total.sum(axis=0).astype(np.float64)
        return pooled / max(pooled.sum(), 1.0)

    def user_distributions(self) -> np.ndarray:
        """``(users, classes)``: each user's own label distribution (rows sum to 1)."""
        total = self.total.astype(np.float64)
        return total / np.maximum(total.sum(axis=1, keepdims=True), 1.0)

    def tv_distances(self) -> np.ndarray:
        """``(users,)``: TV distance of each user's label distribution to the global one."""
        return tv_distance(self.user_distributions(), self.global_distribution())

    @property
    def mean_tv(self) -> float:
        """Mean over users of :meth:`tv_distances`: 0 = IID labels, near 1 = disjoint."""
        distances = self.tv_distances()
        return float(distances.mean()) if len(distances) else float("nan")

    def table(self) -> pd.DataFrame:
        """One row per user: ``user``, ``samples``, ``train``, ``test``, ``tv_distance`` and
        ``label_<c>`` (the user's samples of class ``c``, train and test)."""
        import pandas as pd

        frame = pd.DataFrame(
            {
                "user": self.user_ids,
                "samples": self.samples,
                "train": self.train.sum(axis=1),
                "test": self.test.sum(axis=1),
                "tv_distance": self.tv_distances(),
            }
        )
        labels = pd.DataFrame(self.total, columns=[f"label_{c}" for c in range(self.num_classes)])
        return pd.concat([frame, labels], axis=1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: ``users``, ``train`` and ``test`` as lists of lists."""
        return {
            "users": list(self.user_ids),
            "num_classes": self.num_classes,
            "train": self.train.tolist(),
            "test": self.test.tolist(),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LabelCounts:
        """The inverse of :meth:`to_dict`; raises ``ValueError`` on a malformed table."""
        users = [str(u) for u in raw["users"]]
        classes = int(raw["num_classes"])
        train = np.asarray(raw["train"], dtype=np.int64).reshape(len(users), classes)
        test = np.asarray(raw["test"], dtype=np.int64).reshape(len(users), classes)
        return cls(users, train, test)


def tv_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total-variation distance ``1/2 * sum |p - q|`` over the last axis (broadcasts)."""
    return np.asarray(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(axis=-1))


def label_counts(dataset: FederatedDataset) -> LabelCounts:
    """Count every user's train and test labels.

    Builds each user once without keeping it (a dataset of 10,000 synthetic users takes
    seconds and the memory of one user at a time).
    """
    c = dataset.num_classes
    users = dataset.user_ids
    train = np.zeros((len(users), c), dtype=np.int64)
    test = np.zeros((len(users), c), dtype=np.int64)
    for k, user_id in enumerate(users):
        data = dataset._peek(user_id)  # same package; a built user is not cached
        train[k] = np.bincount(data.y_train, minlength=c)[:c]
        test[k] = np.bincount(data.y_test, minlength=c)[:c]
    return LabelCounts(list(users), train, test)
