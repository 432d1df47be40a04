"""DP building blocks: clipping, DP-SGD's gradient and noise, the accountant (vs Opacus)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.supercore.differential_privacy import compute_clip_model_update
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

from pollinate.models import TrainConfig, create_model, dp_sgd_steps, train
from pollinate.models.privacy import (
    DPSGD,
    clip_update,
    composed_epsilon,
    epsilon,
    noise_for_epsilon,
    per_example_gradients,
    private_step_gradient,
)


@pytest.mark.parametrize("scale", [0.01, 1.0, 1e6])
def test_clip_update_matches_flowers_and_bounds_the_update(scale: float) -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=50).astype(np.float32)
    w = g + scale * rng.normal(size=50).astype(np.float32)
    ours, clipped = clip_update(torch.from_numpy(w), torch.from_numpy(g), 1.5)
    theirs = [w.astype(np.float64).copy()]
    compute_clip_model_update(theirs, [g.astype(np.float64)], 1.5)
    np.testing.assert_allclose(ours.numpy(), theirs[0], rtol=1e-5, atol=1e-5)
    norm = float(np.linalg.norm(ours.numpy().astype(np.float64) - g))
    assert norm <= 1.5 * (1 + 1e-5)
    assert clipped == (scale >= 1)  # norms ~0.07, ~7, ~7e6 against C = 1.5


@pytest.mark.parametrize("name", ["mlp", "logreg", "cnn"])
def test_per_example_gradients_equal_opacus_grad_samples(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_features=64, num_classes=10, seed=1)
    x, y = torch.randn(7, 64), torch.randint(0, 10, (7,))
    names = [k for k, _ in model.named_parameters()]
    ours = per_example_gradients(model, names, x, y)
    gsm = GradSampleModule(
        create_model(name, in_features=64, num_classes=10, seed=1), loss_reduction="sum"
    )
    # Opacus's grad samples are of the summed loss; ours of each example's own loss.
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for k, p in gsm._module.named_parameters():
        torch.testing.assert_close(ours[k], p.grad_sample, rtol=1e-4, atol=1e-6)


def test_a_private_step_clips_every_example_to_c() -> None:
    model = create_model("mlp", in_features=64, num_classes=10, seed=0)
    x, y = 100 * torch.randn(32, 64), torch.randint(0, 10, (32,))
    names = [k for k, _ in model.named_parameters()]
    dp = DPSGD(noise_multiplier=0.0, clipping_norm=0.5)
    g = private_step_gradient(model, names, x, y, dp, expected_batch=32, generator=None)
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in g.values()))
    # The mean of 32 vectors of norm <= C has norm <= C; unclipped they are far larger.
    assert norm <= 0.5 + 1e-6
    raw = per_example_gradients(model, names, x, y)
    raw_norms = torch.sqrt(sum((v.flatten(1).pow(2).sum(1) for v in raw.values()), torch.zeros(())))
    assert float(raw_norms.min()) > 5 * 0.5


def test_dp_sgd_noise_has_the_configured_scale() -> None:
    """On an empty Poisson batch the step is pure noise: N(0, (sigma C / B)^2) per entry."""
    model = create_model("logreg", in_features=64, num_classes=10, seed=0)
    names = [k for k, _ in model.named_parameters()]
    dp = DPSGD(noise_multiplier=1.3, clipping_norm=2.0)
    gen = torch.Generator().manual_seed(0)
    empty_x, empty_y = torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)
    draws = torch.cat(
        [
            torch.cat(
                [
                    v.flatten()
                    for v in private_step_gradient(
                        model, names, empty_x, empty_y, dp, expected_batch=8.0, generator=gen
                    ).values()
                ]
            )
            for _ in range(200)
        ]
    )  # 200 x 650 draws
    expected = 1.3 * 2.0 / 8.0
    assert abs(float(draws.mean())) < 4 * expected / math.sqrt(len(draws))
    # The sample std of n normals is within ~4 / sqrt(2n) of sigma (relative).
    assert abs(float(draws.std()) / expected - 1) < 4 / math.sqrt(2 * len(draws))


def test_private_training_is_seeded_and_differs_from_plain_sgd() -> None:
    x, y = torch.randn(60, 64), torch.randint(0, 10, (60,))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1)

    def run(private: DPSGD | None, seed: int) -> torch.Tensor:
        model = create_model("mlp", in_features=64, num_classes=10, seed=0)
        stats = train(
            model, x, y, cfg, private=private, generator=torch.Generator().manual_seed(seed)
        )
        assert stats.steps == dp_sgd_steps(60, cfg)[1] == 2 * 4
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    dp = DPSGD(noise_multiplier=1.0, clipping_norm=1.0)
    torch.testing.assert_close(run(dp, 3), run(dp, 3))
    assert not torch.allclose(run(dp, 3), run(dp, 4))
    assert not torch.allclose(run(dp, 3), run(None, 3))


@pytest.mark.parametrize(
    ("z", "q", "steps", "delta"),
    [(1.1, 0.01, 1000, 1e-5), (0.8, 0.25, 40, 1e-5), (2.0, 1.0, 10, 1e-6), (1.3, 0.5, 30, 0.05)],
)
def test_epsilon_matches_opacus_rdp_accountant(
    z: float, q: float, steps: int, delta: float
) -> None:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    assert epsilon(z, q, steps, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


def test_composition_matches_opacus_history() -> None:
    acc = RDPAccountant()
    acc.history = [(1.0, 0.1, 50), (2.0, 0.3, 20)]
    ours = composed_epsilon([(1.0, 0.1, 50), (2.0, 0.3, 20)], 1e-5)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0 and math.isinf(epsilon(0.0, 0.1, 5, 1e-5))


@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_derived_noise_reaches_the_target_and_no_less_noise_would(target: float) -> None:
    q, steps, delta = 0.2, 60, 1e-5
    z = noise_for_epsilon(target, delta, q, steps)
    assert epsilon(z, q, steps, delta) <= target
    assert epsilon(0.97 * z, q, steps, delta) > target * 0.98
