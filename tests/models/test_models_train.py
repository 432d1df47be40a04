"""Training and evaluation loops, for every registered model."""

import math

import pytest
import torch

from pollinate.models import (
    EvalStats,
    TrainConfig,
    TrainStats,
    available_models,
    body_keys,
    create_model,
    evaluate,
    head_keys,
    predict_proba,
    train,
)

F, K, N = 16, 3, 150


def blobs(seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearly separable data: K well-separated Gaussian blobs in F dimensions."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(K, F, generator=g)  # (K, F)
    y = torch.arange(n) % K  # (N,)
    x = means[y] + torch.randn(n, F, generator=g)  # (N, F)
    return x, y


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(params=available_models())
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_train_reduces_loss_and_fits_separable_data(name: str) -> None:
    x, y = blobs()
    model = create_model(name, in_features=F, num_classes=K, seed=0)
    before = evaluate(model, x, y)
    stats = train(model, x, y, TrainConfig(epochs=10, batch_size=16), generator=torch.Generator())
    after = evaluate(model, x, y)
    assert stats == TrainStats(loss=stats.loss, num_examples=N, steps=10 * math.ceil(N / 16))
    assert after.loss < stats.loss < before.loss
    assert after.accuracy >= 0.95


def test_train_is_deterministic_with_generator(name: str) -> None:
    x, y = blobs()
    cfg = TrainConfig(epochs=2, batch_size=8, momentum=0.9, weight_decay=1e-3)
    states, losses = [], []
    for _ in range(2):
        model = create_model(name, in_features=F, num_classes=K, seed=1)
        losses.append(train(model, x, y, cfg, generator=torch.Generator().manual_seed(3)).loss)
        states.append(model.state_dict())
    assert losses[0] == losses[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_generator_leaves_global_rng_alone() -> None:
    x, y = blobs()
    model = create_model("mlp", in_features=F, num_classes=K, seed=0)
    rng_before = torch.get_rng_state()
    train(model, x, y, TrainConfig(epochs=2, batch_size=8), generator=torch.Generator())
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize("batch_size", [0, -1, N, 10 * N])
def test_full_batch_takes_one_step_per_epoch(batch_size: int) -> None:
    x, y = blobs()
    model = create_model("mlp", in_features=F, num_classes=K, seed=0)
    stats = train(model, x, y, TrainConfig(epochs=3, batch_size=batch_size))
    assert stats.steps == 3 and stats.num_examples == N


def test_full_batch_loss_is_loss_before_the_step() -> None:
    # One full-batch step: the reported loss is the cross-entropy of the starting weights,
    # and excludes the proximal term even with a far anchor and large mu.
    x, y = blobs()
    model = create_model("mlp", in_features=F, num_classes=K, seed=0)
    anchor = create_model("mlp", in_features=F, num_classes=K, seed=1).state_dict()
    expected = evaluate(model, x, y).loss
    cfg = TrainConfig(epochs=1, batch_size=0, lr=0.01, proximal_mu=50.0)
    stats = train(model, x, y, cfg, anchor=anchor)
    assert stats.loss == pytest.approx(expected, rel=1e-5)


def test_zero_epochs_or_no_data_returns_zeros_and_keeps_weights() -> None:
    x, y = blobs()
    model = create_model("mlp", in_features=F, num_classes=K, seed=0)
    before = snapshot(model)
    zeros = TrainStats(loss=0.0, num_examples=0, steps=0)
    assert train(model, x, y, TrainConfig(epochs=0)) == zeros
    assert train(model, x[:0], y[:0], TrainConfig(epochs=2)) == zeros
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("seed", range(3))
def test_huge_proximal_mu_keeps_weights_at_anchor(name: str, seed: int) -> None:
    # Start far from the anchor: with lr*mu = 1 each step lands within one gradient step of it.
    x, y = blobs(seed)
    model = create_model(name, in_features=F, num_classes=K, seed=seed)
    anchor = snapshot(create_model(name, in_features=F, num_classes=K, seed=100 + seed))

    @torch.no_grad()
    def distance() -> float:
        sq = sum(float(((w - anchor[k]) ** 2).sum()) for k, w in model.named_parameters())
        return math.sqrt(sq)

    d0 = distance()
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.01, proximal_mu=100.0)
    train(model, x, y, cfg, anchor=anchor, generator=torch.Generator().manual_seed(seed))
    assert distance() < 0.05 * d0


def test_proximal_term_needs_both_anchor_and_mu() -> None:
    x, y = blobs()
    anchor = snapshot(create_model("mlp", in_features=F, num_classes=K, seed=9))
    runs = [
        (TrainConfig(epochs=1, proximal_mu=0.0), anchor),
        (TrainConfig(epochs=1, proximal_mu=10.0), None),
        (TrainConfig(epochs=1), None),
    ]
    states = []
    for cfg, a in runs:
        model = create_model("mlp", in_features=F, num_classes=K, seed=0)
        train(model, x, y, cfg, anchor=a, generator=torch.Generator())
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in s)


