"""Per-user label counts and their heterogeneity (data/stats.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pollinate.data import DataSpec, load_federated_dataset
from pollinate.data.stats import LabelCounts, label_counts, tv_distance


def counts(train: list[list[int]], test: list[list[int]] | None = None) -> LabelCounts:
    tr = np.array(train, dtype=np.int64)
    te = np.zeros_like(tr) if test is None else np.array(test, dtype=np.int64)
    return LabelCounts([f"u{k}" for k in range(len(tr))], tr, te)


def test_tv_distance_is_half_the_l1_distance() -> None:
    assert tv_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 1.0
    assert tv_distance(np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])) == 0.5
    rows = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert np.allclose(tv_distance(rows, np.array([0.4, 0.6])), [0.2, 0.2])


def test_iid_users_are_near_zero_and_one_label_users_are_high() -> None:
    iid = counts([[10, 10, 10, 10]] * 5)
    assert iid.mean_tv == pytest.approx(0.0)
    # Four users each holding one of four equally common labels: 1 - 1/4 each.
    one_label = counts([[12, 0, 0, 0], [0, 12, 0, 0], [0, 0, 12, 0], [0, 0, 0, 12]])
    assert np.allclose(one_label.tv_distances(), 0.75)
    assert one_label.mean_tv == pytest.approx(0.75)
    # Test samples count too: a user's distribution is over everything it holds.
    mixed = counts([[4, 0], [0, 4]], test=[[0, 4], [4, 0]])
    assert mixed.mean_tv == pytest.approx(0.0)

    # On digits: iid and Dirichlet(100) users are close to the whole, Dirichlet(0.1) far,
    # one shard per user (a single label each) is 1 - 1/10.
    def mean_tv(**spec: Any) -> float:
        return label_counts(load_federated_dataset(DataSpec(num_users=10, **spec))).mean_tv

    assert mean_tv(partitioner="iid") < 0.15
    assert mean_tv(alpha=100.0) < 0.15
    assert 0.5 < mean_tv(alpha=0.1) < 0.85
    assert mean_tv(partitioner="shards", shards_per_user=1) == pytest.approx(0.9, abs=0.02)


def test_label_counts_are_each_users_own_labels() -> None:
    dataset = load_federated_dataset(DataSpec(num_users=5, alpha=0.5))
    c = label_counts(dataset)
    assert c.user_ids == dataset.user_ids and c.num_classes == 10
    for k, user in enumerate(dataset.users()):
        assert np.array_equal(c.train[k], np.bincount(user.y_train, minlength=10))
        assert np.array_equal(c.test[k], np.bincount(user.y_test, minlength=10))
    assert np.allclose(c.user_distributions().sum(axis=1), 1.0)
    assert c.global_distribution().sum() == pytest.approx(1.0)
    table = c.table()
    assert list(table.columns[:5]) == ["user", "samples", "train", "test", "tv_distance"]
    assert (table["samples"] == table[[f"label_{i}" for i in range(10)]].sum(axis=1)).all()


def test_round_trip_through_a_dict() -> None:
    c = counts([[1, 2, 3], [4, 5, 6]], test=[[0, 1, 0], [1, 0, 0]])
    back = LabelCounts.from_dict(c.to_dict())
    assert back.user_ids == c.user_ids
    assert np.array_equal(back.train, c.train) and np.array_equal(back.test, c.test)
    with pytest.raises(ValueError):
        LabelCounts.from_dict({**c.to_dict(), "num_classes": 4})
