"""Run a Pollinate federation on Flower's simulation engine (Ray), in this process.

This is what ``pollinate run`` calls. It composes the ServerApp and ClientApp unchanged and
hands them to Flower's simulation runtime, so the ServerApp thread, the virtual SuperNodes
and the Ray actors that run the ClientApp are Flower's own. It differs from
``flwr run .`` only in what it skips: no FAB build, no detached SuperLink process and no
runtime dependency installation, so start-up is a couple of seconds and nothing outlives
the call.

Users are spread over ``simulation.num-nodes`` Flower nodes; each node hosts a cohort (see
:mod:`pollinate.client.local`). ``num-nodes = 0`` picks one node per Ray worker slot
(``cpus / cpus-per-node``), which keeps every core busy without paying Flower's per-call
overhead once per user; ``num-nodes = data.num-users`` is Flower's one-node-per-user layout.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pollinate.config import RunConfig, data_spec
from pollinate.data import load_federated_dataset

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


def backend_config(cfg: RunConfig, *, verbose: bool = False) -> dict[str, object]:
    # Actor logs stay out of the live lines; a failing ClientApp still reaches the server
    # as an error reply with its reason.
    init_args: dict[str, object] = {"logging_level": logging.ERROR, "log_to_driver": verbose}
    if cfg.simulation.ray_address:
        init_args["address"] = cfg.simulation.ray_address
    return {
        "client_resources": {"num_cpus": cfg.simulation.cpus_per_node, "num_gpus": 0.0},
        "init_args": init_args,
    }


def run_simulation(cfg: RunConfig, *, verbose: bool = False) -> Path:
    """Run every round of ``cfg``; returns the run folder. Raises what the ServerApp raised."""
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from pollinate.client.app import app as client_app
    from pollinate.server.app import absolute_paths
    from pollinate.server.app import app as server_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = absolute_paths(cfg)
    num_nodes = plan_nodes(cfg, count_users(cfg))
    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flat()
    )
    # `_run_simulation` is the engine behind flwr's public `run_simulation`; unlike the
    # public wrapper it accepts the ServerApp's context, which carries our run config.
    _run_simulation(
        num_supernodes=num_nodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config(cfg, verbose=verbose),  # type: ignore[arg-type]
        server_app_context=context,
        verbose_logging=verbose,
    )
    return cfg.run_dir