def test_parameters_restriction_leaves_others_bit_identical(name: str) -> None:
    x, y = blobs()
    model = create_model(name, in_features=F, num_classes=K, seed=0)
    before = snapshot(model)
    cfg = TrainConfig(epochs=2, batch_size=16, momentum=0.9, weight_decay=0.1)
    stats = train(model, x, y, cfg, parameters=head_keys(model))
    after = model.state_dict()
    assert stats.steps > 0
    assert all(torch.equal(before[k], after[k]) for k in body_keys(model))
    assert all(not torch.equal(before[k], after[k]) for k in head_keys(model))
    assert all(w.requires_grad for w in model.parameters())  # freezing is undone


def test_body_only_training_and_empty_selection() -> None:
    x, y = blobs()
    model = create_model("mlp", in_features=F, num_classes=K, seed=0)
    before = snapshot(model)
    train(model, x, y, TrainConfig(), parameters=body_keys(model))
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in head_keys(model))

    # logreg has no body parameters: FedRep's body phase must be a harmless no-op.
    logreg = create_model("logreg", in_features=F, num_classes=K, seed=0)
    before = snapshot(logreg)
    stats = train(logreg, x, y, TrainConfig(), parameters=body_keys(logreg))
    assert stats.steps == 0 and stats.num_examples == N and stats.loss > 0
    assert all(torch.equal(before[k], v) for k, v in logreg.state_dict().items())


def test_default_respects_frozen_parameters() -> None:
    x, y = blobs()
    model = create_model("mlp", in_features=F, num_classes=K, seed=0)
    model.body.requires_grad_(False)
    before = snapshot(model)
    train(model, x, y, TrainConfig())
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in body_keys(model))
    assert not any(w.requires_grad for w in model.body.parameters())


def test_unknown_parameter_name_raises() -> None:
    x, y = blobs()
    model = create_model("mlp", in_features=F, num_classes=K, seed=0)
    with pytest.raises(ValueError, match=r"parameters not in the model: head\.wieght"):
        train(model, x, y, TrainConfig(), parameters=["head.wieght"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": -1}, "epochs must be >= 0"),
        ({"epochs": 1.5}, "epochs must be an int"),
        ({"batch_size": None}, "batch_size must be an int"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"momentum": -0.1}, "momentum must be >= 0"),
        ({"proximal_mu": float("nan")}, "proximal_mu must be >= 0"),
    ],
)
def test_train_config_validates(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_bad_data_shapes_raise() -> None:
    model = create_model("logreg", in_features=F, num_classes=K)
    x, y = blobs()
    with pytest.raises(ValueError, match="x must have shape"):
        train(model, x[0], y, TrainConfig())
    with pytest.raises(ValueError, match="y must have shape"):
        evaluate(model, x, y[:-1])
    with pytest.raises(ValueError, match="integer class labels"):
        evaluate(model, x, y.float())


def test_evaluate(name: str) -> None:
    x, y = blobs()
    model = create_model(name, in_features=F, num_classes=K, seed=0)
    model.train()
    stats = evaluate(model, x, y, batch_size=7)
    assert model.training  # mode restored
    assert stats.num_examples == N and 0.0 <= stats.accuracy <= 1.0 and stats.loss > 0
    whole = evaluate(model, x, y, batch_size=0)
    assert whole.loss == pytest.approx(stats.loss, rel=1e-5)
    assert whole.accuracy == stats.accuracy
    assert evaluate(model, x[:0], y[:0]) == EvalStats(loss=0.0, accuracy=0.0, num_examples=0)


def test_predict_proba(name: str) -> None:
    x, _ = blobs()
    model = create_model(name, in_features=F, num_classes=K, seed=0)
    p = predict_proba(model, x)
    assert p.shape == (N, K) and not p.requires_grad
    assert torch.allclose(p.sum(dim=1), torch.ones(N))
    assert torch.equal(p.argmax(dim=1), model(x).argmax(dim=1))
    assert predict_proba(model, x[:0]).shape == (0, K)


def test_anchor_aliasing_live_parameters_still_pulls() -> None:
    # FedProx callers may pass the starting weights without cloning them.
    x, y = blobs()
    cfg = TrainConfig(epochs=5, batch_size=16, lr=0.01, proximal_mu=10.0)
    free = create_model("mlp", in_features=F, num_classes=K, seed=0)
    start = snapshot(free)
    train(free, x, y, TrainConfig(epochs=5, batch_size=16, lr=0.01), generator=torch.Generator())
    held = create_model("mlp", in_features=F, num_classes=K, seed=0)
    train(held, x, y, cfg, anchor=dict(held.named_parameters()), generator=torch.Generator())

    def moved(model: torch.nn.Module) -> float:
        return sum(float((v - start[k]).norm()) for k, v in model.state_dict().items())

    assert moved(held) < 0.5 * moved(free)
