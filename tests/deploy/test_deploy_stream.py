"""``pollinate node stream`` (and ``node start --stream-broker``) with a real redis-server:
bad options, a consumer killed with SIGKILL and restarted, a simulation and a deployment
that keep training and swapping the models it answers with."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from deployhelp import Deployment, Proc, write_device_files

from pollinate.cli import main
from pollinate.client.store import ModelStore
from pollinate.models import create_model, load_artifact

ROOT = Path(__file__).resolve().parents[2]
F = 8


def save_model(root: Path, user: str = "alice", round: int = 1) -> None:
    model = create_model("mlp", in_features=F, num_classes=3, hidden=16, seed=round)
    ModelStore(root).save(
        user, "personal", spec=model.spec, state_dict=model.state_dict(), round=round
    )


def stream_argv(url: str, model_dir: Path, *extra: str) -> list[str]:
    return [
        "node", "stream", "--broker", url, "--requests", "rq", "--predictions", "pr",
        "--model-dir", str(model_dir), "--consumer", "device-1", *extra,
    ]  # fmt: skip


def send(r: Any, ids: range, features: int = F) -> None:
    rows = np.random.default_rng(ids.start).normal(size=(len(ids), features)).round(3)
    pipe = r.pipeline(transaction=False)
    for i, row in zip(ids, rows, strict=True):
        pipe.xadd("rq", {"id": f"r{i}", "features": json.dumps(row.tolist())})
    pipe.execute()


def answered_ids(r: Any) -> list[str]:
    return [f[b"id"].decode() for _, f in r.xrange("pr", "-", "+")]


def wait_until(check: Callable[[], bool], timeout: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.popen.poll() is not None:
            pytest.fail(f"the consumer exited ({proc.popen.returncode}):\n{proc.output}")
        assert time.monotonic() < deadline, "timed out" + (f":\n{proc.output}" if proc else "")
        time.sleep(0.05)


# ------------------------------------------------------------------------- bad input


def test_bad_stream_options_are_one_line_errors(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_model(tmp_path / "models")
    cases = [
        (["--broker", "mqtt://x"], "unsupported broker URL"),
        (["--broker", "redis://127.0.0.1:1/0"], "cannot reach the broker"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--predictions", "rq"], "three different keys"),
    ]
    for extra, message in cases:  # the last of a repeated flag wins
        assert main([*stream_argv(redis_url, tmp_path / "models"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    save_model(tmp_path / "models", user="bob")
    assert main(stream_argv(redis_url, tmp_path / "models")) == 2
    assert "holds 2 users" in capsys.readouterr().err


def test_node_start_stream_flags_go_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (data,) = write_device_files(tmp_path, 1)
    base = ["node", "start", "--server", "127.0.0.1:9", "--data", str(data), "--insecure"]
    base += ["--state-dir", str(tmp_path / "node"), "--serve", "none"]
    assert main([*base, "--stream-requests", "rq"]) == 2
    assert "--stream-requests needs --stream-broker URL" in capsys.readouterr().err
    assert main([*base, "--stream-broker", "redis://127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err
    assert "needs --stream-requests and --stream-predictions" in err, err
    argv = [*base, "--stream-broker", "redis://127.0.0.1:1/0"]
    argv += ["--stream-requests", "rq", "--stream-predictions", "pr"]
    assert main(argv) == 2
    assert "cannot reach the broker" in capsys.readouterr().err


# --------------------------------------------------------------------- kill, restart


@pytest.mark.slow
def test_a_consumer_killed_mid_stream_and_restarted_answers_each_request_once(
    deployment: Deployment, redis_url: str
) -> None:
    dep = deployment
    models = dep.root / "models"
    save_model(models)
    r: Any = redis.Redis.from_url(redis_url)
    total = 12_000
    send(r, range(0, 8000))  # a backlog: the consumer always holds a batch when killed
    held_at_kill = []
    for attempt in range(3):
        proc = dep.start(*stream_argv(redis_url, models, "--batch", "50"), name=f"stream{attempt}")
        proc.wait_for("stream: answering 'rq'", 60)
        if attempt == 1:
            threading.Thread(target=send, args=(r, range(8000, total))).start()
        target = r.xlen("pr") + 1500
        wait_until(lambda target=target: r.xlen("pr") >= target, 60, proc)  # type: ignore[misc]
        proc.crash()  # SIGKILL, mid-batch
        pending = r.xpending_range("rq", "pollinate-personal", "-", "+", 100, "device-1")
        held_at_kill.append(len(pending))

    proc = dep.start(*stream_argv(redis_url, models, "--batch", "50"), name="stream-final")
    wait_until(lambda: r.xlen("pr") >= total, 120, proc)
    time.sleep(0.5)  # anything published twice would show up now
    assert proc.stop() == 0
    ids = answered_ids(r)
    assert len(ids) == total and set(ids) == {f"r{i}" for i in range(total)}  # no loss, no dup
    assert r.xpending("rq", "pollinate-personal")["pending"] == 0
    assert r.xlen("rq:dead-letter") == 0
    assert max(held_at_kill) > 0, held_at_kill  # the kills did hit requests in flight
    assert "stream: stopped; answered" in proc.output


# ------------------------------------------------------ training while streaming


class Producer(threading.Thread):
    """Sends ``rate`` requests a second (one row each) until stopped; remembers the ids."""

    def __init__(self, url: str, rows: np.ndarray, rate: float = 150.0) -> None:
        super().__init__(daemon=True)
        self.r = redis.Redis.from_url(url)
        self.rows, self.rate = rows, rate
        self.sent: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.wait(1 / self.rate):
            rid = f"q{i}"
            row = self.rows[i % len(self.rows)].tolist()
            self.r.xadd("rq", {"id": rid, "features": json.dumps(row)})
            self.sent.append(rid)
            i += 1


def check_stream(r: Any, sent: list[str], final_hash: str) -> list[int]:
    """Every request answered once; rounds never go back; the last answers use the final
    model. The rounds seen, in order."""
    answers = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange("pr")]
    ids = [a["id"] for a in answers]
    assert len(ids) == len(sent) and set(ids) == set(sent)
    rounds = [int(a["round"]) for a in answers]
    assert rounds == sorted(rounds), rounds  # a newer model, never an older one
    assert answers[-1]["hash"] == final_hash
    assert r.xlen("rq:dead-letter") == 0
    return sorted(set(rounds))


@pytest.mark.slow
def test_streaming_while_a_simulation_trains_and_swaps_the_models(
    deployment: Deployment, redis_url: str
) -> None:
    from sklearn.datasets import load_digits

    dep = deployment
    store = dep.root / "users"
    proc = dep.start(
        *stream_argv(redis_url, store, "--user", "user-0000", "--batch", "5"), name="stream"
    )
    proc.wait_for("stream: answering 'rq'", 60)
    producer = Producer(redis_url, load_digits().data[:200])
    producer.start()
    run = dep.start(
        "run", str(ROOT / "configs" / "quickstart.toml"),
        "--run-dir", str(dep.root / "run"),
        "--set", "data.num-users=4", "--set", "run.num-rounds=6",
        # The CNN and 3 epochs: rounds long enough (on a quiet machine an MLP round takes
        # ~50 ms) that the stream answers with several of the models in turn.
        "--set", "train.epochs=3", "--set", "personalization.finetune-epochs=3",
        "--set", f"store.dir={store}", "--set", "strategy.fraction-evaluate=1.0",
        name="run",
    )  # fmt: skip
    assert run.wait(240) == 0, run.output
    time.sleep(1.0)  # a few requests for the final model
    producer.halt.set()
    producer.join(5)
    r: Any = redis.Redis.from_url(redis_url)
    wait_until(lambda: r.xlen("pr") >= len(producer.sent), 60, proc)
    assert proc.stop() == 0, proc.output
    final = load_artifact(ModelStore(store).path("user-0000", "personal"))
    rounds = check_stream(r, producer.sent, final.content_hash)
    assert len(rounds) >= 3 and rounds[-1] == 6, rounds  # swapped mid-stream, up to round 6
    assert "answering with the personal model round 6" in proc.output


@pytest.mark.slow
def test_node_start_streams_beside_training(
    deployment: Deployment, redis_url: str, port: int
) -> None:
    from sklearn.datasets import load_digits

    dep = deployment
    write_device_files(dep.root, 1)
    config = dep.write_config(
        "stream",
        run={"name": "stream", "num-rounds": 4},
        model={"name": "mlp", "in-features": 64, "num-classes": 10, "hidden": 32},
        strategy={"min-nodes": 1},
        server={"node-wait-timeout": 120.0, "round-timeout": 120.0},
    )
    server = dep.start(*dep.server_argv(config, port, "--insecure"), name="server")
    server.wait_for(r"run \d+ 'stream'", 60)
    stream = ["--stream-broker", redis_url, "--stream-requests", "rq"]
    stream += ["--stream-predictions", "pr", "--stream-model", "global"]
    node = dep.start(*dep.node_argv(0, port, key=None, serve=None), *stream, name="node")
    node.wait_for("answering prediction requests from 'rq'", 60)
    producer = Producer(redis_url, load_digits().data[:200], rate=50)
    producer.start()
    server.wait_for(r"run finished", 240)
    time.sleep(2.0)
    producer.halt.set()
    producer.join(5)
    r: Any = redis.Redis.from_url(redis_url)
    wait_until(lambda: r.xlen("pr") >= len(producer.sent), 60, node)
    store = ModelStore(dep.root / "node0" / "models")
    final = load_artifact(store.path("user0", "global"))
    rounds = check_stream(r, producer.sent, final.content_hash)
    assert rounds[-1] == 4 and len(rounds) >= 2, rounds
    assert node.stop() == 0, node.output  # the stream child stops with the node (fixture checks)
    log = (dep.root / "node0" / "logs" / "stream.log").read_text()
    assert "answering with the global model round 4" in log
