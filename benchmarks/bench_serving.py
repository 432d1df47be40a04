"""Local inference service: /predict latency and throughput on one core.

    python benchmarks/bench_serving.py                 # ~30 s
    python benchmarks/bench_serving.py --quick         # ~10 s, fewer requests

Issue 3's targets for a small model: median /predict latency under 5 ms and at least
500 requests/s, with the server on one core. The server is the real one
(``pollinate.client.serving.serve``, threads=1) in a subprocess pinned to core 0 with
``taskset`` when available; the load generators run on the other cores (on a one-core
machine they share it, which understates the server). Only 127.0.0.1 is used.

Rows measured:
- in-process ``LoadedModel.predict`` of one row: the floor the service adds HTTP to;
- sequential single-row /predict over one keep-alive httpx client (latency);
- concurrent single-row /predict for a few seconds (throughput) from a few client processes,
  each a bare asyncio HTTP client on 4 keep-alive connections, with the server's CPU use
  from /proc, to tell whether the server or the clients were the bottleneck;
- the same for the pure-Python server stack (asyncio loop + h11 parser) instead of
  uvloop + httptools, to show what those buy (``--no-compare`` skips it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

F, C, HIDDEN = 64, 10, 64  # digits-sized MLP: 64 features, 10 classes

SERVER = """
import sys
import uvicorn
from pollinate.client.serving import _bind, _config, create_app, serve, set_torch_threads
root, port, stack = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if stack == "default":
    serve(root, port=port, threads=1)
