"""Model on demand: answer prediction requests from a message broker (streaming).

A device reads requests from one stream and publishes the predictions of its global or
personal model to another (``pollinate node stream``; beside training, ``pollinate node
start --stream-broker``)::

    from pollinate.client.broker import connect
    from pollinate.client.streaming import HotModel, StreamConsumer

    broker = connect("redis://127.0.0.1:6379/0", requests="requests",
                     predictions="predictions", dead_letter="requests:dead-letter",
                     group="pollinate-personal", consumer="device-1")
    consumer = StreamConsumer(broker, HotModel(model_dir, "personal"))
    consumer.run(stop_event)      # until stop_event is set; or consumer.step() per batch

Messages (field maps; every value is a string):

- request: ``id`` (any non-empty string, up to 1024 bytes, echoed back) and ``features``: a
  JSON list of F numbers (one row) or a list of such lists (a batch of rows). Other fields
  are ignored.
- prediction: ``id``; ``model`` (``global`` | ``personal``), ``user``, ``round`` and
  ``hash`` (the version of the weights that answered); ``prediction`` (the class label, or
  a JSON list of labels for a batch request); ``probabilities`` (a JSON list of C floats, or
  a list of lists); ``model_ms`` (the forward pass that answered it, shared by the requests
  read together); ``service_ms`` (from reading the request to publishing its answer);
  ``request`` (the request's broker entry id).
- dead letter: ``reason`` (one line), ``id`` (if there was one), ``request`` (entry id) and
  ``payload`` (the request's fields as a JSON object; values over 16 KiB are cut short).

Guarantees (with :class:`~pollinate.client.broker.RedisBroker`): every request is answered
exactly once, by a prediction or a dead letter, also when the consumer is killed and
restarted (it answers its own pending requests first) or another consumer of the group
takes over after ``claim_idle_ms``. A malformed request goes to the dead-letter stream and
the consumer goes on. The model file is checked (one ``stat``) after every read, and a
replaced file is loaded and verified before it answers anything: a request is answered
by one model version. At most ``batch`` requests are held at a time (the broker keeps the
rest), so memory is bounded however far behind the consumer falls.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pollinate.client.broker import Broker, BrokerUnavailable, Delivery, Reply
from pollinate.client.predictor import LoadedModel, PredictError, check_kind, resolve_user
from pollinate.client.store import KINDS, ModelStore

__all__ = [
    "BadRequest",
    "HotModel",
    "StreamConsumer",
    "StreamOptions",
    "StreamStats",
    "model_file",
    "parse_request",
]

log = logging.getLogger("pollinate.streaming")

MAX_ID_BYTES = 1024
PAYLOAD_VALUE_BYTES = 16 * 1024  # per field, in a dead letter

# Only these bytes can occur in a JSON list of (lists of) finite numbers. A `features`
# value made of them is parsed straight into floats; anything else (true, null, "1", NaN,
# objects) takes the slow path that says what is wrong.
_NUMERIC_JSON = re.compile(rb"[\[\]0-9eE.,+\- \t\r\n]*")


class BadRequest(ValueError):
    """A request that cannot be answered; the message (one line) goes to the dead letter."""


@dataclass(frozen=True)
class Request:
    """A parsed, checked request: ``rows`` is (n, F) float32, ``single`` if sent as one row."""

    delivery: Delivery
    request_id: str
    rows: np.ndarray
    single: bool


@dataclass(frozen=True)
class StreamOptions:
    """How a :class:`StreamConsumer` reads.

    Attributes
    ----------
    batch
        Most requests read (and held) at a time: ``XREADGROUP COUNT``.
    block_ms
        Longest wait for the next request; also how often an idle consumer checks for a
        stop request, a newer model file, and requests abandoned by other consumers.
    max_deliveries
        A request delivered more often than this without being answered (it crashed the
        consumer every time?) goes to the dead-letter stream instead of the model.
    claim_idle_ms
        Take over requests another consumer of the group has held unanswered this long.
    max_request_bytes
        Larger ``features`` values go to the dead-letter stream unparsed.
    """

    batch: int = 100
    block_ms: int = 1000
    max_deliveries: int = 5
    claim_idle_ms: int = 60_000
    max_request_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("batch", "block_ms", "max_deliveries", "claim_idle_ms", "max_request_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class StreamStats:
    """Counters of a consumer's work since it started."""

    answered: int = 0  # predictions published
    dead_lettered: int = 0  # dead letters published
    already_answered: int = 0  # requests another delivery had answered first
    recovered: int = 0  # pending requests read again (restart, broker outage, claims)
    batches: int = 0
    largest_batch: int = 0
    swaps: int = 0  # newer model versions taken up
    versions: list[tuple[int, str]] = field(default_factory=list)  # (round, hash) answered with


