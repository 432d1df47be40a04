"""Streaming predictions: throughput and latency of ``pollinate node stream`` on one core.

    python benchmarks/bench_stream.py            # ~1-2 min on 2 cores
    python benchmarks/bench_stream.py --quick    # ~40 s: fewer requests, one batch size

Issue 11's targets for the quickstart model: at least 2,000 predictions/s on one core and
a median added latency under 5 ms. Everything is real and on 127.0.0.1: a redis-server
(Debian's), the ``pollinate node stream`` command as a device runs it (one torch thread)
in a subprocess pinned to core 0 (``taskset``), and this script (producer and reader) plus
redis-server on the other cores. The model is the quickstart CNN (64 features, 10
classes): a short ``pollinate run configs/quickstart.toml`` (2 rounds) trains it once into
``--model-run`` (the speed does not depend on the weights); one user's folder is served.

Rows, per ``--batches`` value (the consumer's ``--batch``, XREADGROUP COUNT):

- throughput: ``--requests`` one-row requests pipelined into the stream at once (a
  backlog, so the consumer never waits), then the time from the first request's entry id
  to the last prediction's (both stamped by the Redis server's clock). ``per_cpu_s`` is
  predictions per second of the consumer's own CPU time (from /proc): what one dedicated
  core does, whatever else the machine runs.
- latency (closed loop, one request in flight): ``--latency-requests`` times, XADD one
  request and block on the predictions stream until its answer arrives. ``e2e`` = XADD
  call to answer read (two Redis round trips, the consumer's wake-up, parsing, the model,
  the atomic publish-and-ack, the reader's wake-up); ``added`` = ``e2e`` minus the
  prediction's ``model_ms`` (the forward pass), i.e. what streaming adds to the model's
  own compute; ``stored_to_answer`` = the request's entry id to its prediction's (the
  Redis server's clock, 1 ms resolution: XADD stored -> answer published, no client
  round trips); ``service`` = the consumer's read-to-publish time (``service_ms``).

Also: the cost of parsing a Redis reply per stream entry with hiredis and with redis-py's
pure-Python parser (why hiredis is a dependency).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_markdown, markdown_table, write_csv  # noqa: E402

REPO = HERE.parent
TICKS = os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=20_000, help="throughput backlog")
    p.add_argument("--latency-requests", type=int, default=2_000, help="closed-loop requests")
    p.add_argument("--batches", default="1,10,100", help="consumer --batch values")
    p.add_argument("--quick", action="store_true", help="5,000 / 500 requests, batch 100 only")
    p.add_argument("--model-run", default=str(REPO / "runs" / "bench-stream-model"))
    p.add_argument("--out", default=str(HERE / "results"), help="where stream.{csv,md} go")
    args = p.parse_args()
    if args.quick:
        args.requests, args.latency_requests, args.batches = 5_000, 500, "100"
    batches = [int(b) for b in args.batches.split(",")]
    if shutil.which("redis-server") is None:
        print("redis-server is not installed: apt-get install -y redis-server", file=sys.stderr)
        return 2

    user_dir = quickstart_model(Path(args.model_run))
    folder = Path(tempfile.mkdtemp(prefix="pollinate-bench-stream-"))
    redis_proc, url = start_redis(folder)
    rows: list[dict[str, Any]] = []
    try:
        import redis
        from sklearn.datasets import load_digits

        pin_self_off_core0()
        r = redis.Redis.from_url(url)
        features = [json.dumps(x.tolist()) for x in load_digits().data[:1000]]
        print(f"model: {user_dir} (quickstart CNN), consumer pinned to core 0: {pinning()}")
        for batch in batches:
            rows += bench_batch(r, url, user_dir, batch, features, args)
        parsing = parsing_cost(url)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    out = Path(args.out)
    write_csv(out / "stream.csv", rows)
    table = markdown_table(rows)
    parse_table = markdown_table([parsing])
    (out / "stream.md").write_text(
        f"`python benchmarks/bench_stream.py{' --quick' if args.quick else ''}`\n\n"
        f"{machine_markdown()}\n\n{table}\n\nReply parsing, microseconds per stream "
        f"entry (XRANGE COUNT 100):\n\n{parse_table}\n"
    )
    print(table)
    print(parse_table)
    print(f"wrote {out / 'stream.csv'} and {out / 'stream.md'}")
    return 0


# --------------------------------------------------------------------------- set-up


def quickstart_model(run_dir: Path) -> Path:
    """One user's folder of a 2-round quickstart run (trained once, then reused)."""
    user_dir = run_dir / "users" / "user-0000"
    if not (user_dir / "personal.pt").exists():
        print(f"training the quickstart model (2 rounds) into {run_dir} ...", flush=True)
        config = str(REPO / "configs" / "quickstart.toml")
        argv = [sys.executable, "-m", "pollinate", "run", config, "--run-dir", str(run_dir)]
        subprocess.run([*argv, "--set", "run.num-rounds=2"], check=True, stdout=subprocess.DEVNULL)
    return user_dir


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder)]
    argv += ["--save", "", "--appendonly", "no", "--logfile", str(folder / "redis.log")]
    proc = subprocess.Popen(off_core0(argv))
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return proc, f"redis://127.0.0.1:{port}/0"
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)


def pinning() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1


