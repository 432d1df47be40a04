"""A warm ClientApp worker: one long-lived process that runs every task a SuperNode gets.

By default a Flower SuperNode starts a fresh ``flwr-clientapp`` process per message, which
re-imports torch and Pollinate every time (seconds per message on a small device). A
Pollinate node runs ``flower-supernode --isolation process`` instead and this worker next
to it: it imports everything once, then loops

    AcquireTask -> PullTaskInput/PullMessages -> ClientApp -> PushMessages/PushTaskOutput

over the SuperNode's local Runtime API (the same protocol ``flower-superexec`` +
``flwr-clientapp`` speak, see ``flwr/supernode/runtime/run_clientapp.py``), so a message
costs the training itself plus a few local HTTP calls.

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
from collections.abc import Callable
from types import FrameType
from typing import Any

from flwr.app import Message

from pollinate import protocol
from pollinate.deploy.appdir import APP_NAME, PUBLISHER
from pollinate.deploy.proc import guard_tree, poll_interval

log = logging.getLogger("pollinate.worker")

FAB_ID = f"{PUBLISHER}/{APP_NAME}"
# Poll the local Runtime API every POLL_SHARE of the time idle so far (10 ms .. 0.5 s):
# the next message of a round, due in well under a second, is picked up within tens of ms.
POLL_MIN = 0.01
POLL_MAX = 0.5
POLL_SHARE = 0.1
LOCAL_RETRY_MAX = 1  # s between tries while the SuperNode's local API is down


class _Stop(BaseException):
    pass


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def run_worker(runtime_api_address: str, *, max_tasks: int | None = None) -> int:
    """Serve tasks until SIGTERM/SIGINT (or ``max_tasks``); returns the number served."""
    # Heavy imports once, before the first task arrives.
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    from pollinate.client.app import app as client_app

    warm_up()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=local_retry_invoker(),
    )
    served = 0
    idle_since = time.monotonic()
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    try:
        while max_tasks is None or served < max_tasks:
            res = client.AcquireTask(request)
            if res.HasField("task") and res.token:
                t0 = time.perf_counter()
                what = run_task(runtime_api_address, res.token, client_app)
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
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=local_retry_invoker(),
    )
    heartbeat = HeartbeatSender(task_heartbeat(client))
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed"
    dropped = False
    try:
        heartbeat.start()
        message, context, run = pull_task_input(client)
        if run.fab_id != FAB_ID:
            raise RuntimeError(
                f"this device runs only the Pollinate ClientApp ({FAB_ID}), not {run.fab_id!r}"
            )
        reply = client_app(message=message, context=context)  # type: ignore[operator]
        sub_status, details = SubStatus.COMPLETED, ""
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
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                reply_to=message,
            )
    finally:
        try:
            if reply is not None and context is not None and not dropped:
                push_message(client, reply, context)
            if not dropped:
                push_task_output(client, context=context, sub_status=sub_status, details=details)
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
    return f"{_what(message)} {'done' if sub_status == SubStatus.COMPLETED else 'failed'}"


def _token_void(error: BaseException) -> bool:
    """A 401 from the local Runtime API: this task's token is no longer valid."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None) == 401


def local_retry_invoker() -> Any:
    """Flower's retries for the local Runtime API, fit for a worker that outlives tasks.

    ``make_simple_http_retry_invoker`` with two changes: a 401 (this task's token is
    void: the SuperNode restarted, e.g. to rejoin a restarted server as a new node) fails
    the *task* instead of signalling SIGINT to end the process, and a SuperNode that is
    restarting is retried at most ``LOCAL_RETRY_MAX`` s apart instead of 20 s.
    """
    import httpx
    from flwr.supercore.retry import exponential, make_simple_http_retry_invoker

    invoker = make_simple_http_retry_invoker()
    flower_should_giveup = invoker.should_giveup

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
            return True
        return bool(flower_should_giveup(exc)) if flower_should_giveup else False

    invoker.should_giveup = should_giveup
    invoker.wait_gen_factory = lambda: exponential(max_delay=LOCAL_RETRY_MAX)
    return invoker


def task_heartbeat(client: Any) -> Callable[[], bool]:
    """Flower's task heartbeat (``make_task_heartbeat_fn_http``) minus its SIGINT.

    When the SuperNode has dropped the task (its run ended on the server mid-download),
    Flower's heartbeat signals SIGINT to end the one-task ``flwr-clientapp`` process;
    here that would stop the warm worker for good. The task itself then fails on its own
    (its message is gone) and the worker takes the next one.
    """
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (503, 504):
                return False
            if err.response.status_code == 401:  # a restarted SuperNode: the task is void
                return True
            raise
        if not res.success:
            log.warning("the SuperNode dropped this task (its run ended)")
        return True

    return beat


def _what(message: Message) -> str:
    """``round 2 train``; ``round 1 evaluate + round 2 train`` for a folded message."""
    return protocol.describe_instruction(message)


def pull_task_input(client: Any) -> tuple[Any, Any, Any]:
    """Message, Context and Run of the acquired task.

    ``flwr.supernode.runtime.run_clientapp.pull_task_input`` with one change: the SuperNode
    offers a task while it is still downloading the message's arrays, and Flower's object
    pull then backs off for a whole second; here it retries after 10 ms, growing to 0.5 s.
    """
    from flwr.common.serde import context_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=0.01,
        backoff_cap=0.5,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run


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
