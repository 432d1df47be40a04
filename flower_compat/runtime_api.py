"""The SuperNode's local Runtime API, as Pollinate's warm ClientApp worker speaks it.

Why: Flower 1.42 runs a ClientApp by starting ``flwr-clientapp`` per message, which re-imports
torch and Pollinate each time (seconds per message on a small device). Pollinate's worker
(:mod:`pollinate.deploy.worker`) is one long-lived process that speaks the same protocol
(``flwr/supernode/runtime/run_clientapp.py``: AcquireTask, PullTaskInput, PullMessages,
PushMessages, PushTaskOutput) over the SuperNode's local Runtime API. No public Flower API
offers that protocol, so its pieces (``RuntimeHttpClient``, the interceptors, the protobuf
requests, ``push_message``/``push_task_output``, the object pull) are imported here, and
their signatures are checked when this module is imported. Three pieces differ from
Flower's, for a process that outlives its tasks:

- the object pull of a task's message retries after 10 ms (Flower: 1 s): the SuperNode
  offers the task while it is still downloading the message's arrays;
- the retry invoker gives up on a 401 (the task's token is void: the SuperNode restarted)
  instead of signalling SIGINT to end the process, and retries a restarting SuperNode at
  most ``LOCAL_RETRY_MAX`` s apart (Flower: 20 s);
- the task heartbeat does not signal SIGINT when the SuperNode dropped the task.

Stock: ``flower-supernode --isolation subprocess``, one process per message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import exponential, make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from pollinate.flower_compat._core import require_parameters
from pollinate.flower_compat._names import flower_attribute, flower_module

log = logging.getLogger("pollinate.worker")

LOCAL_RETRY_MAX = 1  # s between tries while the SuperNode's local API is down
OBJECT_RETRY = (0.01, 0.5)  # s: first retry of a missing object, and the cap
COMPLETED, FAILED = SubStatus.COMPLETED, SubStatus.FAILED

# What this module calls, with the parameters it passes: (module, attribute path, params).
SIGNATURES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "flwr.supercore.runtime",
        "RuntimeHttpClient.from_server_address",
        ("server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"),
    ),
    ("flwr.supernode.runtime.run_clientapp", "push_message", ("client", "message", "context")),
    (
        "flwr.supernode.runtime.run_clientapp",
        "push_task_output",
        ("client", "context", "sub_status", "details"),
    ),
    ("flwr.supercore.heartbeat", "HeartbeatSender", ("heartbeat_fn",)),
    (
        "flwr.supercore.inflatable.inflatable_protobuf_utils",
        "make_pull_object_fn_protobuf",
        ("pull_object_protobuf", "node", "run_id"),
    ),
    (
        "flwr.supercore.inflatable.inflatable_protobuf_utils",
        "make_confirm_message_received_fn_protobuf",
        ("confirm_message_received_protobuf", "node", "run_id"),
    ),
    (
        "flwr.supercore.inflatable.inflatable_utils",
        "pull_and_inflate_object_from_tree",
        (
            "object_tree",
            "pull_object_fn",
            "confirm_object_received_fn",
            "return_type",
            "max_concurrent_pulls",
            "max_time",
            "max_tries_per_object",
            "initial_backoff",
            "backoff_cap",
        ),
    ),
    ("flwr.supercore.retry", "make_simple_http_retry_invoker", ()),
    ("flwr.supercore.retry", "exponential", ("base_delay", "multiplier", "max_delay")),
)


def check_signatures() -> None:
    """:class:`FlowerIncompatible` unless every function above takes what it is passed."""
    for module, path, expected in SIGNATURES:
        fn: Any = flower_module(module)
        for part in path.split("."):
            fn = flower_attribute(fn, part)
        require_parameters(fn, expected, what=f"{module}.{path}")


check_signatures()


def local_retry_invoker() -> Any:
    """Flower's retries for the local Runtime API, fit for a worker that outlives tasks."""
    invoker = make_simple_http_retry_invoker()
    flower_should_giveup = invoker.should_giveup

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
            return True
        return bool(flower_should_giveup(exc)) if flower_should_giveup else False

    invoker.should_giveup = should_giveup
    invoker.wait_gen_factory = lambda: exponential(max_delay=LOCAL_RETRY_MAX)
    return invoker


def connect(address: str, *, token: str | None = None) -> Any:
    """A client of the SuperNode's Runtime API at ``address``; with ``token``, for one task."""
    interceptors: list[Any] = [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")
    ]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=local_retry_invoker(),
    )


def acquire_task(client: Any) -> str | None:
    """The token of a ClientApp task the SuperNode offers now, else None."""
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return str(res.token) if res.HasField("task") and res.token else None


def task_heartbeat(client: Any) -> Callable[[], bool]:
    """Flower's task heartbeat (``make_task_heartbeat_fn_http``) minus its SIGINT.

    When the SuperNode has dropped the task (its run ended on the server mid-download),
    Flower's heartbeat signals SIGINT to end the one-task ``flwr-clientapp`` process;
    here that would stop the warm worker for good. The task then fails on its own.
    """
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


def heartbeat_sender(client: Any) -> HeartbeatSender:
    """A task heartbeat thread for ``client`` (not started)."""
    return HeartbeatSender(task_heartbeat(client))


def pull_task_input(client: Any) -> tuple[Message, Any, Any]:
    """Message, Context and Run of the acquired task.

    ``flwr.supernode.runtime.run_clientapp.pull_task_input`` with one change: the object
    pull retries after ``OBJECT_RETRY[0]`` s, growing to ``OBJECT_RETRY[1]`` s.
    """
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
        initial_backoff=OBJECT_RETRY[0],
        backoff_cap=OBJECT_RETRY[1],
    )
    # Flower's own reader sets the id the same way: a pulled message has no id of its own.
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run


def error_reply(message: Message, details: str) -> Message:
    """The reply Flower sends when a ClientApp raises: an error, ``details`` as its reason."""
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message
    )


def push_reply(client: Any, reply: Message, context: Any) -> None:
    """Hand ``reply`` (and the node's updated ``context``) back to the SuperNode."""
    push_message(client, reply, context)


def finish_task(client: Any, context: Any, *, completed: bool, details: str) -> None:
    """Tell the SuperNode the task is over, completed or failed with ``details``."""
    push_task_output(
        client, context=context, sub_status=COMPLETED if completed else FAILED, details=details
    )
