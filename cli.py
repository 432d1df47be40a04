"""``pollinate``: the command line. A thin shell over functions the tests call directly.

Exit codes: 0 success, 1 the run itself failed, 2 bad input (config, data, files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pollinate.server.summary import PLOT_SUFFIXES, plot_rounds, summary_table

# Each command imports what it runs inside its function, on purpose: `import pollinate.cli`
# takes 0.11-0.15 s, and 8-11 s with the modules of every command at the top (torch, Flower,
# pandas, plotly; measured on 2 shared cores under load). `pollinate --help` and a typo in a
# flag must not pay for torch.
if TYPE_CHECKING:  # only annotations here: the readers import it when they run
    import pandas as pd

    from pollinate.config import RunConfig

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input; printed as one line, exit code 2."""


def _bad_input_types() -> tuple[type[BaseException], ...]:
    from pollinate.client.predictor import PredictError
    from pollinate.client.serving import ServingError
    from pollinate.config import ConfigError
    from pollinate.data import DataError
    from pollinate.deploy.certs import DeployError
    from pollinate.models import ArtifactError, UnknownModelError
    from pollinate.server.metrics import MetricsError
    from pollinate.server.rundir import RunDirError
    from pollinate.simulation.apps import AppError

    return (
        InputError,
        AppError,
        ConfigError,
        DataError,
        ArtifactError,
        UnknownModelError,
        MetricsError,
        PredictError,
        ServingError,
        DeployError,
        RunDirError,
    )


# ------------------------------------------------------------------------------- run


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's config: CONFIG with --set/--run-dir/--overwrite, or a run folder's own."""
    from pollinate import config
    from pollinate.server.rundir import RESUME_MAY_CHANGE

    overrides = list(args.set or [])
    if args.resume:
        if args.config or args.run_dir or args.overwrite:
            raise InputError(
                "--resume RUN_DIR continues that run with its own config: leave out CONFIG, "
                "--run-dir and --overwrite"
            )
        for item in overrides:
            key = config.parse_override(item)[0]
            if key not in RESUME_MAY_CHANGE:
                raise InputError(
                    f"--set {key}: a resumed run keeps its config; only "
                    f"{', '.join(k for k in RESUME_MAY_CHANGE if not k.startswith('run.'))} "
                    "may change"
                )
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            raise InputError(f"--resume {args.resume}: no config.toml there, not a run folder")
        dir_ = json.dumps(str(Path(args.resume).resolve()))
        return config.load(saved, [*overrides, f"run.dir={dir_}", "run.resume=true"])
    if not args.config:
        raise InputError("pollinate run needs a CONFIG file (or --resume RUN_DIR)")
    if args.run_dir:
        overrides.append(f"run.dir={json.dumps(args.run_dir)}")
    if args.overwrite:
        overrides.append("run.overwrite=true")
    return config.load(args.config, overrides)


def _start_workers_first(args: argparse.Namespace) -> None:
    """The local backend's fork server, started from the config file and ``--set`` items
    before they are resolved (:func:`pollinate.simulation.engine.start_workers_from`)."""
    from pollinate import config
    from pollinate.simulation.engine import start_workers_from

    if args.resume or not args.config:
        return
    try:
        flat = config.read_toml(args.config)
        flat.update(config.parse_override(item) for item in args.set or [])
    except Exception:  # run_config reads them again and says what is wrong
        return
    start_workers_from(flat)


def cmd_run(args: argparse.Namespace) -> int:
    _start_workers_first(args)
    from pollinate.server import rundir
    from pollinate.server.metrics import read_rounds, read_run_info
    from pollinate.server.tracking import check_tracking
    from pollinate.simulation.engine import (
        count_users,
        run_simulation,
        start_workers_early,
        with_device,
    )

    cfg = with_device(run_config(args))  # `cuda` without a GPU: one line, exit 2
    if not cfg.run.resume:  # the workers' imports overlap the data check (a resume may stop)
        start_workers_early(cfg)
    num_users = count_users(cfg)  # data errors surface here, before any file is written
    check_tracking(cfg)
    # Held for the whole command; the ServerApp (in this process) takes it again.
    with rundir.held(cfg.run_dir):
        rundir.prepare(cfg.run_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)
        if cfg.run.resume and read_run_info(cfg.run_dir).get("status") == "finished":
            print(f"{cfg.run_dir}: the run finished all {cfg.run.num_rounds} rounds already\n")
            print(summary_table(read_rounds(cfg.run_dir)))
            return 0
        verb = "resuming" if cfg.run.resume else "pollinate run:"
        print(
            f"{verb} {cfg.run.name} | {cfg.data.dataset}, {num_users} users | "
            f"{cfg.strategy.name} + {cfg.personalization.method} | {cfg.run.num_rounds} "
            f"rounds on {cfg.simulation.device} -> {cfg.run_dir}",
            flush=True,
        )
        _live_lines()
        try:
            with _round_display(cfg.run.num_rounds):
                run_dir = run_simulation(cfg, verbose=args.verbose, num_users=num_users)
        except KeyboardInterrupt:
            print(f"\ninterrupted; continue with: pollinate run --resume {cfg.run_dir}")
            raise
    print()
    print(summary_table(read_rounds(run_dir)))
    print(f"\nmetrics: pollinate metrics {run_dir}")
    return 0


def cmd_simulate_app(args: argparse.Namespace) -> int:
    """Any Flower ServerApp/ClientApp pair on Pollinate's engine (thin over ``run_apps``)."""
    from pollinate.simulation.apps import parse_run_config, run_apps

    sys.path.insert(0, os.path.abspath(args.app_dir))  # as `flwr run DIR`: the app's folder
    run_apps(
        args.server_app,
        args.client_app,
        num_nodes=args.nodes,
        backend=args.backend,
        cpus_per_node=args.cpus_per_node,
        ray_address=args.ray_address,
        run_config=parse_run_config(args.run_config or []),
        verbose=args.verbose,
    )
    return 0


