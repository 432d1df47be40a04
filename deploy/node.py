"""``pollinate node start | serve | keygen``: a device in a deployment.

``node start`` is one foreground command that supervises three children:

- a Flower SuperNode (:mod:`pollinate.deploy.supernode`) connected to the server with TLS
  and this device's key, with ``--isolation process`` and node config ``data-file``,
  ``user-id`` and ``model-dir`` (absolute paths);
- the warm ClientApp worker (:mod:`pollinate.deploy.worker`) that trains on the data file
  and writes the global and personal models to the model store;
- the local inference service (``pollinate node serve``) on ``--serve`` (127.0.0.1:8080
  by default; ``none`` skips it), which swaps in each new round's models as they land;
- with ``--stream-broker URL``, the streaming consumer (``pollinate node stream``), which
  answers prediction requests from a broker's stream with the same models.

The data file is checked with the same loader the ClientApp uses before anything starts.
Ctrl-C / SIGTERM, or any child dying, stops all of them. Flower's failures become one
line: an unregistered key, a TLS / non-TLS mismatch, an untrusted certificate.

Exit status: 0 stopped by a signal after a clean run, 1 a child failed, 2 bad input or the
server refused this node.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pollinate import protocol
from pollinate.client.broker import redacted_url
from pollinate.config import RunConfig
from pollinate.data import load_user_file
from pollinate.deploy import events
from pollinate.deploy.certs import DeployError, check_node_private_key, private_key_fingerprint
from pollinate.deploy.proc import (
    SUPERVISOR_ENV,
    Child,
    Supervisor,
    child_env,
    format_address,
    free_port,
    guard_tree,
    parse_address,
    port_in_use,
    wait_for_port,
)
from pollinate.deploy.state import NodeDir, record_children, single_instance, write_json
from pollinate.deploy.stream import StreamSettings, stream_argv

DEFAULT_SERVE = "127.0.0.1:8080"
# A node killed without saying goodbye stays "online" on the server for up to 2 heartbeat
# intervals (2 x 10 s after its last heartbeat); until then the server refuses to activate
# it again. Worse, if it came back just as that session expired, a message the dead session
# had taken would never be answered (Flower marks it undeliverable only while the node is
# offline). So a restarted node waits until the old session has surely expired and the
# server has noticed: REJOIN_AFTER seconds after the previous session was last alive.
REJOIN_AFTER = 25.0
REJOIN_PATIENCE = 30.0
ALIVE_EVERY = 2.0

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2


@dataclass
class NodeOptions:
    server: str  # HOST:PORT
    data: Path
    users: list[str]
    user_id: str | None
    state: NodeDir
    model_dir: Path
    key: Path | None  # None: --insecure
    root_cert: Path | None
    serve: tuple[str, int] | None
    runtime_port: int = 0
    user_column: str | None = None
    label_column: str | None = None
    device: str | None = None  # auto | cpu | cuda; None: the server's simulation.device
    threads: int = 0  # torch threads in the worker; 0: torch's default
    stream: StreamSettings | None = None  # answer requests from a broker too
    echo: Callable[[str], None] = print
    verbose: bool = False
    allow_hosts: tuple[str, ...] = ()  # more Host names the inference service answers to

    @property
    def insecure(self) -> bool:
        return self.key is None


def check_data(
    path: Path, user_id: str | None, user_column: str | None, label_column: str | None
) -> list[str]:
    """The users in the device's data file, loaded exactly as the ClientApp will."""
    defaults = RunConfig().data
    table = load_user_file(
        str(path),
        user_column=user_column or defaults.user_column,
        label_column=label_column or defaults.label_column,
        user_id=user_id,
    )
    return list(table)


def node_config(opts: NodeOptions) -> str:
    """``--node-config`` for the SuperNode: TOML values, paths absolute."""
    items = protocol.device_node_config(
        str(opts.data.resolve()),
        str(opts.model_dir.resolve()),
        user_id=opts.user_id,
        user_column=opts.user_column,
        label_column=opts.label_column,
        device=opts.device,
    )
    parts = []
    for key, value in items.items():
        if "'" not in value:
            parts.append(f"{key}='{value}'")  # TOML literal string: no escapes
        elif '"' not in value and "\\" not in value:
            parts.append(f'{key}="{value}"')
        else:
            raise DeployError(f"{key} {value!r} contains both kinds of quote; rename it")
    return " ".join(parts)


