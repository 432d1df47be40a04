"""Event lines Pollinate's launchers print for their supervisor: its own format, not Flower's.

A launcher (``python -m pollinate.deploy.superlink`` / ``.supernode``) learns what happened
from Flower's functions through :mod:`pollinate.flower_compat` and prints one line per
event, ``pollinate: EVENT key=value ...``; ``pollinate server start`` / ``node start`` read
those lines from the child's output (and ignore everything Flower itself prints). Values
hold no spaces.
"""

from __future__ import annotations

import re
import time

PREFIX = "pollinate: "
# SuperLink
TLS_REFUSED = "tls-refused"  # peer, reason
KEY_REFUSED = "key-refused"  # peer, why (unregistered | still-online), key
ADMIN_REFUSED = "admin-refused"  # peer, path
NODE_ACTIVATED = "node-activated"  # node_id
NODE_DEACTIVATED = "node-deactivated"  # node_id
# SuperNode
NODE_JOINED = "joined"  # node_id
NODE_REFUSED = "refused"
CONNECT_FAILED = "connect-failed"

REPEAT_AFTER = 60.0
_FIELD = re.compile(r"(\w+)=(\S+)")
_last_said: dict[tuple[str, ...], float] = {}


def line(event: str, **fields: object) -> str:
    """The line for ``event`` with ``fields`` (values must not contain spaces)."""
    return " ".join([f"{PREFIX}{event}", *(f"{k}={v}" for k, v in fields.items())])


def say(event: str, **fields: object) -> None:
    """Print the event's line now (flushed: the supervisor reads it as it comes)."""
    print(line(event, **fields), flush=True)


def say_at_most_every(seconds: float, event: str, **fields: object) -> None:
    """:func:`say`, but once per ``seconds`` for the same event and fields: a client that
    retries does not flood the log."""
    key = (event, *(f"{k}={v}" for k, v in fields.items()))
    now = time.monotonic()
    if now - _last_said.get(key, -seconds) >= seconds:
        _last_said[key] = now
        say(event, **fields)


def parse(text: str) -> tuple[str, dict[str, str]] | None:
    """(event, fields) of a line :func:`say` printed; None for any other line."""
    if not text.startswith(PREFIX):
        return None
    event, _, rest = text[len(PREFIX) :].partition(" ")
    return event, dict(_FIELD.findall(rest))
