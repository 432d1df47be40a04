from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from pollinate.data import (
    DataSpec,
    FederatedDataset,
    load_federated_dataset,
    load_user_file,
    split_user,
)
from pollinate.data.seeds import user_rng
from pollinate.data.synthetic import (
    SYNTHETIC_MAX_SAMPLES,
    generate_user,
    shared_model,
)

DIGITS = DataSpec(dataset="digits", num_users=10)
SYNTH = DataSpec(dataset="synthetic", num_users=30)


def _arrays(ds: FederatedDataset) -> list[np.ndarray]:
    out = [a for u in ds.users() for a in (u.x_train, u.y_train, u.x_test, u.y_test)]
    return out + list(ds.central_test or ())


def _same(a: FederatedDataset, b: FederatedDataset) -> bool:
    pairs = zip(_arrays(a), _arrays(b), strict=True)
    return a.user_ids == b.user_ids and all(np.array_equal(p, q) for p, q in pairs)


# ----------------------------------------------------------------------------------- digits


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards"])
def test_digits_users_and_central_test_cover_every_sample_once(partitioner: str) -> None:
    ds = load_federated_dataset(replace(DIGITS, partitioner=partitioner))
    assert (ds.name, ds.num_features, ds.num_classes) == ("digits", 64, 10)
    assert ds.user_ids == [f"user-{k:04d}" for k in range(10)]
    assert ds.central_test is not None

    def rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
        return [xi.tobytes() + yi.tobytes() for xi, yi in zip(x, y, strict=True)]

    x_all, y_all = load_digits(return_X_y=True)
    every = rows((x_all / 16).astype(np.float32), y_all.astype(np.int64))
    central = rows(*ds.central_test)
    users = [r for u in ds.users() for r in rows(u.x_train, u.y_train) + rows(u.x_test, u.y_test)]
    assert len(set(every)) == 1797  # digits has no duplicate rows, so rows identify samples
    assert not set(central) & set(users)
    assert sorted(central + users) == sorted(every)  # each sample exactly once


def test_digits_arrays() -> None:
    ds = load_federated_dataset(DIGITS)
    x_c, y_c = ds.central_test or (None, None)
    assert x_c is not None and y_c is not None
    assert x_c.dtype == np.float32 and y_c.dtype == np.int64
    assert x_c.min() >= 0 and x_c.max() <= 1
    counts = np.bincount(y_c, minlength=10)
    assert np.all(np.abs(counts - 0.2 * 180) <= 2)  # stratified: ~36 per class
    for u in ds.users():
        assert u.x_train.shape == (u.num_train, 64) and u.x_test.shape == (u.num_test, 64)
        assert u.num_train >= 1 and u.num_test >= 1
        assert u.num_train + u.num_test >= DIGITS.min_samples


def test_digits_shards_are_label_skewed() -> None:
    ds = load_federated_dataset(replace(DIGITS, partitioner="shards", shards_per_user=2))
    distinct = [len(np.unique(np.concatenate([u.y_train, u.y_test]))) for u in ds.users()]
    assert np.mean(distinct) <= 3  # shards straddle at most one class boundary each


@pytest.mark.parametrize("spec", [DIGITS, SYNTH, replace(SYNTH, dataset="synthetic-iid")])
def test_reproducible(spec: DataSpec) -> None:
    assert _same(load_federated_dataset(spec), load_federated_dataset(spec))
    assert not _same(load_federated_dataset(spec), load_federated_dataset(replace(spec, seed=1)))


def test_digits_too_many_users(data_error) -> None:
    with data_error("at most 359 users", "data.num-users"):
        load_federated_dataset(replace(DIGITS, num_users=400))


