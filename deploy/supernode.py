"""``python -m pollinate.deploy.supernode ARGS``: ``flower-supernode ARGS`` with tighter timings.

Flower 1.42's SuperNode polls the SuperLink every 3 s when it has no message, waits for a
reply in 0.5 s steps, and sends a heartbeat every ~20 s (interval 30 s, so a dead node is
noticed after ~60 s). For federated rounds that take a second, those sleeps dominate. This
launcher runs Flower's own ``flower_supernode()`` with these changes and nothing else:

- while idle it polls every ``POLL_SHARE`` of the time idle so far (``POLL_MIN`` to
  Flower's 3 s), so the next message of a round is picked up within tens of ms while an
  idle device still polls only every 3 s;
- the wait for the ClientApp's reply polls every 20 ms (local state, no network), and a
  message whose arrays are still being uploaded is retried after 50 ms rather than 1 s;
- the heartbeat interval is ``HEARTBEAT`` (10 s, the SuperLink's minimum), so the server
  notices a dead device within ~20 s and a restarted device may re-activate sooner;
- while the server is unreachable (restarting) requests and heartbeats are retried at
  most ``RECONNECT_MAX`` s apart (Flower: 20 s), so a restarted server has its devices
  back within seconds;
- a message whose run ends while its arrays are downloading (the server was restarted,
  so the run it came from is over) is dropped like any message that failed to download.
  Flower's own handler misses this case (``RunNotRunningException`` is not an
  ``Exception``) and leaves the message's task behind: the ClientApp then waits minutes
  for arrays that never come, and the SuperNode, waiting for that reply, takes no other
  message — a surviving device never answered the restarted server's run;

and it dies when its parent (``pollinate node start``) dies, however that dies.
"""

from __future__ import annotations

import functools
import os
import sys
import time as _time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from pollinate.deploy.proc import poll_interval

POLL_MIN = 0.05
POLL_MAX = 3.0  # Flower's own idle poll
POLL_SHARE = 0.1
REPLY_POLL = 0.02
OBJECT_RETRY = 0.05  # each retry is a request to the SuperLink, the bottleneck
HEARTBEAT = 10  # seconds; the SuperLink rejects anything below 10
RECONNECT_MAX = 5  # seconds between retries while the server is down

# Environment overrides, for benchmarks and tests.
POLL_MIN = float(os.environ.get("POLLINATE_POLL_MIN", POLL_MIN))
POLL_MAX = float(os.environ.get("POLLINATE_POLL_MAX", POLL_MAX))


class _Clock(ModuleType):
    """Stands in for ``time`` inside Flower's SuperNode loop: only ``sleep`` differs."""

    def __init__(self) -> None:
        super().__init__("time")
        self.idle_since: float | None = None  # None: busy with a message

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        if seconds >= 1:  # "no message, wait for a while"
            if self.idle_since is None:
                self.idle_since = _time.monotonic()
            idle = _time.monotonic() - self.idle_since
            _time.sleep(poll_interval(idle, POLL_SHARE, POLL_MIN, POLL_MAX))
        else:  # waiting for the local ClientApp's reply
            _time.sleep(min(seconds, REPLY_POLL))

    def reset(self) -> None:
        self.idle_since = None


def patch_flower() -> None:
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supercore.retry.http_retry as http_retry
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=False)  # for log files
    clock = _Clock()
    sci.time = clock
    pull = sci._pull_and_store_message

    def pull_and_reset(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.reset()
        return run_id

    sci._pull_and_store_message = _dropping_ended_runs(pull_and_reset)
    # The SuperLink lists a message before all of its objects are uploaded; Flower's
    # object pull then waits a whole second before retrying.
    sci.pull_objects = functools.partial(
        sci.pull_objects, initial_backoff=OBJECT_RETRY, backoff_cap=0.5
    )
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT
    fleet.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT
    http_retry.MAX_RETRY_DELAY = RECONNECT_MAX  # read at each retry
    heartbeat.exponential = _capped(heartbeat.exponential)


class RunEnded(RuntimeError):
    """The run ended on the SuperLink while one of its messages was being received."""


def _dropping_ended_runs(pull_and_store: Callable[..., int | None]) -> Callable[..., int | None]:
    """``_pull_and_store_message`` whose object download treats an ended run as a failure.

    Flower creates the message's task before downloading its arrays and cleans up
    (message deleted, task finished as failed) on an ``Exception`` only; an ended run
    raises ``RunNotRunningException``, a ``BaseException``, and skipped that cleanup.
    """
    from flwr.supercore.run import RunNotRunningException

    def failing(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except RunNotRunningException:
                raise RunEnded("the run is no longer running on the SuperLink") from None

        return call

    @functools.wraps(pull_and_store)
    def pull(*args: Any, **kwargs: Any) -> int | None:
        for name in ("pull_object", "confirm_message_received"):  # used after the task exists
            if name in kwargs:
                kwargs[name] = failing(kwargs[name])
        return pull_and_store(*args, **kwargs)

    return pull


def _capped(exponential: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's ``exponential`` backoff, at most ``RECONNECT_MAX`` s between tries."""

    def capped(*args: Any, max_delay: float | None = None, **kwargs: Any) -> Any:
        limit = RECONNECT_MAX if max_delay is None else min(max_delay, RECONNECT_MAX)
        return exponential(*args, max_delay=limit, **kwargs)

    return capped


def main(argv: list[str]) -> None:
    from pollinate.deploy.proc import guard_tree

    guard_tree()  # before anything is started: nothing outlives `pollinate ... start`
    patch_flower()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
