"""Run a Pollinate federation in this process, without Flower's simulation engine.

The ServerApp's logic (:func:`pollinate.server.app.run_federation`) and the ClientApp run
unchanged; an in-process Grid hands each message straight to the ClientApp, one node after
another. Node ``p`` of ``N`` gets the node config Flower's simulation engine gives it
(``partition-id``, ``num-partitions``), so it hosts the same cohort of users as under
:func:`pollinate.simulation.engine.run_simulation`, and the results are the same
(``tests/simulation/test_engine.py`` checks it). One process, one core, no Ray start-up:
for tests, debugging (a breakpoint in the ClientApp just works) and sweeps of many small
runs, where Ray's seconds of start-up per run would dominate.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import cast
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from pollinate import protocol
from pollinate.config import RunConfig
from pollinate.flower_compat.identity import assign_message_id, task_identity


class InProcessGrid:
    """A Flower Grid whose ``num_nodes`` nodes run Pollinate's ClientApp in this process.

    Replies come back in reverse order of the messages: a real engine returns them in
    whatever order the nodes finish, and the ServerApp must not depend on it.
    """

    def __init__(self, num_nodes: int) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={**protocol.simulated_node_config(p, num_nodes)},
                state=RecordDict(),
                run_config={},
            )
            for p, node_id in enumerate(range(1001, 1001 + num_nodes))
        }
        self.sent: list[Message] = []  # every message the ServerApp sent, for inspection

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        from pollinate.client.app import app as client_app

        replies = []
        for msg in messages:
            assign_message_id(msg, uuid4().hex)  # as a Grid's push assigns
            self.sent.append(msg)
            context = self.contexts[msg.metadata.dst_node_id]
            replies.append(client_app(message=msg, context=context))
        return replies[::-1]


def run_in_process(cfg: RunConfig, num_nodes: int | None = None) -> Path:
    """Run every round of ``cfg`` here; returns the run folder.

    ``num_nodes`` defaults to ``simulation.num-nodes``, or one node hosting every user.
    """
    from pollinate.server.app import run_federation

    nodes = num_nodes or cfg.simulation.num_nodes or 1
    # Flower stamps every new Message with the running task's identity.
    # Duck-typed: InProcessGrid has the two Grid methods a round calls, not the rest.
    with task_identity(run_id=1, task_id=1, node_id=1):
        return run_federation(cast(Grid, InProcessGrid(nodes)), cfg)