def _live_lines() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("pollinate")
    log.handlers = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


@contextlib.contextmanager
def _round_display(num_rounds: int) -> Iterator[None]:
    """On a terminal, a live progress bar under the round lines; elsewhere the lines only."""
    if not sys.stdout.isatty():
        yield
        return
    from pollinate.server.progress import LiveProgress

    log = logging.getLogger("pollinate")
    saved = log.handlers
    with LiveProgress(num_rounds) as live:
        log.handlers = [live]
        try:
            yield
        finally:
            log.handlers = saved


# --------------------------------------------------------------------------- metrics


def cmd_metrics(args: argparse.Namespace) -> int:
    from pollinate.server.metrics import read_clients, read_rounds
    from pollinate.server.tables import select_columns

    if args.follow:
        return cmd_follow(args)
    df = read_clients(args.run_dir) if args.clients else read_rounds(args.run_dir)
    if args.plot:
        plot_rounds(read_rounds(args.run_dir), _plot_path(args.plot))
        print(f"wrote {args.plot}")
        return 0
    print(render(select_columns(df, args.columns), args.format), end="")
    if args.format == "table":
        _status_note(args.run_dir)
    return 0


def _status_note(run_dir: str) -> None:
    """A run that is not finished says so below the table (stderr: the table stays clean)."""
    from pollinate.server.metrics import read_run_info

    info = read_run_info(run_dir)
    status = info.get("status", "")
    if status in ("interrupted", "failed", "stopped"):
        why = f": {info['error']}" if info.get("error") else ""
        print(
            f"run {status}{why}; continue with: pollinate run --resume {run_dir}", file=sys.stderr
        )
    elif status == "running":
        print("run still running", file=sys.stderr)


def render(df: pd.DataFrame, fmt: str) -> str:
    from pollinate.server.tables import format_table, terminal_width

    if fmt == "csv":
        return str(df.to_csv(index=False))
    if fmt == "json":
        records = json.loads(df.to_json(orient="records"))
        return json.dumps(records, indent=1) + "\n"
    return format_table(df, terminal_width())


