"""The ``[privacy]`` config section: differential privacy and secure aggregation options.

Self-contained (like ``pollinate.data.DataOptions``): the dataclass, its ranges and its
cross-field checks live here; :mod:`pollinate.config` mounts it as ``RunConfig.privacy`` and
turns a reason returned by :func:`privacy_problem` into one ``ConfigError`` line.

Methods (``privacy.method``):

- ``none``  — no differential privacy (the default: runs are unchanged).
- ``user``  — user-level (central) DP, DP-FedAvg (McMahan et al. 2018): each *user's*
  update is clipped to norm C and Gaussian noise of std ``noise-multiplier * C / n`` is
  added to the mean of the n users sampled in a round. ε bounds what the released global
  models reveal about any one user's whole dataset.
- ``local`` — sample-level DP, DP-SGD (Abadi et al. 2016) on each user's own training:
  per-example gradient clipping to C and Gaussian noise. ε (per user) bounds what that
  user's update and personal model reveal about any one of its training examples.
"""

from __future__ import annotations

from dataclasses import dataclass

from pollinate.registry import Range
from pollinate.schema import setting

METHODS = ("none", "user", "local")
CLIPPING = ("fixed", "adaptive")
CLIP_ON = ("client", "server")
# Aggregators whose result is a (weighted) mean of the updates: the only ones DP-FedAvg's
# sensitivity C/n holds for, and the only ones secure aggregation (a sum) can compute.
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
# DP-FedAvg's noise goes on the mean of the clipped updates; a server optimizer (FedAdam,
# FedYogi) reshapes that mean before Flower's wrapper would add it, and C/n no longer holds.
USER_DP_STRATEGIES = ("fedavg", "fedprox")
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class PrivacyOptions:
    method: str = setting(
        "none",
        "differential privacy: `user` (DP-FedAvg, ε per user) or `local` (DP-SGD, ε per example)",
        choices=METHODS,
    )
    noise_multiplier: float = setting(
        0.0, "Gaussian noise std / clipping norm; 0 = derive from target-epsilon", Range(0, 1e6)
    )
    target_epsilon: float = setting(
        0.0, "the ε the whole run should reach (at delta); 0 = not set", Range(0, 1e6)
    )
    delta: float = setting(
        0.0,
        "δ; 0 = min(1e-5, 1/users) for `user`, min(1e-5, 1/a user's examples) for `local`",
        Range(0, 1, open_hi=True),
    )
    clipping_norm: float = setting(
        1.0,
        "C: each user's update (`user`) or example's gradient (`local`) is clipped to this "
        "L2 norm; the starting C with adaptive clipping",
        Range(0, 1e12, open_lo=True),
    )
    clipping: str = setting(
        "fixed",
        "`adaptive` (Andrew et al. 2021, `user` only): C follows a quantile of the update norms",
        choices=CLIPPING,
    )
    clipped_quantile: float = setting(
        0.5, "adaptive clipping: the quantile of the update norms C tracks", Range(0, 1)
    )
    clip_on: str = setting(
        "client",
        "where a user's update is clipped: on its node, or on the server (nodes then send "
        "every user's own update)",
        choices=CLIP_ON,
    )
    epsilon_budget: float = setting(
        0.0,
        "a user stops contributing once its next round would pass this ε; 0 = none",
        Range(0, 1e6),
    )
    secure_aggregation: bool = setting(
        False, "SecAgg+ (Bell et al. 2020): the server learns only the sum of a round's updates"
    )
    # On SecAgg+'s ring: a node and its (k - 1) nearest neighbours hold its shares.
    secagg_num_shares: int = setting(
        3,
        "SecAgg+: shares of each node's secrets, one per ring neighbour (itself included); "
        "odd, at most the round's nodes",
        Range(3, 100_000),
    )
    # Fewer colluding nodes learn nothing from their shares.
    secagg_reconstruction_threshold: int = setting(
        2,
        "SecAgg+: shares that rebuild a secret (below num-shares): a round survives while "
        "every node keeps this many live neighbours",
        Range(2, 100_000),
    )
    # The aggregate's error is about 2 x clipping-range / quantization-range / (sum of
    # weights / max-weight) per value.
    secagg_clipping_range: float = setting(
        8.0,
        "SecAgg+: each value of (weight / max-weight) x update is clipped to +-this before "
        "quantization",
        Range(0, 1e6, open_lo=True),
    )
    # A round's sum of n quantized values must stay below the 2^32 modulus: n < 2^32 / this.
    secagg_quantization_range: int = setting(
        4_194_304, "SecAgg+: integer levels of the quantization (2^22)", Range(2, 2**30)
    )
    secagg_max_weight: float = setting(
        1000.0,
        "SecAgg+: the largest node weight (its training examples) expected; above it, values clip",
        Range(0, 1e12, open_lo=True),
    )


