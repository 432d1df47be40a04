"""Run a Pollinate federation on Flower's simulation engine, in this process.

This is what ``pollinate run`` calls. It hands Pollinate's ServerApp and ClientApp, unchanged,
to the generic engine :func:`pollinate.simulation.apps.run_apps` (any Flower app pair runs
on it), with the nodes, backend, resources and run config taken from the run's config. It
differs from ``flwr run .`` only in what it skips: no FAB build, no detached SuperLink
process and no runtime dependency installation, and nothing outlives the call.

The engine's *backend* runs the ClientApp (``simulation.backend``):

- ``local`` (the default on one machine): worker processes forked from a server that
  imported the ClientApp once (:mod:`pollinate.simulation.workers`) and read the run's data
  once (:mod:`pollinate.simulation.preload`); the server starts before this process checks
  the data (:func:`start_workers_early`), so its import and reading run while this process
  does its own, and the workers share one parsed copy of a users file.
- ``ray`` (the default with ``simulation.ray-address``): Flower's Ray backend, on a local
  Ray or a cluster of many machines. Ray is started, as Flower's backend would start it,
  while this process imports torch and the apps, and a local Ray inherits the import path
  so the workers it starts with it host the ClientApp actors at once.

Either way, with a few nodes the ServerApp and the engine check for new messages every few
milliseconds instead of Flower's 0.1 s, and the engine's threads stop within
milliseconds of the last round instead of waiting out Flower's 1 s queue timeouts
(:mod:`pollinate.simulation.apps`).

Users are spread over ``simulation.num-nodes`` Flower nodes; each node hosts a cohort (see
:mod:`pollinate.client.local`). ``num-nodes = 0`` picks one node per Ray worker slot
(``cpus / cpus-per-node``), which keeps every core busy without paying Flower's per-call
overhead once per user; ``num-nodes = data.num-users`` is Flower's one-node-per-user layout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pollinate.config import ConfigError, RunConfig, check_against_data, data_spec
from pollinate.data import shared_federated_dataset
from pollinate.simulation import apps
from pollinate.simulation.apps import available_cpus
from pollinate.simulation.preload import RUN_CONFIG_ENV

# The apps, by reference: the local backend's workers load the ClientApp by it.
SERVER_APP = "pollinate.server.app:app"
CLIENT_APP = "pollinate.client.app:app"
# What a worker imports on its first message to load each dataset, imported once by the
# fork server instead (scikit-learn's loader is about a second of CPU per worker).
DATASET_MODULES = {"digits": ["sklearn.datasets"], "file": ["pandas"]}
# Imported by the fork server last: it reads the run's data once, for every worker it forks.
PRELOAD_MODULE = "pollinate.simulation.preload"


_log = logging.getLogger(__name__)


def with_device(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``simulation.device`` resolved to ``cpu`` or ``cuda``.

    The resolved device is what the ClientApps get and what the run's config.toml records
    (``pollinate run`` prints it on its first line; :func:`run_simulation` logs it).
    Only NVML is asked (:func:`pollinate.device.cuda_available`): this process
    creates no CUDA context, so the processes it starts can all use the GPU.

    Raises
    ------
    ConfigError
        ``simulation.device = 'cuda'`` where torch sees no GPU (one line: how to fix it).
    """
    from pollinate.device import DeviceUnavailable, resolve_device

    try:
        device = resolve_device(cfg.simulation.device)
    except DeviceUnavailable as err:
        raise ConfigError(f"simulation.device = {err}") from None
    return cfg if device == cfg.simulation.device else cfg.replace(**{"simulation.device": device})


def gpus_per_node(cfg: RunConfig, cpus: int) -> float:
    """Ray's ``num_gpus`` per node actor: a share of one GPU with device ``cuda``, else 0."""
    if cfg.simulation.device != "cuda":
        return 0.0
    return 1.0 / (cfg.simulation.nodes_per_gpu or worker_slots(cfg, cpus))


def count_users(cfg: RunConfig) -> int:
    """The run's number of users; refuses settings impossible for its data (ConfigError)."""
    dataset = shared_federated_dataset(data_spec(cfg))  # the ServerApp reuses it
    num_users = len(dataset.user_ids)
    check_against_data(
        cfg,
        num_users=num_users,
        num_features=dataset.num_features,
        num_classes=dataset.num_classes,
        num_nodes=plan_nodes(cfg, num_users),
    )
    return num_users


def worker_slots(cfg: RunConfig, cpus: int) -> int:
    """ClientApps that run at once: one per ``cpus-per-node`` CPUs (Ray's actor count)."""
    return apps.worker_slots(cpus, cfg.simulation.cpus_per_node)


def plan_nodes(cfg: RunConfig, num_users: int, cpus: int | None = None) -> int:
    """How many Flower nodes host the users."""
    if cfg.simulation.num_nodes:
        return min(cfg.simulation.num_nodes, num_users)
    return min(worker_slots(cfg, cpus or available_cpus()), num_users)