# ---------------------------------------------------------------------- TLS preflight


def probe(host: str, port: int, *, tls: bool, root_cert: Path | None) -> str:
    """What answers at ``host:port``: 'ok', 'unreachable', 'server-uses-tls',
    'server-not-tls', or 'untrusted: <reason>'."""
    try:
        sock = socket.create_connection((host, port), timeout=3)
    except OSError:
        return "unreachable"
    with sock:
        if not tls:
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                head = sock.recv(16)
            except OSError:
                return "server-uses-tls"
            return "ok" if head.startswith(b"HTTP/") else "server-uses-tls"
        ctx = ssl.create_default_context(cafile=str(root_cert) if root_cert else None)
        try:
            with ctx.wrap_socket(sock, server_hostname=host) as tls_sock:
                tls_sock.do_handshake()
        except ssl.SSLCertVerificationError as err:
            return f"untrusted: {err.verify_message}"
        except ssl.SSLError as err:
            if err.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"):
                return "server-not-tls"
            return f"untrusted: {err.reason or err}"
        except OSError:
            return "server-not-tls"
    return "ok"


def explain_probe(result: str, opts: NodeOptions) -> str | None:
    """The one-line error for a probe result that means this node can never connect."""
    if result == "server-uses-tls":
        return (
            f"the server at {opts.server} uses TLS but this node was started with --insecure; "
            "drop --insecure and pass --root-cert ca.crt and --key KEY"
        )
    if result == "server-not-tls":
        return (
            f"the server at {opts.server} does not use TLS (started with --insecure?); for a "
            "local experiment start this node with --insecure too"
        )
    if result.startswith("untrusted"):
        which = f"--root-cert {opts.root_cert}" if opts.root_cert else "the system's CAs"
        return (
            f"the server's certificate at {opts.server} is not trusted by {which} "
            f"({result.split(': ', 1)[1]}); use the ca.crt from the server's "
            "`pollinate certs create`, and a --server name the certificate covers"
        )
    return None


# ------------------------------------------------------------------------------ start


def _supernode_argv(opts: NodeOptions, runtime_port: int) -> list[str]:
    argv = [
        sys.executable, "-m", "pollinate.deploy.supernode",
        "--superlink", opts.server,
        "--isolation", "process",
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--node-config", node_config(opts),
    ]  # fmt: skip
    if opts.insecure:
        argv.append("--insecure")
    else:
        assert opts.key is not None
        argv += ["--auth-supernode-private-key", str(opts.key)]
        if opts.root_cert is not None:
            argv += ["--root-certificates", str(opts.root_cert.resolve())]
    return argv


