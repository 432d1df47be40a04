"""Strategies over user cohorts: sampling, routing, per-user expansion, the aggregates and
the explicit round (one exchange per round, evaluation folded into the next training)."""

from __future__ import annotations

import random
from typing import ClassVar

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord
from flwr.serverapp.strategy import FedAvg

from pollinate import config, protocol
from pollinate.server.rounds import CohortSettings, Sample, sample_users
from pollinate.server.strategies import build_strategy
from pollinate.server.strategy import NodeWaitTimeout, wait_for_nodes

# Each user's update: one 2x2 tensor, and its number of training examples.
UPDATES = {
    "a": (np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), 10),
    "b": (np.array([[5.0, 0.0], [1.0, 1.0]], dtype=np.float32), 30),
    "c": (np.array([[9.0, -2.0], [0.0, 2.0]], dtype=np.float32), 60),
}


def answer(msg: Message) -> Message:
    """What a node's ClientApp replies: every sampled user's update (and evaluation)."""
    ask = protocol.read_instruction(msg.content)
    evaluated = ask.evaluation.users if ask.evaluation else (ask.users or [])
    evaluation = protocol.EvaluateReply(
        {u: MetricRecord({protocol.NUM_EXAMPLES: 5, "accuracy": 0.5}) for u in evaluated}
    )
    if msg.metadata.message_type == MessageType.EVALUATE:
        return Message(protocol.evaluate_content(evaluation), reply_to=msg)
    reply = protocol.TrainReply(evaluation=evaluation if ask.evaluation else None)
    for u in ask.users or []:
        w, n = UPDATES[u]
        reply.updates[u] = ArrayRecord({"w": torch.from_numpy(w)})
        reply.metrics[u] = protocol.metric_record(protocol.train_metrics(n, 1.0))
    return Message(protocol.train_content(reply), reply_to=msg)


class TwoNodeGrid:
    """A stand-in Grid: node 11 hosts users a and b, node 22 hosts user c.

    ``lost`` = {(exchange number, node)}: that node's reply is an error (by default the
    SuperLink's "node unavailable", which names no node, only the message it answers).
    """

    hosts: ClassVar[dict[int, list[str]]] = {11: ["a", "b"], 22: ["c"]}

    def __init__(
        self,
        lost: set[tuple[int, int]] | None = None,
        reason: str = "node unavailable",
        silent: set[int] | None = None,
    ) -> None:
        self.queried: list[int] = []
        self.exchanges: list[list[Message]] = []
        self.lost = lost or set()
        self.reason = reason
        self.silent = silent or set()  # exchanges no reply comes back from, in time

    def get_node_ids(self) -> list[int]:
        return list(self.hosts)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if all(m.metadata.message_type == MessageType.QUERY for m in messages):
            self.queried += [m.metadata.dst_node_id for m in messages]
            return [
                Message(protocol.users_content(self.hosts[m.metadata.dst_node_id]), reply_to=m)
                for m in messages
            ]
        self.exchanges.append(messages)
        if len(self.exchanges) in self.silent:
            return []
        replies = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"x{len(self.exchanges)}-{i}"  # as on push
            if (len(self.exchanges), m.metadata.dst_node_id) in self.lost:
                gone = Message(Error(code=1, reason=self.reason), reply_to=m)
                gone.metadata.__dict__["_src_node_id"] = 0
                replies.append(gone)
            else:
                replies.append(answer(m))
        return replies[::-1]  # in whatever order the nodes finish


def strategy(name: str, **extra: object):
    cfg = config.resolve({"strategy.name": name, **extra})
    return build_strategy(cfg)


def start_arrays() -> ArrayRecord:
    return ArrayRecord({"w": torch.zeros(2, 2)})


def run(s, num_rounds: int, grid: TwoNodeGrid | None = None):
    """``s.run`` over ``num_rounds``; the grid and the (round, model) of each round's end."""
    grid = grid or TwoNodeGrid()
    ends: list[tuple[int, np.ndarray]] = []
    final = s.run(
        grid,
        start_arrays(),
        rounds=range(1, num_rounds + 1),
        train_config=protocol.run_config_record({"x": 1}, "{}", "run-1"),
        evaluate_config=protocol.run_config_record({"x": 1}, "{}", "run-1"),
        end_of_round=lambda r, arrays, _: ends.append((r, arrays["w"].numpy().copy())),
    )
    return grid, ends, final


def by_node(messages: list[Message], key: str) -> dict[int, list[str]]:
    return {m.metadata.dst_node_id: list(m.content["config"][key]) for m in messages}  # type: ignore[arg-type]


