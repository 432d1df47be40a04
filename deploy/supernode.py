"""``python -m pollinate.deploy.supernode ARGS``: ``flower-supernode ARGS`` with tighter timings.

Flower 1.42's SuperNode polls the SuperLink every 3 s when it has no message, waits for a
reply in 0.5 s steps, and sends a heartbeat every ~20 s (interval 30 s, so a dead node is
noticed after ~60 s). For federated rounds that take a second, those sleeps dominate. This
launcher runs Flower's own ``flower_supernode()`` with these changes and nothing else:

- while idle it polls every ``POLL_SHARE`` of the time idle so far (``POLL_MIN`` to
  Flower's 3 s), so the next message of a round is picked up within tens of ms while an
  idle device still polls only every 3 s; where Pollinate's server advises a wait (a
  round with many devices, :mod:`pollinate.deploy.pacing`), it waits that long instead;
- the wait for the ClientApp's reply polls every 20 ms (local state, no network), and a
  message whose arrays are still being uploaded is retried after 50 ms rather than 1 s;
- the heartbeat interval is ``HEARTBEAT`` (10 s, the SuperLink's minimum), so the server
  notices a dead device within ~20 s and a restarted device may re-activate sooner;
- while the server is unreachable (restarting) requests and heartbeats are retried at
  most ``RECONNECT_MAX`` s apart (Flower: 20 s), so a restarted server has its devices
  back within seconds;
- an idle connection to the SuperLink is kept 60 s (Flower: httpx's 5 s; Pollinate's
  SuperLink keeps one 75 s), so a poll seconds after the last does not open a new TLS
  connection (:mod:`pollinate.flower_compat.keep_alive`);
- a message whose run ends while its arrays are downloading (the server was restarted,
  so the run it came from is over) is dropped like any message that failed to download.
  Flower's own handler misses this case (``RunNotRunningException`` is not an
  ``Exception``) and leaves the message's task behind: the ClientApp then waits minutes
  for arrays that never come, and the SuperNode, waiting for that reply, takes no other
  message — a surviving device never answered the restarted server's run;

it reports joining, refusal and failed connection attempts as Pollinate event lines
(:mod:`pollinate.deploy.events`), so ``pollinate node start`` reads no Flower log text;
and it dies when its parent (``pollinate node start``) dies, however that dies. Each
change is one module of :mod:`pollinate.flower_compat`, which says why it is needed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from pollinate.deploy import events
from pollinate.deploy.proc import guard_tree, poll_interval
from pollinate.flower_compat.console import plain_console
from pollinate.flower_compat.ended_runs import ended_runs_dropped
from pollinate.flower_compat.entry_points import flower_supernode
from pollinate.flower_compat.heartbeat import heartbeat_every
from pollinate.flower_compat.keep_alive import clients_keep_connections
from pollinate.flower_compat.node_connection import ConnectionEvents, connection_observed
from pollinate.flower_compat.object_pull import fast_object_pull
from pollinate.flower_compat.poll_advice import poll_advice_taken
from pollinate.flower_compat.reconnect import reconnect_within
from pollinate.flower_compat.supernode_poll import supernode_sleeps

POLL_MIN = 0.05
POLL_MAX = 3.0  # Flower's own idle poll
POLL_SHARE = 0.1
REPLY_POLL = 0.02
OBJECT_RETRY = 0.05  # each retry is a request to the SuperLink, the bottleneck
OBJECT_RETRY_CAP = 0.5
HEARTBEAT = 10  # seconds; the SuperLink rejects anything below 10
RECONNECT_MAX = 5  # seconds between retries while the server is down
# The server's advice is followed up to this (its heartbeats go on regardless: Flower's
# HeartbeatSender is its own thread).
ADVICE_MAX = 120

# Environment overrides, for benchmarks and tests.
POLL_MIN = float(os.environ.get("POLLINATE_POLL_MIN", POLL_MIN))
POLL_MAX = float(os.environ.get("POLLINATE_POLL_MAX", POLL_MAX))


class Clock:
    """The SuperNode loop's sleeps: an adaptive idle poll (or the server's advice), a fast
    wait for local replies."""

    def __init__(self) -> None:
        self.idle_since: float | None = None  # None: busy with a message
        self.advised = 0  # s, from the last empty pull (0: none)

    def idle_wait(self) -> float:
        """The sleep after an empty pull: the server's advice if it gave one."""
        if self.idle_since is None:
            self.idle_since = time.monotonic()
        if self.advised > 0:
            return float(min(self.advised, ADVICE_MAX))
        idle = time.monotonic() - self.idle_since
        return poll_interval(idle, POLL_SHARE, POLL_MIN, POLL_MAX)

    def sleep(self, seconds: float) -> None:
        if seconds >= 1:  # Flower's "no message, wait for a while"
            time.sleep(self.idle_wait())
        else:  # waiting for the local ClientApp's reply
            time.sleep(min(seconds, REPLY_POLL))

    def advise(self, seconds: int) -> None:
        self.advised = seconds

    def reset(self) -> None:
        self.idle_since = None


def connection_events() -> ConnectionEvents:
    """The connection's events as Pollinate event lines for ``pollinate node start``."""
    return ConnectionEvents(
        joined=lambda node_id: events.say(events.NODE_JOINED, node_id=node_id),
        refused=lambda: events.say(events.NODE_REFUSED),
        attempt_failed=lambda: events.say(events.CONNECT_FAILED),
    )


@contextmanager
def patched_flower() -> Iterator[None]:
    """Every change this launcher makes to Flower's SuperNode, undone when the block ends."""
    clock = Clock()
    with ExitStack() as stack:
        stack.enter_context(plain_console())  # for log files
        stack.enter_context(connection_observed(connection_events()))
        stack.enter_context(ended_runs_dropped())
        stack.enter_context(supernode_sleeps(clock.sleep, clock.reset))
        stack.enter_context(poll_advice_taken(clock.advise))
        stack.enter_context(fast_object_pull(OBJECT_RETRY, OBJECT_RETRY_CAP))
        stack.enter_context(heartbeat_every(HEARTBEAT))
        stack.enter_context(reconnect_within(RECONNECT_MAX))
        if not os.environ.get("POLLINATE_SHORT_KEEPALIVE"):  # httpx's 5 s, side by side
            stack.enter_context(clients_keep_connections())  # no handshake per idle poll
        yield


def main(argv: list[str]) -> None:
    guard_tree()  # before anything is started: nothing outlives `pollinate ... start`
    with patched_flower():
        flower_supernode(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
