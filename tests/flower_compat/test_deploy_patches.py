"""The deployment's patches to Flower: each engages on the real Flower code and is undone,
and a changed signature of what it patches is caught (an error, or stock with a warning)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import ssl
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import httpx
import pytest
from flwr.proto.fleet_pb2 import ActivateNodeResponse
from linkstate_help import link_state, reply_message

import pollinate.flower_compat as fc
from pollinate.deploy.certs import create_certs
from pollinate.flower_compat import _names, ended_runs
from pollinate.flower_compat import runtime_api as runtime
from pollinate.flower_compat.console import plain_console
from pollinate.flower_compat.control_errors import api_error_code, flower_error_code
from pollinate.flower_compat.ended_runs import RunEnded, ended_runs_dropped, failing_on_ended_run
from pollinate.flower_compat.fleet_activation import ActivationEvents, activation_observed
from pollinate.flower_compat.heartbeat import heartbeat_every
from pollinate.flower_compat.inline_handlers import handlers_inline, runs_inline
from pollinate.flower_compat.node_auth_cache import node_signatures_remembered
from pollinate.flower_compat.node_connection import ConnectionEvents, connection_observed
from pollinate.flower_compat.object_pull import fast_object_pull
from pollinate.flower_compat.poll_advice import poll_advice_given, poll_advice_taken
from pollinate.flower_compat.reconnect import reconnect_within
from pollinate.flower_compat.superlink_app import wrapped_superlink_app
from pollinate.flower_compat.supernode_poll import StandInTime, supernode_sleeps
from pollinate.flower_compat.tls_handshake import handshake_failures_reported

SCI = "flwr.supernode.start_client_internal"


def _mod(name: str) -> Any:
    return importlib.import_module(name)


def _engaged(name: str) -> int:
    return fc.engaged[name]


@pytest.fixture(autouse=True)
def _warnings_said_again() -> None:
    """Each test may see the one-line fallback warning (it is said once per process)."""
    _names._said.clear()
    fc._core._warned.clear()


def _pull_kwargs(receive: Callable[[], Any]) -> dict[str, Any]:
    """Arguments for Flower's ``_pull_and_store_message`` when no message is waiting."""
    return {
        "state": None,
        "object_store": None,
        "node_config": {},
        "receive": receive,
        "get_run": None,
        "get_fab": None,
        "pull_object": lambda run_id, obj_id: b"",
        "confirm_message_received": lambda run_id, obj_id: None,
        "trusted_entities": None,
    }


# ------------------------------------------------------------------------ SuperLink


def test_activation_reports_join_refusal_and_leave_from_flowers_handlers() -> None:
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest

    handlers = _mod("flwr.superlink.servicer.fleet.fleet_handlers")
    stock = handlers.activate_node
    state = link_state()
    seen: list[tuple[str, object]] = []
    events = ActivationEvents(
        joined=lambda n: seen.append(("joined", n)),
        left=lambda n: seen.append(("left", n)),
        refused=lambda key, registered: seen.append(("refused", registered)),
    )
    before = _engaged(f"{handlers.__name__}.activate_node")
    with activation_observed(events):
        with pytest.raises(Exception):  # noqa: B017 - Flower's FlowerError
            handlers.activate_node(
                request=ActivateNodeRequest(public_key=b"unknown", heartbeat_interval=30),
                state=state,
            )
        node_id = state.create_node("aid", "name", b"known", 30)
        response = handlers.activate_node(
            request=ActivateNodeRequest(public_key=b"known", heartbeat_interval=30), state=state
        )
        with pytest.raises(Exception):  # noqa: B017 - its session is still open
            handlers.activate_node(
                request=ActivateNodeRequest(public_key=b"known", heartbeat_interval=30),
                state=state,
            )
        handlers.deactivate_node(request=DeactivateNodeRequest(node_id=node_id), state=state)
    assert response.node_id == node_id
    assert seen == [("refused", False), ("joined", node_id), ("refused", True), ("left", node_id)]
    assert _engaged(f"{handlers.__name__}.activate_node") == before + 3
    assert handlers.activate_node is stock and not fc.active_patches()


