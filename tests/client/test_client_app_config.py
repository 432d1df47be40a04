"""The ClientApp reads the run config of each message; resolved once per distinct config."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Message, MessageType

from pollinate import protocol
from pollinate.client import app as client_app
from pollinate.config import resolve


def _message(flat: dict[str, object], server_round: int, users: list[str]) -> Message:
    config = protocol.run_config_record(resolve(flat).to_flat(), "{}", "key")
    config = ConfigRecord({**config, protocol.SERVER_ROUND: server_round})
    arrays = protocol.weights_record(torch.zeros(3))
    content = protocol.instruction_content(arrays, config, users=users, node_mean=True)
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_rounds_of_one_run_share_one_resolved_config() -> None:
    flat = {"model.name": "logreg", "train.lr": 0.125}
    first = client_app._run_config(_message(flat, 1, ["a", "b"]))
    later = client_app._run_config(_message(flat, 7, ["c"]))
    assert later is first  # round and users differ; the run's config does not
    assert first == resolve(flat)


def test_another_config_is_resolved_afresh() -> None:
    a = client_app._run_config(_message({"train.lr": 0.125}, 1, ["a"]))
    b = client_app._run_config(_message({"train.lr": 0.25}, 1, ["a"]))
    assert (a.train.lr, b.train.lr) == (0.125, 0.25)