def test_one_message_per_node_listing_its_sampled_users() -> None:
    grid, _, _ = run(strategy("fedavg"), 2)
    first = grid.exchanges[0]
    assert by_node(first, protocol.SAMPLED_USERS) == {11: ["a", "b"], 22: ["c"]}
    assert all(m.content["config"][protocol.SERVER_ROUND] == 1 for m in first)
    assert all(m.content["config"]["x"] == 1 for m in first)  # the run's config rides along
    # Later rounds do not ask the same nodes again.
    assert sorted(grid.queried) == [11, 22]


def test_fraction_samples_users_not_nodes() -> None:
    s = strategy("fedavg", **{"strategy.fraction-train": 0.34, "strategy.min-train-users": 1})
    s.directory.refresh(TwoNodeGrid(), ConfigRecord())
    assert len(s.sample_train(1).users) == 1  # int(3 * 0.34) = 1 user out of 3


def test_sampling_draws_what_flowers_sampler_draws_from_a_seeded_random() -> None:
    users = [f"u{i:02d}" for i in range(30)]

    class UsersAsNodes:
        def get_node_ids(self) -> list[int]:
            return list(range(len(users)))

    for fraction, minimum in [(0.3, 1), (0.1, 5), (1.0, 1)]:
        random.seed(42)
        flower = FedAvg(fraction_train=fraction, min_train_nodes=minimum, min_available_nodes=1)
        msgs = flower.configure_train(1, start_arrays(), ConfigRecord(), UsersAsNodes())  # type: ignore[arg-type]
        expected = [users[m.metadata.dst_node_id] for m in msgs]
        assert sample_users(random.Random(42), users, fraction, minimum) == expected


def test_a_run_leaves_the_global_random_untouched_and_repeats_itself() -> None:
    extra = {"strategy.fraction-train": 0.67, "strategy.fraction-evaluate": 0.34}
    random.seed(3)
    before = random.getstate()
    grid_a, ends_a, _ = run(strategy("fedavg", **extra), 3)
    assert random.getstate() == before
    random.seed(99)  # whatever the caller's global stream holds
    grid_b, ends_b, _ = run(strategy("fedavg", **extra), 3)
    for xa, xb in zip(grid_a.exchanges, grid_b.exchanges, strict=True):
        assert by_node(xa, protocol.SAMPLED_USERS) == by_node(xb, protocol.SAMPLED_USERS)
    assert [r for r, _ in ends_a] == [1, 2, 3]
    for (_, wa), (_, wb) in zip(ends_a, ends_b, strict=True):
        np.testing.assert_array_equal(wa, wb)


def test_flowers_start_is_refused() -> None:
    with pytest.raises(TypeError, match=r"\.run\(\)"):
        strategy("fedavg").start(grid=TwoNodeGrid(), initial_arrays=start_arrays())


def test_fedprox_sends_proximal_mu_through_flowers_own_configure() -> None:
    grid, _, _ = run(strategy("fedprox", **{"strategy.proximal-mu": 0.25}), 1)
    assert all(m.content["config"][protocol.PROXIMAL_MU] == 0.25 for m in grid.exchanges[0])


def aggregate(s) -> np.ndarray:
    _, _, final = run(s, 1)
    return final["w"].numpy()


def test_fedavg_aggregate_is_example_weighted_mean_of_user_updates() -> None:
    total = sum(n for _, n in UPDATES.values())
    expected = sum(w * n for w, n in UPDATES.values()) / total
    np.testing.assert_allclose(aggregate(strategy("fedavg")), expected, rtol=1e-6)


def test_median_sees_every_user_not_every_node() -> None:
    stacked = np.stack([w for w, _ in UPDATES.values()])
    # Per node, the median of (mean(a,b), c) would differ: the per-user median is the truth.
    np.testing.assert_allclose(aggregate(strategy("fedmedian")), np.median(stacked, axis=0))


def test_trimmed_mean_sees_every_user() -> None:
    s = strategy("fedtrimmedavg", **{"strategy.trim-beta": 0.34})
    stacked = np.sort(np.stack([w for w, _ in UPDATES.values()]), axis=0)
    np.testing.assert_allclose(aggregate(s), stacked[1:2].mean(axis=0))


def test_krum_picks_one_users_update() -> None:
    result = aggregate(strategy("krum"))
    assert any(np.allclose(result, w) for w, _ in UPDATES.values())


