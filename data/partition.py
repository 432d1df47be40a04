"""Split one central dataset over users, and each user's samples into train and test.

Every partitioner returns ``list[np.ndarray]``: one sorted int64 array of sample indices per
user, every sample in exactly one user. All randomness comes from the ``rng`` passed in.
"""

from __future__ import annotations

import numpy as np

from .spec import DataError

DIRICHLET_MAX_TRIES = 1000


def partition_iid(num_samples: int, num_users: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and deal the samples out evenly: user sizes differ by at most one."""
    _check_users(num_samples, num_users, min_samples=1)
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_users)]


def partition_dirichlet(
    labels: np.ndarray,
    num_users: int,
    alpha: float,
    rng: np.random.Generator,
    min_samples: int = 1,
) -> list[np.ndarray]:
    """Label skew: each class is spread over users in proportions p ~ Dir(alpha * 1).

    The usual label-skew benchmark (Hsu et al. 2019, "Measuring the Effects of Non-Identical
    Data Distribution"; the NIID-Bench variant without rebalancing). Small ``alpha`` gives
    each user few classes; large ``alpha`` approaches IID. The whole draw is repeated until
    every user holds at least ``min_samples`` samples, at most `DIRICHLET_MAX_TRIES` times.
    """
    labels = np.asarray(labels)
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha!r}; set data.alpha")
    _check_users(len(labels), num_users, min_samples)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DIRICHLET_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_users)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_users, alpha))  # (num_users,)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for user, chunk in enumerate(np.split(idx, cuts)):
                parts[user].append(chunk)
        users = [np.sort(np.concatenate(chunks)) for chunks in parts]
        if min(len(u) for u in users) >= min_samples:
            return users
    raise DataError(
        f"dirichlet alpha={alpha} left some of {num_users} users with fewer than "
        f"{min_samples} samples in {DIRICHLET_MAX_TRIES} tries; "
        "raise data.alpha, or lower data.num-users or data.min-samples"
    )


def partition_shards(
    labels: np.ndarray, num_users: int, shards_per_user: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """FedAvg's pathological non-IID split (McMahan et al. 2017, Sec. 3).

    Sort the samples by label (ties in random order), cut them into
    ``num_users * shards_per_user`` contiguous shards of near-equal size, and give each user
    ``shards_per_user`` shards at random. When class sizes are multiples of the shard size,
    every shard holds one label, so a user sees at most ``shards_per_user`` labels.
    """
    labels = np.asarray(labels)
    if shards_per_user < 1:
        raise DataError(f"shards_per_user must be >= 1, got {shards_per_user}")
    num_shards = num_users * shards_per_user
    if num_shards > len(labels):
        raise DataError(
            f"{num_users} users x {shards_per_user} shards needs at least {num_shards} samples "
            f"but there are {len(labels)}; lower data.num-users or data.shards-per-user"
        )
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    owners = rng.permutation(num_shards).reshape(num_users, shards_per_user)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in owners]


def split_train_test(
    x: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle one user's samples and hold out ``round(n * test_fraction)`` for test.

    The test size is clamped to ``[1, n - 1]`` so every user has at least one train and one
    test sample; needs ``n >= 2``. Returns ``(x_train, y_train, x_test, y_test)``.
    """
    n = len(y)
    if len(x) != n:
        raise DataError(f"x has {len(x)} rows but y has {n}; they must match")
    if n < 2:
        raise DataError(
            f"a user with {n} sample(s) cannot be split into train and test; "
            "every user needs at least 2 samples"
        )
    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction must be strictly between 0 and 1, got {test_fraction}")
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    order = rng.permutation(n)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def max_users(num_samples: int, min_samples: int) -> int:
    """How many users ``num_samples`` samples allow when each needs ``min_samples``."""
    return num_samples // min_samples


def _check_users(num_samples: int, num_users: int, min_samples: int) -> None:
    if num_users < 1:
        raise DataError(f"number of users must be >= 1, got {num_users}; set data.num-users")
    if num_users * min_samples > num_samples:
        raise DataError(
            f"{num_samples} samples allow at most {max_users(num_samples, min_samples)} users "
            f"with at least {min_samples} samples each, but {num_users} were asked for; "
            "lower data.num-users or data.min-samples"
        )
