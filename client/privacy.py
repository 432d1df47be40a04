"""The node's half of differential privacy (``[privacy]``; :mod:`pollinate.privacy_options`).

User-level DP (``privacy.method = "user"``, clipped on the client): the server puts the
clipping norm C in the train config (Flower's ``KEY_CLIPPING_NORM``); the node clips *each
user's* update to C before anything leaves it — before the cohort's mean, so a node-mean
equals clipping user by user — and counts each user once in the mean (``dp-users``), the
uniform mean DP-FedAvg's sensitivity C/n is stated for. ``norm_bit`` (1 = clipped) feeds
adaptive clipping (Andrew et al. 2021).

Local DP (``privacy.method = "local"``): every training on a user's data — the update,
Ditto's personal model, fine-tuning — is DP-SGD (:class:`pollinate.models.privacy.DPSGD`);
each user's metrics carry its DP-SGD steps, sampling rate and noise multiplier
(``dp-steps``, ``dp-sample-rate``, ``dp-noise``) for the server's accountant, and a user
whose next round would pass ``privacy.epsilon-budget`` trains no more.
"""

from __future__ import annotations

from functools import lru_cache

from pollinate import protocol
from pollinate.config import RunConfig
from pollinate.models import TrainConfig, dp_sgd_steps
from pollinate.models.privacy import DPSGD, epsilon, noise_for_epsilon
from pollinate.privacy_options import default_delta

# Flower's names (flwr.supercore.differential_privacy), repeated: this module does not
# need Flower, and tests/client/test_privacy.py checks they are equal.
KEY_CLIPPING_NORM = protocol.CLIPPING_NORM
KEY_NORM_BIT = protocol.NORM_BIT
# Config key: users the server's accountant has stopped (their budget is spent).
STOPPED_USERS = protocol.PRIVACY_STOPPED
# Train-metric key: the users an update stands for (1, or a cohort mean's count).
USERS_KEY = protocol.DP_USERS


# DP-SGD steps a personalization method took for a user (Ditto's personal model, the
# fine-tuning at evaluation), waiting to be reported with that user's metrics. Per process;
# each report takes (and clears) its user's count.
_NOTED: dict[str, int] = {}


def note_steps(user: str, steps: int) -> None:
    _NOTED[user] = _NOTED.get(user, 0) + steps


def take_noted_steps(user: str) -> int:
    return _NOTED.pop(user, 0)


def local_dp_on(cfg: RunConfig) -> bool:
    return cfg.privacy.method == "local"


def _delta(cfg: RunConfig, num_examples: int) -> float:
    return cfg.privacy.delta or default_delta(num_examples)


def steps_per_round(cfg: RunConfig, num_examples: int) -> tuple[float, int]:
    """(q, DP-SGD steps) one round spends on a user with ``num_examples``: its training
    plus the personal model's (Ditto's, or fine-tuning at the round's evaluation)."""
    t, pers = cfg.train, cfg.personalization
    epochs_key = {"ditto": "ditto-epochs", "finetune": "finetune-epochs"}.get(pers.method)
    extra = pers.options.integer(epochs_key) if epochs_key else 0
    total = 0
    rate = 1.0
    for epochs in (t.epochs, extra):
        rate, steps = dp_sgd_steps(
            num_examples, TrainConfig(epochs=epochs, batch_size=t.batch_size)
        )
        total += steps
    return rate, total


@lru_cache(maxsize=4096)
def _derived_noise(target: float, delta: float, rate: float, steps: int) -> float:
    return noise_for_epsilon(target, delta, rate, steps)


def dp_sgd_for(cfg: RunConfig, num_examples: int) -> DPSGD | None:
    """The DP-SGD settings for a user's training, or None without local DP.

    With ``privacy.target-epsilon`` the noise multiplier is the smallest that keeps the
    user within it after ``run.num-rounds`` rounds (as if sampled every round: an upper
    bound on what it can spend).
    """
    p = cfg.privacy
    if p.method != "local" or num_examples == 0:
        return None
    z = p.noise_multiplier
    if not z:
        rate, steps = steps_per_round(cfg, num_examples)
        z = _derived_noise(
            p.target_epsilon, _delta(cfg, num_examples), rate, steps * cfg.run.num_rounds
        )
    return DPSGD(noise_multiplier=z, clipping_norm=p.clipping_norm)


def dp_metrics(cfg: RunConfig, num_examples: int, steps: int) -> dict[str, float]:
    """What the server's accountant needs about one user's DP-SGD this round."""
    dp = dp_sgd_for(cfg, num_examples)
    rate, _ = steps_per_round(cfg, num_examples)
    return {
        "dp-steps": float(steps),
        "dp-sample-rate": rate,
        "dp-noise": dp.noise_multiplier if dp is not None else 0.0,
        "dp-delta": _delta(cfg, num_examples),
    }


def first_round_over_budget(cfg: RunConfig, num_examples: int) -> bool:
    """A user whose very first round would already pass ``privacy.epsilon-budget``
    (the server stops the others, from what they spent: ``privacy-stopped``)."""
    budget = cfg.privacy.epsilon_budget
    dp = dp_sgd_for(cfg, num_examples)
    if not budget or dp is None:
        return False
    rate, steps = steps_per_round(cfg, num_examples)
    return epsilon(dp.noise_multiplier, rate, steps, _delta(cfg, num_examples)) > budget