def test_fedadam_moves_from_the_current_model_toward_the_average() -> None:
    result = aggregate(strategy("fedadam", **{"strategy.server-lr": 0.1}))
    assert np.all(np.abs(result) <= 0.1 + 1e-6)  # Adam's first step is at most eta
    assert np.any(result != 0)


def test_node_error_replies_count_as_failures_and_are_skipped() -> None:
    s = strategy("fedavg")
    grid = TwoNodeGrid(lost={(1, 22)})
    s.directory.refresh(grid, ConfigRecord())
    config = protocol.run_config_record({}, "{}", "run-1")
    replies, sent = s.send(grid, start_arrays(), config, Sample(1, ["a", "b", "c"]), None, None)
    arrays = s.aggregate_training(1, sent, replies, start=start_arrays())
    wa, na = UPDATES["a"]
    wb, nb = UPDATES["b"]
    np.testing.assert_allclose(arrays["w"].numpy(), (wa * na + wb * nb) / (na + nb), rtol=1e-6)


def test_waiting_for_nodes_times_out_with_a_clear_message() -> None:
    class Empty:
        def get_node_ids(self) -> list[int]:
            return []

    with pytest.raises(NodeWaitTimeout, match="only 0 of the 2 nodes required"):
        wait_for_nodes(Empty(), 2, timeout=0.3)  # type: ignore[arg-type]  # a duck-typed fake Grid


# ------------------------------------------------- evaluation and next training folded


def test_the_next_rounds_training_rides_on_this_rounds_evaluation() -> None:
    grid, ends, final = run(strategy("fedmedian"), 2)
    # Two rounds, three exchanges: train 1 | evaluate 1 + train 2 | evaluate 2.
    assert len(grid.exchanges) == 3
    folded = grid.exchanges[1]
    assert {m.metadata.message_type for m in folded} == {MessageType.TRAIN}
    for key in (protocol.EVALUATE_USERS, protocol.SAMPLED_USERS):
        assert by_node(folded, key) == {11: ["a", "b"], 22: ["c"]}
    assert all(m.content["config"][protocol.EVALUATE_ROUND] == 1 for m in folded)
    assert all(m.content["config"][protocol.SERVER_ROUND] == 2 for m in folded)
    # Round 1 ends (its evaluation is in) with round 1's model, before round 2's aggregate.
    median = np.median(np.stack([w for w, _ in UPDATES.values()]), axis=0)
    assert [r for r, _ in ends] == [1, 2]
    np.testing.assert_allclose(ends[0][1], median)
    np.testing.assert_allclose(final["w"].numpy(), median)  # the same updates again
    # The last round's evaluation has no next round to carry.
    assert {m.metadata.message_type for m in grid.exchanges[2]} == {MessageType.EVALUATE}


class Failures:
    """A stand-in MetricsRecorder that keeps only the failure counts per round."""

    def __init__(self) -> None:
        self.failures: dict[int, int] = {}

    def add_failures(self, server_round: int, count: int) -> None:
        self.failures[server_round] = self.failures.get(server_round, 0) + count

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def test_a_node_lost_in_a_folded_exchange_fails_both_halves() -> None:
    s = strategy("fedavg")
    s.recorder = recorder = Failures()
    _, _, final = run(s, 2, TwoNodeGrid(lost={(2, 22)}))
    wa, na = UPDATES["a"]
    wb, nb = UPDATES["b"]
    np.testing.assert_allclose(final["w"].numpy(), (wa * na + wb * nb) / (na + nb), rtol=1e-6)
    assert recorder.failures == {1: 1, 2: 1}  # round 1's evaluation and round 2's training


def test_error_reason_unwraps_flowers_client_app_exception() -> None:
    from pollinate.server.strategy import error_reason

    wrapped = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
        "ClientAppException occurred. Message: could not load the ClientApp a:b: "
        "ModuleNotFoundError: No module named 'a''>"
    )
    assert error_reason(wrapped) == (
        "could not load the ClientApp a:b: ModuleNotFoundError: No module named 'a'"
    )
    assert error_reason("Node Unavailable\n  timed out") == "Node Unavailable timed out"


@pytest.mark.parametrize(("node_wait", "query"), [(120.0, 600.0), (1800.0, 1800.0)])
def test_the_user_query_waits_at_least_as_long_as_the_run_waits_for_nodes(
    node_wait: float, query: float
) -> None:
    """At 1,000 devices the query of every node outlasted a fixed 600 s, and round 1 then
    trained only those that had answered: a longer node wait now lengthens it too."""
    cfg = config.resolve({"server.node-wait-timeout": node_wait})
    assert CohortSettings.from_config(cfg).query_timeout == query