def test_superlink_app_is_wrapped_in_the_middleware_inside_the_block_only() -> None:
    main = _mod("flwr.superlink.main")
    stock = main.create_app
    wrapped: list[Any] = []

    def middleware(app: Any) -> Any:
        wrapped.append(app)
        return ("wrapped", app)

    with wrapped_superlink_app(middleware) as on:
        assert on and main.create_app is not stock
        # The launcher's Flower code imports create_app from the module when it serves.
        from flwr.superlink.main import create_app

        assert create_app is main.create_app
    assert main.create_app is stock and not wrapped  # nothing built: nothing wrapped


def test_a_failed_tls_handshake_is_reported_with_peer_and_reason_a_good_one_counted(
    tmp_path: Path,
) -> None:
    import asyncio.sslproto as sslproto

    certs, _ = create_certs(tmp_path / "certs", hosts=["127.0.0.1"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    reports: list[tuple[str, str]] = []
    completed: list[int] = []
    stock = sslproto.SSLProtocol._on_handshake_complete

    async def plain_http_to_tls_port() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        for _ in range(50):
            if reports:
                break
            await asyncio.sleep(0.02)
        trusting = ssl.create_default_context(cafile=certs.ca_cert)
        _, good = await asyncio.open_connection("127.0.0.1", port, ssl=trusting)
        for _ in range(50):
            if completed:
                break
            await asyncio.sleep(0.02)
        good.close()
        server.close()
        await server.wait_closed()

    uvloop_before = sys.modules.get("uvloop", "absent")
    with handshake_failures_reported(
        lambda peer, reason: reports.append((peer, reason)), lambda: completed.append(1)
    ) as on:
        assert on
        if uvloop_before == "absent":  # not imported yet: kept out, uvicorn picks asyncio
            assert sys.modules["uvloop"] is None
        # Plain asyncio's loop, as the SuperLink's uvicorn then runs on.
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            runner.run(plain_http_to_tls_port())
    assert reports == [("127.0.0.1", "HTTP_REQUEST")]
    assert completed == [1]  # the good connection only
    assert sslproto.SSLProtocol._on_handshake_complete is stock
    assert sys.modules.get("uvloop", "absent") == uvloop_before  # as it was


def test_flowers_console_has_timestamps_and_no_colour_inside_the_block() -> None:
    logger = _mod("flwr.supercore.logger")
    handler = logger.console_handler
    before = (handler.timestamps, handler.colored)
    with plain_console() as on:
        assert on and handler.timestamps and not handler.colored
    assert (handler.timestamps, handler.colored) == before


# ------------------------------------------------------------------------ SuperNode


def test_the_supernode_loop_sleeps_with_pollinates_clock() -> None:
    loop = _mod(SCI)
    slept: list[float] = []
    messages: list[int] = []
    before = _engaged(f"{SCI}._pull_and_store_message")
    with supernode_sleeps(slept.append, lambda: messages.append(1)) as on:
        assert on and isinstance(loop.time, StandInTime)
        loop.time.sleep(3)  # what the loop does when the SuperLink has no message
        assert loop.time.monotonic() > 0  # the rest of `time` is the real one
        # Flower's own function, called the way its loop calls it: no message waiting.
        assert loop._pull_and_store_message(**_pull_kwargs(lambda: None)) is None
    assert slept == [3] and messages == []
    assert _engaged(f"{SCI}._pull_and_store_message") == before + 1
    assert loop.time is time and not fc.active_patches()


def test_an_ended_run_mid_download_becomes_an_exception_flower_cleans_up() -> None:
    from flwr.supercore.run import RunNotRunningException

    loop = _mod(SCI)
    stock = loop._pull_and_store_message

    def download(run_id: int, obj_id: str) -> bytes:
        raise RunNotRunningException

    with pytest.raises(RunEnded) as err:
        failing_on_ended_run(download)(1, "x")
    assert isinstance(err.value, Exception)  # Flower's `except Exception` cleanup runs
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    before = _engaged("ended_runs_dropped")
    empty = InMemoryNodeState(ObjectStoreFactory().store())  # no reply waiting either
    with ended_runs_dropped():
        assert (
            loop._pull_and_store_message(**{**_pull_kwargs(lambda: None), "state": empty}) is None
        )
    assert _engaged("ended_runs_dropped") == before + 1
    assert loop._pull_and_store_message is stock


def _reply_in_node_state(state: Any, store: Any, run_id: int) -> str:
    """A reply as the ClientApp leaves it: in the node's state, its objects in the store."""
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
    )

    reply = reply_message(run_id, 7, reply_to="a-message-whose-receive-failed")
    store.preregister(run_id, get_object_tree(reply))
    for object_id, obj in get_all_nested_objects(reply).items():
        store.put(object_id, obj.deflate())
    assert state.store_message(reply) == reply.object_id
    return str(reply.object_id)


def test_a_reply_left_by_a_failed_receive_is_sent_by_flowers_own_push() -> None:
    """The restart case: a receive failed after the ClientApp took the message, so its reply
    sits in the node's state while the loop pulls nothing. Flower's own pull leaves it
    there for good; the wrapped pull hands Flower's loop its run, and Flower's own
    ``_push_messages`` sends it. In step (nothing waiting), a pull still says nothing."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    loop = _mod(SCI)
    store = ObjectStoreFactory().store()
    state = InMemoryNodeState(store)
    reply_id = _reply_in_node_state(state, store, run_id=5)
    kwargs = {**_pull_kwargs(lambda: None), "state": state, "object_store": store}
    assert loop._pull_and_store_message(**kwargs) is None  # stock: the reply is stranded
    sent: list[str] = []

    def send(message: Any, tree: Any, runtime: float) -> tuple[set[str], str]:
        sent.append(message.metadata.message_id)
        return set(), "session"

    before = _engaged(ended_runs.SENT_WAITING)
    with ended_runs_dropped():
        assert loop._pull_and_store_message(**kwargs) == 5  # the reply's run: push it
        loop._push_messages(state=state, object_store=store, send=send, push_object=_noop)
        assert sent == [reply_id]
        assert loop._pull_and_store_message(**kwargs) is None  # sent and gone: in step
        taken = _reply_in_node_state(state, store, run_id=6)
        assert [m.metadata.message_id for m in state.get_messages_legacy(is_reply=True)] == [taken]
        assert loop._pull_and_store_message(**kwargs) is None  # one being sent: not again
    assert _engaged(ended_runs.SENT_WAITING) == before + 1
    assert not fc.active_patches()


def test_a_node_state_that_keeps_messages_differently_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supernode.nodestate import in_memory_nodestate

    monkeypatch.delattr(in_memory_nodestate, "MessageEntry")
    with pytest.raises(fc.FlowerIncompatible) as err, ended_runs_dropped():
        pass
    message = str(err.value)
    assert "\n" not in message and "msg_store" in message and fc.SUPPORTED_RANGE in message
    assert not fc.active_patches()


def test_a_missing_object_is_retried_within_tens_of_ms() -> None:
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    loop = _mod(SCI)
    tries: list[float] = []

    def pull_object(obj_id: str) -> bytes:
        tries.append(time.monotonic())
        if len(tries) < 3:  # still uploading
            raise ObjectUnavailableError(obj_id)
        return b"arrays"

    with fast_object_pull(0.01, 0.5) as on:
        assert on
        t0 = time.monotonic()
        got = loop.pull_objects(["obj"], pull_object_fn=pull_object)
        took = time.monotonic() - t0
    assert got == {"obj": b"arrays"} and len(tries) == 3
    assert took < 0.5, f"{took:.2f} s: stock Flower waits 1 s, then 2 s"
    assert loop.pull_objects.__module__ == "flwr.supercore.inflatable.inflatable_utils"


def test_heartbeat_interval_inside_the_block_only() -> None:
    heartbeat = _mod("flwr.supercore.heartbeat")
    fleet = _mod("flwr.supernode.fleet_http_connection")
    stock = heartbeat.HEARTBEAT_DEFAULT_INTERVAL
    with heartbeat_every(10) as on:
        assert on and heartbeat.HEARTBEAT_DEFAULT_INTERVAL == fleet.HEARTBEAT_DEFAULT_INTERVAL == 10
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == fleet.HEARTBEAT_DEFAULT_INTERVAL == stock
    with pytest.raises(ValueError, match="under 10 s"), heartbeat_every(5):
        pass


class _Request:
    """What Flower's ``authenticate_node`` reads from a Starlette request."""

    def __init__(self, headers: dict[str, str], protobuf_request: Any) -> None:
        self.headers = headers
        self.state = type("State", (), {"protobuf_request": protobuf_request})()


def _signed_request(key: Any, signed_at: Any, *, tamper: bool = False) -> _Request:
    import base64

    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.constant import (
        FLEET_HTTP_PUBLIC_KEY_HEADER,
        FLEET_HTTP_SIGNATURE_HEADER,
    )
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    public = public_key_to_bytes(key.public_key())
    timestamp = signed_at.isoformat()
    signature = sign_message(key, timestamp.encode("ascii"))
    if tamper:
        signature = sign_message(key, b"something else")
    headers = {
        FLEET_HTTP_PUBLIC_KEY_HEADER: base64.b64encode(public).decode(),
        FLEET_HTTP_SIGNATURE_HEADER: base64.b64encode(signature).decode(),
        TIMESTAMP_HEADER: timestamp,
    }
    # ActivateNode: the key is checked against the request, not the LinkState.
    return _Request(headers, ActivateNodeRequest(public_key=public, heartbeat_interval=30))


def test_a_node_signature_is_verified_once_and_a_bad_or_expired_one_refused_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import datetime as dt

    from cryptography.hazmat.primitives.asymmetric import ec
    from fastapi import HTTPException

    node_auth = _mod("flwr.superlink.routers.fleet.node_auth")
    calls: list[str] = []
    stock_verify, stock_parse = node_auth.verify_signature, node_auth.bytes_to_public_key

    def verify_signature(public_key: Any, message: bytes, signature: bytes) -> bool:
        calls.append("verify")
        return bool(stock_verify(public_key, message, signature))

    def bytes_to_public_key(public_key_bytes: bytes) -> Any:
        calls.append("parse")
        return stock_parse(public_key_bytes)

    monkeypatch.setattr(node_auth, "verify_signature", verify_signature)
    monkeypatch.setattr(node_auth, "bytes_to_public_key", bytes_to_public_key)
    key = ec.generate_private_key(ec.SECP384R1())
    signed_at = dt.datetime.now(dt.timezone.utc)
    good = _signed_request(key, signed_at)
    bad = _signed_request(key, signed_at, tamper=True)
    with node_signatures_remembered() as on:
        assert on
        for _ in range(5):
            node_auth.authenticate_node(good)  # passes: no exception
        assert calls == ["parse", "verify"]  # Flower's own functions ran once
        for _ in range(3):
            with pytest.raises(HTTPException) as refused:
                node_auth.authenticate_node(bad)
            assert refused.value.status_code == 401
        assert calls.count("verify") == 4  # a failed signature is verified every time
        # The age is still checked on every request: a remembered signature expires.
        later = signed_at + dt.timedelta(minutes=10)
        monkeypatch.setattr(node_auth, "now", lambda: later)
        with pytest.raises(HTTPException):
            node_auth.authenticate_node(good)
    assert node_auth.verify_signature is verify_signature  # undone
    assert node_auth.bytes_to_public_key is bytes_to_public_key
    assert not fc.active_patches()


def _activate_over_http(app: Any, key: Any) -> tuple[int, int]:
    """A signed ActivateNode request through ``app`` (in this thread's event loop): the
    HTTP status and the node id answered."""
    response = _post_activate(app, key)
    node_id = ActivateNodeResponse.FromString(response.content).node_id
    return response.status_code, node_id if response.status_code == 200 else -1


def _post_activate(app: Any, key: Any, *, tamper: bool = False) -> httpx.Response:
    """A signed (``tamper``: badly signed) ActivateNode request through ``app``."""
    import base64
    import datetime as dt

    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.constant import (
        FLEET_HTTP_PUBLIC_KEY_HEADER,
        FLEET_HTTP_SIGNATURE_HEADER,
    )
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message
    from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE

    public = public_key_to_bytes(key.public_key())
    timestamp = dt.datetime.now(dt.timezone.utc).isoformat()
    headers = {
        FLEET_HTTP_PUBLIC_KEY_HEADER: base64.b64encode(public).decode(),
        FLEET_HTTP_SIGNATURE_HEADER: base64.b64encode(
            sign_message(key, b"tampered" if tamper else timestamp.encode("ascii"))
        ).decode(),
        TIMESTAMP_HEADER: timestamp,
        "content-type": PROTOBUF_MEDIA_TYPE,
    }
    body = ActivateNodeRequest(public_key=public, heartbeat_interval=30).SerializeToString()

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://link") as client:
            return await client.post("/v1/fleet/activate-node", headers=headers, content=body)

    return asyncio.run(post())


def test_fleet_handlers_and_node_auth_run_on_the_event_loop_inside_the_block_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower's real SuperLink app, a real signed request: inside the block its handler
    and the signature check run in the event loop's thread, outside in worker threads."""
    import threading

    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.superlink.main import create_app

    handlers = _mod("flwr.superlink.servicer.fleet.fleet_handlers")
    node_auth = _mod("flwr.superlink.routers.fleet.node_auth")
    threads: list[tuple[str, str]] = []
    stock_verify = node_auth.verify_signature

    def activate_node(request: Any, state: Any) -> Any:
        threads.append(("handler", threading.current_thread().name))
        return ActivateNodeResponse(node_id=7)

    def verify_signature(public_key: Any, message: bytes, signature: bytes) -> bool:
        threads.append(("auth", threading.current_thread().name))
        return bool(stock_verify(public_key, message, signature))

    monkeypatch.setattr(handlers, "activate_node", activate_node)
    monkeypatch.setattr(node_auth, "verify_signature", verify_signature)
    app, key = create_app(), ec.generate_private_key(ec.SECP384R1())
    loop_thread = threading.current_thread().name  # asyncio.run's loop runs here

    assert _activate_over_http(app, key) == (200, 7)
    assert threads and all(name != loop_thread for _, name in threads)  # stock: workers
    threads.clear()
    with handlers_inline() as on:
        assert on
        assert _activate_over_http(app, key) == (200, 7)  # the same answer
    assert sorted(threads) == [("auth", loop_thread), ("handler", loop_thread)]
    threads.clear()
    assert _activate_over_http(app, key) == (200, 7)
    assert all(name != loop_thread for _, name in threads)  # undone
    assert not fc.active_patches()


@pytest.mark.parametrize("outcome", ["ok", "bad signature", "flower error", "crash"])
def test_buffered_middleware_answers_as_flowers_chain_without_its_task_groups(
    monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    """Flower's real SuperLink app with the gated chain: a Fleet request's answer (status,
    body, type) is the stock chain's, for a good request and three kinds of error, and no
    layer runs Starlette's BaseHTTPMiddleware driver for it."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.superlink.main import create_app
    from starlette.middleware.base import BaseHTTPMiddleware

    from pollinate.flower_compat.link_middleware import gated_link_middleware

    monkeypatch.delenv("POLLINATE_TASKGROUP_MIDDLEWARE", raising=False)
    monkeypatch.delenv("POLLINATE_STOCK_MIDDLEWARE", raising=False)
    handlers = _mod("flwr.superlink.servicer.fleet.fleet_handlers")

    def activate_node(request: Any, state: Any) -> Any:
        if outcome == "flower error":
            raise FlowerError(ApiErrorCode.LINKSTATE_NOT_INITIALIZED, "no state")
        if outcome == "crash":
            raise ZeroDivisionError("a bug")
        return ActivateNodeResponse(node_id=7)

    monkeypatch.setattr(handlers, "activate_node", activate_node)
    drives: list[str] = []
    stock_call = BaseHTTPMiddleware.__call__

    async def counted(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            drives.append(type(self).__name__)
        await stock_call(self, scope, receive, send)

    monkeypatch.setattr(BaseHTTPMiddleware, "__call__", counted)
    key = ec.generate_private_key(ec.SECP384R1())
    answers = []
    for gated in (False, True):
        with gated_link_middleware() if gated else nullcontext():
            app = create_app()
        drives.clear()
        response = _post_activate(app, key, tamper=outcome == "bad signature")
        answers.append(
            (response.status_code, response.content, response.headers.get("content-type"))
        )
        # Stock: Starlette's task-group driver for every layer; gated: for none.
        acting = {"BaseHTTPMiddleware", "ProtobufTranslationMiddleware", "NodeAuthMiddleware"}
        assert drives == [] if gated else acting <= set(drives)
    assert answers[0] == answers[1]
    expected = {"ok": 200, "bad signature": 401, "flower error": 503, "crash": 500}[outcome]
    assert answers[0][0] == expected


def test_only_the_fleet_and_runtime_handlers_and_their_dependencies_run_inline() -> None:
    from flwr.supercore.dependencies.version import VersionDependency
    from flwr.supercore.protobuf.translation import get_protobuf_request

    fleet = _mod("flwr.superlink.routers.fleet.router")
    runtime = _mod("flwr.supercore.routers.runtime.router")
    control = _mod("flwr.superlink.routers.control.router")
    assert runs_inline(fleet.fleet_pull_messages) and runs_inline(runtime.pull_messages)
    assert runs_inline(get_protobuf_request)
    assert runs_inline(VersionDependency(component_name="SuperLink", connection_name="x"))
    # The Control API (its log streams sleep) and anything unlisted keep their threads.
    control_handlers = [
        fn for fn in vars(control).values() if getattr(fn, "__module__", "") == control.__name__
    ]
    assert control_handlers and not any(runs_inline(fn) for fn in control_handlers)
    assert not runs_inline(time.sleep) and not runs_inline(_noop)


class _LinkState:
    """The LinkState calls Flower's ``pull_messages`` handler and the advice make."""

    def __init__(self, ins: int, res: int) -> None:
        self.ins, self.res = ins, res

    def get_message_ins(self, node_id: int, limit: int) -> list[Any]:
        return []

    def num_message_ins(self) -> int:
        return self.ins

    def num_message_res(self) -> int:
        return self.res


def test_an_empty_pull_carries_the_advice_and_stored_replies_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node

    handlers = _mod("flwr.superlink.servicer.fleet.fleet_handlers")
    told: list[int] = []
    replies: list[int] = []

    def push_messages(request: Any, state: Any) -> str:
        if request == "refused":
            raise RuntimeError("run not running")
        return "stored"

    monkeypatch.setattr(handlers, "push_messages", push_messages)

    def advice(outstanding: int) -> int:
        told.append(outstanding)
        return 9

    request = PullMessagesRequest(node=Node(node_id=1))
    with poll_advice_given(advice, lambda: replies.append(1)) as on:
        assert on
        response = handlers.pull_messages(request, _LinkState(ins=30, res=10), None)
        assert response.reconnect.reconnect == 9 and not response.messages_list
        assert told == [20]  # stored messages not yet replied to
        assert handlers.push_messages("reply", None) == "stored"
        with pytest.raises(RuntimeError):
            handlers.push_messages("refused", None)
        assert replies == [1]  # only a stored reply counts
    stock = handlers.pull_messages(request, _LinkState(ins=30, res=10), None)
    assert not stock.HasField("reconnect")  # undone: Flower's own handler again
    assert not fc.active_patches()


def test_the_supernode_hears_each_pulls_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.proto.fleet_pb2 import PullMessagesResponse, Reconnect

    client = _mod("flwr.supernode.fleet_http_client").FleetHttpClient
    answers = [PullMessagesResponse(reconnect=Reconnect(reconnect=12)), PullMessagesResponse()]

    def pull_messages(self: Any, request: Any) -> Any:
        return answers.pop(0)

    monkeypatch.setattr(client, "PullMessages", pull_messages)
    heard: list[int] = []
    with poll_advice_taken(heard.append) as on:
        assert on
        client.PullMessages(None, None)
        client.PullMessages(None, None)
    assert heard == [12, 0]
    assert client.PullMessages is pull_messages


def test_retries_are_capped_for_both_of_flowers_backoffs() -> None:
    heartbeat = _mod("flwr.supercore.heartbeat")
    retry = _mod("flwr.supercore.retry.http_retry")
    with reconnect_within(5) as on:
        assert on
        # Flower's HTTP invoker reads the cap when it makes each wait generator.
        waits = retry.make_simple_http_retry_invoker().wait_gen_factory()
        assert max(next(waits) for _ in range(10)) <= 5
        # The heartbeat sender asks for exponential(max_delay=20) from its module.
        beats = heartbeat.exponential(max_delay=20)
        assert max(next(beats) for _ in range(10)) <= 5
    assert retry.MAX_RETRY_DELAY == 20
    beats = heartbeat.exponential(max_delay=20)
    assert max(next(beats) for _ in range(10)) == 20


def test_failed_connection_attempts_are_reported_by_flowers_retry_invoker() -> None:
    connection = _mod("flwr.supernode.fleet_http_connection")
    client = _mod("flwr.supernode.fleet_http_client").FleetHttpClient
    stock = client.ActivateNode
    failed: list[int] = []
    events = ConnectionEvents(
        joined=lambda n: None, refused=lambda: None, attempt_failed=lambda: failed.append(1)
    )
    calls = iter([httpx.ConnectError("down"), httpx.ConnectError("down"), None])

    def request() -> str:
        error = next(calls)
        if error is not None:
            raise error
        return "ok"

    with connection_observed(events):
        invoker = connection.make_simple_http_retry_invoker()
        invoker.wait_function = lambda seconds: None  # no real waiting in the test
        assert invoker.invoke(request) == "ok"
        assert client.ActivateNode is not stock
    assert failed == [1, 1] and client.ActivateNode is stock


# ---------------------------------------------------------------- changed signatures


def _changed(*params: str) -> Callable[..., Any]:
    namespace: dict[str, Any] = {}
    exec(f"def changed({', '.join(params)}): pass", namespace)
    return namespace["changed"]


def _noop(*_: Any) -> None:
    return None


ERRORS: list[tuple[str, str, Callable[[], AbstractContextManager[Any]]]] = [
    ("flwr.superlink.main", "create_app", lambda: wrapped_superlink_app(_noop)),
    (
        "flwr.superlink.servicer.fleet.fleet_handlers",
        "activate_node",
        lambda: activation_observed(ActivationEvents(_noop, _noop, _noop)),
    ),
    (
        "flwr.superlink.servicer.fleet.fleet_handlers",
        "deactivate_node",
        lambda: activation_observed(ActivationEvents(_noop, _noop, _noop)),
    ),
    (SCI, "_pull_and_store_message", ended_runs_dropped),
    (
        "flwr.supernode.fleet_http_connection",
        "make_simple_http_retry_invoker",
        lambda: connection_observed(ConnectionEvents(_noop, _noop, _noop)),
    ),
]


@pytest.mark.parametrize(
    ("module", "attr", "patch"), ERRORS, ids=[f"{m}.{a}" for m, a, _ in ERRORS]
)
def test_a_changed_signature_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch,
    module: str,
    attr: str,
    patch: Callable[[], AbstractContextManager[Any]],
) -> None:
    monkeypatch.setattr(_mod(module), attr, _changed("request", "state", "extra"))
    with pytest.raises(fc.FlowerIncompatible) as err, patch():
        pass
    message = str(err.value)
    assert "\n" not in message and attr in message and fc.SUPPORTED_RANGE in message
    assert not fc.active_patches()


@pytest.mark.parametrize(
    ("module", "path"), [(m, p) for m, p, _ in runtime.SIGNATURES], ids=lambda v: str(v)
)
def test_a_changed_runtime_api_signature_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, module: str, path: str
) -> None:
    runtime.check_signatures()  # the installed Flower is the one the worker was written for
    owner: Any = _mod(module)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, name, _changed("server_address", "changed"))
    with pytest.raises(fc.FlowerIncompatible) as err:
        runtime.check_signatures()
    assert "\n" not in str(err.value) and name in str(err.value)


