"""The deployment commands of ``pollinate`` (``certs``, ``server``, ``node``).

:func:`add_commands` adds them to the main parser in :mod:`pollinate.cli`; each handler
is a thin shell over a function in this package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pollinate.deploy.certs import DEFAULT_HOSTS, DeployError

# As in pollinate.cli: each handler imports what it runs (the main parser imports this module
# for every command, `--help` included; see the measured costs there).
if TYPE_CHECKING:
    from pollinate.deploy.stream import StreamSettings


def _print(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------ certs


def cmd_certs_create(args: argparse.Namespace) -> int:
    from pollinate.deploy.certs import create_certs

    hosts = [*DEFAULT_HOSTS, *(args.host or [])]
    paths, new_ca = create_certs(Path(args.dir), hosts)
    ca = "new CA" if new_ca else "existing CA"
    _print(f"server certificate for {', '.join(dict.fromkeys(hosts))} ({ca})")
    _print(f"  {paths.ca_cert}       copy to every device: node start --root-cert")
    _print(f"  {paths.ca_key}       keep secret (0600): signs server certificates")
    _print(f"  {paths.server_cert}   {paths.server_key} (0600): server start --certs {args.dir}")
    return 0


# ----------------------------------------------------------------------------- server


def _server_dir(args: argparse.Namespace):
    from pollinate.deploy.state import ServerDir, default_server_dir

    return ServerDir(Path(args.state_dir).expanduser() if args.state_dir else default_server_dir())


def cmd_server_start(args: argparse.Namespace) -> int:
    from pollinate import config
    from pollinate.deploy.proc import parse_address
    from pollinate.deploy.server import ServerOptions, check_certs, deployment_config, start_server

    state = _server_dir(args)
    cfg = deployment_config(config.load(*_run_choice(args, state)), args.run_dir)
    from pollinate.server.rundir import precheck
    from pollinate.server.tracking import check_tracking

    check_tracking(cfg)  # [tracking] on without its package: one line before anything starts
    precheck(cfg.run_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)
    try:
        host, port = parse_address(args.address)
    except ValueError as err:
        raise DeployError(f"--address: {err}") from None
    certs = None
    if not args.insecure:
        certs = check_certs(Path(args.certs).expanduser() if args.certs else state.certs, host)
    opts = ServerOptions(
        cfg=cfg,
        host=host,
        port=port,
        state=state,
        certs=certs,
        echo=_print,
        verbose=args.verbose,
        memory_state=args.memory_state,
    )
    if not sys.stdout.isatty():
        return start_server(opts)
    from pollinate.server.progress import LiveProgress

    with LiveProgress(cfg.run.num_rounds) as live:  # a terminal: a progress bar under the lines
        opts.echo = lambda text: live.console.print(text, markup=False, highlight=False)
        opts.on_round = live.update
        return start_server(opts)


def _run_choice(args: argparse.Namespace, state) -> tuple[Path | None, list[str]]:
    """The config file and overrides: --resume without --config takes the last run's."""
    overrides = list(args.set or [])
    if args.resume and args.overwrite:
        raise DeployError("--resume and --overwrite exclude each other: pick one")
    if args.overwrite:
        overrides.append("run.overwrite=true")
    if not args.resume:
        return (Path(args.config) if args.config else None), overrides
    overrides.append("run.resume=true")
    if args.config:
        return Path(args.config), overrides
    if not state.run_config.is_file():
        raise DeployError(f"--resume: {state.root} has no earlier run to resume; pass its --config")
    return state.run_config, [*overrides, "run.overwrite=false"]


def cmd_server_status(args: argparse.Namespace) -> int:
    from pollinate.deploy.server import render_status, server_status

    status = server_status(_server_dir(args))
    _print(json.dumps(status, indent=1) if args.format == "json" else render_status(status))
    return 0


def cmd_server_register(args: argparse.Namespace) -> int:
    from pollinate.deploy.server import register_node

    _print(register_node(_server_dir(args), Path(args.key)))
    return 0


# ------------------------------------------------------------------------------- node


