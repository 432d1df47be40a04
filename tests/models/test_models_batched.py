"""Stacked (vmap) training equals training each user alone, for every registered model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pollinate.models import FedModel, TrainConfig, available_models, create_model, head_keys, train
from pollinate.models.batched import NotBatchable, StackedUser, train_stacked

# float32 sums in another order: differences stay at rounding level over a few dozen steps.
ATOL = 2e-5

IN_FEATURES, NUM_CLASSES = 64, 10  # 64 = 8x8, a shape every model accepts (the CNN's too)
MODEL_KWARGS: dict[str, dict[str, int]] = {"mlp": {"hidden": 16, "depth": 2}}


def _users(sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, IN_FEATURES, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))
        for n in sizes
    ]


def _model(name: str, seed: int = 0) -> FedModel:
    torch.manual_seed(seed)
    return create_model(
        name, in_features=IN_FEATURES, num_classes=NUM_CLASSES, **MODEL_KWARGS.get(name, {})
    )


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _sequential(
    model: nn.Module,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    starts: list[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    epochs: list[int],
    anchors: list[dict[str, torch.Tensor]] | None,
    parameters: list[str] | None,
) -> list[tuple[dict[str, torch.Tensor], float, int, int]]:
    out = []
    for i, (x, y) in enumerate(data):
        model.load_state_dict(starts[i])
        stats = train(
            model,
            x,
            y,
            TrainConfig(**{**cfg.__dict__, "epochs": epochs[i]}),
            anchor=anchors[i] if anchors else None,
            generator=torch.Generator().manual_seed(100 + i),
            parameters=parameters,
        )
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out.append((weights, stats.loss, stats.num_examples, stats.steps))
    return out


# (what it stands for, cfg, epochs per user, anchored, head only)
CASES = {
    "fedavg": (TrainConfig(epochs=2, batch_size=8, lr=0.05), [2, 2, 2, 2], False, False),
    "fedprox-stragglers": (
        TrainConfig(epochs=3, batch_size=8, lr=0.05, proximal_mu=0.1),
        [3, 1, 2, 0],
        True,
        False,
    ),
    "momentum-wd-fullbatch": (
        TrainConfig(epochs=3, batch_size=0, lr=0.05, momentum=0.9, weight_decay=1e-3),
        [3, 3, 1, 2],
        False,
        False,
    ),
    "momentum-minibatch": (
        TrainConfig(epochs=2, batch_size=5, lr=0.02, momentum=0.5),
        [2, 1, 2, 2],
        False,
        False,
    ),
    "finetune-head": (TrainConfig(epochs=2, batch_size=8, lr=0.05), [2, 2, 2, 2], False, True),
    # Fine-tuning at evaluation (personalization.method = finetune): every user from the
    # same global weights, finetune-lr, the same epochs each.
    "finetune-at-evaluation": (
        TrainConfig(epochs=2, batch_size=6, lr=0.01, momentum=0.3),
        [2, 2, 2, 2],
        False,
        False,
    ),
    "ditto": (
        TrainConfig(epochs=1, batch_size=8, lr=0.05, proximal_mu=0.5),
        [1, 1, 1, 1],
        True,
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", available_models())
def test_stacked_equals_one_by_one(name: str, case: str) -> None:
    cfg, epochs, anchored, head_only = CASES[case]
    model = _model(name)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sizes = [21, 8, 3, 13]  # different sizes: ragged last batches, a user smaller than a batch
    data = _users(sizes)
    # Ditto / FedPer start users from different weights (their own personal models).
    starts = [_perturbed(base, seed=i) if case == "ditto" else base for i in range(len(sizes))]
    anchors = [base] * len(sizes) if anchored else None
    parameters = head_keys(model) if head_only else None

    expected = _sequential(model, data, starts, cfg, epochs, anchors, parameters)
    users = [
        StackedUser(
            x=x,
            y=y,
            start=starts[i],
            epochs=epochs[i],
            anchor=anchors[i] if anchors else None,
            generator=torch.Generator().manual_seed(100 + i),
        )
        for i, (x, y) in enumerate(data)
    ]
    got = train_stacked(model, users, cfg, parameters=parameters)

    assert len(got) == len(expected)
    for (weights, stats), (want, loss, n, steps) in zip(got, expected, strict=True):
        assert (stats.num_examples, stats.steps) == ((n, steps) if steps or n else (0, 0))
        assert stats.loss == pytest.approx(loss, abs=1e-5)
        for k, w in want.items():
            assert torch.allclose(weights[k], w, atol=ATOL), (k, (weights[k] - w).abs().max())
        if head_only:  # the body (logreg has none) stayed at the user's start, bit for bit
            body = set(want) - set(parameters or [])
            assert all(torch.equal(weights[k], starts[0][k]) for k in body)


def test_trained_users_really_moved() -> None:
    """Guards the comparison above against a no-op: weights change, by different amounts."""
    model = _model("mlp")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = _users([16, 16])
    users = [
        StackedUser(x=x, y=y, start=base, generator=torch.Generator().manual_seed(i))
        for i, (x, y) in enumerate(data)
    ]
    (w0, s0), (w1, s1) = train_stacked(model, users, TrainConfig(epochs=2, batch_size=4))
    assert s0.steps == s1.steps == 8
    for k in base:
        assert not torch.equal(w0[k], base[k])
        assert not torch.equal(w0[k], w1[k])


def test_model_with_buffers_is_not_batchable() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    start: dict[str, torch.Tensor] = dict(model.named_parameters())
    user = StackedUser(x=torch.randn(4, 4), y=torch.zeros(4, dtype=torch.long), start=start)
    with pytest.raises(NotBatchable, match="buffers"):
        train_stacked(model, [user], TrainConfig())


def test_mixed_anchors_are_not_batchable() -> None:
    model = _model("logreg")
    base = dict(model.state_dict())
    (x, y), (x2, y2) = _users([4, 4])
    users = [StackedUser(x=x, y=y, start=base, anchor=base), StackedUser(x=x2, y=y2, start=base)]
    with pytest.raises(NotBatchable, match="anchor"):
        train_stacked(model, users, TrainConfig(proximal_mu=0.1))