else:  # the same app on the pure-Python loop and HTTP parser
    set_torch_threads(1)
    config = _config(create_app(root), "warning", log_config=None)
    config.loop, config.http = "asyncio", "h11"
    uvicorn.Server(config).run(sockets=[_bind("127.0.0.1", port)])
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="sequential requests (latency)")
    p.add_argument("--seconds", type=float, default=5.0, help="throughput phase length")
    p.add_argument(
        "--clients", type=int, default=2, help="client processes, 4 connections each (throughput)"
    )
    p.add_argument("--quick", action="store_true", help="500 requests, 2 s")
    p.add_argument("--no-compare", action="store_true", help="skip the asyncio+h11 stack")
    args = p.parse_args()
    if args.quick:
        args.requests, args.seconds = 500, 2.0
    args.requests = max(100, min(args.requests, 20_000))
    args.seconds = max(1.0, min(args.seconds, 30.0))
    args.clients = max(1, min(args.clients, 16))

    import torch

    torch.set_num_threads(1)
    from pollinate.client import load_model
    from pollinate.client.store import ModelStore
    from pollinate.models import create_model

    root = Path(tempfile.mkdtemp(prefix="pollinate-bench-"))
    try:
        model = create_model("mlp", in_features=F, num_classes=C, hidden=HIDDEN, seed=0)
        ModelStore(root).save(
            "bench", "personal", spec=model.spec, state_dict=model.state_dict(), round=1
        )
        row = np.random.default_rng(0).normal(size=F).round(4).tolist()

        loaded = load_model(root)
        inproc = _time_calls(lambda: loaded.predict([row]), args.requests)
        print(
            f"cpus: {os.cpu_count()}, server pinned: {_has_taskset()}, model: mlp "
            f"{F}->{HIDDEN}->{C}, body: {len(json.dumps({'rows': [row]}))} bytes\n"
        )
        results = [("in-process LoadedModel.predict", inproc, None)]
        stacks = ["default"] if args.no_compare else ["default", "asyncio+h11"]
        for stack in stacks:
            lat, load = _bench_server(root, row, stack, args)
            name = "uvloop+httptools" if stack == "default" else stack
            results.append((f"/predict {name}", lat, load))
        _print_table(results, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


# ------------------------------------------------------------------------------ measuring


def _time_calls(call, n: int) -> list[float]:
    for _ in range(min(200, n)):  # warm up
        call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def _bench_server(root: Path, row: list[float], stack: str, args) -> tuple:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-c", SERVER, str(root), str(port), stack]
    if _has_taskset():
        cmd = ["taskset", "-c", "0", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    body = {"rows": [row]}
    try:
        _wait_up(proc, url)
        _pin_self_off_core0()
        with httpx.Client(base_url=url, timeout=10) as http:

            def call() -> None:
                r = http.post("/predict", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"/predict answered {r.status_code}: {r.text}")

            latency = _time_calls(call, args.requests)

        ctx = mp.get_context("spawn")
        counts = ctx.Queue()
        start = ctx.Event()
        workers = [
            ctx.Process(target=_load, args=(url, body, args.seconds, start, counts))
            for _ in range(args.clients)
        ]
        for w in workers:
            w.start()
        time.sleep(1.0)  # let the workers import and connect
        cpu0, t0 = _cpu_seconds(proc.pid), time.perf_counter()
        start.set()
        got = [counts.get(timeout=args.seconds + 60) for _ in workers]
        wall = max(g[2] for g in got)
        cpu_s = _cpu_seconds(proc.pid) - cpu0
        cpu = cpu_s / max(time.perf_counter() - t0, 1e-9)
        for w in workers:
            w.join(10)
        ok, failed = sum(g[0] for g in got), sum(g[1] for g in got)
        if failed:
            print(f"warning: {failed} failed requests during the throughput phase")
        return latency, (ok / wall, cpu, cpu_s / max(ok, 1))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, range(os.cpu_count() or 1))


def _load(url: str, body: dict, seconds: float, start, counts) -> None:
    """One client process: keep-alive connections POSTing /predict back to back.

    A bare asyncio HTTP/1.1 client (prebuilt request bytes, Content-Length framing): httpx
    costs more CPU per request than the server does, so it would measure the clients.
    """
    import asyncio

    _pin_self_off_core0()
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    request = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload

    async def connection(stop_at: float, tally: list[int]) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < stop_at:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                tally[0 if head.startswith(b"HTTP/1.1 200") else 1] += 1
        except (OSError, asyncio.IncompleteReadError):
            tally[1] += 1
        finally:
            writer.close()

    async def run() -> tuple[int, int, float]:
        tally = [0, 0]
        start.wait(30)
        t0 = time.perf_counter()
        await asyncio.gather(*(connection(t0 + seconds, tally) for _ in range(4)))
        return tally[0], tally[1], time.perf_counter() - t0

    counts.put(asyncio.run(run()))


# -------------------------------------------------------------------------------- helpers


def _print_table(results, args) -> None:
    print(
        f"{'':31} {'median':>7} {'p95':>7} {'p99':>7}  {'req/s':>6} {'srv CPU':>7} "
        f"{'CPU/req':>8} {'1-core cap.':>11}"
    )
    for name, lat, load in results:
        ms = sorted(v * 1000 for v in lat)
        q = statistics.quantiles(ms, n=100)
        line = f"{name:31} {statistics.median(ms):7.3f} {q[94]:7.3f} {q[98]:7.3f}"
        if load is not None:
            rps, cpu, per_req = load
            line += f"  {rps:6.0f} {cpu * 100:6.0f}% {per_req * 1e6:6.0f}us {1 / per_req:8.0f}/s"
        print(line)
    print(
        f"\nlatency (ms): {args.requests} sequential single-row requests over one keep-alive "
        f"httpx client; req/s: {args.clients} client processes x 4 connections for "
        f"{args.seconds:g} s; srv CPU: the server's share of its core meanwhile; CPU/req: "
        "server CPU time per request; 1-core cap.: 1 / CPU/req, the rate one dedicated core "
        "sustains (robust to other load on the machine)"
    )
    print("targets (issue 3): median < 5 ms, >= 500 req/s on one core")


def _wait_up(proc: subprocess.Popen, url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"the server exited with {proc.returncode}: {err[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).json().get("ready"):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not come up within 60 s")
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _has_taskset() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1


def _pin_self_off_core0() -> None:
    """Keep load generators off the server's core, where there is another core."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, range(1, os.cpu_count() or 2))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
