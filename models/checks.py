"""Checks on a model update before it is aggregated, and on the global model it makes.

Pure numpy, no Flower: the server checks every user's update before its strategy
aggregates it (:mod:`pollinate.server.validation`), and a node that averages its cohort's
updates itself checks each one before it enters the mean (:mod:`pollinate.client.app`).
An update is one flat weight vector (:mod:`pollinate.models.flat`) and its example count.

Each check returns ``None`` for a good update or a one-line reason for a bad one; the
reason is what the metrics database and the logs record for the user.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


class NonFiniteModelError(RuntimeError):
    """A global model with NaN or infinite weights: it is never written or served."""


@dataclass(frozen=True)
class UpdateBounds:
    """What a sane update looks like this round.

    ``size``/``dtype``: the global model's flat vector. ``max_examples``: the largest
    example count believed (0 = no cap). ``norm_bound``: the largest accepted
    ``||w_user - w_global||`` (0 = no bound).
    """

    size: int
    dtype: np.dtype
    max_examples: float = 0.0
    norm_bound: float = 0.0


def non_finite_reason(flat: np.ndarray) -> str | None:
    """``None`` if every value is finite, else how many are NaN / infinite."""
    if np.isfinite(flat).all():
        return None
    nan = int(np.isnan(flat).sum())
    inf = int(np.isinf(flat).sum())
    return f"non-finite weights ({nan} NaN, {inf} infinite of {flat.size})"


def shape_reason(
    array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, name: str = "weights"
) -> str | None:
    """``None`` if ``array`` has the model's ``shape`` and a floating dtype."""
    if array.shape != tuple(shape):
        size = int(np.prod(shape))
        if array.ndim == 1 and len(shape) == 1:
            extra = array.size - size
            what = f"{extra} extra" if extra > 0 else f"{-extra} missing"
            return f"{array.size} {name} ({what}); the model has {size}"
        return f"{name} of shape {tuple(array.shape)}; the model's is {tuple(shape)}"
    # Real floats only; float32 vs float64 may differ (FedAdam's server step gives float64).
    if not np.issubdtype(array.dtype, np.floating):
        return f"{name} of dtype {array.dtype}; the model's are {dtype}"
    return None


def examples_reason(num_examples: object, max_examples: float = 0.0) -> str | None:
    """``None`` for a positive whole example count within ``max_examples`` (0 = no cap)."""
    try:
        n = float(num_examples)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"num-examples {num_examples!r} is not a number"
    if not math.isfinite(n) or n < 1 or not n.is_integer():
        return f"num-examples {num_examples!r} is not a positive whole number"
    if max_examples > 0 and n > max_examples:
        return f"num-examples {n:.0f} above the cap of {max_examples:.0f}"
    return None


def delta_norm(flat: np.ndarray, global_flat: np.ndarray) -> float:
    """``||w_user - w_global||_2``, in float64 (float32 squares of big updates overflow)."""
    return float(np.linalg.norm(flat.astype(np.float64) - global_flat.astype(np.float64)))


def norm_reason(norm: float, bound: float, what: str = "the bound") -> str | None:
    """``None`` if the update's delta norm is within ``bound`` (0 = no bound)."""
    if bound > 0 and not norm <= bound:
        return f"update norm {norm:.4g} above {what} {bound:.4g}"
    return None


def update_reason(
    flat: np.ndarray,
    num_examples: object,
    bounds: UpdateBounds,
    global_flat: np.ndarray | None = None,
) -> str | None:
    """The first reason ``flat`` must not be aggregated, or ``None``: shape, finite
    values, example count, then the absolute norm bound (needs ``global_flat``)."""
    reason = (
        shape_reason(flat, (bounds.size,), bounds.dtype)
        or non_finite_reason(flat)
        or examples_reason(num_examples, bounds.max_examples)
    )
    if reason is None and bounds.norm_bound > 0 and global_flat is not None:
        reason = norm_reason(delta_norm(flat, global_flat), bounds.norm_bound)
    return reason


def median_outliers(norms: Mapping[str, float], multiple: float) -> dict[str, str]:
    """The updates whose delta norm exceeds ``multiple`` x the median of ``norms``.

    The median is robust to a minority of attackers: fewer than half of the updates
    cannot move it past the honest ones' norms. ``multiple`` = 0 rejects nothing.
    """
    if multiple <= 0 or not norms:
        return {}
    median = float(np.median(list(norms.values())))
    bound = multiple * median
    what = f"{multiple:g} x the round's median norm {median:.4g} ="
    return {k: r for k, n in norms.items() if (r := norm_reason(n, bound, what)) is not None}


def ensure_finite_model(flat: np.ndarray, what: str, dtype: np.dtype | None = None) -> None:
    """Raise :class:`NonFiniteModelError` if ``flat`` holds a NaN or infinite weight.

    With ``dtype`` (the model's), also if a value overflows it: FedAdam's server step
    returns float64, and 1e39 is finite there but infinite in a float32 model.
    """
    if dtype is not None and np.issubdtype(dtype, np.floating):
        with np.errstate(over="ignore"):
            flat = flat.astype(dtype, copy=False)
    reason = non_finite_reason(flat)
    if reason is not None:
        raise NonFiniteModelError(
            f"{what} has {reason}; it was not written or sent. Turn on update "
            "validation bounds (validation.norm-bound or validation.norm-bound-median-"
            "multiple), or lower strategy.server-lr"
        )


__all__ = [
    "NonFiniteModelError",
    "UpdateBounds",
    "delta_norm",
    "ensure_finite_model",
    "examples_reason",
    "median_outliers",
    "non_finite_reason",
    "norm_reason",
    "shape_reason",
    "update_reason",
]
