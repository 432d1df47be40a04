"""Node failures: a round every node failed is a failed run; nodes that could not answer
are asked again; a user moves to the newest node that hosts it."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType
from test_server_strategy import TwoNodeGrid, answer, run, strategy

from pollinate import protocol
from pollinate.server.failures import RoundFailed, check_exchange
from pollinate.server.strategy import NodeWaitTimeout


def instruction(node: int) -> Message:
    config = protocol.run_config_record({}, "{}", "run-1")
    config[protocol.SERVER_ROUND] = 1
    content = protocol.instruction_content(ArrayRecord({"w": torch.zeros(2, 2)}), config, users=[])
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def error_reply(node: int, reason: str = "Node Unavailable") -> Message:
    return Message(Error(code=1, reason=reason), reply_to=instruction(node))


def test_an_exchange_fails_only_when_no_node_succeeded() -> None:
    check_exchange(1, "train", 0, [], 5.0)  # nothing was asked of anyone
    check_exchange(1, "train", 2, [answer(instruction(11)), error_reply(22)], 5.0)
    with pytest.raises(RoundFailed, match=r"round 3: all 2 node\(s\) asked to train failed.*"):
        check_exchange(3, "train", 2, [error_reply(11, "boom"), error_reply(22)], 5.0)
    with pytest.raises(RoundFailed, match=r"0 error\(s\), 2 without reply.*no reply within 5 s"):
        check_exchange(3, "evaluate", 2, [], 5.0)


def test_a_round_in_which_every_node_failed_fails_the_run() -> None:
    grid = TwoNodeGrid(lost={(1, 11), (1, 22)}, reason="boom")
    with pytest.raises(RoundFailed, match=r"round 1: all 2 node.*first: boom"):
        run(strategy("fedavg"), 2, grid)


def test_a_lost_folded_exchange_fails_the_run_at_its_evaluation() -> None:
    s = strategy("fedavg", **{"server.round-timeout": 7.0})
    grid = TwoNodeGrid(silent={2})  # every device gone: nothing came back in time
    with pytest.raises(RoundFailed, match=r"round 1: all 2 node.*evaluate.*no reply within 7 s"):
        run(s, 2, grid)


def test_one_node_answering_keeps_the_folded_round_going() -> None:
    _, ends, final = run(strategy("fedavg"), 2, TwoNodeGrid(lost={(2, 22)}))
    assert [r for r, _ in ends] == [1, 2] and final is not None


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
            replies.append(Message(protocol.users_content(self.hosts[node]), reply_to=m))
        return replies


def routed(s, grid: TwoNodeGrid, server_round: int = 1) -> dict[int, list[str]]:
    """Where round ``server_round``'s training goes: the sampled users, by hosting node."""
    s.directory.refresh(grid, ConfigRecord())
    return s.directory.by_node(s.sample_train(server_round).users)


def test_a_node_that_could_not_answer_is_asked_again() -> None:
    s = strategy("fedavg")
    grid = FlakyGrid()
    assert routed(s, grid) == {11: ["a", "b"]}
    assert routed(s, grid, 2) == {
        11: ["a", "b"],
        22: ["c"],
    }


def test_no_users_yet_means_asking_again_until_the_wait_timeout() -> None:
    grid = FlakyGrid()
    grid.hosts = {22: ["c"]}
    s = strategy("fedavg")
    assert routed(s, grid) == {22: ["c"]}
    assert grid.queried == [22, 22]

    class Broken(FlakyGrid):
        def send_and_receive(self, messages, timeout=None):
            return [Message(Error(code=1, reason="bad data"), reply_to=m) for m in messages]

    s = strategy("fedavg", **{"server.node-wait-timeout": 0.5})
    with pytest.raises(NodeWaitTimeout, match=r"host no users \(node 11: bad data\) after 0.5 s"):
        routed(s, Broken())


def test_a_user_moves_to_the_newest_node_that_hosts_it() -> None:
    # A restarted --insecure device is a new node (here 5, a *lower* id) while the old one
    # (22) still looks connected: its user goes to the new node.
    s = strategy("fedavg")
    grid = FlakyGrid()
    grid.fail_first = set()
    routed(s, grid)
    grid.hosts = {**grid.hosts, 5: ["c"]}
    assert routed(s, grid, 2) == {
        11: ["a", "b"],
        5: ["c"],
    }
