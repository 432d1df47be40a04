"""Flower's simulation runtime, entered one level below its deprecated public wrapper.

Why: the public ``flwr.simulation.run_simulation`` warns that it is deprecated and hands the
ServerApp a ``Context`` with an empty run config; the function behind it,
``run_simulation._run_simulation``, takes the ServerApp's context, so a run config reaches
the ServerApp as under ``flwr run``. It also sets Flower's process-wide ``TaskIdentity``
and never restores it; :func:`run_runtime` does. Stock Flower: ``flwr run`` (a FAB build, a
detached SuperLink) or the public wrapper without a run config. No stock fallback (the run
config would be silently lost): a changed signature is a one-line error.
"""

from __future__ import annotations

import importlib
from typing import Any

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.supercore.telemetry import EventType

from pollinate.flower_compat._core import mark_engaged, require_leading_parameters
from pollinate.flower_compat.identity import task_identity_kept

_runtime = importlib.import_module("flwr.simulation.run_simulation")

RUN_SIMULATION = f"{_runtime.__name__}._run_simulation"
# The leading parameters this module passes (Flower's own keyword defaults do the rest).
RUN_SIMULATION_PARAMS = (
    "num_supernodes",
    "exit_event",
    "client_app",
    "server_app",
    "backend_name",
    "backend_config",
    "client_app_attr",
    "server_app_attr",
    "server_app_context",
)


def server_context(run_config: dict[str, Any]) -> Context:
    """The ServerApp's context under the runtime, carrying ``run_config``."""
    return Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def run_runtime(
    server_app: ServerApp,
    client_app: ClientApp,
    *,
    num_nodes: int,
    backend_name: str,
    backend_config: dict[str, Any],
    run_config: dict[str, Any],
    verbose: bool = False,
) -> None:
    """Run ``server_app`` against ``num_nodes`` virtual nodes running ``client_app``.

    Raises what the ServerApp raised (Flower re-raises it from its thread).
    """
    run_simulation = _runtime._run_simulation
    require_leading_parameters(run_simulation, RUN_SIMULATION_PARAMS, what=RUN_SIMULATION)
    mark_engaged(RUN_SIMULATION)
    with task_identity_kept():
        run_simulation(
            num_supernodes=num_nodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name=backend_name,
            backend_config=backend_config,
            server_app_context=server_context(run_config),
            verbose_logging=verbose,
        )
