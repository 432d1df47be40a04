"""Node failures: a round every node failed is a failed run; nodes that could not answer
are asked again; a user moves to the newest node that hosts it."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from test_server_strategy import (
    TwoNodeGrid,
    folded_reply,
    instruction,
    node_reply,
    pushed,
    start_arrays,
    strategy,
)

from pollinate.server.failures import RoundFailed, check_exchange
from pollinate.server.strategy import NodeWaitTimeout


def error_reply(node: int, reason: str = "Node Unavailable") -> Message:
    return Message(Error(code=1, reason=reason), reply_to=instruction(node))


def test_an_exchange_fails_only_when_no_node_succeeded() -> None:
    check_exchange(1, "train", 0, [], 5.0)  # nothing was asked of anyone
    check_exchange(1, "train", 2, [node_reply(11, ["a"]), error_reply(22)], 5.0)
    with pytest.raises(RoundFailed, match=r"round 3: all 2 node\(s\) asked to train failed.*"):
        check_exchange(3, "train", 2, [error_reply(11, "boom"), error_reply(22)], 5.0)
    with pytest.raises(RoundFailed, match=r"0 error\(s\), 2 without reply.*no reply within 5 s"):
        check_exchange(3, "evaluate", 2, [], 5.0)


def test_a_round_in_which_every_node_failed_fails_the_run() -> None:
    s = strategy("fedavg")
    list(s.configure_train(1, start_arrays(), ConfigRecord(), TwoNodeGrid()))
    with pytest.raises(RoundFailed, match="first: boom"):
        s.aggregate_train(1, [error_reply(11, "boom"), error_reply(22)])


def test_a_lost_folded_exchange_fails_the_run_at_its_evaluation() -> None:
    s = strategy("fedavg", **{"run.num-rounds": 2, "server.round-timeout": 7.0})
    grid = TwoNodeGrid()
    list(s.configure_train(1, start_arrays(), ConfigRecord(), grid))
    assert s.aggregate_train(1, [node_reply(11, ["a", "b"]), node_reply(22, ["c"])])[0]
    pushed(list(s.configure_evaluate(1, start_arrays(), ConfigRecord(), grid)))
    with pytest.raises(RoundFailed, match=r"round 1: all 2 node.*no reply within 7 s"):
        s.aggregate_evaluate(1, [])  # every device gone: nothing came back in time


def test_one_node_answering_keeps_the_folded_round_going() -> None:
    s = strategy("fedavg", **{"run.num-rounds": 2})
    grid = TwoNodeGrid()
    list(s.configure_train(1, start_arrays(), ConfigRecord(), grid))
    msgs = pushed(list(s.configure_evaluate(1, start_arrays(), ConfigRecord(), grid)))
    kept = next(m for m in msgs if m.metadata.dst_node_id == 11)
    assert s.aggregate_evaluate(1, [folded_reply(kept)]) is not None
    list(s.configure_train(2, start_arrays(), ConfigRecord(), grid))
    assert s.aggregate_train(2, [])[0] is not None


class FlakyGrid(TwoNodeGrid):
    """Node 22 cannot answer its first query (it was restarting); later nodes may join."""

    def __init__(self) -> None:
        super().__init__()
        self.hosts = dict(TwoNodeGrid.hosts)
        self.fail_first = {22}

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.queried.append(node)
            if node in self.fail_first:
                self.fail_first.discard(node)
                replies.append(Message(Error(code=1, reason="Node Unavailable"), reply_to=m))
                continue
            content = RecordDict({"users": ConfigRecord({"ids": self.hosts[node]})})
            replies.append(Message(content, reply_to=m))
        return replies


def routed(msgs) -> dict[int, list[str]]:
    return {m.metadata.dst_node_id: list(m.content["config"]["users"]) for m in msgs}


def test_a_node_that_could_not_answer_is_asked_again() -> None:
    s = strategy("fedavg")
    grid = FlakyGrid()
    assert routed(s.configure_train(1, start_arrays(), ConfigRecord(), grid)) == {11: ["a", "b"]}
    assert routed(s.configure_train(2, start_arrays(), ConfigRecord(), grid)) == {
        11: ["a", "b"],
        22: ["c"],
    }


def test_no_users_yet_means_asking_again_until_the_wait_timeout() -> None:
    grid = FlakyGrid()
    grid.hosts = {22: ["c"]}
    s = strategy("fedavg")
    assert routed(s.configure_train(1, start_arrays(), ConfigRecord(), grid)) == {22: ["c"]}
    assert grid.queried == [22, 22]

    class Broken(FlakyGrid):
        def send_and_receive(self, messages, timeout=None):
            return [Message(Error(code=1, reason="bad data"), reply_to=m) for m in messages]

    s = strategy("fedavg", **{"server.node-wait-timeout": 0.5})
    with pytest.raises(NodeWaitTimeout, match=r"host no users \(node 11: bad data\) after 0.5 s"):
        s.configure_train(1, start_arrays(), ConfigRecord(), Broken())


def test_a_user_moves_to_the_newest_node_that_hosts_it() -> None:
    # A restarted --insecure device is a new node (here 5, a *lower* id) while the old one
    # (22) still looks connected: its user goes to the new node.
    s = strategy("fedavg")
    grid = FlakyGrid()
    grid.fail_first = set()
    list(s.configure_train(1, start_arrays(), ConfigRecord(), grid))
    grid.hosts = {**grid.hosts, 5: ["c"]}
    assert routed(s.configure_train(2, start_arrays(), ConfigRecord(), grid)) == {
        11: ["a", "b"],
        5: ["c"],
    }
