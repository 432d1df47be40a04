"""Node authentication on the SuperLink: each signature verified once, not on every request.

Why: Flower 1.42's Fleet HTTP API authenticates every device request
(``flwr.superlink.routers.fleet.node_auth.authenticate_node``): it parses the key in the
request's public-key header (``bytes_to_public_key``) and verifies the ECDSA signature of
its timestamp header (``verify_signature(public_key, message, signature)``). With P-384
node keys that is ~0.57 ms of the SuperLink's CPU per request, about a quarter of all it
spends on one (~2 ms with 10 devices). A device signs a timestamp once and sends it with
every request for up to a minute
(:class:`~pollinate.flower_compat.fleet.ReusedSignatureInterceptor`), so most requests
carry a signature the SuperLink has already checked.

Both functions are pure: the same key bytes give the same key, and the same key, message
and signature verify the same way every time. So Pollinate remembers parsed keys and the
(key, message, signature) triples that verified, and answers those from memory. Nothing
else in ``authenticate_node`` changes: the timestamp's age is checked on every request
before any signature is looked at (an expired signature is refused as before), then the
key's node id. A signature that fails is never remembered: it is verified, and refused,
every time. Stock Flower already accepts a replayed signature within the timestamp
window, so remembering a good one accepts nothing stock would refuse.

Stock: every request verified; correct, only slower. A changed signature of either
function falls back to that with a one-line warning.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cryptography.hazmat.primitives import serialization

from pollinate.flower_compat._core import mark_engaged, swapped_together
from pollinate.flower_compat._names import flower_module

MODULE = "flwr.superlink.routers.fleet.node_auth"
PARSE = f"{MODULE}.bytes_to_public_key"
VERIFY = f"{MODULE}.verify_signature"
PARSE_EXPECT = ("public_key_bytes",)
VERIFY_EXPECT = ("public_key", "message", "signature")
# A device reuses a signature for a minute and Flower accepts it for ~5: 1,000 devices
# make ~5,000 live triples. Beyond the bound the oldest are forgotten (verified again).
MAX_ENTRIES = 65_536


class _Remembered:
    """A bounded, thread-safe memo (``authenticate_node`` runs in a thread pool)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _point(public_key: Any) -> bytes:
    """The key itself, as bytes (the memo's key: never an object's identity)."""
    return bytes(
        public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    )


def remembering(
    parse: Callable[[bytes], Any],
    verify: Callable[[Any, bytes, bytes], bool],
    limit: int = MAX_ENTRIES,
) -> tuple[Callable[[bytes], Any], Callable[[Any, bytes, bytes], bool]]:
    """``parse`` and ``verify`` answering what they answered before from memory.

    Only successes are remembered: a failed verification (or a key that does not parse)
    runs, and fails, again each time.
    """
    keys = _Remembered(limit)
    verified = _Remembered(limit)

    def parse_remembered(public_key_bytes: bytes) -> Any:
        mark_engaged(PARSE)
        key = keys.get(bytes(public_key_bytes))
        if key is None:
            key = parse(public_key_bytes)
            keys.put(bytes(public_key_bytes), key)
        return key

    def verify_remembered(public_key: Any, message: bytes, signature: bytes) -> bool:
        mark_engaged(VERIFY)
        triple = (_point(public_key), bytes(message), bytes(signature))
        if verified.get(triple):
            return True
        ok = bool(verify(public_key, message, signature))
        if ok:
            verified.put(triple, True)
        return ok

    return parse_remembered, verify_remembered


@contextmanager
def node_signatures_remembered(limit: int = MAX_ENTRIES) -> Iterator[bool]:
    """Inside the block the SuperLink verifies each node signature once. Yields whether
    both functions are replaced (False: stock, after a one-line warning)."""
    node_auth = flower_module(MODULE)
    parse, verify = remembering(node_auth.bytes_to_public_key, node_auth.verify_signature, limit)
    why = "verifying a reused P-384 signature on every request costs ~0.57 ms of CPU"
    with swapped_together(
        node_auth,
        [("bytes_to_public_key", parse, PARSE_EXPECT), ("verify_signature", verify, VERIFY_EXPECT)],
        why=why,
    ) as on:
        yield on


__all__ = ["MAX_ENTRIES", "node_signatures_remembered", "remembering"]