def off_core0(argv: list[str]) -> list[str]:
    cores = os.cpu_count() or 1
    return ["taskset", "-c", f"1-{cores - 1}", *argv] if pinning() else argv


def pin_self_off_core0() -> None:
    if pinning():
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 1)))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


# ---------------------------------------------------------------------------- measuring


def start_consumer(url: str, user_dir: Path, batch: int, name: str) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-m", "pollinate", "node", "stream", "--broker", url,
        "--requests", f"rq-{name}", "--predictions", f"pr-{name}", "--model-dir", str(user_dir),
        "--batch", str(batch), "--threads", "1", "--consumer", "bench",
    ]  # fmt: skip
    if pinning():
        argv = ["taskset", "-c", "0", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "answering with the personal model" in line:
            return proc
    raise RuntimeError(f"the consumer exited ({proc.wait()}) before loading its model")


def bench_batch(
    r: Any, url: str, user_dir: Path, batch: int, features: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    name = f"b{batch}"
    proc = start_consumer(url, user_dir, batch, name)
    requests, predictions = f"rq-{name}", f"pr-{name}"
    try:
        latency = closed_loop(r, requests, predictions, features, 200)  # warm-up
        latency = closed_loop(r, requests, predictions, features, args.latency_requests)
        throughput = backlog(r, requests, predictions, features, args.requests, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    row = {"batch": batch, **throughput, **latency}
    print(
        f"batch {batch}: {throughput['predictions_per_s']:.0f} predictions/s "
        f"({throughput['per_cpu_s']:.0f} per consumer CPU-second); p50 e2e "
        f"{latency['e2e_p50_ms']:.2f} ms, added {latency['added_p50_ms']:.2f} ms",
        flush=True,
    )
    return [row]


def closed_loop(r: Any, requests: str, predictions: str, features: list[str], n: int) -> dict:
    """One request in flight at a time; latencies in ms."""
    last = r.xinfo_stream(predictions)["last-generated-id"] if r.exists(predictions) else b"0-0"
    e2e, added, service, model, broker = [], [], [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        sent = r.xadd(requests, {"id": f"l{i}", "features": features[i % len(features)]})
        reply = r.xread({predictions: last}, count=1, block=10_000)
        t1 = time.perf_counter()
        if not reply:
            raise RuntimeError("no prediction within 10 s")
        last, fields = reply[0][1][0]
        broker.append(_ms(last) - _ms(sent))  # request stored -> answer stored, server clock
        ms = (t1 - t0) * 1000
        e2e.append(ms)
        model.append(float(fields[b"model_ms"]))
        added.append(ms - model[-1])
        service.append(float(fields[b"service_ms"]))
    return {
        "e2e_p50_ms": _q(e2e, 0.5),
        "e2e_p99_ms": _q(e2e, 0.99),
        "added_p50_ms": _q(added, 0.5),
        "added_p99_ms": _q(added, 0.99),
        "stored_to_answer_p50_ms": _q(broker, 0.5),
        "service_p50_ms": _q(service, 0.5),
        "model_p50_ms": _q(model, 0.5),
    }


def backlog(
    r: Any, requests: str, predictions: str, features: list[str], n: int, pid: int
) -> dict[str, float]:
    """``n`` requests at once; predictions per second (server clock) and per CPU-second."""
    start = r.xlen(predictions)
    cpu0 = cpu_seconds(pid)
    pipe = r.pipeline(transaction=False)
    first: bytes = b""
    for i in range(n):
        pipe.xadd(requests, {"id": f"t{i}", "features": features[i % len(features)]})
        if len(pipe) == 1000:
            ids = pipe.execute()
            first = first or ids[0]
    if len(pipe):
        ids = pipe.execute()
        first = first or ids[0]
    deadline = time.monotonic() + 600
    while r.xlen(predictions) < start + n:
        if time.monotonic() > deadline:
            raise RuntimeError("the consumer did not keep up within 10 min")
        time.sleep(0.05)
    cpu = cpu_seconds(pid) - cpu0
    last_id = r.xrevrange(predictions, count=1)[0][0]
    seconds = (_ms(last_id) - _ms(first)) / 1000
    return {
        "requests": n,
        "predictions_per_s": n / max(seconds, 1e-3),
        "consumer_cpu_s": cpu,
        "per_cpu_s": n / max(cpu, 1e-3),
    }


def parsing_cost(url: str) -> dict[str, Any]:
    """Microseconds per stream entry to parse an XRANGE reply: hiredis vs pure Python."""
    import redis
    from redis._parsers import _HiredisParser, _RESP2Parser

    r = redis.Redis.from_url(url)
    row = json.dumps([float(i % 17) for i in range(64)])
    pipe = r.pipeline(transaction=False)
    for i in range(100):
        pipe.xadd("parse", {"id": f"p{i}", "features": row})
    pipe.execute()
    out: dict[str, Any] = {}
    for name, cls in (("hiredis", _HiredisParser), ("python", _RESP2Parser)):
        client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, parser_class=cls))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(20):
                client.xrange("parse", count=100)
            best = min(best, (time.perf_counter() - t0) / 2000 * 1e6)
        out[f"{name}_us_per_entry"] = best
    return out


def _q(values: Sequence[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[round(q * 100) - 1] if q < 1 else max(values)


def _ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


if __name__ == "__main__":
    sys.exit(main())
