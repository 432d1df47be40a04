from __future__ import annotations

import numpy as np
import pytest

from pollinate.data import (
    partition_dirichlet,
    partition_iid,
    partition_shards,
    split_train_test,
)


def _labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n)


def _partition(name: str, labels: np.ndarray, num_users: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "iid":
        return partition_iid(len(labels), num_users, rng)
    if name == "dirichlet":
        return partition_dirichlet(labels, num_users, 1.0, rng, 1)
    return partition_shards(labels, num_users, 2, rng)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("num_samples", "num_users"), [(50, 1), (101, 7), (1000, 20)])
def test_every_sample_in_exactly_one_user(
    name: str, seed: int, num_samples: int, num_users: int
) -> None:
    parts = _partition(name, _labels(num_samples, 10, seed), num_users, seed)
    assert len(parts) == num_users
    assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(num_samples))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in partition_iid(103, 10, np.random.default_rng(0))]
    assert max(sizes) - min(sizes) <= 1


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=10) / len(p)
        freq = freq[freq > 0]
        entropies.append(-(freq * np.log(freq)).sum())
    return float(np.mean(entropies))


def test_small_alpha_is_more_label_skewed() -> None:
    labels = np.repeat(np.arange(10), 200)
    entropy = {
        alpha: np.mean(
            [
                _mean_label_entropy(
                    labels,
                    partition_dirichlet(labels, 10, alpha, np.random.default_rng(s), 5),
                )
                for s in range(3)
            ]
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 0.95 * np.log(10)  # near IID
    assert entropy[0.1] < 0.6 * np.log(10)


def test_dirichlet_respects_min_samples() -> None:
    labels = _labels(400, 10, 0)
    parts = partition_dirichlet(labels, 20, 0.3, np.random.default_rng(0), 8)
    assert min(len(p) for p in parts) >= 8


def test_dirichlet_impossible_min_samples(data_error) -> None:
    labels = np.repeat(np.arange(10), 10)
    with data_error("raise data.alpha", "data.num-users"):
        partition_dirichlet(labels, 40, 0.01, np.random.default_rng(0), 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_pure_shards_give_at_most_shards_per_user_labels(seed: int) -> None:
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(10), 40))
    for shards_per_user in (1, 2, 4):
        # 10 classes x 40 samples, shards of 40 / (num_shards / 10) samples: label-pure.
        num_users = 20 // shards_per_user
        parts = partition_shards(labels, num_users, shards_per_user, np.random.default_rng(seed))
        assert all(len(np.unique(labels[p])) <= shards_per_user for p in parts)
        assert {len(p) for p in parts} == {400 // num_users}


def test_too_many_users(data_error) -> None:
    rng = np.random.default_rng(0)
    with data_error("at most 5 users"):
        partition_iid(5, 6, rng)
    with data_error("at most 2 users", "data.num-users"):
        partition_dirichlet(np.zeros(10, dtype=np.int64), 3, 1.0, rng, 4)
    with data_error("lower data.num-users or data.shards-per-user"):
        partition_shards(np.zeros(10, dtype=np.int64), 6, 2, rng)


@pytest.mark.parametrize(
    ("n", "fraction", "expected_test"),
    [(2, 0.2, 1), (2, 0.9, 1), (10, 0.2, 2), (5, 0.01, 1), (5, 0.99, 4), (1000, 0.25, 250)],
)
def test_split_train_test(n: int, fraction: float, expected_test: int) -> None:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = np.arange(n, dtype=np.int64)
    x_train, y_train, x_test, y_test = split_train_test(x, y, fraction, np.random.default_rng(0))
    assert len(y_test) == expected_test and len(y_train) == n - expected_test
    np.testing.assert_array_equal(np.sort(np.concatenate([y_train, y_test])), y)
    np.testing.assert_array_equal(x_train[:, 0], y_train * 3)  # rows stay paired
    np.testing.assert_array_equal(x_test[:, 0], y_test * 3)


def test_split_needs_two_samples(data_error) -> None:
    with data_error("at least 2 samples"):
        split_train_test(np.zeros((1, 2)), np.zeros(1), 0.5, np.random.default_rng(0))
