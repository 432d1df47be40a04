"""Poisoned updates, to measure what update validation and robust aggregation withstand.

A malicious user trains like any other, then (or, for label flipping, before) poisons
what it sends. ``attack.kind``:

- ``sign-flip`` — sends ``w_g - scale * (w - w_g)``: the update pushes the other way,
  amplified (Blanchard et al., 2017; Fang et al., 2020 use scale 1..10).
- ``scaling``   — sends ``w_g + scale * (w - w_g)``: the "model replacement" boost of
  Bagdasaryan et al. (2020), which wins a plain mean.
- ``gaussian``  — sends ``w_g + N(0, noise_std^2)`` per weight: noise, no learning.
- ``label-flip`` — trains on labels ``C - 1 - y`` (Tolpegin et al., 2020): a plausible
  update that teaches the wrong classes.
- ``nan``       — sends all-NaN weights (a broken or hostile device).

Which users are malicious is decided by :func:`malicious_users`: the same users for a
given seed on every run. Pure PyTorch: the ClientApp applies these to its own update.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np
import torch

ATTACKS = ("none", "sign-flip", "scaling", "gaussian", "label-flip", "nan")


def malicious_users(user_ids: Iterable[str], fraction: float, seed: int) -> list[str]:
    """``round(fraction * n)`` of the users, chosen by ``seed`` alone (sorted).

    Each user gets a rank from a hash of (seed, user id), independent of the order or
    the process that asks, and the lowest ranks are malicious: on a fixed set of users
    the choice is exact and reproducible, and a user that joins later displaces at most
    one attacker.
    """
    ids = sorted(set(user_ids))
    k = round(fraction * len(ids))
    if k <= 0:
        return []
    ranked = sorted(ids, key=lambda u: (zlib.crc32(f"{seed}/{u}".encode()), u))
    return sorted(ranked[:k])


def flip_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Label flipping: class ``c`` becomes ``C - 1 - c``."""
    return (num_classes - 1 - y).astype(y.dtype)


def poison(
    update: torch.Tensor,
    global_weights: torch.Tensor,
    kind: str,
    *,
    scale: float = 10.0,
    noise_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The poisoned flat vector a malicious user sends instead of ``update``.

    ``update`` and ``global_weights`` are flat vectors (:func:`pollinate.models.flat.flatten`).
    ``label-flip`` and ``none`` poison the data, not the update: ``update`` comes back as is.
    """
    delta = update - global_weights
    if kind == "sign-flip":
        return global_weights - scale * delta
    if kind == "scaling":
        return global_weights + scale * delta
    if kind == "gaussian":
        noise = torch.randn(update.shape, generator=generator, dtype=update.dtype)
        return global_weights + noise_std * noise
    if kind == "nan":
        return torch.full_like(update, float("nan"))
    if kind in ("none", "label-flip"):
        return update
    raise ValueError(f"unknown attack kind '{kind}'; choose one of: {', '.join(ATTACKS)}")


__all__ = ["ATTACKS", "flip_labels", "malicious_users", "poison"]
