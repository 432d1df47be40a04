"""Federated datasets: every user has their own train and test data.

`load_federated_dataset` is the entry point: it validates a `DataSpec` and returns a
`FederatedDataset` whose users are built on first use (and cached), so a process that hosts
a few of 10,000 users builds only those. Everything is seeded: the same spec gives
identical arrays, and a user's data does not depend on which other users were built.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import synthetic
from .files import load_user_file
from .partition import (
    max_users,
    partition_dirichlet,
    partition_iid,
    partition_shards,
    split_train_test,
)
from .seeds import file_user_rng, shared_rng, user_rng
from .spec import DATASETS, PARTITIONERS, DataError, DatasetEntry, DataSpec, PartitionerEntry

DEFAULT_CACHE_SIZE = 1024


@dataclass(frozen=True, eq=False)
class UserData:
    """One user's own data: ``x_*`` float32 ``(n, F)``, ``y_*`` int64 ``(n,)`` class indices.

    The arrays may be shared with the dataset's cache: treat them as read-only.
    """

    user_id: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)


class FederatedDataset:
    """A set of users, each built on demand by ``build(k)`` for ``k = user_ids.index(id)``.

    Parameters
    ----------
    name
        The dataset's name (``DataSpec.dataset``).
    num_features, num_classes
        Shape of every user's data: ``x`` is ``(n, num_features)``, labels lie in
        ``0..num_classes-1``.
    user_ids
        All user ids, in a stable order.
    build
        Builds user ``k``'s `UserData`; must be deterministic.
    central_test
        ``(x, y)`` held out before partitioning for server-side evaluation, or ``None``.
    detail
        How the data was made, shown by `describe`.
    cache_size
        How many built users to keep (least recently used are dropped and rebuilt on
        demand); bounds memory when one process walks through many users.
    """

    def __init__(
        self,
        *,
        name: str,
        num_features: int,
        num_classes: int,
        user_ids: list[str],
        build: Callable[[int], UserData],
        central_test: tuple[np.ndarray, np.ndarray] | None = None,
        detail: str = "",
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.name = name
        self.num_features = num_features
        self.num_classes = num_classes
        self.user_ids = list(user_ids)
        self.central_test = central_test
        self.detail = detail
        self._build = build
        self._index = {user_id: k for k, user_id in enumerate(self.user_ids)}
        self._cache: OrderedDict[str, UserData] = OrderedDict()
        self._cache_size = cache_size

    def __len__(self) -> int:
        return len(self.user_ids)

    def __repr__(self) -> str:
        return (
            f"FederatedDataset(name={self.name!r}, users={len(self.user_ids)}, "
            f"features={self.num_features}, classes={self.num_classes})"
        )

    def user(self, user_id: str) -> UserData:
        """User ``user_id``'s data, built on first use; always the same arrays."""
        cached = self._cache.get(user_id)
        if cached is not None:
            self._cache.move_to_end(user_id)
            return cached
        k = self._index.get(user_id)
        if k is None:
            raise DataError(
                f"unknown user {user_id!r}; dataset {self.name!r} has {len(self.user_ids)} "
                f"users ({_span(self.user_ids)})"
            )
        data = self._build(k)
        self._cache[user_id] = data
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return data

    def users(self, ids: Iterable[str] | None = None) -> list[UserData]:
        """The given users' data in the given order; all users when ``ids`` is None."""
        return [self.user(user_id) for user_id in (self.user_ids if ids is None else ids)]

    def describe(self) -> str:
        """One line: users, samples, features, classes, samples per user (min/median/max).

        Builds every user (cheap for digits and files; for 10,000 synthetic users, seconds).
        """
        sizes = np.array(  # (users, 2): train, test; users are not kept, to bound memory
            [(d.num_train, d.num_test) for d in map(self._peek, self.user_ids)], dtype=np.int64
        ).reshape(-1, 2)
        counts, train = sizes.sum(axis=1), int(sizes[:, 0].sum())
        central = (
            f", central test {len(self.central_test[1])}" if self.central_test is not None else ""
        )
        detail = f" ({self.detail})" if self.detail else ""
        return (
            f"{self.name}{detail}: {len(self.user_ids)} users, {int(counts.sum())} samples "
            f"({train} train / {int(counts.sum()) - train} test){central}, "
            f"{self.num_features} features, {self.num_classes} classes, samples per user "
            f"min {int(counts.min())} / median {float(np.median(counts)):g} / "
            f"max {int(counts.max())}"
        )

    def _peek(self, user_id: str) -> UserData:
        """A user's data without adding it to the cache."""
        cached = self._cache.get(user_id)
        return cached if cached is not None else self._build(self._index[user_id])


def load_federated_dataset(spec: DataSpec) -> FederatedDataset:
    """Validate ``spec`` and build the `FederatedDataset` it describes."""
    spec.validate()
    return DATASETS.get(spec.dataset).load(spec)


