"""Message brokers for streaming predictions: a small interface and its Redis Streams version.

The streaming consumer (:mod:`pollinate.client.streaming`) only needs five things from a
broker, the :class:`Broker` protocol:

- ``ensure_group()``: the consumer group exists (created on first start);
- ``read(count, block_ms)``: up to ``count`` new requests for this consumer, waiting at most
  ``block_ms`` for the first; they stay *pending* (delivered, unanswered) until answered;
- ``pending(count)``: this consumer's own pending requests, oldest first, with how often
  each was delivered: what a restarted consumer answers before reading new ones;
- ``claim_idle(min_idle_ms, count)``: take over requests that other consumers of the group
  took and left unanswered for ``min_idle_ms`` (a device that died for good);
- ``answer(replies)``: publish each reply (a prediction or a dead letter) *and* acknowledge
  its request in one atomic step, skipping requests some consumer already answered;
- ``close()``.

:class:`RedisBroker` implements it with Redis Streams. Why Redis (and not MQTT): a stream
keeps every request until it is trimmed; a consumer group remembers which ones each consumer
took and did not acknowledge (the pending entries list, ``XPENDING``); a restarted consumer
reads its own pending entries again (``XREADGROUP ... 0``), and ``XAUTOCLAIM`` hands a dead
consumer's to another. ``answer`` runs as one Lua script, which Redis executes atomically
like ``MULTI``/``EXEC``, but which can also *branch*: it publishes a reply only where
``XACK`` reports that it acknowledged the request just now. So a consumer killed at any
point either answered a request (published and acknowledged) or did not (neither), and two
consumers that both hold a request (one claimed it from the other, which was slow, not dead)
cannot both answer it. MQTT 3.1.1/5 brokers have no equivalent: QoS 1 redelivers only
to the same persistent session, a QoS-1 message is acknowledged before the application's
reply is published (no atomic publish-and-ack), shared subscriptions (MQTT 5) are
broker-specific about unacknowledged messages when a member disconnects, and there is no
replay of a topic's history. An MQTT broker can implement this protocol later with weaker,
documented guarantees (at-least-once with duplicate replies possible).

Field names and values are bytes on the wire; a request's fields come back as
``dict[str, bytes]`` (names decoded as UTF-8, values raw), replies take ``str`` values.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pollinate.text import one_line

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Delivery",
    "RedisBroker",
    "Reply",
    "connect",
]

Target = Literal["predictions", "dead-letter"]


class BrokerError(ValueError):
    """A broker URL or stream name that cannot work; one line saying how to fix it."""


class BrokerUnavailable(ConnectionError):
    """The broker did not answer (down, restarting, network); retry later."""


@dataclass(frozen=True)
class Delivery:
    """One request as the broker delivered it.

    Attributes
    ----------
    entry_id
        The broker's id of the message (Redis: ``<ms>-<seq>``).
    fields
        The message's fields, or None when the message was deleted from the stream (trimmed)
        after it was delivered and before it was answered.
    deliveries
        How many times it has been delivered, this time included (1 for a new message).
    """

    entry_id: str
    fields: Mapping[str, bytes] | None
    deliveries: int = 1


@dataclass(frozen=True)
class Reply:
    """What to publish for one request, and where; ``answer`` acknowledges the request too."""

    entry_id: str
    target: Target
    fields: Mapping[str, str]


class Broker(Protocol):
    """Where prediction requests come from and predictions go (see the module docstring)."""

    def ensure_group(self) -> None: ...

    def read(self, count: int, block_ms: int) -> list[Delivery]: ...

    def pending(self, count: int) -> list[Delivery]: ...

    def claim_idle(self, min_idle_ms: int, count: int) -> int: ...

    def answer(self, replies: Sequence[Reply]) -> list[bool]: ...

    def close(self) -> None: ...


# Publish-and-acknowledge, atomically, and only for requests not acknowledged before.
# KEYS: requests, predictions, dead-letter. ARGV: group, maxlen (0: none), then per reply:
# entry id, target (2 predictions, 3 dead letter), field count n, n name/value pairs.
_ANSWER = """
local group = ARGV[1]
local maxlen = tonumber(ARGV[2])
local published = {}
local i = 3
while i <= #ARGV do
  local entry, target, n = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  if redis.call('XACK', KEYS[1], group, entry) == 1 then
    local args = {KEYS[target]}
    if maxlen > 0 then
      args[2] = 'MAXLEN'; args[3] = '~'; args[4] = maxlen
    end
    args[#args + 1] = '*'
    for j = i, i + 2 * n - 1 do
      args[#args + 1] = ARGV[j]
    end
    redis.call('XADD', unpack(args))
    published[#published + 1] = 1
  else
    published[#published + 1] = 0
  end
  i = i + 2 * n
end
return published
"""

_TARGET_KEY = {"predictions": 2, "dead-letter": 3}


class RedisBroker:
    """The :class:`Broker` protocol over Redis Streams (Redis 6.2 or newer).

    Parameters
    ----------
    url
        ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) or
        ``unix:///path/redis.sock``.
    requests, predictions, dead_letter
        Stream names (Redis keys).
    group, consumer
        Consumer group and this consumer's name in it; a restarted consumer must keep its
        name to get its own pending requests back.
    maxlen
        Keep about this many entries in the predictions and dead-letter streams
        (``XADD MAXLEN ~``); 0 keeps everything.
    timeout
        Seconds to wait for the broker on any call other than a blocking read.
    """

    def __init__(
        self,
        url: str,
        *,
        requests: str,
        predictions: str,
        dead_letter: str,
        group: str,
        consumer: str,
        maxlen: int = 0,
        timeout: float = 10.0,
    ) -> None:
        import redis

        names = {"requests": requests, "predictions": predictions, "dead-letter": dead_letter}
        for what, name in {**names, "group": group, "consumer": consumer}.items():
            if not isinstance(name, str) or not name.strip():
                raise BrokerError(f"the {what} name must be a non-empty string, got {name!r}")
        if len(set(names.values())) < 3:
            raise BrokerError(
                f"the requests, predictions and dead-letter streams must be three different "
                f"keys, got {requests!r}, {predictions!r}, {dead_letter!r}"
            )
        if maxlen < 0:
            raise BrokerError(f"maxlen must be >= 0 (0: keep every entry), got {maxlen}")
        self._redis_module = redis
        try:
            # RESP2 whatever the client's default: the reply shapes below are RESP2's.
            self.client = redis.Redis.from_url(
                url, protocol=2, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        except ValueError as e:
            raise BrokerError(
                f"bad broker URL {url!r} ({e}); use redis://HOST:PORT/DB, e.g. "
                "redis://127.0.0.1:6379/0"
            ) from None
        self.url = url
        self.requests, self.predictions, self.dead_letter = requests, predictions, dead_letter
        self.group, self.consumer, self.maxlen = group, consumer, maxlen
        self.timeout = timeout
        self._answer = self.client.register_script(_ANSWER)

    # ------------------------------------------------------------------- protocol

    def ensure_group(self) -> None:
        """Create the group (and the stream) unless they exist; it starts at the stream's
        first entry, so requests sent before the device first started are answered too."""
        with self._errors():
            try:
                self.client.xgroup_create(self.requests, self.group, id="0", mkstream=True)
            except self._redis_module.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def read(self, count: int, block_ms: int) -> list[Delivery]:
        """Up to ``count`` requests never delivered to this group; blocks up to ``block_ms``."""
        with self._errors(read_timeout=block_ms / 1000):
            reply = self.client.xreadgroup(
                self.group, self.consumer, {self.requests: ">"}, count=count, block=block_ms
            )
        return [Delivery(_text(eid), _fields(raw)) for eid, raw in _entries(reply)]

    def pending(self, count: int) -> list[Delivery]:
        """This consumer's oldest ``count`` unanswered requests (delivery counts included)."""
        with self._errors():
            counts = {
                _text(p["message_id"]): int(p["times_delivered"])  # type: ignore[arg-type]
                for p in self.client.xpending_range(
                    self.requests, self.group, "-", "+", count, consumername=self.consumer
                )
            }
            if not counts:
                return []
            # Reading the history delivers again: the counter goes up by one (Redis does
            # that for XREADGROUP with an id other than ">").
            reply = self.client.xreadgroup(
                self.group, self.consumer, {self.requests: "0"}, count=count
            )
        return [
            Delivery(eid, _fields(raw), counts.get(eid, 0) + 1)
            for eid, raw in ((_text(e), r) for e, r in _entries(reply))
        ]

    def claim_idle(self, min_idle_ms: int, count: int) -> int:
        """Move up to ``count`` requests other consumers left pending for ``min_idle_ms``
        into this consumer's pending list (``pending`` then returns them); how many."""
        with self._errors():
            reply = self.client.xautoclaim(
                self.requests,
                self.group,
                self.consumer,
                min_idle_time=min_idle_ms,
                start_id="0-0",
                count=count,
                justid=True,
            )
        return len(reply or [])  # redis-py returns JUSTID's claimed ids only

    def answer(self, replies: Sequence[Reply]) -> list[bool]:
        """Publish and acknowledge ``replies`` atomically; for each, whether it was
        published (False: its request had been answered already, by this or another
        consumer)."""
        if not replies:
            return []
        args: list[str | int] = [self.group, self.maxlen]
        for r in replies:
            args += [r.entry_id, _TARGET_KEY[r.target], len(r.fields)]
            for name, value in r.fields.items():
                args += [name, value]
        with self._errors():
            flags = self._answer(
                keys=[self.requests, self.predictions, self.dead_letter], args=args
            )
        return [bool(f) for f in flags]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    # ------------------------------------------------------------------ helpers

    def check(self) -> None:
        """Reach the broker now; a one-line :class:`BrokerError` if it cannot be reached."""
        try:
            with self._errors():
                self.client.ping()
            self.ensure_group()
        except BrokerUnavailable as e:
            raise BrokerError(
                f"cannot reach the broker at {redacted_url(self.url)} ({e}); is redis-server "
                "running there?"
            ) from None
        except self._redis_module.RedisError as e:
            raise BrokerError(
                f"the broker at {redacted_url(self.url)} refused: {one_line(e)}"
            ) from None

    @contextlib.contextmanager
    def _errors(self, read_timeout: float | None = None) -> Any:
        """Connection trouble becomes :class:`BrokerUnavailable`; a vanished group (the
        stream was deleted, or a broker without persistence restarted) is recreated."""
        redis = self._redis_module
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, TimeoutError, OSError) as e:
            raise BrokerUnavailable(one_line(e)) from None
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):
                self.ensure_group()
                raise BrokerUnavailable(
                    f"the consumer group {self.group!r} of {self.requests!r} was gone; recreated it"
                ) from None
            raise


def connect(
    url: str,
    *,
    requests: str,
    predictions: str,
    dead_letter: str,
    group: str,
    consumer: str,
    maxlen: int = 0,
) -> RedisBroker:
    """The broker for ``url`` (only ``redis://``, ``rediss://`` and ``unix://`` so far)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        raise BrokerError(
            f"unsupported broker URL {url!r}: use redis://HOST:PORT/DB (e.g. "
            "redis://127.0.0.1:6379/0), rediss:// for TLS, or unix:///path/redis.sock"
        )
    return RedisBroker(
        url,
        requests=requests,
        predictions=predictions,
        dead_letter=dead_letter,
        group=group,
        consumer=consumer,
        maxlen=maxlen,
    )


def default_consumer() -> str:
    """This machine's host name: stable across restarts, as the consumer name must be."""
    return socket.gethostname() or "device"


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """The (id, fields) pairs of an XREADGROUP reply on one stream (RESP2 shape)."""
    if not reply:
        return []
    _stream, entries = reply[0]
    return list(entries)


def _fields(raw: Any) -> dict[str, bytes] | None:
    if not raw:  # deleted from the stream while pending (XADD needs at least one field)
        return None
    return {_text(k): v if isinstance(v, bytes) else str(v).encode() for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def redacted_url(url: str) -> str:
    """``url`` without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://***@{host}"
