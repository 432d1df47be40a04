"""Flower's Fleet API client pieces, for the device emulator (:mod:`pollinate.deploy.emulator`).

Why: the emulator hosts many device identities in one process and speaks the protocol a
stock ``flower-supernode`` speaks (``flwr/supernode/fleet_http_connection.py``), request for
request. Flower exposes that protocol only inside its SuperNode loop (one identity per
process, a heartbeat thread and a ClientApp process per node), so the emulator reuses the
same building blocks by their non-public names, all of them imported here:

- ``FleetHttpClient`` (protobuf over HTTP(S), one method per Fleet RPC) and
  ``NodeAuthHttpInterceptor`` (the signed public-key headers of node authentication);
- the object helpers the SuperNode and the ServerApp grid use: ``pull_objects`` /
  ``push_objects``, their protobuf request builders, ``get_object_tree``,
  ``get_all_nested_objects``, ``iterate_object_tree``, ``inflate_object_from_contents``,
  ``remove_content_from_message`` and the message serde;
- the Control API client ``flwr supernode register`` uses, so 1,000 node keys are
  registered with 1,000 requests from one process instead of 1,000 ``flwr`` processes;
- the header names and signing of node authentication, for
  :class:`ReusedSignatureInterceptor`.

:func:`check_fleet_api` checks the signatures these are called with.
"""

from __future__ import annotations

import time
from base64 import b64encode
from typing import Any

from flwr.app.message import Message, remove_content_from_message
from flwr.common.constant import (
    HEARTBEAT_DEFAULT_INTERVAL,
    TIMESTAMP_HEADER,
    TIMESTAMP_TOLERANCE,
    ErrorCode,
)
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.control_pb2 import RegisterNodeRequest
from flwr.proto.fab_pb2 import GetFabRequest
from flwr.proto.fleet_pb2 import (
    ActivateNodeRequest,
    DeactivateNodeRequest,
    PullMessagesRequest,
    PullMessagesResponse,
    PushMessagesRequest,
)
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
from flwr.proto.message_pb2 import ObjectTree
from flwr.proto.node_pb2 import Node
from flwr.proto.run_pb2 import GetRunRequest
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
    make_push_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    pull_objects,
    push_objects,
)
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.interceptors.http.utils import add_headers
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from pollinate.flower_compat._core import require_parameters


def check_fleet_api() -> None:
    """Raise ``FlowerIncompatible`` unless the helpers take the arguments we pass them."""
    require_parameters(
        FleetHttpClient.from_server_address,
        ("server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"),
        what="FleetHttpClient.from_server_address",
    )
    require_parameters(
        NodeAuthHttpInterceptor.__init__,
        ("self", "private_key", "public_key"),
        what="NodeAuthHttpInterceptor",
    )
    require_parameters(
        NodeAuthHttpInterceptor.intercept,
        ("self", "context", "call_next"),
        what="NodeAuthHttpInterceptor.intercept",
    )
    require_parameters(
        sign_message, ("private_key", "message"), what="flwr.supercore...sign_message"
    )
    require_parameters(
        make_pull_object_fn_protobuf,
        ("pull_object_protobuf", "node", "run_id"),
        what="make_pull_object_fn_protobuf",
    )
    require_parameters(
        make_push_object_fn_protobuf,
        ("push_object_protobuf", "node", "run_id", "session_id"),
        what="make_push_object_fn_protobuf",
    )
    require_parameters(
        inflate_object_from_contents,
        ("object_id", "object_contents", "keep_object_contents", "objects"),
        what="inflate_object_from_contents",
    )


SIGNATURE_REUSE = 60.0  # s; the SuperLink accepts a signed timestamp for 300 + 5 s