# ------------------------------------------------------------------------------- models


def model_file(model_dir: str | os.PathLike[str], kind: str, user: str | None) -> Path | None:
    """Where the ``kind`` model lives: ``model_dir`` may be a model store (one folder per
    user) or one user's folder (holding ``global.pt`` / ``personal.pt``).

    Returns None while the store holds no user yet (a device before its first round).

    Raises
    ------
    PredictError
        ``user`` is None and the store holds several users (the message lists them).
    """
    check_kind(kind)
    root = Path(model_dir).expanduser()
    if any((root / f"{k}.pt").is_file() for k in KINDS):
        return root / f"{kind}.pt"  # one user's folder
    store = ModelStore(root)
    if user is None and not store.users():
        return None
    return store.path(resolve_user(store, user), kind)


class HotModel:
    """The latest verified model in one store file, reloaded when the file changes.

    :meth:`current` costs one ``stat`` when nothing changed. A replaced file (a training
    round wrote a newer model: temp file + rename) is loaded and verified (content hash,
    architecture) before it is used; a file that fails to load is logged once and the
    previous model goes on answering.
    """

    def __init__(
        self, model_dir: str | os.PathLike[str], kind: str = "personal", user: str | None = None
    ) -> None:
        self.model_dir = Path(model_dir).expanduser()
        self.kind = check_kind(kind)
        self.user = user
        self.path: Path | None = None
        self.model: LoadedModel | None = None
        self.swaps = 0
        self.problem: str | None = None  # why the newest file is not in use
        self._stamp: tuple[int, int, int] | None = None

    def current(self) -> LoadedModel | None:
        """The model to answer with now; None until the store has one of this kind."""
        if self.path is None:
            try:
                self.path = model_file(self.model_dir, self.kind, self.user)
            except PredictError as e:  # several users appeared: say so, answer nothing
                if self.problem != str(e):
                    self.problem = str(e)
                    log.error("%s", e)
                return None
            if self.path is None:
                return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self.model
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._stamp = stamp
            self._load(self.path)
        return self.model

    def _load(self, path: Path) -> None:
        try:
            model = LoadedModel.from_file(path)
            if model.kind != self.kind:
                raise PredictError(f"{path} holds a {model.kind!r} model, not {self.kind!r}")
        except Exception as e:  # corrupt, truncated, tampered: keep answering with the old one
            self.problem = " ".join(str(e).split()) or type(e).__name__
            keep = f"; still answering with round {self.model.round}" if self.model else ""
            log.warning("could not load the %s model: %s%s", self.kind, self.problem, keep)
            return
        self.problem = None
        old = self.model
        if old is not None and old.version == model.version:
            return
        if old is not None and model.num_features != old.num_features:
            log.warning(
                "the new %s model takes %d features, the old one %d",
                self.kind,
                model.num_features,
                old.num_features,
            )
        self.model = model
        if old is not None:
            self.swaps += 1
        log.info(
            "answering with the %s model round %d (hash %s) of user %r",
            self.kind,
            model.round,
            model.content_hash[:12],
            model.user,
        )


# ----------------------------------------------------------------------------- requests


def parse_request(delivery: Delivery, model: LoadedModel, max_bytes: int = 1_000_000) -> Request:
    """The checked request in ``delivery``, or a :class:`BadRequest` saying what is wrong."""
    fields = delivery.fields
    if fields is None:
        raise BadRequest("the request was deleted from the stream before it was answered")
    request_id = _request_id(fields)
    raw = fields.get("features")
    if raw is None:
        raise BadRequest(f"request {request_id!r} has no 'features' field")
    if len(raw) > max_bytes:
        raise BadRequest(f"features is {len(raw)} bytes; the limit is {max_bytes}")
    if _NUMERIC_JSON.fullmatch(raw):
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise BadRequest(f"features is not valid JSON ({_json_problem(e)})") from None
    else:
        obj = _parse_slowly(raw)
    single = isinstance(obj, list) and bool(obj) and not isinstance(obj[0], list)
    try:
        rows = model.check(obj)  # (n, F) float32, finite
    except PredictError as e:
        raise BadRequest(str(e)) from None
    return Request(delivery, request_id, rows, single)


