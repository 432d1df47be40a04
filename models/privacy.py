"""Differential-privacy building blocks in pure PyTorch: update clipping, DP-SGD, accounting.

- :func:`clip_update` — L2 clipping of one user's model update (DP-FedAvg, McMahan et al.
  2018): ``w_g + delta * min(1, C / ||delta||)``, the same as Flower's
  ``compute_clip_model_update``.
- :class:`DPSGD` + :func:`private_step_gradient` — DP-SGD (Abadi et al. 2016): per-example
  gradients (``torch.func``), each clipped to C, summed, plus N(0, (sigma C)^2) noise,
  divided by the expected batch size. Batches are Poisson samples (each example in with
  probability q), the sampling the RDP accountant's amplification assumes.
- :func:`epsilon` / :func:`noise_for_epsilon` — Opacus's RDP accountant (Mironov 2017) for
  the subsampled Gaussian mechanism: (noise multiplier, sampling rate, steps, delta) -> ε,
  and the noise multiplier that reaches a target ε.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "DPSGD",
    "clip_update",
    "composed_epsilon",
    "epsilon",
    "noise_for_epsilon",
    "per_example_gradients",
    "private_step_gradient",
]

# Opacus's RDP orders (opacus.accountants.RDPAccountant.DEFAULT_ALPHAS).
_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
_INTEGER_ORDERS = list(range(2, 64))


def clip_update(
    weights: torch.Tensor, global_weights: torch.Tensor, clipping_norm: float
) -> tuple[torch.Tensor, bool]:
    """``weights`` with its update ``weights - global_weights`` clipped to L2 norm C.

    Returns the clipped weights (float64 arithmetic, cast back to ``weights``' dtype) and
    whether the update had to be scaled down (Flower's ``norm_bit``).
    """
    delta = weights.to(torch.float64) - global_weights.to(torch.float64)  # (P,)
    norm = float(torch.linalg.vector_norm(delta))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    clipped = global_weights.to(torch.float64) + delta * scale
    return clipped.to(weights.dtype), scale < 1.0


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings for :func:`pollinate.models.train`.

    Parameters
    ----------
    noise_multiplier
        sigma: the noise std is ``sigma * clipping_norm`` on the sum of clipped gradients.
    clipping_norm
        C: each example's gradient is clipped to this L2 norm.
    """

    noise_multiplier: float
    clipping_norm: float

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.clipping_norm > 0:
            raise ValueError(f"clipping_norm must be > 0, got {self.clipping_norm}")


def per_example_gradients(
    model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gradient of each example's cross-entropy w.r.t. parameters ``names``: (B, *shape)."""
    params = dict(model.named_parameters())
    trained = {k: params[k].detach() for k in names}
    fixed = {k: v.detach() for k, v in params.items() if k not in trained}
    buffers = dict(model.named_buffers())

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, ({**p, **fixed}, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    grads: dict[str, torch.Tensor] = vmap(grad(loss_one), in_dims=(None, 0, 0))(trained, x, y)
    return grads


def private_step_gradient(
    model: nn.Module,
    names: list[str],
    x: torch.Tensor,
    y: torch.Tensor,
    dp: DPSGD,
    expected_batch: float,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """One DP-SGD gradient: (sum of clipped per-example gradients + noise) / expected batch.

    ``x`` may be empty (a Poisson batch can be): the step is then noise only, as Opacus's.
    Clipping matches Opacus: factor ``min(1, C / (||g_i|| + 1e-6))``.
    """
    params = dict(model.named_parameters())
    if len(x):
        g = per_example_gradients(model, names, x, y)
        norms = torch.stack([v.flatten(1).pow(2).sum(1) for v in g.values()]).sum(0).sqrt()  # (B,)
        factor = (dp.clipping_norm / (norms + 1e-6)).clamp(max=1.0)  # (B,)
        summed = {k: torch.einsum("b,b...->...", factor, v) for k, v in g.items()}
    else:
        summed = {k: torch.zeros_like(params[k]) for k in names}
    std = dp.noise_multiplier * dp.clipping_norm
    out = {}
    for k, total in summed.items():
        noise = torch.randn(total.shape, generator=generator, dtype=total.dtype) * std
        out[k] = (total + noise.to(total.device)) / expected_batch
    return out


def _rdp(noise_multiplier: float, sample_rate: float, steps: int) -> list[float]:
    # RDP composes additively: `steps` equal releases are `steps` times one (the same
    # product Opacus's compute_rdp takes), and one release's curve is worth caching.
    return [steps * v for v in _rdp_one_step(noise_multiplier, sample_rate)]


@lru_cache(maxsize=1024)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_ORDERS)
    return tuple(float(v) for v in rdp)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` after ``steps`` subsampled Gaussian releases (Opacus's RDP accountant).

    0 steps spend nothing (0.0); no noise spends everything (``inf``).
    """
    return composed_epsilon([(noise_multiplier, sample_rate, steps)], delta)


def composed_epsilon(parts: list[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of several runs of (noise multiplier, sampling rate, steps): their
    RDP curves add (composition), then one conversion to (ε, δ)."""
    parts = [p for p in parts if p[2] > 0]
    if not parts:
        return 0.0
    if any(z <= 0 for z, _, _ in parts):
        return math.inf
    from opacus.accountants.analysis.rdp import get_privacy_spent

    total = [0.0] * len(_ORDERS)
    for z, q, steps in parts:
        total = [a + b for a, b in zip(total, _rdp(z, q, steps), strict=True)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": ε is still a bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=_ORDERS, rdp=total, delta=delta)
    return float(eps)


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose ε after ``steps`` stays within the target
    (Opacus's ``get_noise_multiplier``, RDP accountant).

    The search evaluates integer RDP orders only (closed form, milliseconds; the fractional
    ones take seconds per call): ε over fewer orders is never smaller, so the multiplier
    found keeps :func:`epsilon` (all orders) within the target too.
    """
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _search(get_noise_multiplier, target_epsilon, delta, sample_rate, steps)


def _search(
    search: Any, target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    return float(
        search(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=max(steps, 1),
            accountant="rdp",
            epsilon_tolerance=0.005,
            alphas=_INTEGER_ORDERS,
        )
    )
