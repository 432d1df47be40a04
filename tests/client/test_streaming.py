"""Streaming predictions through a real redis-server: answers, dead letters, hot swap,
recovery of pending requests, answer-once, backpressure."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from pollinate.client.broker import BrokerError, Delivery, RedisBroker, Reply, connect
from pollinate.client.predictor import LoadedModel, PredictError
from pollinate.client.store import ModelStore
from pollinate.client.streaming import (
    HotModel,
    StreamConsumer,
    StreamOptions,
    model_file,
)
from pollinate.models import ModelArtifact, create_model

F, C = 8, 3
REQ, PRED, DEAD, GROUP = "requests", "predictions", "requests:dead-letter", "g"


def save(root: Path, round: int, seed: int, kind: str = "personal") -> ModelArtifact:
    model = create_model("mlp", in_features=F, num_classes=C, hidden=16, seed=seed)
    return ModelStore(root).save(
        "alice", kind, spec=model.spec, state_dict=model.state_dict(), round=round
    )


def make_broker(url: str, consumer: str = "c1", **kw: Any) -> RedisBroker:
    broker = connect(
        url,
        requests=REQ,
        predictions=PRED,
        dead_letter=DEAD,
        group=GROUP,
        consumer=consumer,
        **kw,
    )
    broker.ensure_group()
    return broker


def entries(r: Any, stream: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in r.xrange(stream, "-", "+")
    ]


def send(r: Any, n: int, start: int = 0, seed: int = 0) -> dict[str, list[float]]:
    rows = np.random.default_rng(seed).normal(size=(n, F)).round(4)
    sent = {}
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        rid = f"r{start + i}"
        sent[rid] = rows[i].tolist()
        pipe.xadd(REQ, {"id": rid, "features": json.dumps(sent[rid])})
    pipe.execute()
    return sent


def drain(consumer: StreamConsumer, until: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out; stats {consumer.stats}"
        consumer.step()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """As ``node stream`` runs (``--threads 1``): tiny batches on a busy machine are far
    slower with torch's default of one thread per core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def r(redis_url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    save(root, round=1, seed=1)
    return root


def fast(**kw: Any) -> StreamOptions:
    return StreamOptions(block_ms=50, **kw)


# ------------------------------------------------------------------------- answering


def test_predictions_match_the_model_and_carry_its_version(
    redis_url: str, r: Any, store: Path
) -> None:
    sent = send(r, 5)
    batch = np.random.default_rng(9).normal(size=(3, F)).round(3).tolist()
    r.xadd(REQ, {"id": "b", "features": json.dumps(batch), "trace": "ignored"})
    consumer = StreamConsumer(make_broker(redis_url), HotModel(store, "personal"), fast())
    drain(consumer, lambda: r.xlen(PRED) == 6)

    model = LoadedModel.from_file(ModelStore(store).path("alice", "personal"))
    out = {p["id"]: p for p in entries(r, PRED)}
    assert set(out) == {*sent, "b"}
    for rid, row in sent.items():
        p = out[rid]
        want = model.predict_proba([row])[0]
        assert json.loads(p["probabilities"]) == pytest.approx(want.tolist(), abs=1e-6)
        assert int(p["prediction"]) == int(want.argmax())
        assert (p["model"], p["user"], int(p["round"]), p["hash"]) == (
            "personal",
            "alice",
            1,
            model.content_hash,
        )
        assert float(p["model_ms"]) >= 0 and float(p["service_ms"]) >= float(p["model_ms"])
    # A batch request gets lists back, one entry per row.
    assert json.loads(out["b"]["prediction"]) == model.predict(batch).tolist()
    assert np.allclose(json.loads(out["b"]["probabilities"]), model.predict_proba(batch))
    assert r.xpending(REQ, GROUP)["pending"] == 0  # every request acknowledged
    assert consumer.stats.answered == 6 and consumer.stats.dead_lettered == 0


