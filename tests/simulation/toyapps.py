"""A ClientApp for the worker-pool tests, loaded by reference in the worker processes.

Its ``train`` handler does what the message's ``config["mode"]`` says: ``count`` replies
with its process id and how many messages this node's context has seen, ``raise`` raises
in the ClientApp, ``die`` ends the worker process abruptly.
"""

from __future__ import annotations

import os
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    mode = msg.content["config"]["mode"]
    if mode == "raise":
        raise ValueError("bad user data in row 3")
    if mode == "die":
        os._exit(3)
    seen = 1
    if "seen" in context.state:
        seen += int(context.state.config_records["seen"]["n"])  # type: ignore[arg-type]
    context.state["seen"] = ConfigRecord({"n": seen})
    return Message(
        RecordDict({"metrics": MetricRecord({"pid": os.getpid(), "seen": seen})}), reply_to=msg
    )


# A ServerApp that sends one ``count`` message to every node and keeps the replies' pids.
server_app = ServerApp()
REPLY_PIDS: list[int] = []
GRID_POLLS: list[float] = []  # the reply poll of the grid the ServerApp was given


@server_app.main()
def ask_every_node(grid: Grid, context: Context) -> None:
    GRID_POLLS.append(grid.pull_interval)  # type: ignore[attr-defined]  # InMemoryGrid's
    while not grid.get_node_ids():  # the engine registers its nodes once the app runs
        time.sleep(0.01)
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"mode": "count"})}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
        )
        for node in grid.get_node_ids()
    ]
    for reply in grid.send_and_receive(messages):
        REPLY_PIDS.append(int(reply.content.metric_records["metrics"]["pid"]))  # type: ignore[arg-type]
