"""``pollinate server start | status | register-node``: the coordinator of a deployment.

``server start`` stays in the foreground for the whole run. It

1. validates the experiment config (a deployed server has no data, so ``model.in-features``
   and ``model.num-classes`` must be set) and pins ``run.dir`` to an absolute path — the
   ServerApp runs in a process the SuperLink starts, in another working directory;
2. starts a Flower SuperLink (:mod:`pollinate.deploy.superlink`) with TLS and node
   authentication (unless ``--insecure``) and its state database in the state folder, so
   runs, logs and node registrations survive a restart (``--memory-state``: in memory);
3. registers the node keys saved in ``<state>/nodes/`` and submits the Pollinate ServerApp
   run with ``flwr run`` (app folder from :mod:`pollinate.deploy.appdir`);
4. prints each round as it lands in ``<run dir>/metrics.db`` (``pollinate metrics RUN_DIR``
   reads the same file, also while the run goes on), nodes joining and leaving, and any
   refused connection; then the summary, and stops the SuperLink. Ctrl-C / SIGTERM stop
   the run and the SuperLink; nothing is left running either way.

Exit status: 0 the run finished, 1 it failed (the reason is printed, e.g. too few nodes
within ``server.node-wait-timeout``), 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pollinate.config import ConfigError, RunConfig, to_toml
from pollinate.deploy import events, link
from pollinate.deploy.appdir import write_app_dir
from pollinate.deploy.certs import (
    CertPaths,
    DeployError,
    certificate_hosts,
    key_fingerprint,
    load_node_public_key,
)
from pollinate.deploy.proc import (
    Supervisor,
    format_address,
    port_in_use,
    wait_for_port,
)
from pollinate.deploy.state import (
    ServerDir,
    instance_running,
    record_children,
    single_instance,
    write_json,
)
from pollinate.server.metrics import MetricsError, MetricsRecorder, read_rounds, read_run_info
from pollinate.server.summary import summary_table

DEFAULT_ADDRESS = "127.0.0.1:9092"
STATUS_POLL = 0.5  # metrics.db, a local file
# `flwr ls` is a subprocess (~0.7 s of CPU): every 10 s until the ServerApp has written its
# first metrics (to catch one that dies early), then once a minute (to catch one killed
# mid-run, which cannot record its own end).
LINK_POLL = 10.0
LINK_POLL_RUNNING = 60.0

# `--memory-state`: the SuperLink's state (runs, nodes, messages and every array of every
# message) in plain Python objects instead of its SQLite database. The database costs an
# ORM query or several per request (about 2x the SuperLink's CPU per round, measured with
# benchmarks/bench_deploy.py) but is what lets runs, logs and node registrations survive a
# SuperLink restart, so it stays the default.
MEMORY_STATE = ":flwr-in-memory:"

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# After a predecessor killed with SIGKILL: its SuperLink dies with it (proc.guard_tree)
# but may hold the port a moment longer.
PORT_FREED_WITHIN = 10.0


def deployment_config(cfg: RunConfig, run_dir: str | None = None) -> RunConfig:
    """The run config as the deployed ServerApp gets it: sizes set, ``run.dir`` absolute."""
    if not (cfg.model.in_features and cfg.model.num_classes):
        raise ConfigError(
            "a deployed server has no data to infer the model's sizes from: set "
            "model.in-features (feature columns in the devices' files) and "
            "model.num-classes in the config"
        )
    directory = Path(run_dir) if run_dir else cfg.run_dir
    return cfg.replace(**{"run.dir": str(directory.expanduser().resolve())})


def control_address(host: str, port: int) -> str:
    """Where processes on this host reach the SuperLink (wildcards mean loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return format_address(host, port)


@dataclass
class ServerOptions:
    cfg: RunConfig
    host: str
    port: int
    state: ServerDir
    certs: CertPaths | None  # None: --insecure
    echo: Callable[[str], None] = print
    verbose: bool = False
    memory_state: bool = False  # see MEMORY_STATE
    extra_env: dict[str, str] = field(default_factory=dict)
    # Called with each round's metrics row as it lands (the live display on a terminal).
    on_round: Callable[[dict[str, Any]], None] | None = None

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def control(self) -> str:
        return control_address(self.host, self.port)


def check_certs(certs_dir: Path, host: str) -> CertPaths:
    paths = CertPaths.in_dir(certs_dir)
    missing = [
        p.name for p in (paths.ca_cert, paths.server_cert, paths.server_key) if not p.is_file()
    ]
    if missing:
        raise DeployError(
            f"no TLS certificates in {certs_dir} (missing {', '.join(missing)}); make them "
            f"with: pollinate certs create {certs_dir} --host <this server's name or IP> "
            "(or pass --insecure for a local experiment)"
        )
    hosts = certificate_hosts(paths.server_cert)
    local = control_address(host, 1).rsplit(":", 1)[0].strip("[]")
    if local not in hosts:
        raise DeployError(
            f"{paths.server_cert} is not valid for {local} (it covers {', '.join(hosts)}), "
            "which the server's own processes connect to; re-issue it with "
            f"pollinate certs create {certs_dir} --host {host}"
        )
    return paths


# ------------------------------------------------------------------------------- start


class _RunWatch:
    """Follows the run through its metrics.db and prints rounds as they land."""

    def __init__(self, opts: ServerOptions, submitted_at: float) -> None:
        self.opts = opts
        self.run_dir = opts.cfg.run_dir
        self.submitted_at = submitted_at
        self.printed = 0

    def poll(self) -> dict[str, str] | None:
        """This run's ``run`` table (None before the ServerApp created it)."""
        if not (self.run_dir / "metrics.db").is_file():
            return None
        try:
            info = read_run_info(self.run_dir)
            began = info.get("resumed_at") or info.get("started_at") or 0
            if float(began) < self.submitted_at - 1:
                return None  # a previous run's file, not yet reset by this one
            rounds = read_rounds(self.run_dir)
        except (MetricsError, ValueError, OSError, Exception):  # mid-write, locked, ...
            return None
        for row in rounds.itertuples():
            if int(row.round) >= 1 and int(row.round) > self.printed:
                self.printed = int(row.round)
                self.opts.echo(_round_line(row, self.opts.cfg.run.num_rounds))
                if self.opts.on_round is not None:
                    self.opts.on_round(row._asdict())
        return info


def _fmt(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "  -  "
    return "  -  " if math.isnan(v) else f"{v:.3f}"


def _round_line(row: Any, num_rounds: int) -> str:
    return (
        f"round {int(row.round)}/{num_rounds} | {int(row.train_users)} users trained, "
        f"{int(row.eval_users)} evaluated, {int(row.failures)} failed | "
        f"global acc {_fmt(row.global_accuracy)} | personal acc {_fmt(row.personal_accuracy)}"
        f" | {float(row.round_seconds):.2f} s"
    )


def refusal_message(line: str, state: ServerDir) -> str | None:
    """A SuperLink event line turned into the message ``server start`` prints, if it is one."""
    parsed = events.parse(line)
    if parsed is None:
        return None
    event, f = parsed
    peer = f.get("peer", "?")
    if event == events.TLS_REFUSED:
        reason = f.get("reason", "?")
        if reason == "HTTP_REQUEST":
            return (
                f"refused a connection from {peer}: it spoke plain HTTP to this TLS server "
                "(a node started with --insecure? devices need --root-cert ca.crt instead)"
            )
        return (
            f"refused a TLS connection from {peer} ({reason}): the device does not trust "
            f"this server's certificate? give it --root-cert {state.certs / 'ca.crt'}"
        )
    if event == events.KEY_REFUSED:
        key = f.get("key", "?")
        if f.get("why") == "unregistered":
            return (
                f"refused a node with an unregistered key {key}; to admit it run: "
                f"pollinate server register-node ITS_KEY.pub --state-dir {state.root}"
            )
        return (
            f"node with key {key} reconnected while its previous session is still open; "
            "it is admitted once that session times out (about 20 s)"
        )
    if event == events.ADMIN_REFUSED:
        return (
            f"refused an admin request from {peer} ({f.get('path', '?')}): the control API "
            "answers only on this host"
        )
    if event == events.NODE_ACTIVATED:
        return f"node {f.get('node_id', '?')} joined"
    if event == events.NODE_DEACTIVATED:
        return f"node {f.get('node_id', '?')} left"
    return None


def start_server(opts: ServerOptions) -> int:
    """Run the coordinator in the foreground until the run ends; returns the exit status."""
    cfg, state = opts.cfg, opts.state
    state.root.mkdir(parents=True, exist_ok=True)
    with single_instance(state.info_file, "server", address=opts.address) as previous:
        stale_run = _after_unclean_exit(opts, previous)
        if not _port_freed(opts.host, opts.port, PORT_FREED_WITHIN if stale_run else 0.0):
            raise DeployError(
                f"{opts.address} is already in use (another server?); pick another --address"
            )
        return _run(opts, cfg, state, stale_run)


def _after_unclean_exit(opts: ServerOptions, previous: dict[str, Any]) -> int | None:
    """Say so if the previous server died without cleaning up; the Flower run it left."""
    if previous.get("clean_exit") is not False:
        return None
    leftovers = int(previous.get("leftovers") or 0)
    killed = f"; stopped {leftovers} of its processes that were still running" if leftovers else ""
    opts.echo(
        f"server: the previous server (pid {previous.get('pid')}) ended without cleaning up{killed}"
    )
    run_id = previous.get("run_id")
    return int(run_id) if isinstance(run_id, int) else -1


def _port_freed(host: str, port: int, within: float) -> bool:
    """True once nothing listens on ``host:port`` (a killed predecessor's port frees late)."""
    deadline = time.monotonic() + within
    while port_in_use(host, port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def superlink_argv(opts: ServerOptions, state: ServerDir) -> list[str]:
    """The SuperLink's command line: its state database, and TLS + node auth or not."""
    argv = [
        sys.executable, "-m", "pollinate.deploy.superlink",
        "--host", opts.host, "--port", str(opts.port),
        "--database", MEMORY_STATE if opts.memory_state else str(state.database),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if opts.certs is None:
        return [*argv, "--insecure"]
    return [
        *argv,
        "--ssl-ca-certfile", str(opts.certs.ca_cert),
        "--ssl-certfile", str(opts.certs.server_cert),
        "--ssl-keyfile", str(opts.certs.server_key),
        "--enable-supernode-auth",
    ]  # fmt: skip


def _stop_stale_run(state: ServerDir, run_id: int, echo: Callable[[str], None]) -> None:
    """End the Flower run a killed server left "running" in the state database.

    Otherwise it stays running in ``flwr ls`` and the messages it had queued for the
    devices are still delivered: each surviving device would train once more for a run
    nobody waits on before it gets to this server's run.
    """
    try:
        link.stop_run(state.flwr_home, run_id)
    except DeployError:
        return  # already ended, or never stored (--memory-state)
    echo(f"server: stopped run {run_id}, left running by the previous server")


def _run(opts: ServerOptions, cfg: RunConfig, state: ServerDir, stale_run: int | None) -> int:
    echo = opts.echo
    root_cert = opts.certs.ca_cert if opts.certs else None
    link.write_connection(state.flwr_home, opts.control, root_cert)
    app_dir = write_app_dir(state.apps)
    state.run_config.write_text(to_toml(cfg))
    env = {**link.env_for_superlink(state.flwr_home), **opts.extra_env}
    argv = superlink_argv(opts, state)
    if opts.certs is None:
        echo(
            "WARNING: --insecure: no TLS and no node authentication; anyone who can reach "
            f"{opts.address} can join, read the model and send updates. Local experiments only."
        )

    refusals: list[str] = []

    def on_line(line: str) -> None:
        message = refusal_message(line, state)
        if message is not None:
            refusals.append(message)
            echo(f"server: {message}")

    echo_raw = (lambda name, line: echo(f"[{name}] {line}")) if opts.verbose else None
    record = partial(record_children, state.info_file)
    with Supervisor(state.logs, echo=echo_raw, record=record) as sup:
        superlink = sup.start("superlink", argv, env=env, on_line=on_line)
        host, port = opts.control.rsplit(":", 1)
        if not wait_for_port(host.strip("[]"), int(port), 60, superlink.running):
            tail = "\n".join(list(superlink.tail)[-5:])
            raise DeployError(
                f"the SuperLink did not start on {opts.address}: {tail or 'no output'} "
                f"(log: {superlink.log_path})"
            )
        mode = "TLS, node authentication on" if opts.certs else "INSECURE"
        echo(f"pollinate server: listening on {opts.address} ({mode}); state in {state.root}")
        if opts.certs is not None:
            _register_saved_keys(state, echo)
        if stale_run is not None and stale_run >= 0:
            _stop_stale_run(state, stale_run, echo)
        submitted_at = time.time()
        run_id = link.submit_run(state.flwr_home, app_dir, state.run_config)
        write_json(
            state.info_file,
            {
                **state.info(),
                "run_id": run_id,
                "run_dir": str(cfg.run_dir),
                "run_name": cfg.run.name,
                "num_rounds": cfg.run.num_rounds,
                "min_nodes": cfg.strategy.min_nodes,
                "address": opts.address,
                "control": opts.control,
                "insecure": opts.certs is None,
                "started_at": submitted_at,
            },
        )
        echo(
            f"run {run_id} '{cfg.run.name}': {cfg.run.num_rounds} rounds of "
            f"{cfg.strategy.name} + {cfg.personalization.method} ({cfg.model.name}), waiting "
            f"up to {cfg.server.node_wait_timeout:g} s for {cfg.strategy.min_nodes} node(s)"
        )
        echo(f"  metrics: pollinate metrics {cfg.run_dir}")
        echo(f"  status:  pollinate server status --state-dir {state.root}")
        return _follow(opts, sup, superlink, run_id, submitted_at)


def _register_saved_keys(state: ServerDir, echo: Callable[[str], None]) -> None:
    for key in sorted(state.nodes.glob("*.pub")):
        node_id, new = link.register_key(state.flwr_home, key)
        if new:
            echo(f"registered node key {key.name} as node {node_id}")


def _follow(
    opts: ServerOptions, sup: Supervisor, superlink: Any, run_id: int, submitted_at: float
) -> int:
    echo, state, cfg = opts.echo, opts.state, opts.cfg
    watch = _RunWatch(opts, submitted_at)
    next_link_check = time.monotonic() + LINK_POLL
    while True:
        if sup.stop_requested.is_set():
            name = signal.Signals(sup.stop_signal or signal.SIGINT).name
            echo(f"server: {name}: stopping run {run_id} and the SuperLink")
            _stop_run(state, run_id, cfg.run_dir, f"stopped by {name}")
            return EXIT_INTERRUPTED
        if not superlink.running():
            tail = [ln for ln in superlink.tail if ln.strip()][-3:]
            echo(
                f"error: the SuperLink exited with status {superlink.popen.returncode}: "
                f"{' | '.join(tail) or 'no output'} (log: {superlink.log_path})"
            )
            return EXIT_FAILED
        info = watch.poll()
        status = (info or {}).get("status", "")
        if status in ("finished", "failed", "stopped"):
            watch.poll()
            return _finish(opts, info or {})
        if time.monotonic() >= next_link_check:
            next_link_check = time.monotonic() + (LINK_POLL if info is None else LINK_POLL_RUNNING)
            failure = _flower_failure(state, run_id)
            if failure and info is not None:
                info = watch.poll()
                if (info or {}).get("status") in ("finished", "failed", "stopped"):
                    return _finish(opts, info or {})
                echo(f"error: the ServerApp ended without finishing the run: {failure}")
                echo(
                    f"  ServerApp log: FLWR_HOME={state.flwr_home} flwr log {run_id} "
                    f"{link.CONNECTION} --show"
                )
                return EXIT_FAILED
            if failure:
                echo(f"error: the run failed before its first round: {failure}")
                echo(
                    f"  ServerApp log: FLWR_HOME={state.flwr_home} flwr log {run_id} "
                    f"{link.CONNECTION} --show"
                )
                return EXIT_FAILED
        sup.wait(STATUS_POLL)


def _flower_failure(state: ServerDir, run_id: int) -> str | None:
    """Flower's reason if it already marked the run as ended while we saw no metrics."""
    try:
        runs = link.list_runs(state.flwr_home, run_id)
    except DeployError:
        return None
    for run in runs:
        status = str(run.get("status", ""))
        if status.startswith("finished") and status != "finished:completed":
            details = str(run.get("status-details", "") or "")
            return f"{status} {details if details not in ('', 'N/A') else ''}".strip()
    return None


def _finish(opts: ServerOptions, info: dict[str, str]) -> int:
    echo, cfg = opts.echo, opts.cfg
    status = info.get("status", "")
    if status == "finished":
        rounds = read_rounds(cfg.run_dir)
        if len(rounds) > 1:
            echo("")
            echo(summary_table(rounds))
        echo(f"\nrun finished; metrics: pollinate metrics {cfg.run_dir}")
        return EXIT_OK
    error = info.get("error", "") or "no reason recorded"
    error = _own_error(error)
    echo(f"error: the run {status}: {error}")
    echo(f"  metrics so far: pollinate metrics {cfg.run_dir}")
    return EXIT_FAILED


def _own_error(error: str) -> str:
    """A recorded error without the type name where it is one of Pollinate's own reasons."""
    for own in ("NodeWaitTimeout: ", "RoundFailed: "):
        if error.startswith(own):
            return error.removeprefix(own)
    return error


def _stop_run(state: ServerDir, run_id: int, run_dir: Path, reason: str) -> None:
    """Ask Flower to stop the run and record it as stopped in metrics.db (best effort)."""
    done = threading.Event()

    def stop() -> None:
        with contextlib.suppress(DeployError):
            link.stop_run(state.flwr_home, run_id)
        done.set()

    threading.Thread(target=stop, daemon=True).start()
    done.wait(8)
    try:
        if (run_dir / "metrics.db").is_file() and read_run_info(run_dir).get("status") == "running":
            recorder = MetricsRecorder(run_dir)
            recorder.finish("stopped", error=reason)
            recorder.close()
    except Exception:
        pass


# ------------------------------------------------------------------------------ status


def server_status(state: ServerDir) -> dict[str, Any]:
    """What ``pollinate server status`` shows: server, nodes, run and its progress."""
    info = state.info()
    running = instance_running(state.info_file)
    out: dict[str, Any] = {
        "state_dir": str(state.root),
        "running": running,
        "address": info.get("address"),
        "insecure": info.get("insecure"),
        "run_id": info.get("run_id"),
        "run_dir": info.get("run_dir"),
        "min_nodes": info.get("min_nodes"),
        "nodes": [],
        "run_status": None,
        "round": None,
        "num_rounds": info.get("num_rounds"),
        "error": None,
    }
    if running:
        try:
            out["nodes"] = [
                {"node_id": n.get("node-id"), "status": n.get("status")}
                for n in link.list_nodes(state.flwr_home)
            ]
        except DeployError as err:
            out["error"] = str(err)
        if info.get("run_id") is not None:
            try:
                runs = link.list_runs(state.flwr_home, int(info["run_id"]))
                out["flower_status"] = runs[0].get("status") if runs else None
            except DeployError:
                pass
    run_dir = info.get("run_dir")
    if run_dir and (Path(run_dir) / "metrics.db").is_file():
        try:
            run_info = read_run_info(run_dir)
            rounds = read_rounds(run_dir)
            out["run_status"] = run_info.get("status")
            out["round"] = int(rounds["round"].max()) if len(rounds) else 0
            if run_info.get("error"):
                error = run_info["error"]
                out["error"] = _own_error(error)
            if out["run_status"] == "running" and not running:
                out["run_status"] = "interrupted"
        except (MetricsError, Exception):
            pass
    return out


def render_status(status: dict[str, Any]) -> str:
    lines = []
    if status["running"]:
        mode = "INSECURE" if status.get("insecure") else "TLS + node authentication"
        lines.append(f"server:  running on {status['address']} ({mode})")
    else:
        lines.append(f"server:  not running (state folder {status['state_dir']})")
    online = [n for n in status["nodes"] if n["status"] == "online"]
    if status["running"]:
        need = status.get("min_nodes")
        lines.append(
            f"nodes:   {len(online)} online"
            + (f" (run needs {need})" if need else "")
            + f", {len(status['nodes'])} registered"
        )
        for node in status["nodes"]:
            lines.append(f"         {node['node_id']:>22}  {node['status']}")
    if status.get("run_id") is not None:
        run_state = status.get("run_status") or status.get("flower_status") or "starting"
        progress = (
            f", round {status['round']}/{status['num_rounds']}"
            if status.get("round") is not None
            else ""
        )
        lines.append(f"run:     {status['run_id']} {run_state}{progress}")
        lines.append(f"         pollinate metrics {status['run_dir']}")
    if status.get("error"):
        lines.append(f"error:   {status['error']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------- register-node


def register_node(state: ServerDir, public_key: Path) -> str:
    """Admit a device key: saved in ``<state>/nodes/`` and, if the server runs, registered."""
    data = load_node_public_key(public_key)
    fingerprint = key_fingerprint(data.split(b" ", 2)[0] + b" " + data.split(b" ", 2)[1])
    state.nodes.mkdir(parents=True, exist_ok=True)
    name = public_key.name if public_key.name.endswith(".pub") else f"{public_key.name}.pub"
    saved = state.nodes / name
    if saved.exists() and saved.read_bytes().split()[:2] != data.split()[:2]:
        raise DeployError(
            f"{saved} already holds a different key; rename the new key file and register again"
        )
    if not saved.exists():
        shutil.copyfile(public_key, saved)
    info = state.info()
    if not instance_running(state.info_file):
        return f"saved key {fingerprint} as {saved}; it is registered when the server starts"
    if info.get("insecure"):
        return f"saved key {fingerprint}; the running server is --insecure and admits any node"
    node_id, new = link.register_key(state.flwr_home, saved)
    if not new:
        return f"key {fingerprint} is already registered"
    return f"registered key {fingerprint} as node {node_id}"