class _Events:
    """Turns child output into the few lines a device owner wants to see."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.node_id: str | None = None
        self.refused = False
        self.connect_failures = 0

    def supernode(self, line: str) -> None:
        """Reads the launcher's event lines (:mod:`.events`), never Flower's own log text."""
        parsed = events.parse(line)
        if parsed is None:
            return
        event, fields = parsed
        if event == events.NODE_JOINED:
            self.node_id = fields.get("node_id", "?")
            self.echo(f"node: joined the federation as node {self.node_id}")
            self.connect_failures = 0
        elif event == events.NODE_REFUSED:
            self.refused = True
        elif event == events.CONNECT_FAILED:
            self.connect_failures += 1

    def worker(self, line: str) -> None:
        if "pollinate.worker: round" in line:
            self.echo("node: " + line.split("pollinate.worker: ", 1)[1])
        elif "ERROR" in line and "pollinate.worker" in line:
            self.echo("node: " + line.split("pollinate.worker: ", 1)[-1])


def start_node(opts: NodeOptions) -> int:
    """Run the device in the foreground until a signal or a failure; the exit status."""
    server_host, server_port = parse_address(opts.server)
    if opts.serve is not None and port_in_use(*opts.serve):
        raise DeployError(
            f"--serve {format_address(*opts.serve)} is already in use (another node?); "
            "pick another port, or --serve none"
        )
    problem = explain_probe(
        probe(server_host, server_port, tls=not opts.insecure, root_cert=opts.root_cert), opts
    )
    if problem:
        raise DeployError(problem)
    opts.state.root.mkdir(parents=True, exist_ok=True)
    opts.model_dir.mkdir(parents=True, exist_ok=True)
    with single_instance(opts.state.info_file, "node", server=opts.server) as previous:
        # An --insecure node is a new node (a fresh key) every time: nothing to wait out.
        recovering = previous.get("clean_exit") is False and not opts.insecure
        if recovering:
            _wait_out_previous_session(opts, previous)
        return _supervise(opts, server_host, server_port, recovering)


def _wait_out_previous_session(opts: NodeOptions, previous: dict[str, object]) -> None:
    alive_at = previous.get("alive_at")
    if not isinstance(alive_at, (int, float)):
        return
    wait = alive_at + REJOIN_AFTER - time.time()
    if wait <= 0:
        return
    opts.echo(
        f"node: the previous session ended without saying goodbye {time.time() - alive_at:.0f}"
        f" s ago; waiting {wait:.0f} s so the server closes it before this one joins"
    )
    stop = threading.Event()
    handlers = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        if stop.wait(wait):
            raise KeyboardInterrupt
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _supervise(opts: NodeOptions, server_host: str, server_port: int, recovering: bool) -> int:
    echo = opts.echo
    events = _Events(echo)
    env = child_env()
    echo_raw = (lambda name, line: echo(f"[{name}] {line}")) if opts.verbose else None
    mode = "INSECURE" if opts.insecure else "TLS"
    who = ", ".join(opts.users) if len(opts.users) <= 5 else f"{len(opts.users)} users"
    echo(
        f"node: connecting to {opts.server} ({mode}) to train on {opts.data.name} ({who}); "
        f"models in {opts.model_dir}"
    )
    record = partial(record_children, opts.state.info_file)
    with Supervisor(opts.state.logs, echo=echo_raw, record=record) as sup:
        runtime_port = opts.runtime_port or free_port()
        supernode = sup.start(
            "supernode", _supernode_argv(opts, runtime_port), env=env, on_line=events.supernode
        )
        if not wait_for_port("127.0.0.1", runtime_port, 60, supernode.running):
            return _supernode_failed(opts, supernode, events)
        runtime = format_address("127.0.0.1", runtime_port)
        worker = [sys.executable, "-m", "pollinate.deploy.worker", "--runtime-api-address", runtime]
        if opts.threads > 0:
            worker += ["--threads", str(opts.threads)]
        sup.start(
            "worker",
            worker,
            env=env,
            on_line=events.worker,
        )
        if opts.serve is not None:
            host, port = opts.serve
            serve_argv = [
                sys.executable, "-m", "pollinate", "node", "serve",
                "--model-dir", str(opts.model_dir.resolve()),
                "--serve", format_address(host, port),
            ]  # fmt: skip
            serve_user = opts.user_id or (opts.users[0] if len(opts.users) == 1 else None)
            if serve_user is not None:
                serve_argv += ["--user", serve_user]
            for name in opts.allow_hosts:
                serve_argv += ["--allow-host", name]
            serving = sup.start("serve", serve_argv, env=env)
            if not wait_for_port(host, port, 60, serving.running):
                tail = [ln for ln in serving.tail if ln.strip()][-1:]
                raise DeployError(
                    f"the inference service did not start on {format_address(host, port)}: "
                    f"{tail[0] if tail else 'no output'}"
                )
            echo(f"node: serving predictions on http://{format_address(host, port)}")
        if opts.stream is not None:
            sup.start("stream", stream_argv(opts.stream), env=env)
            echo(
                f"node: answering prediction requests from {opts.stream.requests!r} on "
                f"{redacted_url(opts.stream.broker)} (log: {opts.state.logs / 'stream.log'})"
            )
        deadline = time.monotonic() + REJOIN_PATIENCE
        next_alive = 0.0
        said_unreachable = False
        reconnects = 0
        while True:
            if sup.stop_requested.is_set():
                name = signal.Signals(sup.stop_signal or signal.SIGINT).name
                echo(f"node: {name}: stopping")
                return EXIT_OK
            gone = sup.exited()
            retry = None
            if gone is supernode and events.refused and recovering and time.monotonic() < deadline:
                retry = 3.0
                echo(
                    "node: the server still holds this node's previous session (it ended "
                    "without saying goodbye); retrying until it times out"
                )
            elif gone is supernode and events.node_id is not None and not events.refused:
                # It had joined: the server went away (stopped, restarted) and dropped it.
                retry = min(5.0 * 2**reconnects, 60.0)
                reconnects += 1
                echo(
                    f"node: lost the server (the SuperNode exited with status "
                    f"{supernode.popen.returncode}); reconnecting in {retry:.0f} s"
                )
            if retry is not None:
                sup.stop_child(supernode)
                sup.children.remove(supernode)
                sup.wait(retry)
                events.refused = False
                events.node_id = None
                supernode = sup.start(
                    "supernode",
                    _supernode_argv(opts, runtime_port),
                    env=env,
                    on_line=events.supernode,
                )
                continue
            if gone is supernode:
                return _supernode_failed(opts, supernode, events)
            if gone is not None:
                tail = [ln for ln in gone.tail if ln.strip()][-3:]
                echo(
                    f"error: the {gone.name} process exited with status {gone.popen.returncode}: "
                    f"{' | '.join(tail) or 'no output'} (log: {gone.log_path})"
                )
                return EXIT_FAILED
            if events.connect_failures and events.node_id is None:
                result = probe(
                    server_host, server_port, tls=not opts.insecure, root_cert=opts.root_cert
                )
                problem = explain_probe(result, opts)
                if problem:
                    echo(f"error: {problem}")
                    return EXIT_REFUSED
                if result == "unreachable" and not said_unreachable:
                    said_unreachable = True
                    echo(f"node: the server at {opts.server} is not reachable yet; retrying")
                events.connect_failures = 0
            if time.monotonic() >= next_alive:
                next_alive = time.monotonic() + ALIVE_EVERY
                write_json(opts.state.info_file, {**opts.state.info(), "alive_at": time.time()})
            sup.wait(0.5)


def _supernode_failed(opts: NodeOptions, supernode: Child, events: _Events) -> int:
    with contextlib.suppress(Exception):
        supernode.popen.wait(5)
    if events.refused and opts.key is not None:
        fingerprint = private_key_fingerprint(opts.key)
        opts.echo(
            f"error: the server at {opts.server} refused this node's key {fingerprint}: it is "
            f"not registered. On the server run: pollinate server register-node "
            f"{opts.key.name}.pub"
        )
        return EXIT_REFUSED
    tail = [ln for ln in supernode.tail if ln.strip() and "INFO" not in ln][-3:]
    opts.echo(
        f"error: the Flower SuperNode exited with status {supernode.popen.returncode}: "
        f"{' | '.join(tail) or 'no output'} (log: {supernode.log_path})"
    )
    return EXIT_FAILED


# ------------------------------------------------------------------------------ serve


def serve_store(
    model_dir: Path,
    host: str,
    port: int,
    user: str | None,
    echo: Callable[[str], None],
    allowed_hosts: Sequence[str] = (),
) -> int:
    """``pollinate node serve``: the inference service over an existing model store."""
    # Lazy: torch + FastAPI load in the `node serve` process only, not in the `node start`
    # supervisor that imports this module.
    from pollinate.client.serving import ServingError, serve

    if SUPERVISOR_ENV in os.environ:  # started by `node start`: die with it
        guard_tree()
    if not model_dir.is_dir():
        raise DeployError(f"model store '{model_dir}' does not exist")
    try:
        serve(
            model_dir,
            host,
            port,
            user=user,
            announce=lambda url: echo(f"serving {url}"),
            allowed_hosts=allowed_hosts,
        )
    except ServingError as err:
        raise DeployError(str(err)) from None
    return EXIT_OK


def check_key_options(key: str | None, root_cert: str | None, insecure: bool) -> Path | None:
    if insecure:
        if key or root_cert:
            raise DeployError(
                "--insecure turns TLS off, and node authentication needs TLS: drop --key and "
                "--root-cert, or drop --insecure"
            )
        return None
    if not key:
        raise DeployError(
            "node start needs --key KEY, this device's private key (make one with "
            "pollinate node keygen DIR, then register DIR/node.pub on the server); or "
            "--insecure for a local experiment against an --insecure server"
        )
    return check_node_private_key(key)
