"""A grid that delivers each message to a real ClientApp in this process, one Context per node.

The SecAgg+ tests drive :mod:`pollinate.server.secagg` (the server's stages) against
Flower's ``secaggplus_mod`` behind :func:`pollinate.client.secagg.secure_aggregation_mod`
through it, with nothing in between but delivery. It records every reply the server side
receives (``received``), and a node listed in ``die_at`` stops answering from that stage on,
as a device that loses power does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from pollinate.flower_compat.secagg import RECORD_KEY_CONFIGS, Key


def stage_of(msg: Message) -> str:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs[Key.STAGE]) if configs is not None else "plain"


class LoopbackGrid(Grid):
    def __init__(self, app: ClientApp, nodes: list[int], die_at: dict[int, str] | None = None):
        self.app = app
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in nodes
        }
        self.die_at = dict(die_at or {})
        self.dead: set[int] = set()
        self.received: list[Message] = []
        self.stages_seen: dict[int, list[str]] = {n: [] for n in nodes}

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return sorted(set(self.contexts) - self.dead)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            node = msg.metadata.dst_node_id
            stage = stage_of(msg)
            if self.die_at.get(node) == stage:
                self.dead.add(node)
            if node in self.dead:
                continue  # no reply: the exchange times out on it
            self.stages_seen[node].append(stage)
            # A copy, as the wire makes one: the node must not touch the server's objects.
            reply = self.app(copy.deepcopy(msg), self.contexts[node])
            replies.append(reply)
        self.received.extend(copy.deepcopy(r) for r in replies)  # as they arrived
        return replies
