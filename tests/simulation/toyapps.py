"""A ClientApp for the worker-pool tests, loaded by reference in the worker processes.

Its ``train`` handler does what the message's ``config["mode"]`` says: ``count`` replies
with its process id and how many messages this node's context has seen, ``raise`` raises
in the ClientApp, ``die`` ends the worker process abruptly.
"""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

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
