"""Strategies over user cohorts: routing, per-user expansion and the aggregates."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from pollinate import config
from pollinate.server.strategy import NodeWaitTimeout, build_strategy, wait_for_nodes


class TwoNodeGrid:
    """A stand-in Grid: node 11 hosts users a and b, node 22 hosts user c."""

    hosts: ClassVar[dict[int, list[str]]] = {11: ["a", "b"], 22: ["c"]}

    def __init__(self) -> None:
        self.queried: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.hosts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            assert m.metadata.message_type == MessageType.QUERY
            node = m.metadata.dst_node_id
            self.queried.append(node)
            content = RecordDict({"users": ConfigRecord({"ids": self.hosts[node]})})
            replies.append(Message(content, reply_to=m))
        return replies


# Each user's update: one 2x2 tensor, and its number of training examples.
UPDATES = {
    "a": (np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), 10),
    "b": (np.array([[5.0, 0.0], [1.0, 1.0]], dtype=np.float32), 30),
    "c": (np.array([[9.0, -2.0], [0.0, 2.0]], dtype=np.float32), 60),
}


def node_reply(node: int, users: list[str]) -> Message:
    content = RecordDict()
    for u in users:
        w, n = UPDATES[u]
        content[f"arrays/{u}"] = ArrayRecord({"w": torch.from_numpy(w)})
        content[f"metrics/{u}"] = MetricRecord({"num-examples": n, "train-loss": 1.0})
    content["users"] = ConfigRecord({"ids": users})
    return Message(content, reply_to=instruction(node))


def instruction(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)


def strategy(name: str, **extra: object):
    cfg = config.resolve({"strategy.name": name, **extra})
    return build_strategy(cfg)


def start_arrays() -> ArrayRecord:
    return ArrayRecord({"w": torch.zeros(2, 2)})


def test_one_message_per_node_listing_its_sampled_users() -> None:
    s = strategy("fedavg")
    grid = TwoNodeGrid()
    msgs = list(s.configure_train(1, start_arrays(), ConfigRecord({"x": 1}), grid))
    assert sorted(grid.queried) == [11, 22]
    routed = {m.metadata.dst_node_id: list(m.content["config"]["users"]) for m in msgs}
    assert routed == {11: ["a", "b"], 22: ["c"]}
    assert all(m.content["config"]["server-round"] == 1 for m in msgs)
    # A second round does not ask the same nodes again.
    list(s.configure_train(2, start_arrays(), ConfigRecord({"x": 1}), grid))
    assert sorted(grid.queried) == [11, 22]


def test_fraction_samples_users_not_nodes() -> None:
    s = strategy("fedavg", **{"strategy.fraction-train": 0.34, "strategy.min-train-users": 1})
    msgs = list(s.configure_train(1, start_arrays(), ConfigRecord(), TwoNodeGrid()))
    sampled = [u for m in msgs for u in m.content["config"]["users"]]
    assert len(sampled) == 1  # int(3 * 0.34) = 1 user out of 3, on whichever node hosts it


def test_fedprox_sends_proximal_mu_through_flowers_own_configure() -> None:
    s = strategy("fedprox", **{"strategy.proximal-mu": 0.25})
    msgs = list(s.configure_train(1, start_arrays(), ConfigRecord(), TwoNodeGrid()))
    assert all(m.content["config"]["proximal-mu"] == 0.25 for m in msgs)


def aggregate(s) -> np.ndarray:
    grid = TwoNodeGrid()
    list(s.configure_train(1, start_arrays(), ConfigRecord(), grid))
    replies = [node_reply(22, ["c"]), node_reply(11, ["a", "b"])]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    return arrays["w"].numpy()


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
    from flwr.app import Error

    s = strategy("fedavg")
    list(s.configure_train(1, start_arrays(), ConfigRecord(), TwoNodeGrid()))
    bad = Message(Error(code=1, reason="boom"), reply_to=instruction(22))
    arrays, _ = s.aggregate_train(1, [node_reply(11, ["a", "b"]), bad])
    wa, na = UPDATES["a"]
    wb, nb = UPDATES["b"]
    np.testing.assert_allclose(arrays["w"].numpy(), (wa * na + wb * nb) / (na + nb), rtol=1e-6)


def test_waiting_for_nodes_times_out_with_a_clear_message() -> None:
    class Empty:
        def get_node_ids(self) -> list[int]:
            return []

    with pytest.raises(NodeWaitTimeout, match="only 0 of the 2 nodes required"):
        wait_for_nodes(Empty(), 2, timeout=0.3)


# ------------------------------------------------- evaluation and next training folded


def folded_reply(msg: Message) -> Message:
    """A node's answer to a folded message: its evaluations, then its users' updates."""
    config = msg.content["config"]
    content = RecordDict()
    evaluated = [str(u) for u in config["evaluate-users"]]  # type: ignore[union-attr]
    for u in evaluated:
        content[f"evaluate/metrics/{u}"] = MetricRecord({"num-examples": 5, "accuracy": 0.5})
    content["evaluate/users"] = ConfigRecord({"ids": evaluated})
    trained = [str(u) for u in config["users"]]  # type: ignore[union-attr]
    for u in trained:
        w, n = UPDATES[u]
        content[f"arrays/{u}"] = ArrayRecord({"w": torch.from_numpy(w)})
        content[f"metrics/{u}"] = MetricRecord({"num-examples": n, "train-loss": 1.0})
    content["users"] = ConfigRecord({"ids": trained})
    return Message(content, reply_to=msg)


def pushed(messages: list[Message]) -> list[Message]:
    """The messages with the ids a grid gives them when it pushes them."""
    for i, m in enumerate(messages):
        m.metadata.__dict__["_message_id"] = f"m{i}"
    return messages


def test_the_next_rounds_training_rides_on_this_rounds_evaluation() -> None:
    s = strategy("fedmedian", **{"run.num-rounds": 2})
    grid = TwoNodeGrid()
    list(s.configure_train(1, start_arrays(), ConfigRecord({"x": 1}), grid))
    msgs = pushed(list(s.configure_evaluate(1, start_arrays(), ConfigRecord({"x": 1}), grid)))
    assert {m.metadata.message_type for m in msgs} == {MessageType.TRAIN}
    for key in ("evaluate-users", "users"):
        routed = {m.metadata.dst_node_id: list(m.content["config"][key]) for m in msgs}  # type: ignore[arg-type]
        assert routed == {11: ["a", "b"], 22: ["c"]}
    assert all(m.content["config"]["evaluate-round"] == 1 for m in msgs)
    assert all(m.content["config"]["server-round"] == 2 for m in msgs)

    metrics = s.aggregate_evaluate(1, [folded_reply(m) for m in msgs])
    assert metrics is not None and metrics["accuracy"] == pytest.approx(0.5)
    # Round 2 sends nothing: its training came back with round 1's evaluation.
    assert list(s.configure_train(2, start_arrays(), ConfigRecord({"x": 1}), grid)) == []
    arrays, _ = s.aggregate_train(2, [])
    stacked = np.stack([w for w, _ in UPDATES.values()])
    np.testing.assert_allclose(arrays["w"].numpy(), np.median(stacked, axis=0))
    # The last round's evaluation has no next round to carry.
    last = list(s.configure_evaluate(2, start_arrays(), ConfigRecord({"x": 1}), grid))
    assert {m.metadata.message_type for m in last} == {MessageType.EVALUATE}


class Failures:
    """A stand-in MetricsRecorder that keeps only the failure counts per round."""

    def __init__(self) -> None:
        self.failures: dict[int, int] = {}

    def add_failures(self, server_round: int, count: int) -> None:
        self.failures[server_round] = self.failures.get(server_round, 0) + count

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def test_a_node_lost_in_a_folded_exchange_fails_both_halves() -> None:
    from flwr.app import Error

    s = strategy("fedavg", **{"run.num-rounds": 2})
    s.recorder = recorder = Failures()
    grid = TwoNodeGrid()
    list(s.configure_train(1, start_arrays(), ConfigRecord(), grid))
    msgs = pushed(list(s.configure_evaluate(1, start_arrays(), ConfigRecord(), grid)))
    lost = next(m for m in msgs if m.metadata.dst_node_id == 22)
    # The SuperLink's "node unavailable" reply names no node, only the message it answers.
    gone = Message(Error(code=1, reason="node unavailable"), reply_to=lost)
    gone.metadata.__dict__["_src_node_id"] = 0
    replies = [folded_reply(m) for m in msgs if m is not lost] + [gone]
    assert s.aggregate_evaluate(1, replies) is not None
    list(s.configure_train(2, start_arrays(), ConfigRecord(), grid))
    arrays, _ = s.aggregate_train(2, [])
    wa, na = UPDATES["a"]
    wb, nb = UPDATES["b"]
    np.testing.assert_allclose(arrays["w"].numpy(), (wa * na + wb * nb) / (na + nb), rtol=1e-6)
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