def shared_federated_dataset(spec: DataSpec) -> FederatedDataset:
    """`load_federated_dataset`, built once per process for the same spec and source.

    One run reads its data in several places of one process (the CLI's check of the data,
    the ServerApp's model shape, the data-split report); parsing a 100 MB users file each
    time cost a second apiece. A ``file`` dataset is read again once its file changed
    (another size or modification time). Errors are raised every time, never kept.
    """
    return _shared_dataset(spec, _source_stamp(spec))


def _source_stamp(spec: DataSpec) -> tuple[int, int] | None:
    """What identifies the file a ``file`` spec reads: (size, mtime in ns); None otherwise."""
    if spec.dataset != "file":
        return None
    try:
        st = os.stat(spec.path)
    except OSError:
        return None  # load_federated_dataset says what is wrong with the path
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _shared_dataset(spec: DataSpec, stamp: tuple[int, int] | None) -> FederatedDataset:
    del stamp  # part of the cache key only
    return load_federated_dataset(spec)


def register_dataset(
    name: str, *, help: str, uses: tuple[str, ...] = (), options: dict | None = None
) -> Callable[[Callable[[DataSpec], FederatedDataset]], Callable[[DataSpec], FederatedDataset]]:
    """Decorator: ``load(spec) -> FederatedDataset`` becomes ``data.dataset = name``.

    ``uses`` names the ``data.*`` keys it reads; ``options`` (:class:`pollinate.registry.
    Option` by key) are its own keys, ``data.<key>``, read from ``spec.options``.
    """

    def decorator(
        load: Callable[[DataSpec], FederatedDataset],
    ) -> Callable[[DataSpec], FederatedDataset]:
        DATASETS.add(DatasetEntry(name, help, load, uses, dict(options or {})))
        return load

    return decorator


def register_partitioner(
    name: str, *, help: str, uses: tuple[str, ...] = ()
) -> Callable[[Splitter], Splitter]:
    """Decorator: ``split(labels, spec, rng) -> (indices per user, detail)`` becomes
    ``data.partitioner = name`` (for ``digits``)."""

    def decorator(split: Splitter) -> Splitter:
        PARTITIONERS.add(PartitionerEntry(name, help, split, uses))
        return split

    return decorator


Splitter = Callable[[np.ndarray, DataSpec, np.random.Generator], tuple[list[np.ndarray], str]]


@register_partitioner("iid", help="uniformly at random")
def _iid(labels: np.ndarray, spec: DataSpec, rng: np.random.Generator) -> tuple[list, str]:
    return partition_iid(len(labels), spec.num_users, rng), "iid"


@register_partitioner("dirichlet", help="label skew, Dirichlet(alpha) per class", uses=("alpha",))
def _dirichlet(labels: np.ndarray, spec: DataSpec, rng: np.random.Generator) -> tuple[list, str]:
    parts = partition_dirichlet(labels, spec.num_users, spec.alpha, rng, spec.min_samples)
    return parts, f"dirichlet alpha={spec.alpha:g}"


@register_partitioner(
    "shards", help="FedAvg's pathological split: label-sorted shards", uses=("shards-per-user",)
)
def _shards(labels: np.ndarray, spec: DataSpec, rng: np.random.Generator) -> tuple[list, str]:
    parts = partition_shards(labels, spec.num_users, spec.shards_per_user, rng)
    return parts, f"shards {spec.shards_per_user} per user"


def user_id_for(k: int, num_users: int) -> str:
    """``user-0007``: zero-padded (at least 4 digits) so ids sort in user order."""
    return f"user-{k:0{max(4, len(str(num_users - 1)))}d}"