MALFORMED: list[tuple[dict[str, Any], str]] = [
    ({"features": "[1,2,3,4,5,6,7,8]"}, "no 'id'"),
    ({"id": "", "features": "[1,2,3,4,5,6,7,8]"}, "no 'id'"),
    ({"id": b"\xff\xfe", "features": "[1,2,3,4,5,6,7,8]"}, "UTF-8"),
    ({"id": "x" * 2000, "features": "[1]"}, "limit is 1024"),
    ({"id": "m"}, "no 'features'"),
    ({"id": "m", "features": "[1,2,3"}, "not valid JSON"),
    ({"id": "m", "features": b"\xff[1]"}, "not valid JSON"),
    ({"id": "m", "features": "[1,2,3]"}, "rows have 3 features; the personal model expects 8"),
    ({"id": "m", "features": "[[1,2,3,4,5,6,7,8],[1,2]]"}, "rows have different lengths"),
    ({"id": "m", "features": "[1,2,3,NaN,5,6,7,8]"}, "feature 3 is NaN"),
    ({"id": "m", "features": "[1,2,3,4,5,6,7,Infinity]"}, "feature 7 is infinite"),
    ({"id": "m", "features": "[1,2,3,4,5,6,7,1e400]"}, "feature 7 is infinite"),
    ({"id": "m", "features": "[1,2,3,4,5,6,7,1e39]"}, "beyond float32 range"),
    ({"id": "m", "features": '[1,2,3,4,5,6,7,"8"]'}, 'found "8"'),
    ({"id": "m", "features": "[1,2,3,4,5,6,7,true]"}, "found true"),
    ({"id": "m", "features": "[1,2,3,4,5,6,7,null]"}, "found null"),
    ({"id": "m", "features": '{"a": 1}'}, 'found {"a": 1}'),
    ({"id": "m", "features": "[]"}, "no rows"),
    ({"id": "m", "features": "7"}, "shape"),
    ({"id": "m", "features": "[[[1]]]"}, "shape"),
    ({"id": "m", "features": "[" + "1," * 600_000 + "1]"}, "limit is 1000000"),
]


@pytest.mark.parametrize(("fields", "reason"), MALFORMED, ids=[m[1] for m in MALFORMED])
def test_a_malformed_request_is_dead_lettered_with_its_reason(
    redis_url: str, r: Any, store: Path, fields: dict[str, Any], reason: str
) -> None:
    entry = r.xadd(REQ, fields).decode()
    r.xadd(REQ, {"id": "good", "features": json.dumps([0.5] * F)})
    consumer = StreamConsumer(make_broker(redis_url), HotModel(store), fast())
    drain(consumer, lambda: r.xlen(PRED) == 1)

    [dead] = entries(r, DEAD)
    assert reason in dead["reason"] and "\n" not in dead["reason"], dead["reason"]
    assert dead["request"] == entry
    payload = json.loads(dead["payload"])
    assert set(payload) == set(fields)
    assert [p["id"] for p in entries(r, PRED)] == ["good"]
    assert r.xpending(REQ, GROUP)["pending"] == 0


def test_a_thousand_malformed_requests_do_not_stop_the_good_ones(
    redis_url: str, r: Any, store: Path
) -> None:
    rng = np.random.default_rng(0)
    bad_kinds = [f for f, _ in MALFORMED[:-1]]  # not the 1 MB one, 1,000 times
    pipe = r.pipeline(transaction=False)
    good, bad = [], []
    for i in range(1300):
        if i % 13 < 10:
            fields = dict(bad_kinds[int(rng.integers(len(bad_kinds)))])
            if fields.get("id") == "m":
                fields["id"] = f"bad{i}"
            bad.append(i)
        else:
            fields = {"id": f"good{i}", "features": json.dumps(rng.normal(size=F).tolist())}
            good.append(f"good{i}")
        pipe.xadd(REQ, fields)
    pipe.execute()
    assert len(bad) == 1000

    consumer = StreamConsumer(make_broker(redis_url), HotModel(store), fast(batch=64))
    drain(consumer, lambda: r.xlen(PRED) + r.xlen(DEAD) == 1300)
    assert [p["id"] for p in entries(r, PRED)] == good  # in order, each once
    dead = entries(r, DEAD)
    assert len(dead) == 1000 and all(d["reason"] for d in dead)
    assert consumer.stats.dead_lettered == 1000 and consumer.stats.answered == 300
    assert r.xpending(REQ, GROUP)["pending"] == 0


# ------------------------------------------------------------------------- hot swap


def test_a_replaced_model_file_is_used_from_the_next_batch_on(
    redis_url: str, r: Any, store: Path
) -> None:
    consumer = StreamConsumer(make_broker(redis_url), HotModel(store), fast(batch=10))
    send(r, 10)
    drain(consumer, lambda: r.xlen(PRED) == 10)
    newer = save(store, round=2, seed=2)  # what a training round does: temp file + rename
    send(r, 10, start=10)
    drain(consumer, lambda: r.xlen(PRED) == 20)

    rounds = [(p["round"], p["hash"]) for p in entries(r, PRED)]
    assert {h for rd, h in rounds[10:]} == {newer.content_hash} and rounds[10][0] == "2"
    assert len(set(rounds[:10])) == 1 and rounds[0][0] == "1"
    assert consumer.stats.swaps == 1 and len(consumer.stats.versions) == 2