def _request_id(fields: Mapping[str, bytes]) -> str:
    raw = fields.get("id")
    if raw is None or not raw.strip():
        raise BadRequest("the request has no 'id' field (or it is empty)")
    if len(raw) > MAX_ID_BYTES:
        raise BadRequest(f"id is {len(raw)} bytes; the limit is {MAX_ID_BYTES}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("id is not valid UTF-8") from None


def _parse_slowly(raw: bytes) -> Any:
    """``features`` that holds more than digits: parse it and name the first non-number."""
    try:
        obj = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError is one
        raise BadRequest(f"features is not valid JSON ({_json_problem(e)})") from None
    bad = _first_non_number(obj)
    if bad is not None:
        shown = json.dumps(bad[0])
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise BadRequest(
            "features must be a JSON list of numbers (one row) or a list of such lists "
            f"(rows); found {shown}"
        )
    return obj  # numbers only, some of them NaN or Infinity: the model's check says which


def _first_non_number(obj: Any) -> tuple[Any] | None:
    """``(value,)`` for the first value in nested lists that is not a number, else None."""
    if isinstance(obj, list):
        for item in obj:
            bad = _first_non_number(item)
            if bad is not None:
                return bad
        return None
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return None
    return (obj,)


def _json_problem(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at character {e.pos}"
    return " ".join(str(e).split())[:80]


def dead_letter(delivery: Delivery, reason: str) -> Reply:
    """The dead-letter reply for a request that cannot be answered."""
    fields = delivery.fields or {}
    payload = {name: _shown(value) for name, value in fields.items()}
    request_id = fields.get("id", b"")[:MAX_ID_BYTES].decode("utf-8", "backslashreplace")
    return Reply(
        delivery.entry_id,
        "dead-letter",
        {
            "reason": reason,
            "id": request_id,
            "request": delivery.entry_id,
            "payload": json.dumps(payload, ensure_ascii=False),
        },
    )


def _shown(value: bytes) -> str:
    text = value[:PAYLOAD_VALUE_BYTES].decode("utf-8", "backslashreplace")
    if len(value) > PAYLOAD_VALUE_BYTES:
        text += f"... ({len(value)} bytes in all)"
    return text


# ----------------------------------------------------------------------------- consumer


class StreamConsumer:
    """Answers the requests of one consumer-group member with one model kind.

    Parameters
    ----------
    broker
        Where requests come from and answers go (:class:`~pollinate.client.broker.Broker`).
    model
        The model to answer with; reloaded when its file changes.
    options
        Batch size, waits and limits (:class:`StreamOptions`).
    """

    def __init__(
        self, broker: Broker, model: HotModel, options: StreamOptions | None = None
    ) -> None:
        self.broker = broker
        self.model = model
        self.options = options or StreamOptions()
        self.stats = StreamStats()
        self._recovering = True  # answer our own pending requests before new ones
        self._next_claim = 0.0
        self._waiting_said = False

    def run(self, stop: threading.Event) -> StreamStats:
        """Answer requests until ``stop`` is set (the batch in hand is finished first).

        Broker outages are waited out (retrying with a growing pause, at most 5 s); the
        requests in hand then stay pending on the broker and are answered after it is back.
        """
        pause = 0.1
        outage = False
        while not stop.is_set():
            try:
                if outage:
                    self.broker.ensure_group()
                self.step(stop)
                if outage:
                    log.info("the broker is back")
                outage, pause = False, 0.1
            except BrokerUnavailable as e:
                if not outage:
                    log.warning("the broker is unavailable (%s); retrying", e)
                outage = True
                self._recovering = True
                stop.wait(pause)
                pause = min(pause * 2, 5.0)
        return self.stats

    def step(self, stop: threading.Event | None = None) -> int:
        """Read one batch (waiting up to ``block_ms``) and answer it; requests answered."""
        if self.model.current() is None:
            self._say_waiting()
            if stop is not None:
                stop.wait(self.options.block_ms / 1000)
            else:
                time.sleep(self.options.block_ms / 1000)
            return 0
        if not self._recovering:
            # After our own pending requests: XAUTOCLAIM also drops pending requests that
            # were deleted from the stream, which we answer with a dead letter first.
            self._claim_abandoned()
        if self._recovering:
            batch = self.broker.pending(self.options.batch)
            if not batch:
                self._recovering = False
                return 0
            self.stats.recovered += len(batch)
        else:
            batch = self.broker.read(self.options.batch, self.options.block_ms)
            if not batch:
                return 0
        t_read = time.perf_counter()
        model = self.model.current()  # a newer file since the read started is used now
        assert model is not None  # a loaded model is never dropped
        replies = self.answer(batch, model, t_read)
        published = self.broker.answer(replies)
        self._count(batch, replies, published, model)
        return len(batch)

    def answer(self, batch: Sequence[Delivery], model: LoadedModel, t_read: float) -> list[Reply]:
        """The reply to every delivery of ``batch``, in order (predictions or dead letters)."""
        replies: dict[int, Reply] = {}
        good: list[tuple[int, Request]] = []
        for i, delivery in enumerate(batch):
            if delivery.deliveries > self.options.max_deliveries:
                replies[i] = dead_letter(
                    delivery,
                    f"delivered {delivery.deliveries} times without being answered (did "
                    "answering it stop the consumer each time?)",
                )
                continue
            try:
                good.append((i, parse_request(delivery, model, self.options.max_request_bytes)))
            except BadRequest as e:
                replies[i] = dead_letter(delivery, str(e))
        if good:
            replies.update(self._predict(good, model, t_read))
        return [replies[i] for i in range(len(batch))]

    def _predict(
        self, good: list[tuple[int, Request]], model: LoadedModel, t_read: float
    ) -> dict[int, Reply]:
        x = np.concatenate([r.rows for _, r in good]) if len(good) > 1 else good[0][1].rows
        t0 = time.perf_counter()
        try:
            proba = model.predict_proba(x)  # (N, C), one forward pass for the whole batch
        except Exception:  # a bug, not bad input: answer one by one to isolate the culprit
            if len(good) == 1:
                log.exception("predicting request %r failed", good[0][1].request_id)
                i, r = good[0]
                return {i: dead_letter(r.delivery, "internal error while predicting it")}
            out: dict[int, Reply] = {}
            for item in good:
                out.update(self._predict([item], model, t_read))
            return out
        model_ms = f"{(time.perf_counter() - t0) * 1000:.3f}"
        labels = proba.argmax(axis=1)  # (N,)
        service_ms = f"{(time.perf_counter() - t_read) * 1000:.3f}"
        common = {
            "model": model.kind,
            "user": model.user or "",
            "round": str(model.round),
            "hash": model.content_hash,
        }
        out = {}
        start = 0
        for i, r in good:
            n = len(r.rows)
            p, y = proba[start : start + n], labels[start : start + n]
            start += n
            out[i] = Reply(
                r.delivery.entry_id,
                "predictions",
                {
                    "id": r.request_id,
                    **common,
                    "prediction": str(int(y[0])) if r.single else json.dumps(y.tolist()),
                    "probabilities": json.dumps(p[0].tolist() if r.single else p.tolist()),
                    "model_ms": model_ms,
                    "service_ms": service_ms,
                    "request": r.delivery.entry_id,
                },
            )
        return out

    def _claim_abandoned(self) -> None:
        """Now and then, take over requests that a dead consumer of the group left pending."""
        now = time.monotonic()
        if now < self._next_claim:
            return
        self._next_claim = now + self.options.claim_idle_ms / 2000
        claimed = self.broker.claim_idle(self.options.claim_idle_ms, self.options.batch)
        if claimed:
            log.info("took over %d requests another consumer left unanswered", claimed)
            self._recovering = True

    def _count(
        self,
        batch: Sequence[Delivery],
        replies: list[Reply],
        published: list[bool],
        model: LoadedModel,
    ) -> None:
        s = self.stats
        s.batches += 1
        s.largest_batch = max(s.largest_batch, len(batch))
        s.swaps = self.model.swaps
        for reply, done in zip(replies, published, strict=True):
            if not done:
                s.already_answered += 1
            elif reply.target == "dead-letter":
                s.dead_lettered += 1
            else:
                s.answered += 1
        version = (model.round, model.content_hash)
        if not s.versions or s.versions[-1] != version:
            s.versions.append(version)

    def _say_waiting(self) -> None:
        if self._waiting_said:
            return
        self._waiting_said = True
        where = self.model.model_dir
        who = f" of user {self.model.user!r}" if self.model.user else ""
        log.info(
            "waiting for the %s model%s in %s (a device writes it after its first round); "
            "requests wait in the stream meanwhile",
            self.model.kind,
            who,
            where,
        )
