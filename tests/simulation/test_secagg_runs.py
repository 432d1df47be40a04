"""Secure aggregation in real runs: Pollinate's ServerApp and ClientApp, in this process.

The run with ``privacy.secure-aggregation`` ends at the plain run's model within the
quantization error; the strategy only ever aggregates the one unmasked sum a round; a node
that stops answering after the keys were shared costs its users, not the round.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Message
from simhelpers import final_weights, max_abs_diff, small_config

from pollinate.flower_compat.secagg import RECORD_KEY_CONFIGS, Key, Stage
from pollinate.server.app import run_federation
from pollinate.server.metrics import read_rounds, read_run_info
from pollinate.server.strategy import UserCohorts
from pollinate.simulation.inprocess import InProcessGrid

NODES = 3
SECURE = {"privacy.secure-aggregation": True, "data.num-users": 6}


class RecordingGrid(InProcessGrid):
    """The real nodes; keeps every reply the server side received. ``die``: node id ->
    (round, stage) from which that node stops answering, as a device that lost power."""

    def __init__(self, num_nodes: int, die: dict[int, tuple[int, str]] | None = None) -> None:
        super().__init__(num_nodes)
        self.die = die or {}
        self.dead: set[int] = set()
        self.received: list[Message] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        live = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = str(configs[Key.STAGE]) if configs is not None else ""
            # The train message itself carries no group id: its config names the round.
            config: Any = msg.content.config_records.get("config") or {}
            round_ = msg.metadata.group_id or config.get("server-round", 0)
            if (int(cast(Any, round_)), stage) == self.die.get(node):
                self.dead.add(node)
            if node not in self.dead:
                live.append(msg)
        replies = super().send_and_receive(live, timeout=timeout)
        self.received.extend(replies)
        return replies


def _run(tmp: Path, grid: InProcessGrid, **overrides: Any) -> Path:
    from flwr.serverapp import Grid

    from pollinate.flower_compat.identity import task_identity

    with task_identity(run_id=1, task_id=1, node_id=1):
        return run_federation(cast(Grid, grid), small_config(tmp, **overrides))


@pytest.fixture
def aggregated(monkeypatch: pytest.MonkeyPatch) -> list[list[Message]]:
    """Every list of updates the Flower strategy's aggregate got, round by round."""
    calls: list[list[Message]] = []
    original = UserCohorts._aggregate_updates

    def spy(self: UserCohorts, server_round: int, updates: list[Message]) -> Any:
        calls.append(list(updates))
        return original(self, server_round, updates)

    monkeypatch.setattr(UserCohorts, "_aggregate_updates", spy)
    return calls


def examples(msg: Message) -> int:
    return int(cast(Any, msg.content.metric_records["metrics"])["num-examples"])


def _node_means(grid: RecordingGrid) -> list[np.ndarray]:
    return [
        r.content.array_records["arrays"]["weights"].numpy()
        for r in grid.received
        if not r.has_error() and len(r.content.array_records.get("arrays", {})) > 0
    ]


def test_secure_run_ends_at_the_plain_runs_model(
    tmp_path: Path, aggregated: list[list[Message]]
) -> None:
    plain_grid = RecordingGrid(NODES)
    plain = _run(tmp_path / "plain", plain_grid, **{"data.num-users": 6})
    plain_updates = _node_means(plain_grid)
    assert len(plain_updates) == 2 * NODES  # the plain run sees each node's update
    aggregated.clear()

    grid = RecordingGrid(NODES)
    secure = _run(tmp_path / "secure", grid, **SECURE)
    diff = max_abs_diff(final_weights(plain), final_weights(secure))
    assert 0 < diff < 1e-3  # quantization's error, two rounds of it
    # The server side never received a node's update: every node reply's arrays are
    # empty (Flower's mod clears them; the masked vector travels as bytes).
    assert _node_means(grid) == []
    # The strategy aggregated one message a round: the unmasked sum, for all 6 users,
    # and it is none of the nodes' own updates of the plain run.
    assert len(aggregated) == 2
    total_examples = (
        sum(
            examples(r)
            for r in grid.received
            if not r.has_error() and "metrics" in r.content.metric_records
        )
        // 2
    )  # two rounds, the same users and examples each
    for updates in aggregated:
        (agg,) = updates
        assert examples(agg) == total_examples
        got = agg.content.array_records["arrays"]["weights"].numpy()
        assert all(np.abs(got - u).max() > 1e-3 for u in plain_updates)
    assert read_run_info(secure)["status"] == "finished"


def test_round_goes_on_when_a_node_dies_after_sharing_keys(
    tmp_path: Path, aggregated: list[list[Message]]
) -> None:
    victim = 1002
    grid = RecordingGrid(NODES, die={victim: (2, Stage.COLLECT_MASKED_VECTORS)})
    run = _run(tmp_path / "secure", grid, **SECURE)
    failures = read_rounds(run).set_index("round")["failures"]
    # Round 2's training exchange also carried round 1's evaluation: both lose the node.
    assert failures.loc[2] >= 1
    # Round 2 still aggregated, over the two nodes left (4 of the 6 users).
    (agg,) = [m for m in aggregated[1] if not m.has_error()]  # and the dead node's error
    assert examples(agg) < examples(aggregated[0][0])
    assert read_run_info(run)["status"] == "finished"


def test_user_level_dp_noises_the_secure_sum_as_it_noises_the_plain_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The noise std is z C / m, m = the users in the mean: under secure aggregation the
    # server sees one sum a round, so m must come from the summed per-user weights.
    import pollinate.server.privacy as server_privacy

    calls: list[tuple[float, float, int]] = []
    stock = server_privacy.compute_stdv

    def spy(noise_multiplier: float, clipping_norm: float, num_sampled_clients: int) -> float:
        calls.append((noise_multiplier, clipping_norm, num_sampled_clients))
        return stock(noise_multiplier, clipping_norm, num_sampled_clients)

    monkeypatch.setattr(server_privacy, "compute_stdv", spy)
    # Weights are users (2 a node) under user-level DP: max-weight bounds that count.
    dp = {"privacy.method": "user", "privacy.noise-multiplier": 0.5, "privacy.secagg-max-weight": 4}
    plain_run = _run(tmp_path / "plain", RecordingGrid(NODES), **dp, **{"data.num-users": 6})
    plain, calls[:] = list(calls), []
    secure = _run(tmp_path / "secure", RecordingGrid(NODES), **dp, **SECURE)
    assert len(plain) == 2 and all(m > 1 for _, _, m in plain)  # a mean over several users
    assert calls == plain
    # The same uniform per-user mean, and the same seeded noise: the same model, up to
    # quantization (an example-weighted secure sum would differ by far more).
    assert max_abs_diff(final_weights(plain_run), final_weights(secure)) < 1e-3
    assert read_run_info(secure)["status"] == "finished"