def engine_backend(cfg: RunConfig) -> str:
    """``local`` or ``ray``: where this run's ClientApps run."""
    if cfg.simulation.backend == "auto":
        return "ray" if cfg.simulation.ray_address else "local"
    return cfg.simulation.backend


def run_simulation(cfg: RunConfig, *, verbose: bool = False, num_users: int | None = None) -> Path:
    """Run every round of ``cfg``; returns the run folder. Raises what the ServerApp raised.

    ``num_users``: the dataset's user count, if the caller has it already. Ctrl-C / SIGTERM
    (in the main thread) mark the run ``interrupted`` before anything stops, then raise
    KeyboardInterrupt (:class:`pollinate.server.rundir.Terminated` for SIGTERM).
    """
    from pollinate.server.rundir import stop_signals

    with stop_signals():
        return _simulate(cfg, verbose=verbose, num_users=num_users)


def _pinned(cfg: RunConfig) -> RunConfig:
    """Run and store folders as absolute paths (as ``server.app.absolute_paths``): the
    ClientApps may run in another cwd. Not imported from there: importing the ServerApp
    here would end the overlap of its import with the workers' start."""
    return cfg.replace(
        **{"run.dir": str(cfg.run_dir.resolve()), "store.dir": str(cfg.store_dir.resolve())}
    )


def start_workers_early(cfg: RunConfig) -> None:
    """Start the local backend's fork server now (nothing else with the ``ray`` backend).

    It imports torch and the ClientApp and reads the run's data (:mod:`pollinate.
    simulation.preload`) while this process checks the data and imports Flower's engine,
    instead of after: on 2 cores that is most of a small run's start-up. Nothing is written;
    if the data then proves bad, the server goes with this process.
    """
    if engine_backend(cfg) == "local":
        apps.prestart_local(CLIENT_APP, cpus_per_node=cfg.simulation.cpus_per_node, **_preload(cfg))


def start_workers_from(flat: Mapping[str, Any]) -> bool:
    """:func:`start_workers_early` from a config not resolved yet (``pollinate run``'s file
    and ``--set`` items): the fork server's torch import then overlaps this process's own
    (resolving a config imports torch for the model registry, ~1 s).

    Only the few keys that say whether and how the local backend runs are read here, with
    their defaults; the fork server resolves the rest itself when it reads the data. Does
    nothing (False) where they are not plain values: the config check says what is wrong.
    """
    backend = flat.get("simulation.backend", "auto")
    address = flat.get("simulation.ray-address", "")
    cpus = flat.get("simulation.cpus-per-node", 1.0)
    dataset = flat.get("data.dataset", "digits")
    if not (isinstance(backend, str) and isinstance(address, str) and isinstance(dataset, str)):
        return False
    if isinstance(cpus, bool) or not isinstance(cpus, int | float) or not cpus > 0:
        return False
    if backend == "ray" or (backend == "auto" and address):
        return False
    try:
        text = json.dumps(dict(flat))
    except (TypeError, ValueError):  # e.g. a TOML date: not a config value anyway
        return False
    apps.prestart_local(
        CLIENT_APP,
        cpus_per_node=float(cpus),
        preload=[*DATASET_MODULES.get(dataset, []), PRELOAD_MODULE],
        preload_env={RUN_CONFIG_ENV: text},
    )
    return True


def _preload(cfg: RunConfig) -> dict[str, Any]:
    """What the fork server imports and reads besides the ClientApp (its data, once)."""
    return {
        "preload": [*DATASET_MODULES.get(cfg.data.dataset, []), PRELOAD_MODULE],
        "preload_env": {RUN_CONFIG_ENV: json.dumps(cfg.to_flat())},
    }


def _simulate(cfg: RunConfig, *, verbose: bool, num_users: int | None) -> Path:
    backend = engine_backend(cfg)
    if cfg.simulation.device == "auto":  # `pollinate run` has resolved (and printed) it
        cfg = with_device(cfg)
        _log.info("simulation.device = auto: the ClientApps train on %s", cfg.simulation.device)
    if num_users is None:
        start_workers_early(cfg)
        num_users = count_users(cfg)
    cfg = _pinned(cfg)
    ray_address = cfg.simulation.ray_address or None
    if backend == "ray":
        # The nodes follow the cluster's CPUs: start (or attach to) Ray first; run_apps
        # then finds it running (and shuts it down at the end).
        cpus, _ = apps.start_ray(SERVER_APP, ray_address=ray_address, verbose=verbose)
    else:
        cpus = available_cpus()
    try:
        apps.run_apps(
            SERVER_APP,
            CLIENT_APP,
            num_nodes=plan_nodes(cfg, num_users, cpus),
            backend=backend,
            cpus_per_node=cfg.simulation.cpus_per_node,
            gpus_per_node=gpus_per_node(cfg, cpus) if backend == "ray" else 0.0,
            ray_address=ray_address if backend == "ray" else None,
            run_config=cfg.to_flat(),
            verbose=verbose,
            **_preload(cfg),
        )
    finally:
        if backend == "ray":
            _stop_ray()
    return cfg.run_dir


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():  # run_apps stops it, unless it failed before its engine ran
        ray.shutdown()