def cmd_node_keygen(args: argparse.Namespace) -> int:
    from pollinate.deploy.certs import create_node_key

    key = create_node_key(Path(args.dir), args.name, force=args.force)
    _print(f"node key {key.fingerprint}")
    _print(f"  {key.private}      private (0600): node start --key {key.private}")
    _print(f"  {key.public}  public: on the server, pollinate server register-node")
    return 0


def cmd_node_start(args: argparse.Namespace) -> int:
    from pollinate.deploy.flags import serve_address
    from pollinate.deploy.node import (
        NodeOptions,
        check_data,
        check_key_options,
        start_node,
    )
    from pollinate.deploy.proc import parse_address
    from pollinate.deploy.state import NodeDir, default_node_dir

    try:
        parse_address(args.server)
    except ValueError as err:
        raise DeployError(f"--server: {err}") from None
    key = check_key_options(args.key, args.root_cert, args.insecure)
    root_cert = Path(args.root_cert).expanduser() if args.root_cert else None
    if root_cert is not None and not root_cert.is_file():
        raise DeployError(f"--root-cert '{root_cert}' does not exist")
    if args.device:  # checked here, on this machine: `cuda` without a GPU is one line
        from pollinate.device import DeviceUnavailable, resolve_device

        try:
            resolve_device(args.device)
        except DeviceUnavailable as err:
            raise DeployError(f"--device {err}") from None
    data = Path(args.data).expanduser()
    users = check_data(data, args.user, args.user_column, args.label_column)
    state = NodeDir(Path(args.state_dir).expanduser() if args.state_dir else default_node_dir())
    model_dir = Path(args.model_dir).expanduser() if args.model_dir else state.models
    serve = serve_address(args, allow_none=True)
    if serve is not None and args.user is None and len(users) > 1:
        raise DeployError(
            f"{data.name} holds {len(users)} users; the inference service serves one: pick it "
            "with --user, or pass --serve none"
        )
    stream = _node_start_stream(args, data, users, model_dir)
    opts = NodeOptions(
        server=args.server,
        data=data,
        users=users,
        user_id=args.user,
        state=state,
        model_dir=model_dir,
        key=key,
        root_cert=root_cert,
        serve=serve,
        runtime_port=args.runtime_port,
        user_column=args.user_column,
        label_column=args.label_column,
        device=args.device or None,
        threads=args.threads,
        stream=stream,
        echo=_print,
        verbose=args.verbose,
        allow_hosts=tuple(args.allow_host or ()),
    )
    return start_node(opts)


def _node_start_stream(
    args: argparse.Namespace, data: Path, users: list[str], model_dir: Path
) -> StreamSettings | None:
    """``node start --stream-*``: the settings of the streaming child, checked (broker too)."""
    from pollinate.deploy.stream import StreamSettings, check_settings, open_broker

    flags = {
        "--stream-requests": args.stream_requests,
        "--stream-predictions": args.stream_predictions,
    }
    if args.stream_broker is None:
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise DeployError(f"{given[0]} needs --stream-broker URL")
        return None
    missing = [flag for flag, value in flags.items() if value is None]
    if missing:
        raise DeployError(f"--stream-broker needs {' and '.join(missing)} NAME")
    user = args.user or (users[0] if len(users) == 1 else None)
    if user is None:
        raise DeployError(
            f"{data.name} holds {len(users)} users; streaming answers with one user's model: "
            "pick it with --user"
        )
    settings = StreamSettings(
        broker=args.stream_broker,
        requests=args.stream_requests,
        predictions=args.stream_predictions,
        model_dir=model_dir,
        model=args.stream_model,
        user=user,
    )
    check_settings(settings)
    open_broker(settings).close()  # unreachable or refusing: say so before anything starts
    return settings


def _stream_settings(args: argparse.Namespace) -> StreamSettings:
    from pollinate.deploy.state import NodeDir, default_node_dir
    from pollinate.deploy.stream import StreamSettings

    state = Path(args.state_dir).expanduser() if args.state_dir else default_node_dir()
    model_dir = Path(args.model_dir).expanduser() if args.model_dir else NodeDir(state).models
    return StreamSettings(
        broker=args.broker,
        requests=args.requests,
        predictions=args.predictions,
        model_dir=model_dir,
        model=args.model,
        user=args.user,
        group=args.group,
        consumer=args.consumer,
        dead_letter=args.dead_letter,
        batch=args.batch,
        maxlen=args.maxlen,
        max_deliveries=args.max_deliveries,
        claim_idle=args.claim_idle,
        threads=args.threads,
    )


