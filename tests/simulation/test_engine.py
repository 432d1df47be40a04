"""On Flower's simulation engine (Ray): cohorts equal one node per user.

Each case runs the same config twice through ``run_simulation``: once with a few Flower
nodes hosting cohorts, once with Flower's one-node-per-user layout. FedAvg-family results
agree to float rounding (nodes send their cohort's mean); robust aggregators see every
user's update in both layouts and agree exactly — and also agree exactly with the same
federation run in-process, so the engine adds nothing to the numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from simhelpers import final_weights, max_abs_diff, run_in_process, small_config

from pollinate.server.metrics import read_rounds
from pollinate.simulation.engine import run_simulation

USERS = 6

CASES = [
    pytest.param("fedavg", 2, {}, id="fedavg-2-nodes"),
    pytest.param(
        "fedprox", 1, {"strategy.proximal-mu": 0.1}, id="fedprox-1-node", marks=pytest.mark.slow
    ),
    pytest.param("fedmedian", 2, {}, id="fedmedian-2-nodes", marks=pytest.mark.slow),
    # f = 0: with 3 users a round Krum cannot assume an attacker (it needs n > 2f + 2,
    # refused by the config check); the case is about the cohort layout, not about f.
    pytest.param(
        "krum", 2, {"strategy.krum-byzantine": 0}, id="krum-2-nodes", marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(("name", "num_nodes", "extra"), CASES)
def test_cohorts_equal_one_node_per_user_on_ray(
    tmp_path: Path, name: str, num_nodes: int, extra: dict[str, object]
) -> None:
    overrides = {
        "strategy.name": name,
        "strategy.fraction-train": 0.5,
        "strategy.fraction-evaluate": 0.5,
        **extra,
    }
    cohort = run_simulation(
        small_config(tmp_path / "cohort", **overrides, **{"simulation.num-nodes": num_nodes})
    )
    per_user = run_simulation(
        small_config(tmp_path / "per-user", **overrides, **{"simulation.num-nodes": USERS})
    )
    local, _ = run_in_process(small_config(tmp_path / "local", **overrides), USERS)
    a, b, c = final_weights(cohort), final_weights(per_user), final_weights(local)
    rounds = read_rounds(cohort)
    assert rounds["train_users"].tolist()[1:] == [USERS // 2] * 2
    assert rounds["eval_users"].tolist()[1:] == [USERS // 2] * 2
    if name in ("fedavg", "fedprox"):
        assert max_abs_diff(a, b) < 1e-6
        assert all(torch.equal(b[k], c[k]) for k in b)  # same engine-free per-user result
    else:
        assert all(torch.equal(a[k], b[k]) and torch.equal(b[k], c[k]) for k in a)
