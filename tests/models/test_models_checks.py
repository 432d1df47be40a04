"""Update checks and attacks: the pure functions both the server and the nodes call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pollinate import config
from pollinate.models.attacks import ATTACKS, flip_labels, malicious_users, poison
from pollinate.models.checks import (
    NonFiniteModelError,
    UpdateBounds,
    delta_norm,
    ensure_finite_model,
    examples_reason,
    median_outliers,
    update_reason,
)

BOUNDS = UpdateBounds(size=10, dtype=np.dtype(np.float32), max_examples=100)
GOOD = np.linspace(-1, 1, 10, dtype=np.float32)


def test_a_good_update_passes() -> None:
    assert update_reason(GOOD, 50, BOUNDS) is None


@pytest.mark.parametrize(
    ("flat", "examples", "phrase"),
    [
        (np.full(10, np.nan, dtype=np.float32), 50, "non-finite weights (10 NaN, 0 infinite"),
        (np.where(GOOD > 0, np.inf, GOOD).astype(np.float32), 50, "infinite"),
        (np.concatenate([GOOD, np.zeros(7, np.float32)]), 50, "17 weights (7 extra)"),
        (GOOD[:8], 50, "2 missing"),
        (GOOD.reshape(2, 5), 50, "shape (2, 5)"),
        (GOOD.astype(np.int64), 50, "dtype int64"),
        (GOOD, 1e9, "num-examples 1000000000 above the cap of 100"),
        (GOOD, 0, "not a positive whole number"),
        (GOOD, -3, "not a positive whole number"),
        (GOOD, 2.5, "not a positive whole number"),
        (GOOD, float("nan"), "not a positive whole number"),
        (GOOD, "many", "not a number"),
    ],
)
def test_a_bad_update_gets_a_one_line_reason(
    flat: np.ndarray, examples: object, phrase: str
) -> None:
    reason = update_reason(flat, examples, BOUNDS)
    assert reason is not None and phrase in reason and "\n" not in reason


def test_norm_bound_is_on_the_delta_from_the_global_model() -> None:
    bounds = UpdateBounds(size=10, dtype=np.dtype(np.float32), norm_bound=1.0)
    global_flat = GOOD + 100  # far from 0: the bound must not look at ||w|| itself
    assert update_reason(global_flat + 0.1, 5, bounds, global_flat) is None
    reason = update_reason(global_flat + 1.0, 5, bounds, global_flat)
    assert reason is not None and "update norm 3.162 above" in reason


def test_delta_norm_does_not_overflow_on_huge_finite_updates() -> None:
    huge = np.full(10, 3e38, dtype=np.float32)
    assert np.isfinite(delta_norm(huge, np.zeros(10, np.float32)))


def test_median_outliers_rejects_only_updates_far_above_the_median() -> None:
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "d": 150.0, "e": 1.1}
    out = median_outliers(norms, 3.0)
    assert list(out) == ["d"] and "median norm 1.1" in out["d"]
    assert median_outliers(norms, 0.0) == {}


def test_examples_cap_zero_means_no_cap() -> None:
    assert examples_reason(10**12, 0) is None


def test_non_finite_model_raises_also_when_it_overflows_the_models_dtype() -> None:
    ensure_finite_model(GOOD, "x", np.dtype(np.float32))
    with pytest.raises(NonFiniteModelError, match="NaN"):
        ensure_finite_model(np.array([1.0, np.nan]), "round 3's global model")
    # 1e39 is a finite float64 but infinite in the float32 model it is loaded into.
    with pytest.raises(NonFiniteModelError, match="infinite"):
        ensure_finite_model(np.array([1e39]), "x", np.dtype(np.float32))


# ---------------------------------------------------------------------------- attacks


def test_attack_kinds_are_the_configs() -> None:
    assert ATTACKS == config.ATTACKS


def test_malicious_users_are_an_exact_seeded_fraction() -> None:
    users = [f"user-{i:04d}" for i in range(20)]
    chosen = malicious_users(users, 0.2, seed=7)
    assert len(chosen) == 4 and set(chosen) <= set(users)
    # Deterministic: the order the users are listed in and repeated calls do not matter.
    assert malicious_users(reversed(users), 0.2, seed=7) == chosen
    assert malicious_users(users, 0.2, seed=7) == chosen
    # Its own seed: other seeds choose other users.
    assert any(malicious_users(users, 0.2, seed=s) != chosen for s in range(8, 12))
    assert malicious_users(users, 0.0, seed=7) == []
    # Growing the fraction keeps the attackers already chosen.
    assert set(chosen) <= set(malicious_users(users, 0.3, seed=7))


def test_poisoned_updates() -> None:
    g = torch.zeros(6)
    w = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -2.0])
    assert torch.equal(poison(w, g, "sign-flip", scale=2.0), -2 * w)
    assert torch.equal(poison(w, g + 1, "scaling", scale=3.0), 1 + 3 * (w - 1))
    assert torch.isnan(poison(w, g, "nan")).all()
    noise = poison(w, g, "gaussian", noise_std=0.5, generator=torch.Generator().manual_seed(0))
    again = poison(w, g, "gaussian", noise_std=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise, again) and not torch.equal(noise, w)
    assert poison(w, g, "label-flip") is w
    with pytest.raises(ValueError, match="unknown attack kind"):
        poison(w, g, "bogus")


def test_label_flip() -> None:
    y = np.array([0, 1, 9, 4], dtype=np.int64)
    assert flip_labels(y, 10).tolist() == [9, 8, 0, 5]
