"""Run a Pollinate federation on Flower's simulation engine (Ray), in this process.

This is what ``pollinate run`` calls. It composes the ServerApp and ClientApp unchanged and
hands them to Flower's simulation runtime, so the ServerApp thread, the virtual SuperNodes
and the Ray actors that run the ClientApp are Flower's own. It differs from
``flwr run .`` only in what it skips: no FAB build, no detached SuperLink process and no
runtime dependency installation, so start-up is a few seconds and nothing outlives the
call. Three things shorten it further (``benchmarks/RESULTS.md``): Ray is started, as
Flower's Ray backend would start it, while this process imports torch and the apps; a
local Ray inherits the import path, so the workers it starts with it host the ClientApp
actors at once; and with a few nodes the ServerApp and the engine check for new messages
every few milliseconds instead of Flower's 0.1 s.

Users are spread over ``simulation.num-nodes`` Flower nodes; each node hosts a cohort (see
:mod:`pollinate.client.local`). ``num-nodes = 0`` picks one node per Ray worker slot
(``cpus / cpus-per-node``), which keeps every core busy without paying Flower's per-call
overhead once per user; ``num-nodes = data.num-users`` is Flower's one-node-per-user layout.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollinate.config import RunConfig, data_spec
from pollinate.data import load_federated_dataset

if TYPE_CHECKING:
    from flwr.serverapp import ServerApp

# Quiet and offline by default; the user's environment wins.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def count_users(cfg: RunConfig) -> int:
    return len(load_federated_dataset(data_spec(cfg)).user_ids)


def plan_nodes(cfg: RunConfig, num_users: int, cpus: int | None = None) -> int:
    """How many Flower nodes host the users."""
    if cfg.simulation.num_nodes:
        return min(cfg.simulation.num_nodes, num_users)
    cpus = cpus or os.cpu_count() or 1
    slots = max(1, int(cpus // cfg.simulation.cpus_per_node))
    return min(slots, num_users)


def ray_init_args(cfg: RunConfig, *, verbose: bool = False) -> dict[str, Any]:
    # Actor logs stay out of the live lines; a failing ClientApp still reaches the server
    # as an error reply with its reason.
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": verbose}
    if cfg.simulation.ray_address:
        init_args["address"] = cfg.simulation.ray_address
    return init_args


def backend_config(cfg: RunConfig, *, verbose: bool = False) -> dict[str, object]:
    return {
        "client_resources": {"num_cpus": cfg.simulation.cpus_per_node, "num_gpus": 0.0},
        "init_args": ray_init_args(cfg, verbose=verbose),
    }


# Seconds between the ServerApp's checks for replies on the in-memory grid, and between
# the engine's scans for messages to hand to the Ray actors (Flower: 0.1 s each, paid on
# every message exchange of every round). A scan visits every node, so the short interval
# is used only with a few nodes hosting cohorts, not with one node per user.
GRID_POLL = 0.005
ENGINE_POLL = 0.005
ENGINE_POLL_MAX_NODES = 64


def _import_apps(failed: list[BaseException]) -> None:
    try:
        import flwr.simulation.run_simulation  # noqa: F401  (Flower's engine, its state store)

        import pollinate.client.app  # torch and Flower's app API
        import pollinate.server.app  # noqa: F401
    except BaseException as err:  # re-raised in the caller's thread
        failed.append(err)


def start_ray(cfg: RunConfig, *, verbose: bool = False) -> int:
    """Start (or attach to) Ray as Flower's Ray backend would; returns the cluster's CPUs.

    Flower's backend skips its own ``ray.init`` when Ray is up, and shuts Ray down at the
    end of the run. Starting it here lets this process import torch and the apps while
    Ray's own processes start, instead of one after the other.
    """
    import ray

    failed: list[BaseException] = []
    importer = threading.Thread(target=_import_apps, args=(failed,), daemon=True)
    importer.start()
    if not ray.is_initialized():
        init_args = ray_init_args(cfg, verbose=verbose)
        # As flwr's RayBackend.init_ray: workers import what this process can.
        pythonpath = os.pathsep.join(sys.path)
        if os.environ.get("PYTHONPATH"):
            pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
        os.environ["PYTHONPATH"] = pythonpath
        if "address" in init_args:  # a running cluster's workers get the path with the job
            init_args["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
        # A local Ray inherits the environment instead: its workers, started with Ray,
        # then suit the job and host the actors at once (with a job runtime_env, as
        # Flower passes, Ray starts new workers for them, about a second later).
        init_args.setdefault("include_dashboard", False)
        ray.init(**init_args)
    importer.join()
    if failed:
        ray.shutdown()
        raise failed[0]
    return int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))


def _simulation_server_app(poll: float) -> ServerApp:
    """Pollinate's ServerApp, checking the in-memory grid for replies every ``poll`` s."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from pollinate.server.app import main

    app = ServerApp()

    @app.main()
    def simulation_main(grid: Grid, context: Context) -> None:
        if hasattr(grid, "pull_interval"):  # flwr's InMemoryGrid
            grid.pull_interval = min(grid.pull_interval, poll)
        main(grid, context)

    return app


@contextmanager
def _prompt_delivery(num_nodes: int) -> Iterator[None]:
    """Flower's engine, scanning for new messages every ENGINE_POLL s instead of 0.1 s.

    The scan is flwr's ``vce_api.add_messages_to_queue`` (Flower 1.42) with only the wait
    changed; it is swapped in for this run and put back afterwards.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    params = list(inspect.signature(original).parameters)
    if num_nodes > ENGINE_POLL_MAX_NODES or params != ["state", "queue", "nodes_mapping", "f_stop"]:
        yield  # many nodes (a scan is not free), or a Flower this was not written for
        return

    def add_messages_to_queue(
        state: Any, queue: Any, nodes_mapping: dict[int, int], f_stop: threading.Event
    ) -> None:
        while not f_stop.is_set():
            for node_id in nodes_mapping:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(ENGINE_POLL)

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


def run_simulation(cfg: RunConfig, *, verbose: bool = False) -> Path:
    """Run every round of ``cfg``; returns the run folder. Raises what the ServerApp raised."""
    import ray

    num_users = count_users(cfg)
    cpus = start_ray(cfg, verbose=verbose)
    if not verbose:  # after the imports: importing flwr sets its logger's level
        logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        from pollinate.server.app import absolute_paths

        cfg = absolute_paths(cfg)
        from flwr.app import Context, RecordDict
        from flwr.simulation.run_simulation import _run_simulation
        from flwr.supercore.telemetry import EventType

        from pollinate.client.app import app as client_app

        num_nodes = plan_nodes(cfg, num_users, cpus)
        context = Context(
            run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flat()
        )
        # `_run_simulation` is the engine behind flwr's public `run_simulation`; unlike the
        # public wrapper it accepts the ServerApp's context, which carries our run config.
        with _prompt_delivery(num_nodes):
            _run_simulation(
                num_supernodes=num_nodes,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=_simulation_server_app(
                    GRID_POLL if num_nodes <= ENGINE_POLL_MAX_NODES else 0.1
                ),
                backend_name="ray",
                backend_config=backend_config(cfg, verbose=verbose),  # type: ignore[arg-type]
                server_app_context=context,
                verbose_logging=verbose,
            )
    finally:
        if ray.is_initialized():  # Flower shuts Ray down unless it failed before starting
            ray.shutdown()
    return cfg.run_dir