def test_unknown_user_and_users_order(data_error) -> None:
    ds = load_federated_dataset(DIGITS)
    assert [u.user_id for u in ds.users(["user-0003", "user-0001"])] == [
        "user-0003",
        "user-0001",
    ]
    assert ds.user("user-0002") is ds.user("user-0002")  # cached
    with data_error("unknown user 'user-9999'", "user-0000 .. user-0009"):
        ds.user("user-9999")


def test_describe_is_one_line() -> None:
    text = load_federated_dataset(DIGITS).describe()
    assert "\n" not in text
    for part in ("10 users", "64 features", "10 classes", "central test", "median"):
        assert part in text


# -------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_counts() -> None:
    ds = load_federated_dataset(SYNTH)
    assert (ds.num_features, ds.num_classes, ds.central_test) == (60, 10, None)
    assert len(ds.user_ids) == 30
    counts = [u.num_train + u.num_test for u in ds.users()]
    assert min(counts) >= 50 and max(counts) <= SYNTHETIC_MAX_SAMPLES
    assert np.median(counts) < 400  # lognormal(4, 2) + 50: median about e^4 + 50 = 105
    labels = np.concatenate([u.y_train for u in ds.users()])
    assert labels.min() >= 0 and labels.max() <= 9
    u = ds.user("user-0000")
    assert u.x_train.dtype == np.float32 and u.x_train.shape[1] == 60
    assert u.y_train.dtype == np.int64


def test_synthetic_user_independent_of_other_users() -> None:
    alone = load_federated_dataset(replace(SYNTH, num_users=8)).user("user-0007")
    ds = load_federated_dataset(SYNTH)
    ds.users()  # generate everyone first, in order
    together = ds.user("user-0007")
    fresh = load_federated_dataset(SYNTH).user("user-0007")  # generated first
    for a in (together, fresh):
        assert np.array_equal(a.x_train, alone.x_train)
        assert np.array_equal(a.y_test, alone.y_test)
    # ... and it is exactly what default_rng([seed, k]) generates.
    x, y = generate_user(user_rng(SYNTH.seed, 7), 1.0, 1.0)
    assert len(y) == alone.num_train + alone.num_test
    assert set(map(bytes, alone.x_test)) <= set(map(bytes, x))


def test_synthetic_iid_shares_w_and_b() -> None:
    w, b = shared_model(0)
    for dataset, shared in (("synthetic-iid", True), ("synthetic", False)):
        ds = load_federated_dataset(replace(SYNTH, dataset=dataset, num_users=10))
        agree = np.mean(
            [np.mean(np.argmax(u.x_train @ w + b, axis=1) == u.y_train) for u in ds.users()]
        )
        if shared:  # float32 rounding may flip a near-tie
            assert agree > 0.99
        else:
            assert agree < 0.5


def test_synthetic_iid_features_follow_sigma() -> None:
    ds = load_federated_dataset(replace(SYNTH, dataset="synthetic-iid", num_users=30))
    x = np.concatenate([u.x_train for u in ds.users()]).astype(np.float64)
    sigma = np.arange(1, 61) ** -1.2
    assert np.all(np.abs(x.mean(axis=0)) < 4 * np.sqrt(sigma / len(x)) + 1e-3)
    np.testing.assert_allclose(x.var(axis=0) / sigma, 1.0, atol=0.15)


def test_synthetic_non_iid_users_differ() -> None:
    ds = load_federated_dataset(replace(SYNTH, synthetic_alpha=1.0, synthetic_beta=1.0))
    means = np.array([u.x_train[:, 0].mean() for u in ds.users()])
    assert means.std() > 0.5  # v_k ~ N(B_k, 1) moves each user's inputs


class _HugeLognormal:
    """A Generator whose lognormal draw is far beyond the cap."""

    def __init__(self) -> None:
        self._rng = np.random.default_rng(0)

    def lognormal(self, *args: object) -> float:
        return 1e12

    def __getattr__(self, name: str) -> object:
        return getattr(self._rng, name)