# Strategies that need every individual update: secure aggregation hides them.
_NEEDS_INDIVIDUAL_UPDATES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def privacy_problem(
    p: PrivacyOptions, *, strategy: str, norm_bound_median_multiple: float = 0.0
) -> str | None:
    """Why this combination makes no sense (one line naming the key to change), or None."""
    for key, value, choices in (
        ("privacy.method", p.method, METHODS),
        ("privacy.clipping", p.clipping, CLIPPING),
        ("privacy.clip-on", p.clip_on, CLIP_ON),
    ):
        if value not in choices:
            return f"{key} = '{value}' is not known; choose one of: {', '.join(choices)}"
    return _secagg_problem(p, strategy, norm_bound_median_multiple) or _dp_problem(p, strategy)


def _secagg_problem(p: PrivacyOptions, strategy: str, median_multiple: float) -> str | None:
    n, t = p.secagg_num_shares, p.secagg_reconstruction_threshold
    if t >= n:
        return (
            f"privacy.secagg-reconstruction-threshold = {t} must be below "
            f"privacy.secagg-num-shares = {n} (a node's secret is split into that many "
            "shares; below it, a round survives a dropped neighbour)"
        )
    if not p.secure_aggregation:
        return None
    if strategy in _NEEDS_INDIVIDUAL_UPDATES:
        return (
            f"strategy.name = '{strategy}' needs every user's own update but "
            "privacy.secure-aggregation shows the server only their sum; use one of "
            f"{', '.join(MEAN_STRATEGIES)} or turn secure aggregation off"
        )
    if median_multiple:
        return (
            "validation.norm-bound-median-multiple needs every update's norm but "
            "privacy.secure-aggregation hides them; use validation.norm-bound (checked on "
            "the node) instead"
        )
    if p.method == "user" and p.clip_on == "server":
        return (
            "privacy.clip-on = 'server' cannot clip updates the server never sees "
            "(privacy.secure-aggregation); use privacy.clip-on = 'client'"
        )
    if p.method == "user" and p.clipping == "adaptive":
        # Adaptive clipping counts clipped updates from per-update bits the sum hides.
        return (
            "privacy.clipping = 'adaptive' needs each update's clipped bit, which "
            "privacy.secure-aggregation hides; use privacy.clipping = 'fixed'"
        )
    return None


def _dp_problem(p: PrivacyOptions, strategy: str) -> str | None:
    if p.method == "none":
        set_keys = [
            k
            for k, v in (
                ("noise-multiplier", p.noise_multiplier),
                ("target-epsilon", p.target_epsilon),
                ("epsilon-budget", p.epsilon_budget),
            )
            if v
        ]
        if set_keys:
            return (
                f"privacy.{set_keys[0]} has no effect with privacy.method = 'none'; set "
                "privacy.method = 'user' (user-level DP) or 'local' (DP-SGD)"
            )
        return None
    if p.noise_multiplier and p.target_epsilon:
        return (
            "privacy.noise-multiplier and privacy.target-epsilon both set: give one (the "
            "noise multiplier is derived from the target ε)"
        )
    if not p.noise_multiplier and not p.target_epsilon:
        return (
            f"privacy.method = '{p.method}' without noise is not private: set "
            "privacy.noise-multiplier (e.g. 1.0) or privacy.target-epsilon (e.g. 8)"
        )
    if p.method == "user" and strategy not in USER_DP_STRATEGIES:
        return (
            f"privacy.method = 'user' adds noise scaled to one user's share of the mean of "
            f"the updates, which strategy.name = '{strategy}' does not release; use one of "
            f"{', '.join(USER_DP_STRATEGIES)}"
        )
    if p.method == "local" and p.clipping == "adaptive":
        return (
            "privacy.clipping = 'adaptive' is user-level DP's (Andrew et al. 2021); with "
            "privacy.method = 'local' use privacy.clipping = 'fixed'"
        )
    if p.method == "local" and p.clip_on == "server":
        return (
            "privacy.method = 'local' clips every example's gradient on the device; "
            "privacy.clip-on = 'server' applies to privacy.method = 'user' only"
        )
    return None


def default_delta(records: int) -> float:
    """δ when ``privacy.delta`` is 0: min(1e-5, 1/records) — below one over the number of
    protected records (users, or a user's examples), as a meaningful δ must be."""
    return min(DEFAULT_DELTA, 1.0 / max(records, 1))