def test_a_corrupt_model_file_keeps_the_previous_model_answering(
    redis_url: str, r: Any, store: Path
) -> None:
    hot = HotModel(store)
    consumer = StreamConsumer(make_broker(redis_url), hot, fast())
    send(r, 3)
    drain(consumer, lambda: r.xlen(PRED) == 3)
    path = ModelStore(store).path("alice", "personal")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    send(r, 3, start=3)
    drain(consumer, lambda: r.xlen(PRED) == 6)
    assert {p["round"] for p in entries(r, PRED)} == {"1"}
    assert hot.problem is not None


def test_requests_wait_until_the_first_model_is_stored(
    redis_url: str, r: Any, tmp_path: Path
) -> None:
    root = tmp_path / "empty"
    consumer = StreamConsumer(make_broker(redis_url), HotModel(root), fast())
    send(r, 4)
    for _ in range(3):
        assert consumer.step() == 0  # nothing taken off the stream without a model
    assert r.xpending(REQ, GROUP)["pending"] == 0 and r.xlen(PRED) == 0
    save(root, round=1, seed=1)
    drain(consumer, lambda: r.xlen(PRED) == 4)


def test_model_file_takes_a_store_or_one_users_folder(store: Path, tmp_path: Path) -> None:
    user_folder = ModelStore(store).path("alice", "personal").parent
    assert model_file(store, "personal", None) == user_folder / "personal.pt"
    assert model_file(user_folder, "global", None) == user_folder / "global.pt"
    assert model_file(tmp_path / "none-yet", "personal", None) is None
    ModelStore(store).save(
        "bob",
        "personal",
        spec=create_model("mlp", in_features=F, num_classes=C).spec,
        state_dict=create_model("mlp", in_features=F, num_classes=C).state_dict(),
        round=1,
    )
    with pytest.raises(PredictError, match="holds 2 users"):
        model_file(store, "personal", None)
    assert model_file(store, "personal", "bob") == ModelStore(store).path("bob", "personal")


# ------------------------------------------------------------------ at least / at most once


def test_a_restarted_consumer_answers_what_it_had_taken(
    redis_url: str, r: Any, store: Path
) -> None:
    sent = send(r, 30)
    dead = make_broker(redis_url, "device")
    taken = dead.read(20, 10)  # then the process died before answering
    assert len(taken) == 20 and r.xpending(REQ, GROUP)["pending"] == 20

    consumer = StreamConsumer(make_broker(redis_url, "device"), HotModel(store), fast(batch=8))
    drain(consumer, lambda: r.xlen(PRED) == 30)
    ids = [p["id"] for p in entries(r, PRED)]
    assert sorted(ids) == sorted(sent) and len(set(ids)) == 30
    assert consumer.stats.recovered == 20
    assert r.xpending(REQ, GROUP)["pending"] == 0


def test_two_consumers_holding_one_request_answer_it_once(
    redis_url: str, r: Any, store: Path
) -> None:
    send(r, 5)
    slow = make_broker(redis_url, "slow")
    held = slow.read(5, 10)
    # Another consumer takes them over (the first looked dead) and answers.
    other = StreamConsumer(make_broker(redis_url, "other"), HotModel(store), fast(claim_idle_ms=1))
    time.sleep(0.01)
    drain(other, lambda: r.xlen(PRED) == 5)
    # The slow one comes back and answers the same requests: nothing is published twice.
    model = HotModel(store).current()
    assert model is not None
    late = StreamConsumer(slow, HotModel(store), fast())
    replies = late.answer(held, model, time.perf_counter())
    assert slow.answer(replies) == [False] * 5
    assert r.xlen(PRED) == 5


def test_answer_publishes_and_acknowledges_together(redis_url: str, r: Any) -> None:
    r.xadd(REQ, {"id": "a", "features": "[1]"})
    broker = make_broker(redis_url, maxlen=3)
    [d] = broker.read(1, 10)
    reply = Reply(d.entry_id, "predictions", {"id": "a", "prediction": "1"})
    assert broker.answer([reply]) == [True]
    assert broker.answer([reply]) == [False]  # acknowledged already: not published again
    assert r.xlen(PRED) == 1 and r.xpending(REQ, GROUP)["pending"] == 0


def test_a_request_that_keeps_killing_the_consumer_is_dead_lettered(
    redis_url: str, r: Any, store: Path
) -> None:
    send(r, 1)
    crashing = make_broker(redis_url, "device")
    crashing.read(10, 10)  # delivered once, and the consumer died answering it,
    crashing.pending(10)  # and again after each of two restarts
    crashing.pending(10)
    consumer = StreamConsumer(
        make_broker(redis_url, "device"), HotModel(store), fast(max_deliveries=3)
    )
    drain(consumer, lambda: r.xlen(DEAD) == 1)
    assert "delivered 4 times" in entries(r, DEAD)[0]["reason"]
    assert r.xlen(PRED) == 0