def test_a_changed_activate_node_method_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _mod("flwr.supernode.fleet_http_client").FleetHttpClient
    monkeypatch.setattr(client, "ActivateNode", _changed("self", "request", "timeout"))
    with (
        pytest.raises(fc.FlowerIncompatible, match="ActivateNode"),
        connection_observed(ConnectionEvents(_noop, _noop, _noop)),
    ):
        pass


FALLBACKS: list[tuple[str, str, Any, Callable[[], AbstractContextManager[Any]]]] = [
    (
        "asyncio.sslproto",
        "SSLProtocol",
        None,
        lambda: handshake_failures_reported(_noop),
    ),
    ("flwr.supercore.logger", "update_console_handler", _changed("level"), plain_console),
    (SCI, "_pull_and_store_message", _changed("state"), lambda: supernode_sleeps(_noop, _noop)),
    (SCI, "time", object(), lambda: supernode_sleeps(_noop, _noop)),
    (SCI, "pull_objects", _changed("object_ids"), lambda: fast_object_pull(0.01, 0.5)),
    ("flwr.supercore.heartbeat", "HEARTBEAT_DEFAULT_INTERVAL", None, lambda: heartbeat_every(10)),
    ("flwr.supercore.retry.http_retry", "MAX_RETRY_DELAY", None, lambda: reconnect_within(5)),
    ("flwr.supercore.heartbeat", "exponential", _changed("delay"), lambda: reconnect_within(5)),
    (
        "flwr.superlink.routers.fleet.node_auth",
        "bytes_to_public_key",
        _changed("data"),
        node_signatures_remembered,
    ),
    (
        "flwr.superlink.routers.fleet.node_auth",
        "verify_signature",
        _changed("key", "message"),
        node_signatures_remembered,
    ),
    (
        "flwr.superlink.servicer.fleet.fleet_handlers",
        "pull_messages",
        _changed("request", "state"),
        lambda: poll_advice_given(lambda n: 0, _noop),
    ),
    (
        "flwr.superlink.servicer.fleet.fleet_handlers",
        "push_messages",
        _changed("request"),
        lambda: poll_advice_given(lambda n: 0, _noop),
    ),
    ("flwr.supercore.protobuf.routing", "run_in_threadpool", _changed("fn"), handlers_inline),
    ("fastapi.dependencies.utils", "run_in_threadpool", None, handlers_inline),
]


