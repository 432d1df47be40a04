"""Run a Pollinate federation on Flower's simulation engine, in this process.

This is what ``pollinate run`` calls. It composes the ServerApp and ClientApp unchanged and
hands them to Flower's simulation runtime, so the ServerApp thread, the virtual SuperNodes,
the message queues and the state they go through are Flower's own. It differs from
``flwr run .`` only in what it skips: no FAB build, no detached SuperLink process and no
runtime dependency installation, and nothing outlives the call.

The engine's *backend* runs the ClientApp (``simulation.backend``):

- ``local`` (the default on one machine): worker processes forked from a server that
  imported the ClientApp once (:mod:`pollinate.simulation.workers`); that import runs
  while this process does its own, so a run starts in about the time of a torch import.
- ``ray`` (the default with ``simulation.ray-address``): Flower's Ray backend, on a local
  Ray or a cluster of many machines. Ray is started, as Flower's backend would start it,
  while this process imports torch and the apps, and a local Ray inherits the import path
  so the workers it starts with it host the ClientApp actors at once.

Either way, with a few nodes the ServerApp and the engine check for new messages every few
milliseconds instead of Flower's 0.1 s, and the engine's threads stop within
milliseconds of the last round instead of waiting out Flower's 1 s queue timeouts.

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
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING, Any

from pollinate.config import RunConfig, check_against_data, data_spec
from pollinate.data import load_federated_dataset

if TYPE_CHECKING:
    from flwr.serverapp import ServerApp

    from pollinate.simulation.workers import WorkerPool

# Quiet and offline by default; the user's environment wins.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def count_users(cfg: RunConfig) -> int:
    """The run's number of users; refuses settings impossible for its data (ConfigError)."""
    dataset = load_federated_dataset(data_spec(cfg))
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
    return max(1, int(cpus // cfg.simulation.cpus_per_node))


def plan_nodes(cfg: RunConfig, num_users: int, cpus: int | None = None) -> int:
    """How many Flower nodes host the users."""
    if cfg.simulation.num_nodes:
        return min(cfg.simulation.num_nodes, num_users)
    return min(worker_slots(cfg, cpus or available_cpus()), num_users)


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


# The ClientApp the workers of the local backend load, by reference.
CLIENT_APP = "pollinate.client.app:app"
# What a worker imports on its first message to load each dataset, imported once by the
# fork server instead (scikit-learn's loader is about a second of CPU per worker).
DATASET_MODULES = {"digits": ["sklearn.datasets"], "file": ["pandas"]}
# The thread-pool sizes OpenMP and MKL read when torch loads them, set for the workers.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Seconds between the engine threads' checks of the stop event while they wait for work.
STOP_POLL = 0.02


def engine_backend(cfg: RunConfig) -> str:
    """``local`` or ``ray``: where this run's ClientApps run."""
    if cfg.simulation.backend == "auto":
        return "ray" if cfg.simulation.ray_address else "local"
    return cfg.simulation.backend


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _start_method() -> str:
    """``forkserver`` where the platform has it (Linux, macOS), else ``spawn``."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def _start_fork_server(cfg: RunConfig, threads: int) -> None:
    """Launch multiprocessing's fork server, which imports torch and the ClientApp.

    Returns as soon as the server process is launched (its imports run on); started before
    this process imports torch, so the thread settings below reach only the server.
    """
    import multiprocessing
    from multiprocessing import forkserver

    from pollinate.simulation.workers import detached_from_main

    modules = [CLIENT_APP.partition(":")[0], *DATASET_MODULES.get(cfg.data.dataset, [])]
    multiprocessing.set_forkserver_preload(modules)
    # OpenMP sizes its thread pool when torch loads it: as Ray gives an actor
    # OMP_NUM_THREADS = its CPUs. torch.set_num_threads in an already-forked worker is
    # not the same: rounds ran about 1.5x slower with the pool sized for the machine.
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update(dict.fromkeys(THREAD_VARS, str(threads)))
    try:
        with detached_from_main():
            forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start_workers(
    cfg: RunConfig, size: int, *, verbose: bool, out: list[Any], failed: list[BaseException]
) -> None:
    """Start the local backend's workers (forked once the fork server has its imports)."""
    try:
        from pollinate.simulation.workers import WorkerPool

        pool = WorkerPool(
            size,
            CLIENT_APP,
            method=_start_method(),
            threads=_worker_threads(cfg),
            quiet=not verbose,
        )
        out.append(pool)
    except BaseException as err:  # re-raised in the caller's thread
        failed.append(err)


def _worker_threads(cfg: RunConfig) -> int:
    return max(1, int(cfg.simulation.cpus_per_node))


def start_local(cfg: RunConfig, num_users: int, cpus: int, *, verbose: bool = False) -> WorkerPool:
    """Start the local backend's workers while this process imports the apps.

    The fork server imports torch and the ClientApp in its own process, on another core,
    while this thread imports the same for the ServerApp: the two imports overlap instead
    of each worker paying for its own after the driver's.
    """
    size = min(worker_slots(cfg, cpus), plan_nodes(cfg, num_users, cpus))
    if _start_method() == "forkserver":
        _start_fork_server(cfg, _worker_threads(cfg))
    pools: list[Any] = []
    failed: list[BaseException] = []
    starter = threading.Thread(
        target=_start_workers,
        args=(cfg, size),
        kwargs={"verbose": verbose, "out": pools, "failed": failed},
        daemon=True,
    )
    starter.start()
    _import_apps(failed)
    starter.join()
    if failed:
        for pool in pools:
            pool.close()
        raise failed[0]
    return pools[0]


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


class _Hurried:
    """A stop event whose ``wait`` lasts at most ``poll`` s (Flower's scan waits 0.1 s)."""

    def __init__(self, event: threading.Event, poll: float) -> None:
        self._event = event
        self._poll = poll

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(self._poll if timeout is None else min(timeout, self._poll))


@contextmanager
def _prompt_delivery(num_nodes: int) -> Iterator[None]:
    """Flower's engine, scanning for new messages every ENGINE_POLL s instead of 0.1 s.

    Flower's own scan (``vce_api.add_messages_to_queue``) runs unchanged; it only gets a
    stop event that waits less between scans.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    scan = vce_api.add_messages_to_queue
    expected = ["state", "queue", "nodes_mapping", "f_stop"]
    if num_nodes > ENGINE_POLL_MAX_NODES or _params(scan) != expected:
        yield  # many nodes (a scan is not free), or a Flower this was not written for
        return

    def prompt_scan(state: Any, queue: Any, nodes: Any, f_stop: threading.Event) -> None:
        scan(state, queue, nodes, _Hurried(f_stop, ENGINE_POLL))  # type: ignore[arg-type]

    with _swapped(vce_api, "add_messages_to_queue", prompt_scan):
        yield


@contextmanager
def _swapped(module: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


class _StopAwareQueue:
    """A queue whose timed ``get`` gives up within STOP_POLL s once ``stop`` is set.

    Flower's engine threads wait for work with ``get(timeout=1.0)`` and check the stop
    event in between, so every run ended with up to a second of waiting.
    """

    def __init__(self, queue: Any, stop: threading.Event) -> None:
        self._queue = queue
        self._stop = stop

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._queue.get_nowait()
            except Empty:
                pass
            left = STOP_POLL if deadline is None else min(STOP_POLL, deadline - time.monotonic())
            if not block or left <= 0 or self._stop.is_set():
                raise Empty
            try:
                return self._queue.get(timeout=left)
            except Empty:
                continue

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


@contextmanager
def _prompt_stop() -> Iterator[None]:
    """Flower's engine worker and reply injector, waiting on stop-aware queues."""
    from flwr.server.superlink.fleet.vce import vce_api

    worker, inject = vce_api.worker, vce_api.put_message_into_state
    expected = (
        ["messageins_queue", "messageres_queue", "node_info_store", "backend", "f_stop", "metrics"],
        ["state", "queue", "f_stop"],
    )
    if (_params(worker), _params(inject)) != expected:
        yield  # a Flower this was not written for: its own waits
        return

    def prompt_worker(
        ins: Any, res: Any, stores: Any, backend: Any, f_stop: threading.Event, metrics: Any
    ) -> None:
        worker(_StopAwareQueue(ins, f_stop), res, stores, backend, f_stop, metrics)  # type: ignore[arg-type]

    def prompt_inject(state: Any, queue: Any, f_stop: threading.Event) -> None:
        inject(state, _StopAwareQueue(queue, f_stop), f_stop)  # type: ignore[arg-type]

    with (
        _swapped(vce_api, "worker", prompt_worker),
        _swapped(vce_api, "put_message_into_state", prompt_inject),
    ):
        yield


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


@contextmanager
def _local_backend(pool: WorkerPool) -> Iterator[None]:
    """Flower's engine loop (``vce_api.run_api``) with the local backend in Ray's place.

    Flower 1.42's ``start_vce`` always builds its Ray backend; it hands ``run_api`` a
    factory for it, and this swaps in one for :class:`LocalBackend` over ``pool``.
    Everything else (node registration, the ClientApp check, the queues, the threads, the
    state) stays Flower's.
    """
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import Backend

    class LocalBackend(Backend):
        """Flower's ``Backend`` contract over the worker pool, one message per worker."""

        def build(self, app_fn: Any) -> None:
            pass  # the workers load the ClientApp by reference (a ClientApp need not pickle)

        @property
        def num_workers(self) -> int:
            return pool.size

        def is_worker_idle(self) -> bool:
            return pool.has_idle()

        def process_message(self, message: Any, context: Any) -> Any:
            return pool.run(message, context)

        def terminate(self) -> None:
            pool.close()

    run_api = vce_api.run_api

    def run_api_locally(app_fn: Any, backend_fn: Any, *rest: Any) -> None:
        run_api(app_fn, lambda: LocalBackend({}), *rest)

    with _swapped(vce_api, "run_api", run_api_locally):
        yield


def run_simulation(cfg: RunConfig, *, verbose: bool = False, num_users: int | None = None) -> Path:
    """Run every round of ``cfg``; returns the run folder. Raises what the ServerApp raised.

    ``num_users``: the dataset's user count, if the caller has it already. Ctrl-C / SIGTERM
    (in the main thread) mark the run ``interrupted`` before anything stops, then raise
    KeyboardInterrupt (:class:`pollinate.server.rundir.Terminated` for SIGTERM).
    """
    from pollinate.server.rundir import stop_signals

    with stop_signals():
        return _simulate(cfg, verbose=verbose, num_users=num_users)


def _simulate(cfg: RunConfig, *, verbose: bool, num_users: int | None) -> Path:
    backend = engine_backend(cfg)
    if num_users is None:
        num_users = count_users(cfg)
    pool = None
    if backend == "local":
        cpus = available_cpus()
        pool = start_local(cfg, num_users, cpus, verbose=verbose)
    else:
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
        with ExitStack() as engine:
            engine.enter_context(_prompt_delivery(num_nodes))
            engine.enter_context(_prompt_stop())
            if pool is not None:
                engine.enter_context(_local_backend(pool))
            # `_run_simulation` is the engine behind flwr's public `run_simulation`; unlike
            # the public wrapper it accepts the ServerApp's context, with our run config.
            _run_simulation(
                num_supernodes=num_nodes,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=_simulation_server_app(
                    GRID_POLL if num_nodes <= ENGINE_POLL_MAX_NODES else 0.1
                ),
                backend_name=backend,
                backend_config=backend_config(cfg, verbose=verbose),  # type: ignore[arg-type]
                server_app_context=context,
                verbose_logging=verbose,
            )
    finally:
        if pool is not None:  # Flower's engine stops it too, unless the run never started
            pool.close()
        if backend == "ray":
            import ray

            if ray.is_initialized():  # Flower shuts Ray down unless it failed before starting
                ray.shutdown()
    return cfg.run_dir