class ReusedSignatureInterceptor(NodeAuthHttpInterceptor):
    """``NodeAuthHttpInterceptor`` that signs a fresh timestamp only every ``reuse`` s.

    Why: what the SuperLink checks (``flwr/superlink/routers/fleet/node_auth.py``) is the
    signature over the timestamp header, and that the timestamp is at most
    ``TIMESTAMP_TOLERANCE`` (300 s) + 5 s old; it keeps no record of timestamps seen. So a
    device may send one signed timestamp with every request for a while; the SuperLink
    verifies each request exactly as before. For the emulator, one P-384 signature per
    request was ~12% of its CPU (py-spy, 20 devices).
    """

    def __init__(self, private_key: Any, public_key: Any, reuse: float = SIGNATURE_REUSE) -> None:
        super().__init__(private_key, public_key)
        if not 0 <= reuse < TIMESTAMP_TOLERANCE:
            raise ValueError(f"reuse must be in [0, {TIMESTAMP_TOLERANCE}) s, not {reuse}")
        self._reuse = reuse
        self._key = private_key
        self._headers: dict[str, str] = {}
        self._signed_at = -float("inf")

    def intercept(self, context: Any, call_next: Any) -> Any:
        if time.monotonic() - self._signed_at >= self._reuse:
            timestamp = now().isoformat()
            signature = sign_message(self._key, timestamp.encode("ascii"))
            self._headers = {
                FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(self._public_key_bytes).decode("ascii"),
                TIMESTAMP_HEADER: timestamp,
                FLEET_HTTP_SIGNATURE_HEADER: b64encode(signature).decode("ascii"),
            }
            self._signed_at = time.monotonic()
        add_headers(context.request, self._headers)
        return call_next(context)


def fleet_client(
    address: str,
    root_certificates: bytes | None,
    private_key: Any,
    public_key: Any,
    *,
    signature_reuse: float = 0.0,
) -> FleetHttpClient:
    """A Fleet API client for one identity: TLS unless ``root_certificates`` is None.

    ``signature_reuse`` > 0: sign a timestamp only that often (:class:`ReusedSignatureInterceptor`).
    """
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperNode")]
    if private_key is not None and signature_reuse > 0:
        interceptors.append(ReusedSignatureInterceptor(private_key, public_key, signature_reuse))
    elif private_key is not None:
        interceptors.append(NodeAuthHttpInterceptor(private_key, public_key))
    return FleetHttpClient.from_server_address(
        address, root_certificates is None, root_certificates, interceptors=interceptors
    )


def register_node_keys(connection: str, public_keys: list[bytes]) -> list[int]:
    """Register node public keys over the Control API (``flwr supernode register``'s call).

    ``connection`` names a SuperLink connection in ``$FLWR_HOME/config.toml``.
    """
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    client = init_http_client_from_connection(read_superlink_connection(connection))
    try:
        return [
            int(client.RegisterNode(request=RegisterNodeRequest(public_key=key)).node_id)
            for key in public_keys
        ]
    finally:
        client.close()


__all__ = [
    "HEARTBEAT_DEFAULT_INTERVAL",
    "SIGNATURE_REUSE",
    "ActivateNodeRequest",
    "DeactivateNodeRequest",
    "ErrorCode",
    "FleetHttpClient",
    "GetFabRequest",
    "GetRunRequest",
    "Message",
    "Node",
    "ObjectTree",
    "PullMessagesRequest",
    "PullMessagesResponse",
    "PushMessagesRequest",
    "ReusedSignatureInterceptor",
    "SendNodeHeartbeatRequest",
    "check_fleet_api",
    "fleet_client",
    "get_all_nested_objects",
    "get_object_tree",
    "inflate_object_from_contents",
    "iterate_object_tree",
    "make_confirm_message_received_fn_protobuf",
    "make_pull_object_fn_protobuf",
    "make_push_object_fn_protobuf",
    "message_from_proto",
    "message_to_proto",
    "no_object_id_recompute",
    "public_key_to_bytes",
    "pull_objects",
    "push_objects",
    "register_node_keys",
    "remove_content_from_message",
]