def test_a_request_trimmed_while_pending_is_dead_lettered(
    redis_url: str, r: Any, store: Path
) -> None:
    send(r, 2)
    make_broker(redis_url, "device").read(2, 10)
    r.xtrim(REQ, maxlen=0)
    consumer = StreamConsumer(make_broker(redis_url, "device"), HotModel(store), fast())
    drain(consumer, lambda: r.xlen(DEAD) == 2)
    assert all("deleted from the stream" in d["reason"] for d in entries(r, DEAD))


# ------------------------------------------------------------------------ backpressure


class CountingBroker:
    """The real broker, noting how many requests are pending on the server at each answer."""

    def __init__(self, inner: RedisBroker, r: Any) -> None:
        self.inner, self.r = inner, r
        self.read_sizes: list[int] = []
        self.pending_at_answer: list[int] = []

    def read(self, count: int, block_ms: int) -> list[Delivery]:
        got = self.inner.read(count, block_ms)
        self.read_sizes.append(len(got))
        return got

    def answer(self, replies: Sequence[Reply]) -> list[bool]:
        self.pending_at_answer.append(int(self.r.xpending(REQ, GROUP)["pending"]))
        return self.inner.answer(replies)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_large_backlog_is_taken_a_bounded_batch_at_a_time(
    redis_url: str, r: Any, store: Path
) -> None:
    send(r, 5000)
    broker = CountingBroker(make_broker(redis_url), r)
    consumer = StreamConsumer(broker, HotModel(store), fast(batch=50))
    drain(consumer, lambda: r.xlen(PRED) == 5000, timeout=60)
    # Never more than one batch off the stream and unanswered: the rest waits in Redis.
    assert max(broker.pending_at_answer) <= 50 and max(broker.read_sizes) == 50
    assert consumer.stats.largest_batch == 50 and consumer.stats.batches >= 100
    assert r.xpending(REQ, GROUP)["pending"] == 0


def test_maxlen_caps_the_predictions_stream(redis_url: str, r: Any, store: Path) -> None:
    send(r, 2000)
    consumer = StreamConsumer(make_broker(redis_url, maxlen=100), HotModel(store), fast())
    drain(consumer, lambda: consumer.stats.answered == 2000)
    assert 100 <= r.xlen(PRED) < 400  # approximate trimming (MAXLEN ~) in whole nodes


# ------------------------------------------------------------------- running, outages


def test_run_stops_when_asked_and_survives_a_broker_restart(tmp_path: Path, store: Path) -> None:
    from redisserver import RedisServer

    with RedisServer(tmp_path / "redis-data", appendonly=True) as server:
        r: Any = redis.Redis.from_url(server.url)
        consumer = StreamConsumer(make_broker(server.url), HotModel(store), fast())
        stop = threading.Event()
        thread = threading.Thread(target=consumer.run, args=(stop,))
        thread.start()
        try:
            send(r, 50)
            deadline = time.monotonic() + 20
            while r.xlen(PRED) < 50:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            server.kill()  # the broker dies (its append-only file has every write)
            time.sleep(0.3)
            server.start()
            r = redis.Redis.from_url(server.url)
            send(r, 50, start=50)
            while r.xlen(PRED) < 100:
                assert time.monotonic() < deadline + 20, consumer.stats
                time.sleep(0.02)
        finally:
            stop.set()
            thread.join(10)
        assert not thread.is_alive()
        ids = [p["id"] for p in entries(r, PRED)]
        assert sorted(ids) == sorted(f"r{i}" for i in range(100))


def test_bad_broker_settings_are_one_line_errors(redis_url: str) -> None:
    with pytest.raises(BrokerError, match="unsupported broker URL"):
        connect("mqtt://x", requests="a", predictions="b", dead_letter="c", group="g", consumer="c")
    with pytest.raises(BrokerError, match="three different keys"):
        connect(redis_url, requests="a", predictions="a", dead_letter="c", group="g", consumer="c")
    unreachable = connect(
        "redis://127.0.0.1:1/0",
        requests="a",
        predictions="b",
        dead_letter="c",
        group="g",
        consumer="c",
    )
    with pytest.raises(BrokerError, match="cannot reach the broker"):
        unreachable.check()


def test_broker_urls_are_shown_without_their_password() -> None:
    from pollinate.client.broker import redacted_url

    assert redacted_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redacted_url("redis://user:s3cret@host/0") == "redis://user:***@host/0"
    assert redacted_url("redis://host:6379/0") == "redis://host:6379/0"