def cmd_node_stream(args: argparse.Namespace) -> int:
    from pollinate.deploy.stream import stream_store

    if args.exit_with_parent:
        from pollinate.deploy.proc import watch_parent

        watch_parent()
    return stream_store(_stream_settings(args), _print)


def cmd_node_serve(args: argparse.Namespace) -> int:
    from pollinate.deploy.flags import serve_address
    from pollinate.deploy.node import serve_store

    address = serve_address(args, allow_none=False)
    assert address is not None
    return serve_store(
        Path(args.model_dir).expanduser(), *address, args.user, _print, args.allow_host or ()
    )


# ----------------------------------------------------------------------------- parser


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``certs``, ``server`` and ``node`` with their subcommands."""
    from pollinate.deploy.flags import add_serve_option, add_user_option

    certs = sub.add_parser("certs", help="TLS certificates for a deployed server")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    create = certs_sub.add_parser("create", help="make a CA and a server certificate")
    create.add_argument("dir", help="folder for ca.crt, ca.key, server.pem, server.key")
    create.add_argument(
        "--host",
        action="append",
        metavar="HOST",
        help="a name or IP address devices use to reach the server (repeatable); "
        f"{', '.join(DEFAULT_HOSTS)} are always included",
    )
    create.set_defaults(func=cmd_certs_create)

    server = sub.add_parser("server", help="run the coordinator of a deployment")
    server_sub = server.add_subparsers(dest="server_command", required=True)
    state_help = "server state folder (default $POLLINATE_HOME/server, ~/.pollinate/server)"

    start = server_sub.add_parser("start", help="start the server and run an experiment")
    start.add_argument("--config", help="experiment TOML (must set model.in-features/num-classes)")
    start.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    start.add_argument(
        "--address",
        default="127.0.0.1:9092",
        help="HOST:PORT to listen on (default 127.0.0.1:9092; 0.0.0.0:9092 for other machines)",
    )
    start.add_argument(
        "--insecure", action="store_true", help="no TLS, no node authentication (local tests)"
    )
    start.add_argument("--state-dir", help=state_help)
    start.add_argument("--certs", help="folder made by `certs create` (default <state>/certs)")
    start.add_argument("--run-dir", help="where results go (default runs/<run.name>)")
    start.add_argument("--verbose", action="store_true", help="echo the SuperLink's log")
    start.add_argument(
        "--memory-state",
        action="store_true",
        help="keep the SuperLink's state in memory: faster rounds, but runs and logs do "
        "not survive a restart (default: <state>/superlink.db)",
    )
    start.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the run folder from its last completed round (the "
        "config defaults to the last run's)",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in the run folder (only Pollinate's files are removed)",
    )
    start.set_defaults(func=cmd_server_start)

    status = server_sub.add_parser("status", help="nodes, round and state of the run")
    status.add_argument("--state-dir", help=state_help)
    status.add_argument("--format", choices=("table", "json"), default="table")
    status.set_defaults(func=cmd_server_status)

    register = server_sub.add_parser("register-node", help="admit a device's public key")
    register.add_argument("key", help="the device's KEY.pub (from `pollinate node keygen`)")
    register.add_argument("--state-dir", help=state_help)
    register.set_defaults(func=cmd_server_register)

    node = sub.add_parser("node", help="run a device of a deployment")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    node_state = "node state folder (default $POLLINATE_HOME/node, ~/.pollinate/node)"

    keygen = node_sub.add_parser("keygen", help="make this device's key pair")
    keygen.add_argument("dir", help="folder for NAME (private, 0600) and NAME.pub")
    keygen.add_argument("--name", default="node", help="file name (default node)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.set_defaults(func=cmd_node_keygen)

    nstart = node_sub.add_parser("start", help="join a server: train, keep and serve models")
    nstart.add_argument("--server", required=True, help="the server's HOST:PORT")
    nstart.add_argument("--data", required=True, help="this device's CSV or Parquet file")
    add_user_option(nstart, "train (and serve) only this user of the file")
    nstart.add_argument("--root-cert", help="the server's ca.crt (default: system CAs)")
    nstart.add_argument("--key", help="this device's private key (from `node keygen`)")
    nstart.add_argument("--model-dir", help="model store (default <state>/models)")
    add_serve_option(nstart, allow_none=True)
    nstart.add_argument("--insecure", action="store_true", help="no TLS (--insecure servers)")
    nstart.add_argument(
        "--allow-host",
        action="append",
        metavar="NAME",
        help="another Host name the inference service answers to (repeatable)",
    )
    nstart.add_argument("--state-dir", help=node_state)
    nstart.add_argument(
        "--runtime-port",
        type=int,
        default=0,
        help="local port between SuperNode and ClientApp worker (default: a free one)",
    )
    nstart.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for training (default: torch's, one per core; 1 when several "
        "nodes share one machine's cores)",
    )
    nstart.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="",
        help="where this device trains (default: the server's simulation.device; auto = "
        "cuda when torch sees a GPU)",
    )
    nstart.add_argument("--user-column", help="user id column (default: the server's config)")
    nstart.add_argument("--label-column", help="label column (default: the server's config)")
    nstart.add_argument("--verbose", action="store_true", help="echo the children's logs")
    nstart.add_argument(
        "--stream-broker",
        metavar="URL",
        help="also answer prediction requests from this broker (e.g. redis://127.0.0.1:6379/0)",
    )
    nstart.add_argument("--stream-requests", metavar="NAME", help="stream of requests to read")
    nstart.add_argument("--stream-predictions", metavar="NAME", help="stream to publish to")
    nstart.add_argument(
        "--stream-model",
        choices=("global", "personal"),
        default="personal",
        help="default personal",
    )
    nstart.set_defaults(func=cmd_node_start)

    nserve = node_sub.add_parser("serve", help="serve a model store without joining")
    nserve.add_argument(
        "--model-dir",
        required=True,
        help="the model store to serve, or one user's folder in it (with global.pt/personal.pt)",
    )
    add_serve_option(nserve, allow_none=False)
    add_user_option(nserve, "which user's models (needed if the store has several)")
    nserve.add_argument(
        "--allow-host",
        action="append",
        metavar="NAME",
        help="another name clients may use in the Host header (repeatable; localhost, "
        "127.0.0.1, ::1 and the --serve host are always allowed)",
    )
    nserve.set_defaults(func=cmd_node_serve)

    nstream = node_sub.add_parser(
        "stream", help="answer prediction requests from a message broker (Redis Streams)"
    )
    nstream.add_argument(
        "--broker", required=True, metavar="URL", help="e.g. redis://127.0.0.1:6379/0"
    )
    nstream.add_argument("--requests", required=True, metavar="NAME", help="stream to read")
    nstream.add_argument(
        "--predictions", required=True, metavar="NAME", help="stream to publish to"
    )
    _add_stream_options(nstream, node_state)
    nstream.set_defaults(func=cmd_node_stream)


def _add_stream_options(p: argparse.ArgumentParser, node_state: str) -> None:
    from pollinate.deploy.flags import add_user_option

    p.add_argument(
        "--model", choices=("global", "personal"), default="personal", help="default personal"
    )
    p.add_argument("--model-dir", help="model store or one user's folder (default <state>/models)")
    add_user_option(p, "whose models (needed if the store has several)")
    p.add_argument("--state-dir", help=node_state)
    p.add_argument("--group", help="consumer group (default pollinate-<model>)")
    p.add_argument(
        "--consumer",
        help="this consumer's name in the group; keep it across restarts (default: the host name)",
    )
    p.add_argument("--dead-letter", metavar="NAME", help="default <requests>:dead-letter")
    p.add_argument(
        "--batch", type=int, default=100, help="most requests read at a time (default 100)"
    )
    p.add_argument(
        "--maxlen",
        type=int,
        default=0,
        help="keep about this many predictions and dead letters (default 0: all)",
    )
    p.add_argument(
        "--max-deliveries",
        type=int,
        default=5,
        help="dead-letter a request delivered more often than this without an answer (default 5)",
    )
    p.add_argument(
        "--claim-idle",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="take over requests other consumers left unanswered this long (default 60)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)


__all__ = ["add_commands"]
