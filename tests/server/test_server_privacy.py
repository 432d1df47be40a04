"""User-level DP over cohorts: per-user clipping (node or server), the bound on one user's
influence, the noise, the accountant and the budget; `[privacy]` config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore import differential_privacy as flower_dp

from pollinate import config, protocol
from pollinate.client import app as client_app
from pollinate.client import privacy as client_privacy
from pollinate.models import create_model
from pollinate.models.flat import flatten
from pollinate.models.privacy import clip_update, epsilon
from pollinate.server.privacy import PrivateCohorts
from pollinate.server.strategies import build_strategy

P = 40  # parameters of the toy updates


def user_message(update: np.ndarray, global_w: np.ndarray, examples: int = 10) -> Message:
    """One user's update as UserCohorts hands it to aggregation."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({"weights": torch.from_numpy(global_w + update)}),
            "metrics": MetricRecord(
                {"num-examples": examples, "train-loss": 1.0, "dp-users": 1, "norm_bit": 0}
            ),
        }
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def private_strategy(n_users: int, **privacy: object) -> PrivateCohorts:
    keys = {f"privacy.{k.replace('_', '-')}": v for k, v in privacy.items()}
    cfg = config.resolve({"privacy.method": "user", **keys})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, PrivateCohorts)
    strategy.directory.users = [f"u{i}" for i in range(n_users)]
    return strategy


def aggregate(
    strategy: PrivateCohorts, updates: list[np.ndarray], global_w: np.ndarray
) -> np.ndarray:
    strategy._dp_global[1] = ArrayRecord({"weights": torch.from_numpy(global_w)})
    strategy._dp_sampled[1] = len(updates)
    arrays, _ = strategy._aggregate_updates(1, [user_message(u, global_w) for u in updates])
    assert arrays is not None
    return arrays["weights"].numpy()


@pytest.mark.parametrize("clip_on", ["server", "client"])
def test_one_huge_update_moves_the_aggregate_by_at_most_c_over_n(clip_on: str) -> None:
    rng = np.random.default_rng(0)
    n, c = 10, 0.5
    global_w = rng.normal(size=P)
    honest = [0.05 * rng.normal(size=P) for _ in range(n)]
    huge = [*honest[:-1], 1000000.0 * rng.normal(size=P)]
    if clip_on == "client":  # the node clips each user before it sends (client/app.py)
        honest, huge = (
            [
                clip_update(torch.from_numpy(global_w + u), torch.from_numpy(global_w), c)[
                    0
                ].numpy()
                - global_w
                for u in us
            ]
            for us in (honest, huge)
        )
    # The same seed draws the same noise: the difference is the huge user's influence only.
    base = aggregate(
        private_strategy(n, noise_multiplier=1.0, clipping_norm=c, clip_on=clip_on),
        honest,
        global_w,
    )
    moved = aggregate(
        private_strategy(n, noise_multiplier=1.0, clipping_norm=c, clip_on=clip_on), huge, global_w
    )
    # Replacing one user's update changes a uniform mean of n updates clipped to C by <= 2C/n
    # (from one clipped vector to another), and removing it entirely by <= C/n.
    assert np.linalg.norm(moved - base) <= 2 * c / n + 1e-9
    assert np.linalg.norm(moved - base) > c / n  # the huge user did move it, up to the bound


def test_noise_on_the_aggregate_has_std_z_c_over_n() -> None:
    n, z, c = 8, 1.7, 0.3
    global_w, update = np.zeros(P), np.full(P, 0.01)  # every user the same, inside C
    strategy = private_strategy(n, noise_multiplier=z, clipping_norm=c, clip_on="server")
    draws = np.concatenate(
        [aggregate(strategy, [update] * n, global_w) - update for _ in range(150)]
    )
    expected = z * c / n
    assert abs(draws.mean()) < 4 * expected / np.sqrt(draws.size)
    assert abs(draws.std() / expected - 1) < 4 / np.sqrt(2 * draws.size)


def test_the_run_epsilon_is_opacus_rdp_with_user_sampling_rate() -> None:
    strategy = private_strategy(20, noise_multiplier=1.1, clipping_norm=1.0, clip_on="server")
    global_w = np.zeros(P)
    for r in (1, 2, 3):
        strategy._dp_global[r] = ArrayRecord({"weights": torch.from_numpy(global_w)})
        strategy._dp_sampled[r] = 5
        strategy._aggregate_updates(r, [user_message(np.ones(P), global_w) for _ in range(5)])
    # 3 releases, q = 5 / 20, delta = min(1e-5, 1/20).
    assert strategy.ledger.run_epsilon() == pytest.approx(epsilon(1.1, 0.25, 3, 1e-5))


def test_the_budget_stops_training_before_it_would_be_passed() -> None:
    budget = epsilon(1.5, 0.25, 5, 1e-5) * 1.001  # five rounds fit, six do not
    strategy = private_strategy(20, noise_multiplier=1.5, clipping_norm=1.0, epsilon_budget=budget)
    strategy.ledger.rounds = [(1.5, 0.25)] * 4
    assert not strategy._budget_spent()  # the fifth round may run
    strategy.ledger.rounds.append((1.5, 0.25))
    assert strategy._budget_spent()  # a sixth would pass the budget
    assert strategy.sample_train(6).users == []  # round 6 trains nobody


