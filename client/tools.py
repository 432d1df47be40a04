"""Small helpers that a user's round and the personalization methods share.

Kept apart from :mod:`pollinate.client.steps` so that :mod:`pollinate.client.personalization`,
which steps imports, can use them too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pollinate.client.local import user_seed
from pollinate.config import RunConfig
from pollinate.models import TrainConfig

if TYPE_CHECKING:
    from pollinate.client.steps import RoundContext

StateDict = dict[str, torch.Tensor]


def tensors(
    x: np.ndarray, y: np.ndarray, ctx: RoundContext | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's arrays as tensors on the round's device (kept there between rounds)."""
    if ctx is None or ctx.device == "cpu":
        return torch.from_numpy(x), torch.from_numpy(y)
    from pollinate.client.ondevice import DATA

    DATA.max_bytes = ctx.cfg.simulation.device_cache_mb << 20
    return DATA.tensors(x, y, ctx.device)


def snapshot(model: torch.nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_config(
    cfg: RunConfig, *, epochs: int, proximal_mu: float = 0.0, lr: float = 0.0
) -> TrainConfig:
    t = cfg.train
    return TrainConfig(
        epochs=epochs,
        batch_size=t.batch_size,
        lr=lr or t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        proximal_mu=proximal_mu,
    )


def generator(ctx: RoundContext, user: str, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(
        user_seed(ctx.cfg.run.seed, ctx.server_round, user, purpose)
    )


def writes_models(ctx: RoundContext) -> bool:
    """Whether this round writes each evaluated user's models (``store.save-models``)."""
    store = ctx.cfg.store
    return store.save_models == "every-round" or ctx.server_round >= ctx.cfg.run.num_rounds
