"""Flower's real in-memory LinkState and messages for it, for the tests of the patches."""

from __future__ import annotations

import time
from typing import Any


def link_state() -> Any:
    """A fresh ``InMemoryLinkState``, made as the SuperLink makes it."""
    from flwr.superlink.config_loader import (
        get_federation_manager,
        get_objectstore_linkstate_factories,
    )

    _, factory = get_objectstore_linkstate_factories(
        ":flwr-in-memory:", get_federation_manager(is_simulation=False)
    )
    return factory.state()


def _message(run_id: int, src: int, dst: int, reply_to: str, message_id: str, ttl: float) -> Any:
    from flwr.app import Message, RecordDict
    from flwr.app.metadata import Metadata

    meta = Metadata(
        run_id=run_id,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="",
        created_at=time.time(),
        ttl=ttl,
        message_type="train",
    )
    made = Message(RecordDict(), metadata=meta)  # type: ignore[call-overload]
    if not message_id:
        made.metadata.__dict__["_message_id"] = made.object_id
    return made


def train_message(run_id: int, node_id: int, message_id: str = "", ttl: float = 3600.0) -> Any:
    """An instruction from the SuperLink to ``node_id``; ``message_id`` "" (the default):
    its content's id, as Flower's Grid sets it."""
    from flwr.common.constant import SUPERLINK_NODE_ID

    return _message(run_id, SUPERLINK_NODE_ID, node_id, "", message_id, ttl)


def reply_message(run_id: int, node_id: int, reply_to: str) -> Any:
    """``node_id``'s train reply to the message ``reply_to``, its id its content's."""
    from flwr.common.constant import SUPERLINK_NODE_ID

    return _message(run_id, node_id, SUPERLINK_NODE_ID, reply_to, "", 3600.0)
