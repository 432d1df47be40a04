"""The server's half of differential privacy: DP-FedAvg over users, and the accountant.

User-level DP (``privacy.method = "user"``; DP-FedAvg, McMahan et al. 2018) runs Flower's
own wrappers (``flwr.serverapp.strategy.DifferentialPrivacy{Client,Server}Side{Fixed,
Adaptive}Clipping``), but on the *per-user* messages :class:`~pollinate.server.strategy.
UserCohorts` expands a round's node replies into — so a node hosting many users still
contributes one clipped update per user, and a folded round (trained in the previous
round's evaluation exchange) is clipped and noised like any other. Differences from
calling the wrappers on node replies, each for a reason:

- the mean is uniform over users (``dp-users`` weights, one per user; a node's cohort mean
  counts its users): DP-FedAvg's sensitivity C/m holds for a uniform mean, not for an
  example-weighted one;
- the noise std is ``z * C / m`` with m the users actually in the mean (not the number
  sampled): a user that dropped out cannot make the others' noise too small;
- the noise comes from a generator seeded by ``run.seed`` (Flower draws from numpy's global
  one), so a run is reproducible;
- adaptive clipping moves C the way Andrew et al. (2021) do: Flower 1.42 counts the
  *clipped* users as its ``norm_bit`` and then applies the paper's update, written for the
  *unclipped* fraction, so its C shrinks while most updates are clipped. Here
  ``C <- C * exp(-lr * (unclipped fraction - quantile))``: C tracks the
  ``privacy.clipped-quantile`` quantile of the update norms.

Accounting (:class:`PrivacyLedger`): Opacus's RDP accountant. User-level: every round that
released an aggregate is one subsampled Gaussian step with q = users sampled / users.
Local DP: each user's own DP-SGD steps (reported by its node), ε per user. Each round's
metrics carry the ε spent so far (``epsilon``: the run's, or the largest user's;
``epsilon_mean`` over the users; per user in the clients table).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from pollinate import protocol
from pollinate.flower_compat.dp import KEY_CLIPPING_NORM, KEY_NORM_BIT, compute_stdv
from pollinate.models.privacy import composed_epsilon, noise_for_epsilon
from pollinate.privacy_options import PrivacyOptions, default_delta
from pollinate.server.rounds import Exchange, Sample, UserCohorts
from pollinate.server.validation import Candidate

_logger = logging.getLogger("pollinate")

STOPPED_USERS = protocol.PRIVACY_STOPPED
USERS_KEY = protocol.DP_USERS


class PrivacyLedger:
    """ε spent so far, from the releases of the run (Opacus's RDP accountant).

    User-level DP: one entry (z, q) per round that released an aggregate. Local DP:
    per user, the DP-SGD steps its node reported, by (z, q), and the user's δ.
    """

    def __init__(self, options: PrivacyOptions) -> None:
        self.options = options
        self.rounds: list[tuple[float, float]] = []
        self.run_delta = options.delta or 1e-5
        self.user_steps: dict[str, dict[tuple[float, float], int]] = {}
        self.user_delta: dict[str, float] = {}
        # The steps a user's last round took: what its next one is assumed to take.
        self.last_steps: dict[str, tuple[float, float, int]] = {}

    # -- user-level DP
    def run_epsilon(self, extra_rounds: int = 0) -> float:
        counts: dict[tuple[float, float], int] = {}
        for key in self.rounds:  # equal releases compose as one run of several steps
            counts[key] = counts.get(key, 0) + 1
        if extra_rounds and self.rounds:
            counts[self.rounds[-1]] += extra_rounds
        return composed_epsilon([(z, q, n) for (z, q), n in counts.items()], self.run_delta)

    # -- local DP
    def add_steps(self, user: str, metrics: dict[str, float]) -> None:
        steps = int(metrics.get("dp-steps", 0))
        if steps <= 0:
            return
        key = (float(metrics["dp-noise"]), float(metrics["dp-sample-rate"]))
        spent = self.user_steps.setdefault(user, {})
        spent[key] = spent.get(key, 0) + steps
        self.user_delta[user] = float(metrics["dp-delta"])
        self.last_steps[user] = (*key, steps)

    def user_epsilon(self, user: str, extra: tuple[float, float, int] | None = None) -> float:
        parts = [(z, q, n) for (z, q), n in self.user_steps.get(user, {}).items()]
        if extra is not None:
            parts.append(extra)
        return composed_epsilon(parts, self.user_delta.get(user, 1e-5))

    def user_stopped(self, user: str) -> bool:
        """Its next round (as large as its last) would take the user past the budget."""
        budget = self.options.epsilon_budget
        last = self.last_steps.get(user)
        return bool(budget) and last is not None and self.user_epsilon(user, last) > budget

    def per_user(self) -> dict[str, float]:
        return {u: self.user_epsilon(u) for u in sorted(self.user_steps)}


class _MeanOf(Strategy):
    """The strategy Flower's DP wrapper wraps: the cohort strategy's own aggregate."""

    def __init__(
        self,
        aggregate: Callable[[int, list[Message]], tuple[ArrayRecord | None, MetricRecord | None]],
    ) -> None:
        self._aggregate = aggregate

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self._aggregate(server_round, list(replies))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        raise NotImplementedError("the cohort strategy configures rounds")

    configure_evaluate = configure_train

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        raise NotImplementedError("the cohort strategy aggregates evaluation")

    def summary(self) -> None:
        return None


class _SeededNoise:
    """Mixin for Flower's DP wrappers: noise from ``self.rng``; Andrew et al.'s C update."""

    rng: np.random.Generator
    users_in_mean: int = 1
    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int
    clipped_count_stddev: float
    clip_norm_lr: float
    target_clipped_quantile: float

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.users_in_mean)
        noisy = {}
        for key, array in aggregated.items():
            values = array.numpy()
            noisy[key] = Array(
                values + self.rng.normal(0.0, std, values.shape).astype(values.dtype)
            )
        return ArrayRecord(noisy)

    def _noisy_fraction(self, count: int, total: int) -> float:
        return float(self.rng.normal(count, self.clipped_count_stddev)) / float(total)

    def _geometric_update(self, clipped_fraction: float) -> None:
        unclipped = 1.0 - clipped_fraction
        self.clipping_norm *= math.exp(
            -self.clip_norm_lr * (unclipped - self.target_clipped_quantile)
        )


class ClientFixed(_SeededNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping; clipping on the node, per user."""


class ServerFixed(_SeededNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, on per-user messages."""


class ServerAdaptive(_SeededNoise, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, on per-user messages."""


class ClientAdaptive(_SeededNoise, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping; a cohort mean counts each of its users."""

    def _update_clip_norm_from_replies(self, replies: list[Message]) -> None:
        clipped = total = 0
        for msg in replies:
            metrics = msg.content.metric_records[protocol.METRICS]
            clipped += _count(metrics[KEY_NORM_BIT])
            total += _count(metrics[USERS_KEY])
        self._geometric_update(self._noisy_fraction(clipped, max(total, 1)))


def _count(value: object) -> int:
    """A count a node put in a MetricRecord (an int, or a float that is one)."""
    if not isinstance(value, int | float):
        raise TypeError(f"expected a count, got {value!r}")
    return int(value)


class PrivateCohorts(UserCohorts):
    """Mixin before a ``Cohort*`` strategy: ``[privacy]`` user-level or local DP."""

    privacy: PrivacyOptions = PrivacyOptions()

    def setup_privacy(self, options: PrivacyOptions, *, seed: int, num_rounds: int) -> None:
        self.privacy = options
        self.ledger = PrivacyLedger(options)
        self._rng = np.random.default_rng([seed, 0x5EED])
        self._dp: Any = None
        self._dp_rounds = num_rounds
        self._dp_global: dict[int, ArrayRecord] = {}
        self._dp_sampled: dict[int, int] = {}
        self._run_stopped = False

    @property
    def noise_multiplier(self) -> float:
        """z in use (derived from privacy.target-epsilon once the users are known)."""
        if self._dp is not None:
            return float(self._dp.noise_multiplier)
        return self.privacy.noise_multiplier

    @property
    def sends_cohort_means(self) -> bool:
        p = self.privacy
        server_clips = p.method == "user" and p.clip_on == "server"
        return super().sends_cohort_means and not server_clips

    # ------------------------------------------------------------ configuring
    def sample_train(self, server_round: int) -> Sample:
        if self.privacy.method == "user" and self._budget_spent():
            return Sample(server_round, [])
        sample = super().sample_train(server_round)
        self._dp_sampled[server_round] = len(sample.users)
        return sample

    def _budget_spent(self) -> bool:
        budget = self.privacy.epsilon_budget
        if not budget or not self.ledger.rounds:
            return False
        if self.ledger.run_epsilon(extra_rounds=1) <= budget:
            return False
        if not self._run_stopped:
            self._run_stopped = True
            _logger.warning(
                "privacy: the next round would take ε past privacy.epsilon-budget = %g "
                "(spent %.3f): no more training, the global model stays",
                budget,
                self.ledger.run_epsilon(),
            )
        return True

    def _flower_config(
        self, message_type: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> ConfigRecord:
        """The round's config, plus what the nodes need for DP: the clipping norm (user-level,
        clipped on the node) and the users whose budget is spent (local DP)."""
        config = super()._flower_config(message_type, server_round, arrays, config)
        if message_type != MessageType.TRAIN:
            return config
        p = self.privacy
        if p.method == "user" and p.clip_on == "client":
            clip = self._dp.clipping_norm if self._dp is not None else p.clipping_norm
            config[KEY_CLIPPING_NORM] = float(clip)
        if p.method == "local" and p.epsilon_budget:
            users = self.directory.users
            config[STOPPED_USERS] = [u for u in users if self.ledger.user_stopped(u)]
        return config

    # ------------------------------------------------------------ accounting
    def _updates(self, server_round: int, replies: Iterable[Message]) -> list[Candidate]:
        replies = list(replies)
        if self.privacy.method == "local":
            for reply in replies:
                if not reply.has_error():
                    self._account(protocol.read_train_reply(reply.content).metrics)
        return super()._updates(server_round, replies)

    def aggregate_evaluation(
        self, server_round: int, exchange: Exchange, replies: list[Message], *, carried: bool
    ) -> MetricRecord | None:
        if self.privacy.method == "local":  # fine-tuning at evaluation is DP-SGD too
            prefix = protocol.EVALUATION if carried else ""
            for reply in exchange.replies_of(replies, exchange.evaluators):
                if not reply.has_error():
                    self._account(protocol.read_evaluate_reply(reply.content, prefix).metrics)
        return super().aggregate_evaluation(server_round, exchange, replies, carried=carried)

    def _account(self, metrics: Mapping[str, MetricRecord]) -> None:
        """Every DP-SGD step a node reports spends its user's ε, whatever becomes of the
        update (refused, or a round cut short): the user's data was used."""
        for user, record in metrics.items():
            if "dp-steps" in record:
                values = {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
                self.ledger.add_steps(user, values)

    # ------------------------------------------------------------ aggregation
    def aggregate_training(
        self,
        server_round: int,
        exchange: Exchange,
        replies: list[Message],
        *,
        start: ArrayRecord,
        dtype: np.dtype | None = None,
    ) -> ArrayRecord | None:
        self._dp_global[server_round] = start  # what server-side clipping clips towards
        try:
            return super().aggregate_training(
                server_round, exchange, replies, start=start, dtype=dtype
            )
        finally:
            self._dp_global.pop(server_round, None)
            self._record_spent(server_round)

    def _aggregate_updates(
        self, server_round: int, updates: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.privacy.method != "user":
            return super()._aggregate_updates(server_round, updates)
        updates = [m for m in updates if not m.has_error()]  # failures were counted
        if not updates:
            return None, None
        dp = self._wrapper(server_round)
        # m: the users in this mean; the noise is z C / m (see the module doc). Flower's
        # reply-count check compares messages (a cohort's mean is one) with its count.
        dp.users_in_mean = sum(
            _count(m.content.metric_records[protocol.METRICS][USERS_KEY]) for m in updates
        )
        dp.num_sampled_clients = len(updates)
        if self.privacy.clip_on == "server":
            dp.current_arrays = self._dp_global[server_round]
        arrays, metrics = dp.aggregate_train(server_round, updates)
        if arrays is not None:
            self.ledger.rounds.append((self.noise_multiplier, self._sampling_rate(server_round)))
        return arrays, metrics

    def _uniform_mean(
        self, server_round: int, updates: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's mean with one weight per user (evaluation stays example-weighted)."""
        self.weighted_by_key = USERS_KEY
        try:
            return super()._aggregate_updates(server_round, updates)
        finally:
            self.weighted_by_key = protocol.NUM_EXAMPLES

    def _sampling_rate(self, server_round: int) -> float:
        users = max(len(self.directory.users), 1)
        return min(1.0, self._dp_sampled.get(server_round, users) / users)

    def _wrapper(self, server_round: int) -> Any:
        """Flower's DP wrapper for this configuration, built when the users are known."""
        if self._dp is not None:
            return self._dp
        p = self.privacy
        users = max(len(self.directory.users), 1)
        self.ledger.run_delta = p.delta or default_delta(users)
        z = p.noise_multiplier or noise_for_epsilon(
            p.target_epsilon,
            self.ledger.run_delta,
            self._sampling_rate(server_round),
            self._dp_rounds,
        )
        sampled = max(self._dp_sampled.get(server_round, 1), 1)
        inner = _MeanOf(self._uniform_mean)
        dp: Any
        if p.clipping == "fixed":
            cls = ClientFixed if p.clip_on == "client" else ServerFixed
            dp = cls(inner, z, p.clipping_norm, sampled)
        else:
            cls_a = ClientAdaptive if p.clip_on == "client" else ServerAdaptive
            dp = cls_a(
                inner,
                z,
                sampled,
                initial_clipping_norm=p.clipping_norm,
                target_clipped_quantile=p.clipped_quantile,
            )
        dp.rng = self._rng
        self._dp = dp
        _logger.info(
            "privacy: user-level DP, noise multiplier %.4f, clipping %s (C = %g) on the %s, "
            "δ = %g over %d users",
            dp.noise_multiplier,
            p.clipping,
            p.clipping_norm,
            p.clip_on,
            self.ledger.run_delta,
            users,
        )
        return dp

    def _record_spent(self, server_round: int) -> None:
        if self.recorder is None:
            return
        if self.privacy.method == "user":
            eps = self.ledger.run_epsilon()
            self.recorder.privacy_spent(server_round, epsilon=eps, epsilon_mean=eps)
            return
        per_user = self.ledger.per_user()
        values = list(per_user.values()) or [0.0]
        self.recorder.privacy_spent(
            server_round,
            epsilon=max(values),
            epsilon_mean=sum(values) / len(values),
            per_user=per_user,
        )


def with_privacy(
    strategy: UserCohorts, options: PrivacyOptions, *, seed: int, num_rounds: int
) -> UserCohorts:
    """``strategy`` with ``[privacy]`` applied (unchanged for ``method = "none"``).

    The strategy's class gains :class:`PrivateCohorts` in front (so ``build_strategy``'s
    dispatch stays as it is), and its state is set up.
    """
    if options.method == "none":
        return strategy
    cls = type(strategy)
    strategy.__class__ = type(f"Private{cls.__name__}", (PrivateCohorts, cls), {})
    assert isinstance(strategy, PrivateCohorts)
    strategy.setup_privacy(options, seed=seed, num_rounds=num_rounds)
    return strategy