def test_adaptive_clipping_follows_the_quantile() -> None:
    """Andrew et al.: C moves towards the target quantile of the update norms (Flower 1.42's
    sign would shrink C while every update is clipped)."""
    rng = np.random.default_rng(1)
    n = 50
    norms = np.linspace(1.0, 3.0, n)  # median 2
    strategy = private_strategy(
        n, noise_multiplier=0.5, clipping_norm=0.1, clipping="adaptive", clip_on="server"
    )
    global_w = np.zeros(P)
    for r in range(1, 60):
        ups = [u * rng.normal(size=P) for u in norms]
        ups = [u / np.linalg.norm(u) * s for u, s in zip(ups, norms, strict=True)]
        strategy._dp_global[r] = ArrayRecord({"weights": torch.from_numpy(global_w)})
        strategy._dp_sampled[r] = n
        strategy._aggregate_updates(r, [user_message(u, global_w) for u in ups])
    assert 1.6 < strategy._dp.clipping_norm < 2.4


def test_flower_keys_are_the_clients() -> None:
    from pollinate.server import privacy as server_privacy

    assert client_privacy.KEY_CLIPPING_NORM == flower_dp.KEY_CLIPPING_NORM
    assert client_privacy.KEY_NORM_BIT == flower_dp.KEY_NORM_BIT
    assert client_privacy.STOPPED_USERS == server_privacy.STOPPED_USERS
    assert client_privacy.USERS_KEY == server_privacy.USERS_KEY


def _node_train(
    cfg: config.RunConfig, users: list[str], *, node_mean: bool = False, **extra: object
) -> tuple[Message, torch.Tensor]:
    """The real ClientApp's train handler on one node hosting ``users``."""
    model = create_model("mlp", in_features=64, num_classes=10, seed=0, hidden=16, depth=1)
    flat = flatten(model.state_dict())
    round_config = ConfigRecord(
        {
            **cfg.to_flat(),
            protocol.MODEL_SPEC: json.dumps(model.spec.to_dict()),
            protocol.SERVER_ROUND: 1,
            **extra,  # type: ignore[dict-item]
        }
    )
    content = protocol.instruction_content(
        protocol.weights_record(flat), round_config, users=users, node_mean=node_mean
    )
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return client_app.train(msg, context), flat


def test_a_nodes_cohort_mean_equals_clipping_user_by_user(tmp_path) -> None:
    """The node clips every user's update before its cohort's mean: the same as clipping
    each user's own update and averaging them uniformly on the server."""
    cfg = config.resolve(
        {
            "data.dataset": "digits",
            "data.num-users": 6,
            "model.name": "mlp",
            "model.hidden": 16,
            "train.lr": 0.5,
            "store.dir": str(tmp_path),
            "privacy.method": "user",
            "privacy.noise-multiplier": 1.0,
            "privacy.clipping-norm": 0.3,
        }
    )
    from pollinate.client.local import hosted_cohort

    users = hosted_cohort(cfg, {}).user_ids
    unclipped, g = _node_train(cfg, users)
    got = protocol.read_train_reply(unclipped.content)
    per_user = [got.updates[u][protocol.WEIGHTS].numpy() for u in users]
    by_user = np.mean(
        [clip_update(torch.from_numpy(w), g, 0.3)[0].numpy() for w in per_user], axis=0
    )
    assert max(np.linalg.norm(w - g.numpy()) for w in per_user) > 0.3  # clipping matters
    node_mean, _ = _node_train(cfg, users, node_mean=True, clipping_norm=0.3)
    reply = protocol.read_train_reply(node_mean.content)
    assert reply.mean is not None and reply.mean_metrics is not None
    np.testing.assert_allclose(reply.mean[protocol.WEIGHTS].numpy(), by_user, atol=1e-6)
    metrics = reply.mean_metrics
    assert metrics["dp-users"] == 6
    assert metrics["norm_bit"] == sum(int(np.linalg.norm(w - g.numpy()) > 0.3) for w in per_user)


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"privacy.method": "user"}, "without noise is not private"),
        (
            {
                "privacy.method": "local",
                "privacy.noise-multiplier": 1.0,
                "privacy.target-epsilon": 2.0,
            },
            "both set",
        ),
        ({"privacy.noise-multiplier": 1.0}, "no effect with privacy.method = 'none'"),
        (
            {"privacy.secure-aggregation": True, "strategy.name": "krum"},
            "needs every user's own update",
        ),
        ({"privacy.secure-aggregation": True, "strategy.name": "fedmedian"}, "only their sum"),
        (
            {
                "privacy.secure-aggregation": True,
                "privacy.method": "user",
                "privacy.noise-multiplier": 1.0,
                "privacy.clip-on": "server",
            },
            "cannot clip updates the server never sees",
        ),
        (
            {"privacy.method": "user", "privacy.noise-multiplier": 1.0, "strategy.name": "krum"},
            "fedavg, fedprox",
        ),
        (
            {
                "privacy.method": "local",
                "privacy.noise-multiplier": 1.0,
                "privacy.clipping": "adaptive",
            },
            "user-level",
        ),
        (
            {"privacy.secagg-reconstruction-threshold": 5, "privacy.secagg-num-shares": 3},
            "must be below",
        ),
        ({"privacy.method": "dp"}, "choose one of: none, user, local"),
        ({"privacy.delta": 1.0}, "privacy.delta"),
        ({"privacy.clipping-norm": 0.0}, "privacy.clipping-norm"),
        (
            {"privacy.method": "user", "privacy.noise-multiplier": 1.0, "run.resume": True},
            "not checkpointed",
        ),
    ],
)
def test_nonsense_privacy_configs_are_one_line_errors(flat: dict[str, object], needle: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.resolve(flat)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_default_changes_nothing() -> None:
    cfg = config.resolve({})
    assert cfg.privacy.method == "none"
    assert not isinstance(build_strategy(cfg), PrivateCohorts)