@pytest.mark.parametrize(
    ("module", "attr", "replacement", "patch"),
    FALLBACKS,
    ids=[f"{m}.{a}" for m, a, _, _ in FALLBACKS],
)
def test_a_changed_signature_falls_back_to_stock_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    module: str,
    attr: str,
    replacement: Any,
    patch: Callable[[], AbstractContextManager[Any]],
) -> None:
    owner = _mod(module)
    if attr == "SSLProtocol":  # a private method of a class: change the method itself
        owner, attr, replacement = owner.SSLProtocol, "_on_handshake_complete", _changed("self")
    if replacement is None:
        monkeypatch.delattr(owner, attr)
    else:
        monkeypatch.setattr(owner, attr, replacement)
    changed = getattr(owner, attr, None)
    caplog.set_level(logging.WARNING, logger="pollinate.flower_compat")
    for _ in range(2):
        with patch() as on:
            assert on is False
            assert getattr(owner, attr, None) is changed  # stock (the changed one) runs
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "stock" in warnings[0]
    assert fc.SUPPORTED_RANGE in warnings[0]
    assert not fc.active_patches()


# ------------------------------------------------------------------- Control API replies


def test_the_flwr_cli_error_code_is_flowers_api_error_code() -> None:
    from flwr.supercore.error import ApiErrorCode

    assert api_error_code("PUBLIC_KEY_ALREADY_IN_USE") == int(
        ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE
    )
    reply = "Using SuperLink: pollinate (x)\n\n[code: 23] Public key already in use."
    assert flower_error_code(reply) == 23
    assert flower_error_code("connection refused") is None
    with pytest.raises(fc.FlowerIncompatible, match="NO_SUCH_CODE"):
        api_error_code("NO_SUCH_CODE")


def test_the_launchers_put_the_request_savings_in_place() -> None:
    from pollinate.deploy import server, superlink, supernode

    with superlink.patched_flower():
        active = fc.active_patches()
        assert "flwr.superlink.routers.fleet.node_auth.verify_signature" in active
        assert "flwr.superlink.routers.fleet.node_auth.bytes_to_public_key" in active
        assert "flwr.superlink.servicer.fleet.fleet_handlers.pull_messages" in active
        assert "flwr.superlink.servicer.fleet.fleet_handlers.push_messages" in active
        assert not any("run_in_threadpool" in name for name in active)  # a database
    with superlink.patched_flower(["--database", server.MEMORY_STATE]):  # what it is given
        inline = [name for name in fc.active_patches() if "run_in_threadpool" in name]
        assert len(inline) == 3  # the handler call, FastAPI's dependencies, node auth
    with supernode.patched_flower():
        assert "FleetHttpClient.PullMessages" in fc.active_patches()
    assert not fc.active_patches()