@register_dataset(
    "digits",
    help="scikit-learn's bundled 8x8 digits (1,797 images, 64 features, 10 classes)",
    uses=("num-users", "partitioner", "central-test-fraction"),
)
def _digits(spec: DataSpec) -> FederatedDataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    x_all, y_all = load_digits(return_X_y=True)
    x_all = (x_all / 16.0).astype(np.float32)  # (1797, 64) in [0, 1]
    y_all = y_all.astype(np.int64)
    rng = shared_rng(spec.seed)

    # Central test set first (stratified), so no user ever trains on it.
    test_idx = np.sort(
        np.concatenate(
            [
                rng.permutation(idx)[: round(len(idx) * spec.central_test_fraction)]
                for idx in (np.flatnonzero(y_all == c) for c in range(10))
            ]
        )
    )
    pool = np.setdiff1d(np.arange(len(y_all)), test_idx)  # sorted
    if spec.num_users * spec.min_samples > len(pool):
        raise DataError(
            f"digits has {len(pool)} samples left after the central test set, which allow at "
            f"most {max_users(len(pool), spec.min_samples)} users with data.min-samples="
            f"{spec.min_samples}, but data.num-users is {spec.num_users}; lower data.num-users"
        )
    parts, detail = PARTITIONERS.get(spec.partitioner).split(y_all[pool], spec, rng)
    user_ids = [user_id_for(k, spec.num_users) for k in range(spec.num_users)]
    for user_id, part in zip(user_ids, parts, strict=True):
        if len(part) < spec.min_samples:
            raise DataError(
                f"partitioner {spec.partitioner!r} gave {user_id} only {len(part)} samples, "
                f"below data.min-samples={spec.min_samples}; lower data.num-users"
            )
    owned = [pool[part] for part in parts]  # indices into the full 1797 samples

    def build(k: int) -> UserData:
        idx = owned[k]
        split = split_train_test(x_all[idx], y_all[idx], spec.test_fraction, user_rng(spec.seed, k))
        return UserData(user_ids[k], *split)

    return FederatedDataset(
        name="digits",
        num_features=x_all.shape[1],
        num_classes=10,
        user_ids=user_ids,
        build=build,
        central_test=(x_all[test_idx], y_all[test_idx]),
        detail=f"{detail}, seed {spec.seed}",
    )


@register_dataset(
    "synthetic-iid",
    help="FedProx's Synthetic-IID: every user draws from one shared model",
    uses=("num-users",),
)
@register_dataset(
    "synthetic",
    help="FedProx's Synthetic(alpha, beta): one natural partition per user, made lazily",
    uses=("num-users", "synthetic-alpha", "synthetic-beta"),
)
def _synthetic(spec: DataSpec) -> FederatedDataset:
    if spec.min_samples > synthetic.SYNTHETIC_MIN_SAMPLES:
        raise DataError(
            f"synthetic users can have as few as {synthetic.SYNTHETIC_MIN_SAMPLES} samples, "
            f"below data.min-samples={spec.min_samples}; set data.min-samples to at most "
            f"{synthetic.SYNTHETIC_MIN_SAMPLES}"
        )
    iid = spec.dataset == "synthetic-iid"
    shared = synthetic.shared_model(spec.seed) if iid else None
    user_ids = [user_id_for(k, spec.num_users) for k in range(spec.num_users)]

    def build(k: int) -> UserData:
        rng = user_rng(spec.seed, k)
        x, y = synthetic.generate_user(rng, spec.synthetic_alpha, spec.synthetic_beta, shared)
        return UserData(user_ids[k], *split_train_test(x, y, spec.test_fraction, rng))

    detail = "iid" if iid else f"alpha={spec.synthetic_alpha:g}, beta={spec.synthetic_beta:g}"
    return FederatedDataset(
        name=spec.dataset,
        num_features=synthetic.NUM_FEATURES,
        num_classes=synthetic.NUM_CLASSES,
        user_ids=user_ids,
        build=build,
        detail=f"{detail}, seed {spec.seed}",
    )


@register_dataset(
    "file",
    help="your CSV/Parquet table; every distinct user id is one user",
    uses=("path", "user-column", "label-column"),
)
def _file(spec: DataSpec) -> FederatedDataset:
    tables = load_user_file(spec.path, user_column=spec.user_column, label_column=spec.label_column)
    small = {u: len(y) for u, (_, y) in tables.items() if len(y) < spec.min_samples}
    if small:
        first, count = next(iter(small.items()))
        others = f" ({len(small)} users are below it)" if len(small) > 1 else ""
        raise DataError(
            f"user {first!r} in {Path(spec.path).name!r} has {count} samples, fewer than "
            f"data.min-samples={spec.min_samples}{others}; remove such users from the file "
            "or lower data.min-samples"
        )
    user_ids = list(tables)
    num_features = next(iter(tables.values()))[0].shape[1]
    num_classes = 1 + max(int(y.max()) for _, y in tables.values())

    def build(k: int) -> UserData:
        return split_user(user_ids[k], *tables[user_ids[k]], spec.test_fraction, spec.seed)

    return FederatedDataset(
        name="file",
        num_features=num_features,
        num_classes=num_classes,
        user_ids=user_ids,
        build=build,
        detail=f"{Path(spec.path).name}, seed {spec.seed}",
    )


def split_user(
    user_id: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> UserData:
    """Split one file user's ``(x, y)`` exactly as the ``file`` dataset does.

    The split is seeded by ``(seed, user_id)``, not by the user's position, so a device
    that loads only its own rows (``load_user_file(..., user_id=...)``) gets the same
    train/test split as the simulation over the whole file.
    """
    rng = file_user_rng(seed, user_id)
    return UserData(user_id, *split_train_test(x, y, test_fraction, rng))


def _span(ids: list[str]) -> str:
    if not ids:
        return "none"
    return ids[0] if len(ids) == 1 else f"{ids[0]} .. {ids[-1]}"
