"""TLS read buffers: the server's memory per idle connection, and its CPU per upload.

    python benchmarks/bench_tls_buffer.py                  # ~1 min: stock, 64 KiB, 32, 16
    python benchmarks/bench_tls_buffer.py --sizes 65536 --connections 200 --repeat 2

Why: the SuperLink keeps one TLS connection per device (``flower_compat/keep_alive.py``),
and asyncio gives each one a resident read buffer of ``SSLProtocol.max_size`` bytes
(256 KiB). ``flower_compat/tls_buffer.py`` sets it smaller; this measures what that buys
and costs, side by side in one invocation, on a real asyncio TLS server (the loop under
the SuperLink's uvicorn) with a certificate from ``pollinate.deploy.certs``:

- ``MiB / 1,000 idle``: the server process's RSS growth while this script holds
  ``--connections`` TLS connections to it, each handshaken and idle, per 1,000.
- ``upload CPU s``: the server loop thread's CPU time to take in ``--upload-mib`` MiB on
  one connection (TLS decryption and reads); the least of ``--repeat`` runs, the sizes
  taking turns, each against the stock buffer measured in the same turn.

Each size is its own server process (``--serve``), made with ``tls_reads_into(size)``;
``stock`` is asyncio's own size, with no patch. Writes ``benchmarks/results/tls_buffer.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_markdown, markdown_table  # noqa: E402

RESULTS_DIR = HERE / "results"
STOCK = "stock"


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve(size: str, cert: str, key: str) -> None:
    """A TLS server on asyncio's loop (in a thread); this process answers ``rss`` and
    ``cpu`` on stdin with one line each, and exits on EOF."""
    from pollinate.flower_compat.tls_buffer import tls_reads_into

    uploads: list[float] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    ready = threading.Event()
    port: list[int] = []

    async def take_in(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        began = None
        with contextlib.suppress(ConnectionError):  # a client's close without close_notify
            while chunk := await reader.read(1 << 20):
                if chunk == b"i":  # an idle connection saying it is there
                    continue
                began = began if began is not None else time.thread_time()
        if began is not None:
            uploads.append(time.thread_time() - began)
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(take_in, "127.0.0.1", 0, ssl=context, backlog=4096)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        await asyncio.Event().wait()

    patch = nullcontext(True) if size == STOCK else tls_reads_into(int(size))
    with patch as on:
        assert on, "the patch did not engage"
        threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
        ready.wait()
        print(f"port {port[0]}", flush=True)
        for line in sys.stdin:
            if line.strip() == "rss":
                print(_rss_bytes(), flush=True)
            elif line.strip() == "cpu":
                waited = time.monotonic()
                while not uploads and time.monotonic() - waited < 60:
                    time.sleep(0.01)
                print(uploads.pop() if uploads else "nan", flush=True)


class Server:
    """One ``--serve`` child process and this script's end of its stdin/stdout."""

    def __init__(self, size: str, cert: str, key: str) -> None:
        command = [sys.executable, __file__, "--serve", size, "--cert", cert, "--key", key]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.port = int(self._line().split()[1])

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"error: the --serve child exited ({self.process.wait()})")
        return line

    def ask(self, what: str) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(what + "\n")
        self.process.stdin.flush()
        return float(self._line())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def _connect(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port))
    return context.wrap_socket(raw, server_hostname="localhost")  # handshake done here


def idle_mib_per_thousand(server: Server, context: ssl.SSLContext, connections: int) -> float:
    before = server.ask("rss")
    held = [_connect(server.port, context) for _ in range(connections)]
    for sock in held:
        sock.sendall(b"i")  # the server side has read once: its buffer is in use
    time.sleep(0.5)
    grown = server.ask("rss") - before
    for sock in held:
        sock.close()
    return grown / 2**20 * 1000 / connections


def upload_cpu_s(server: Server, context: ssl.SSLContext, mib: int, chunk: bytes) -> float:
    with _connect(server.port, context) as sock:
        for _ in range(mib):
            sock.sendall(chunk)
        sock.unwrap()  # close_notify: the server reads to its end, then sees EOF
    return server.ask("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="65536,32768,16384", help="bytes, comma-separated")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--upload-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.cert, args.key)
        return
    try:
        sizes = [STOCK] + [str(int(s)) for s in args.sizes.split(",") if s]
    except ValueError:
        raise SystemExit(  # noqa: B904  # one line, not a traceback
            f"error: --sizes {args.sizes!r}: give byte counts, e.g. 65536,16384"
        )
    if args.connections < 1 or args.upload_mib < 1 or args.repeat < 1:
        raise SystemExit("error: --connections, --upload-mib and --repeat must be at least 1")

    from pollinate.deploy.certs import create_certs

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        paths, _ = create_certs(tmp)
        context = ssl.create_default_context(cafile=str(paths.ca_cert))
        servers: dict[str, Any] = {}
        for size in sizes:
            servers[size] = Server(size, str(paths.server_cert), str(paths.server_key))
            stack.callback(servers[size].close)
        idle = {s: idle_mib_per_thousand(servers[s], context, args.connections) for s in sizes}
        chunk = os.urandom(1 << 20)
        cpu: dict[str, list[float]] = {s: [] for s in sizes}
        for turn in range(args.repeat):
            for size in sizes:
                cpu[size].append(upload_cpu_s(servers[size], context, args.upload_mib, chunk))
            print(f"turn {turn + 1}: " + ", ".join(f"{s} {cpu[s][-1]:.3f} s" for s in sizes))
    rows = []
    for size in sizes:
        label = "stock (asyncio, 256 KiB)" if size == STOCK else f"{int(size) // 1024} KiB"
        ratios = [mine / stock for mine, stock in zip(cpu[size], cpu[STOCK], strict=True)]
        rows.append(
            {
                "read buffer": label,
                "MiB / 1,000 idle": round(idle[size], 1),
                "upload CPU s (least)": round(min(cpu[size]), 3),
                "x stock, median of turns": round(sorted(ratios)[len(ratios) // 2], 2),
            }
        )
    table = markdown_table(rows)
    heading = (
        f"{args.connections} idle TLS connections held; {args.upload_mib} MiB uploaded on one, "
        f"{args.repeat} turns\n\n"
    )
    print(heading + table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "tls_buffer.md"
    tmp_out = out.with_suffix(".md.tmp")
    tmp_out.write_text(heading + table + "\n\n" + machine_markdown() + "\n")
    tmp_out.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