def test_synthetic_sample_count_is_capped() -> None:
    x, y = generate_user(_HugeLognormal(), 1.0, 1.0)  # type: ignore[arg-type]  # a fake rng
    assert len(y) == len(x) == SYNTHETIC_MAX_SAMPLES


def test_synthetic_min_samples_above_50(data_error) -> None:
    with data_error("at most 50"):
        load_federated_dataset(replace(SYNTH, min_samples=51))


# ------------------------------------------------------------------------------------- file


def _table(tmp_path: Path, sizes: dict[str, int], suffix: str = ".csv") -> str:
    rng = np.random.default_rng(0)
    rows = [
        {"user": u, "label": int(rng.integers(0, 3)), "a": rng.random(), "b": rng.random()}
        for u, n in sizes.items()
        for _ in range(n)
    ]
    rows[0]["label"] = 4  # num_classes = max label + 1 = 5
    path = tmp_path / f"users{suffix}"
    df = pd.DataFrame(rows)
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path, index=False)
    return str(path)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_file_dataset_is_a_natural_partition(tmp_path: Path, suffix: str) -> None:
    path = _table(tmp_path, {"u2": 10, "u1": 6, "u3": 20}, suffix)
    ds = load_federated_dataset(DataSpec(dataset="file", path=path, num_users=99))
    assert ds.user_ids == ["u1", "u2", "u3"]
    assert (ds.name, ds.num_features, ds.num_classes, ds.central_test) == ("file", 2, 5, None)
    assert [u.num_train + u.num_test for u in ds.users()] == [6, 10, 20]
    assert [u.num_test for u in ds.users()] == [1, 2, 4]


def test_file_user_split_is_the_same_on_a_device(tmp_path: Path) -> None:
    spec = DataSpec(dataset="file", path=_table(tmp_path, {"u1": 12, "u2": 30}))
    everyone = load_federated_dataset(spec).user("u2")
    only = tmp_path / "u2.csv"
    df = pd.read_csv(spec.path)
    df[df.user == "u2"].to_csv(only, index=False)
    device = load_federated_dataset(replace(spec, path=str(only))).user("u2")
    x, y = load_user_file(spec.path, user_column="user", label_column="label", user_id="u2")["u2"]
    direct = split_user("u2", x, y, spec.test_fraction, spec.seed)
    for other in (device, direct):
        assert np.array_equal(everyone.x_train, other.x_train)
        assert np.array_equal(everyone.y_test, other.y_test)


def test_file_user_below_min_samples(tmp_path: Path, data_error) -> None:
    path = _table(tmp_path, {"u1": 12, "tiny": 3, "u3": 2})
    with data_error("user 'tiny'", "has 3 samples", "2 users", "data.min-samples"):
        load_federated_dataset(DataSpec(dataset="file", path=path))


def test_a_100000_user_dataset_builds_only_the_users_asked_for(monkeypatch) -> None:
    """Memory grows with the users a node trains, not with the users in the federation:
    loading 100,000 synthetic users builds none, each asked-for user is built once while
    cached, and the cache stays within its bound however many users are walked through."""
    import pollinate.data.federated as federated

    built: list[int] = []
    real = federated.synthetic.generate_user

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(federated.synthetic, "generate_user", counting)
    ds = load_federated_dataset(replace(SYNTH, num_users=100_000))
    assert len(ds) == 100_000 and built == []
    assert federated.DEFAULT_CACHE_SIZE == 1024  # what a node keeps by default
    ds._cache_size = 128  # the same bound, smaller, to walk past it quickly
    sample = ds.user_ids[::1000]  # 100 users across the whole id range
    first = ds.users(sample)
    assert len(built) == 100
    assert [u.user_id for u in ds.users(sample)] == sample and len(built) == 100  # cached
    assert all(a is b for a, b in zip(first, ds.users(sample), strict=True))
    for user_id in ds.user_ids[:300]:
        ds.user(user_id)
    assert len(ds._cache) == 128
