"""A warm ClientApp worker: one long-lived process that runs every task a SuperNode gets.

By default a Flower SuperNode starts a fresh ``flwr-clientapp`` process per message, which
re-imports torch and Pollinate every time (seconds per message on a small device). A
Pollinate node runs ``flower-supernode --isolation process`` instead and this worker next
to it: it imports everything once, then loops

    AcquireTask -> PullTaskInput/PullMessages -> ClientApp -> PushMessages/PushTaskOutput

over the SuperNode's local Runtime API (the same protocol ``flower-superexec`` +
``flwr-clientapp`` speak, see ``flwr/supernode/runtime/run_clientapp.py``), so a message
costs the training itself plus a few local HTTP calls. The protocol's Flower pieces (all
non-public) are in :mod:`pollinate.flower_compat.runtime_api`, with the reasons for the three
places where the worker's differ from ``flwr-clientapp``'s.

The worker runs the Pollinate ClientApp *installed on this device*; it does not install
or execute code shipped in the run's FAB. A run of any other app gets an error reply.

Run by ``pollinate node start``; by hand::

    python -m pollinate.deploy.worker --runtime-api-address 127.0.0.1:9094
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from types import FrameType

from flwr.app import Message

from pollinate import protocol
from pollinate.deploy.appdir import APP_NAME, PUBLISHER
from pollinate.deploy.proc import guard_tree, poll_interval
from pollinate.flower_compat import runtime_api as runtime

log = logging.getLogger("pollinate.worker")

FAB_ID = f"{PUBLISHER}/{APP_NAME}"
# Poll the local Runtime API every POLL_SHARE of the time idle so far (10 ms .. 0.5 s):
# the next message of a round, due in well under a second, is picked up within tens of ms.
POLL_MIN = 0.01
POLL_MAX = 0.5
POLL_SHARE = 0.1


class _Stop(BaseException):
    pass


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def run_worker(runtime_api_address: str, *, max_tasks: int | None = None) -> int:
    """Serve tasks until SIGTERM/SIGINT (or ``max_tasks``); returns the number served."""
    from pollinate.client.app import app as client_app

    warm_up()  # heavy imports and torch's first-use costs once, before the first task
    client = runtime.connect(runtime_api_address)
    served = 0
    idle_since = time.monotonic()
    try:
        while max_tasks is None or served < max_tasks:
            token = runtime.acquire_task(client)
            if token is not None:
                t0 = time.perf_counter()
                what = run_task(runtime_api_address, token, client_app)
                log.info("%s in %.2f s", what, time.perf_counter() - t0)
                served += 1
                idle_since = time.monotonic()
                continue
            idle = time.monotonic() - idle_since
            time.sleep(poll_interval(idle, POLL_SHARE, POLL_MIN, POLL_MAX))
    finally:
        client.close()
    return served


def run_task(runtime_api_address: str, token: str, client_app: object) -> str:
    """One ClientApp task, in this process (``run_clientapp`` without the process exit).

    Returns what was done, for the log: ``round 2 train done`` (or ``failed``).
    """
    client = runtime.connect(runtime_api_address, token=token)
    heartbeat = runtime.heartbeat_sender(client)
    message = reply = context = None
    completed, details = False, "ClientApp task failed"
    dropped = False
    try:
        heartbeat.start()
        message, context, run = runtime.pull_task_input(client)
        if run.fab_id != FAB_ID:
            raise RuntimeError(
                f"this device runs only the Pollinate ClientApp ({FAB_ID}), not {run.fab_id!r}"
            )
        reply = client_app(message=message, context=context)  # type: ignore[operator]
        completed, details = True, ""
    except _Stop:
        raise
    except Exception as ex:  # the ClientApp's failure becomes the reply, as in Flower
        if _token_void(ex):
            # The SuperNode restarted (a new node for a restarted server): nobody waits
            # for this task any more, and every request for it would be refused.
            log.warning("task dropped: the SuperNode restarted while it ran")
            dropped = True
        log.exception("ClientApp task failed")
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = runtime.error_reply(message, details)
    finally:
        try:
            if reply is not None and context is not None and not dropped:
                runtime.push_reply(client, reply, context)
            if not dropped:
                runtime.finish_task(client, context, completed=completed, details=details)
        except Exception:
            log.exception("could not hand the reply back to the SuperNode")
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    if dropped:
        return "task dropped"
    if message is None:
        return "task failed before its message arrived"
    return f"{_what(message)} {'done' if completed else 'failed'}"


def _token_void(error: BaseException) -> bool:
    """A 401 from the local Runtime API: this task's token is no longer valid."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None) == 401


def _what(message: Message) -> str:
    """``round 2 train``; ``round 1 evaluate + round 2 train`` for a folded message."""
    return protocol.describe_instruction(message)


def warm_up() -> None:
    """One tiny training step, so torch's lazy first-use costs are paid before round 1."""
    import torch

    from pollinate.models import TrainConfig, create_model, train

    model = create_model("mlp", in_features=4, num_classes=2, hidden=4, depth=1)
    x, y = torch.zeros(4, 4), torch.tensor([0, 1, 0, 1])
    train(model, x, y, TrainConfig(epochs=1, batch_size=4, lr=0.01))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pollinate.deploy.worker")
    parser.add_argument("--runtime-api-address", required=True, help="SuperNode HOST:PORT")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        import torch

        # Several devices sharing a machine's cores oversubscribe them with torch's default
        # of one thread per core each: a small model's step then waits on its own threads.
        torch.set_num_threads(args.threads)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s pollinate.worker: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    guard_tree()
    with contextlib.suppress(_Stop):
        run_worker(args.runtime_api_address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