def cmd_follow(args: argparse.Namespace) -> int:
    from pollinate.server.follow import follow_rounds
    from pollinate.server.tables import follow_printer

    if args.clients or args.plot:
        raise InputError("--follow prints round rows as they land; drop --clients / --plot")
    printer = follow_printer(args.format, args.columns)
    end = follow_rounds(
        args.run_dir, printer, on_wait=lambda m: print(m, file=sys.stderr, flush=True)
    )
    if end.writer_gone:
        print(
            f"error: the run in {args.run_dir} stopped writing: its process is gone but its "
            "status is still 'running' (killed?)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"run {end.status}" + (f": {end.error}" if end.error else ""), file=sys.stderr)
    return 0 if end.status == "finished" else EXIT_FAILED


# ---------------------------------------------------------------------- report, data


def _plot_path(path: str) -> Path:
    if Path(path).suffix.lower() not in PLOT_SUFFIXES:
        raise InputError(f"--plot '{path}' must end in .png, .svg or .pdf")
    return Path(path)


def cmd_report(args: argparse.Namespace) -> int:
    from pollinate.server.report import load_run, run_labels, write_report

    dirs = [Path(d) for d in args.run_dirs]
    if args.plot:
        from pollinate.server.report_static import plot_runs

        plot = _plot_path(args.plot)  # before any reading: a bad name fails at once
        runs = [load_run(d) for d in dirs]
        for run, label in zip(runs, run_labels(runs), strict=True):
            run.label = label
        print(f"wrote {plot_runs(runs, plot)}")
        if not args.output:
            return 0
    out = (
        Path(args.output)
        if args.output
        else dirs[0] / "report.html"
        if len(dirs) == 1
        else Path("report.html")
    )
    print(f"wrote {write_report(dirs, out)}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from pollinate import config
    from pollinate.data import load_federated_dataset
    from pollinate.data.stats import label_counts

    plot = _plot_path(args.plot) if args.plot else None
    cfg = config.load(args.config, list(args.set or []))
    dataset = load_federated_dataset(config.data_spec(cfg))
    counts = label_counts(dataset)
    table = counts.table()
    if plot is not None:
        from pollinate.server.report_static import plot_data_split

        plot_data_split(counts, plot, dataset.describe())
        print(f"wrote {args.plot}")
        return 0
    if args.format == "json":
        body = {
            "dataset": dataset.describe(),
            "users": len(counts.user_ids),
            "num_classes": counts.num_classes,
            "mean_tv_distance": counts.mean_tv,
            "global_distribution": counts.global_distribution().tolist(),
            "per_user": json.loads(table.to_json(orient="records")),
        }
        print(json.dumps(body, indent=1))
        return 0
    if args.format == "table":
        print(dataset.describe())
        print(
            f"label heterogeneity: mean total-variation distance to the global label "
            f"distribution {counts.mean_tv:.4f} (0 = iid, 1 = disjoint)\n"
        )
    print(render(table, args.format), end="")
    return 0


# ----------------------------------------------------------------------------- sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    from pollinate import config
    from pollinate.simulation.sweep import (
        format_comparison,
        parse_grid,
        plan_sweep,
        run_sweep,
        write_tables,
    )

    if args.parallel < 1:
        raise InputError(f"--parallel must be >= 1, got {args.parallel}")
    axes = parse_grid(args.grid or [])
    base = config.load(args.config, list(args.set or []))
    name = args.name or f"{base.run.name}-sweep"
    out_dir = Path(args.out) if args.out else Path("runs") / name
    runs = plan_sweep(
        args.config, axes, seeds=args.seeds, sets=list(args.set or []), out_dir=out_dir, name=name
    )
    print(
        f"pollinate sweep: {name} | {len(runs) // args.seeds} grid points x {args.seeds} "
        f"seed(s) = {len(runs)} runs, {args.parallel} at a time -> {out_dir}",
        flush=True,
    )
    run_sweep(args.config, runs, parallel=args.parallel, echo=lambda m: print(m, flush=True))
    keys = [a.key for a in axes]
    sweep_csv, runs_csv, table = write_tables(runs, keys, out_dir)
    print()
    print(format_comparison(table, keys), end="")
    print(f"\ntables: {sweep_csv} (per grid point), {runs_csv} (per run)")
    finished = [r.run_dir for r in runs if r.status == "finished"]
    if finished:
        from pollinate.server.report import write_report

        print(f"report: {write_report(finished, out_dir / 'report.html')}")
    failed = [r for r in runs if r.status != "finished"]
    if failed:
        print(f"error: {len(failed)} of {len(runs)} runs failed", file=sys.stderr)
        return EXIT_FAILED
    return 0


# --------------------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    from pollinate.client.predictor import predict_file

    n = predict_file(
        args.model_dir,
        args.model,
        args.input,
        args.output,
        args.user,
        label_column=args.label_column,
        user_column=args.user_column,
        id_column=args.id_column,
        db=args.db,
        db_table=args.db_table,
        chunk_rows=args.chunk_rows,
    )
    where = [w for w in (args.output, args.db and f"{args.db} (table {args.db_table})") if w]
    print(f"scored {n} rows with the {args.model} model -> {' and '.join(where)}")
    return 0


def cmd_predictions_get(args: argparse.Namespace) -> int:
    import pandas as pd

    from pollinate.client.predictions_db import list_predictions

    rows = list_predictions(
        args.db, args.id, args.model, all_versions=args.all_versions, table=args.db_table
    )
    if not rows:
        which = f"{args.model} " if args.model else ""
        raise InputError(
            f"no {which}prediction stored for id {args.id!r} in {args.db} (table "
            f"{args.db_table}); pollinate predict ... --db {args.db} writes them"
        )
    if args.format == "json":
        print(json.dumps(rows if args.all_versions or len(rows) > 1 else rows[0], indent=1))
        return 0
    df = pd.DataFrame(rows)
    df["probabilities"] = [json.dumps(p) for p in df["probabilities"]]
    print(render(df, args.format), end="")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from pollinate import configdoc

    return configdoc.command(output=args.format, write_files=args.write, check=args.check)


# ------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    from pollinate.deploy.flags import add_user_option

    p = argparse.ArgumentParser(
        prog="pollinate",
        description="Federated learning with per-user personalized and global models.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a federated simulation from a config file",
        epilog="Every config key with its default and allowed values, and the registered "
        "models, datasets, strategies and personalization methods: `pollinate config`.",
    )
    run.add_argument("config", nargs="?", help="experiment TOML file, e.g. configs/quickstart.toml")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=0.1 (repeatable)",
    )
    run.add_argument("--run-dir", help="where results go (default runs/<run.name>)")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last completed round",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in the folder (only Pollinate's own files are removed)",
    )
    run.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    run.set_defaults(func=cmd_run, quick_exit=True)

    conf = sub.add_parser(
        "config",
        help="every config key: default, allowed values (registered names), meaning",
        description="Every run-config key, from the schema (config.py and the registries).",
    )
    conf.add_argument("--format", choices=("markdown", "toml"), default="markdown")
    conf.add_argument(
        "--write", action="store_true", help="refresh README.md's key table and pyproject's mirror"
    )
    conf.add_argument("--check", action="store_true", help="exit 1 if either is stale")
    conf.set_defaults(func=cmd_config)

    sim = sub.add_parser(
        "simulate-app",
        help="run any Flower ServerApp/ClientApp pair on Pollinate's simulation engine",
    )
    sim.add_argument("server_app", help="the ServerApp, as module:attribute")
    sim.add_argument("client_app", help="the ClientApp, as module:attribute")
    sim.add_argument("--nodes", type=int, required=True, help="virtual SuperNodes")
    sim.add_argument("--backend", choices=("local", "ray"), default="local")
    sim.add_argument("--cpus-per-node", type=float, default=1.0, help="CPUs per ClientApp")
    sim.add_argument("--ray-address", help="a running Ray cluster (with --backend ray)")
    sim.add_argument(
        "--run-config", action="append", metavar="KEY=VALUE", help="run config (repeatable)"
    )
    sim.add_argument("--app-dir", default=".", help="folder the modules import from (default .)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own logs")
    sim.set_defaults(func=cmd_simulate_app, quick_exit=True)

    met = sub.add_parser("metrics", help="show a run's per-round or per-client metrics")
    met.add_argument("run_dir", help="a run folder, e.g. runs/quickstart")
    met.add_argument("--clients", action="store_true", help="per-client rows")
    met.add_argument("--format", choices=("table", "csv", "json"), default="table")
    met.add_argument("--plot", metavar="FILE.png", help="write accuracy/loss curves to a file")
    met.add_argument(
        "--columns", metavar="A,B,C", help="only these columns, in this order (e.g. round,failures)"
    )
    met.add_argument(
        "--follow",
        action="store_true",
        help="for a run in progress: print each round as it lands, until the run ends",
    )
    met.set_defaults(func=cmd_metrics)

    rep = sub.add_parser("report", help="write a run's HTML report (several runs: side by side)")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s)")
    rep.add_argument(
        "-o",
        "--output",
        metavar="FILE.html",
        help="where to write it (default RUN_DIR/report.html; with several runs report.html)",
    )
    rep.add_argument("--plot", metavar="FILE.png", help="a static image of the main charts")
    rep.set_defaults(func=cmd_report)

    dat = sub.add_parser(
        "data", help="show a config's users, samples and label distribution, without training"
    )
    dat.add_argument("config", help="experiment TOML file, e.g. configs/quickstart.toml")
    dat.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    dat.add_argument("--format", choices=("table", "csv", "json"), default="table")
    dat.add_argument("--plot", metavar="FILE.png", help="samples per user and labels per user")
    dat.set_defaults(func=cmd_data)

    sw = sub.add_parser("sweep", help="run a grid of configs x seeds and compare them")
    sw.add_argument("config", help="the base experiment TOML file")
    sw.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2",
        help="a key and the values to try, e.g. --grid train.lr=0.1,0.01 (repeatable: the "
        "grid is every combination)",
    )
    sw.add_argument("--seeds", type=int, default=1, help="seeds per grid point (run.seed + i)")
    sw.add_argument("--parallel", type=int, default=1, help="runs at once on this machine")
    sw.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a key in every run"
    )
    sw.add_argument("--name", help="sweep name (default <run.name>-sweep)")
    sw.add_argument("--out", help="sweep folder (default runs/<sweep name>)")
    sw.set_defaults(func=cmd_sweep)

    pred = sub.add_parser("predict", help="score a CSV/Parquet file with a stored model (batch)")
    pred.add_argument("input", metavar="IN", help="features file, .csv or .parquet")
    pred.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="where to write input + predictions (.csv or .parquet); -o, --db or both",
    )
    pred.add_argument(
        "--db",
        metavar="DB",
        help="also upsert the predictions into a database table: a SQLite file path or a "
        "SQLAlchemy URL (sqlite:///x.db, postgresql://user@host/db)",
    )
    pred.add_argument(
        "--db-table", default="predictions", help="the table's name (default predictions)"
    )
    pred.add_argument(
        "--id-column",
        help="the column that identifies each row (the database key; not a feature; "
        "default: a column named id)",
    )
    pred.add_argument("--model-dir", required=True, help="a model store, e.g. a device's")
    pred.add_argument("--model", choices=("personal", "global"), default="personal")
    add_user_option(pred, "whose model (default: the store's only user)")
    pred.add_argument("--label-column", help="a column to copy through, not a feature")
    pred.add_argument("--user-column", help="a user-id column to copy through, not a feature")
    pred.add_argument(
        "--chunk-rows",
        type=int,
        default=65_536,
        help="rows read, scored and written at a time (bounds memory; default 65536)",
    )
    pred.set_defaults(func=cmd_predict)

    preds = sub.add_parser("predictions", help="read predictions stored by predict --db")
    preds_sub = preds.add_subparsers(dest="predictions_command", required=True)
    get = preds_sub.add_parser("get", help="the stored prediction for an id")
    get.add_argument("--db", required=True, metavar="DB", help="SQLite file path or SQLAlchemy URL")
    get.add_argument("--id", required=True, help="the row id (as in the --id-column)")
    get.add_argument("--model", choices=("personal", "global"), help="one kind (default: both)")
    get.add_argument(
        "--all-versions", action="store_true", help="every stored model version, newest first"
    )
    get.add_argument("--db-table", default="predictions", help="default predictions")
    get.add_argument("--format", choices=("table", "csv", "json"), default="table")
    get.set_defaults(func=cmd_predictions_get)

    from pollinate.deploy.cli import add_commands  # certs, server, node

    add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return _run_command(build_parser().parse_args(argv))


def entry() -> None:
    """The ``pollinate`` command: :func:`main`, then a quick exit where the command allows.

    Tearing down an interpreter that has torch, Flower (gRPC, SQLAlchemy) and their
    C++ state loaded takes 0.5-1.5 s on a 2-core machine, longer than a small run's
    rounds. ``pollinate run`` has closed its files and stopped its processes when it
    returns, so it ends the process at once (streams flushed) instead.
    """
    args = build_parser().parse_args()
    code = _run_command(args)
    if getattr(args, "quick_exit", False):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _run_command(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except KeyboardInterrupt as err:
        from pollinate.server.rundir import Terminated

        print("interrupted", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:  # one line, never a traceback, for what the user can fix
        if isinstance(err, _bad_input_types()):
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        root = err.__cause__ or err
        if isinstance(root, _bad_input_types()):
            print(f"error: {root}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if getattr(args, "verbose", False):
            raise
        print(f"error: the run failed: {type(root).__name__}: {root}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    entry()
