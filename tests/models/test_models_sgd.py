"""``train``'s own SGD step is ``torch.optim.SGD``'s update, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pollinate.models import TrainConfig, create_model, train


def reference(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    anchor: dict[str, torch.Tensor] | None = None,
) -> None:
    """The loop ``train`` runs, with torch.optim.SGD."""
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    g = torch.Generator().manual_seed(seed)
    anchor = {k: v.clone() for k, v in (anchor or {}).items()}
    named = dict(model.named_parameters())
    n = len(x)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if anchor and cfg.proximal_mu > 0:
                sq = sum(((named[k] - w0) ** 2).sum() for k, w0 in anchor.items())
                loss = loss + 0.5 * cfg.proximal_mu * sq
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@pytest.mark.parametrize(
    ("momentum", "weight_decay", "mu"), [(0.0, 0.0, 0.0), (0.9, 0.0, 0.0), (0.9, 1e-3, 0.5)]
)
def test_matches_torch_optim_sgd_bit_for_bit(
    momentum: float, weight_decay: float, mu: float
) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(70, 12, generator=g), torch.randint(0, 3, (70,), generator=g)
    cfg = TrainConfig(
        epochs=3,
        batch_size=16,
        lr=0.1,
        momentum=momentum,
        weight_decay=weight_decay,
        proximal_mu=mu,
    )
    ours = create_model("mlp", in_features=12, num_classes=3, hidden=8, seed=0)
    theirs = create_model("mlp", in_features=12, num_classes=3, hidden=8, seed=0)
    anchor = {k: v.clone() for k, v in ours.state_dict().items()}
    train(
        ours, x, y, cfg, anchor=anchor if mu else None, generator=torch.Generator().manual_seed(7)
    )
    reference(theirs, x, y, cfg, seed=7, anchor=anchor if mu else None)
    a, b = ours.state_dict(), theirs.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], anchor["head.weight"])  # it did train
