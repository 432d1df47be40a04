"""A node hosting a cohort of users gives the same federation as one node per user.

These run the real ServerApp (``run_federation``) and the real ClientApp, with the nodes'
messages handled in this process (no Ray), so every strategy is checked in seconds;
``test_engine.py`` repeats the key cases on Flower's simulation engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from simhelpers import InProcessGrid, final_weights, max_abs_diff, run_in_process, small_config

from pollinate import config
from pollinate.client.steps import RoundContext, is_dropped, local_epochs
from pollinate.client.store import ModelStore
from pollinate.models import create_model
from pollinate.server.metrics import read_clients, read_rounds

USERS = 6  # small_config's data.num-users

# Strategies whose aggregate is the example-weighted mean: a node sends its cohort's mean,
# equal to the per-user result up to float rounding.
MEAN: dict[str, dict[str, object]] = {
    "fedavg": {},
    "fedprox": {"strategy.proximal-mu": 0.1},
    "fedadam": {"strategy.server-lr": 0.05},
}
# Robust aggregators see every user's own update in both layouts: bit-for-bit equal.
ROBUST: dict[str, dict[str, object]] = {
    "fedmedian": {},
    "fedtrimmedavg": {"strategy.trim-beta": 0.2},
    "krum": {"strategy.krum-byzantine": 1},
}


def both_layouts(
    tmp_path: Path, num_nodes: int, **overrides: object
) -> tuple[Path, Path, InProcessGrid]:
    cohort, grid = run_in_process(small_config(tmp_path / "cohort", **overrides), num_nodes)
    per_user, _ = run_in_process(small_config(tmp_path / "per-user", **overrides), USERS)
    return cohort, per_user, grid


@pytest.mark.parametrize("num_nodes", [1, 2])
@pytest.mark.parametrize("name", sorted(MEAN))
def test_weighted_mean_strategies_match_one_node_per_user(
    tmp_path: Path, name: str, num_nodes: int
) -> None:
    overrides = {"strategy.name": name, "strategy.fraction-train": 0.5, **MEAN[name]}
    cohort, per_user, grid = both_layouts(tmp_path, num_nodes, **overrides)
    assert max_abs_diff(final_weights(cohort), final_weights(per_user)) < 1e-6
    # The training really happened: the model moved away from its initialisation.
    first = torch.load(cohort / "models" / "global-round-0000.pt", weights_only=False)
    assert max_abs_diff(first["state_dict"], final_weights(cohort)) > 1e-3
    # Each node replied with its cohort's mean, not one update per user.
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train and all(m.content["config"]["node-mean"] for m in train)


@pytest.mark.parametrize("num_nodes", [1, 2])
@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_aggregators_see_every_user_and_match_exactly(
    tmp_path: Path, name: str, num_nodes: int
) -> None:
    overrides = {"strategy.name": name, "strategy.fraction-train": 0.7, **ROBUST[name]}
    cohort, per_user, grid = both_layouts(tmp_path, num_nodes, **overrides)
    a, b = final_weights(cohort), final_weights(per_user)
    assert all(torch.equal(a[k], b[k]) for k in a)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train and not any(m.content["config"].get("node-mean") for m in train)


def test_per_user_metrics_and_sampling_do_not_depend_on_the_layout(tmp_path: Path) -> None:
    overrides = {"strategy.fraction-train": 0.5, "strategy.fraction-evaluate": 1.0}
    cohort, per_user, _ = both_layouts(tmp_path, 2, **overrides)
    a, b = read_clients(cohort), read_clients(per_user)
    assert a[["round", "user"]].equals(b[["round", "user"]])  # the same users each round
    assert a.groupby("round")["train_examples"].count().tolist() == [3, 3]
    for col in ("train_examples", "train_loss", "global_accuracy", "global_loss"):
        assert ((a[col] - b[col]).abs().fillna(0) < 1e-5).all(), col
    ra, rb = read_rounds(cohort), read_rounds(per_user)
    assert ((ra["train_loss"] - rb["train_loss"]).abs().fillna(0) < 1e-6).all()


def test_the_same_seed_samples_the_same_users_as_a_plain_random_sample(tmp_path: Path) -> None:
    """Sampling uses the strategy's own stream seeded by run.seed, as `random.seed` would."""
    import random

    run_dir, _ = run_in_process(small_config(tmp_path, **{"strategy.fraction-train": 0.5}), 2)
    clients = read_clients(run_dir)
    rng = random.Random(0)
    for server_round in (1, 2):
        expected = sorted(f"user-{k:04d}" for k in rng.sample(range(USERS), USERS // 2))
        got = sorted(clients[clients["round"] == server_round]["user"])
        assert got == expected


# ----------------------------------------------------------------------------- stragglers


def ctx(
    tmp_path: Path, overrides: dict[str, object] | None = None, round_: int = 1
) -> RoundContext:
    cfg = config.resolve({"train.epochs": 20, **(overrides or {})})
    model = create_model("logreg", in_features=4, num_classes=2)
    return RoundContext(
        cfg=cfg,
        spec=model.spec,
        global_weights=dict(model.state_dict()),
        server_round=round_,
        store=ModelStore(tmp_path),
    )


def test_stragglers_train_a_random_1_to_e_epochs_reproducibly(tmp_path: Path) -> None:
    c = ctx(tmp_path, {"train.straggler-fraction": 0.5})
    epochs = [local_epochs(c, f"u{k}") for k in range(400)]
    assert epochs == [local_epochs(c, f"u{k}") for k in range(400)]  # seeded
    short = [e for e in epochs if e < 20]
    assert 0.4 < len(short) / len(epochs) < 0.6  # ~half are stragglers (a few draw E)
    assert min(epochs) >= 1 and len(set(short)) > 10
    assert not any(is_dropped(c, f"u{k}") for k in range(400))
    later = ctx(tmp_path, {"train.straggler-fraction": 0.5}, round_=2)
    assert epochs != [local_epochs(later, f"u{k}") for k in range(400)]  # new draw per round
    none = ctx(tmp_path)
    assert {local_epochs(none, f"u{k}") for k in range(50)} == {20}


def test_dropped_stragglers_are_the_stragglers(tmp_path: Path) -> None:
    keep = ctx(tmp_path, {"train.straggler-fraction": 0.5})
    drop = ctx(tmp_path, {"train.straggler-fraction": 0.5, "train.drop-stragglers": True})
    for k in range(100):
        straggler = local_epochs(keep, f"u{k}") < 20
        assert is_dropped(drop, f"u{k}") == straggler or local_epochs(keep, f"u{k}") == 20


@pytest.mark.parametrize("drop", [False, True])
def test_stragglers_in_a_federation(tmp_path: Path, drop: bool) -> None:
    overrides = {
        "strategy.name": "fedprox",
        "strategy.proximal-mu": 0.1,
        "train.epochs": 4,
        "train.straggler-fraction": 0.5,
        "train.drop-stragglers": drop,
        "run.num-rounds": 3,
    }
    cohort, per_user, _ = both_layouts(tmp_path, 2, **overrides)
    assert max_abs_diff(final_weights(cohort), final_weights(per_user)) < 1e-6
    trained = read_rounds(cohort)["train_users"].tolist()[1:]
    if drop:  # FedAvg's rule in the FedProx paper: stragglers send nothing
        assert sum(trained) < 3 * USERS
    else:  # FedProx keeps their partial work
        assert trained == [USERS] * 3
