"""Run any Flower ServerApp/ClientApp pair on Flower's simulation engine, in this process.

:func:`run_apps` is the engine, with nothing of Pollinate's config in it: a ServerApp, a
ClientApp, a number of nodes, a backend and its resources, a run config. Pollinate's own
run (:func:`pollinate.simulation.engine.run_simulation`) composes it; a Flower user's
quickstart-style app runs on it unchanged (``pollinate simulate-app module:server
module:client --nodes N``).

The ServerApp thread, the virtual SuperNodes, the message queues and the state they go
through are Flower's own (:mod:`pollinate.flower_compat.runtime`). The *backend* runs the
ClientApp:

- ``local``: worker processes forked from a server that imported the ClientApp's module
  once (:mod:`pollinate.simulation.workers`), started while this process imports the
  ServerApp, so a run starts in about the time of one torch import;
- ``ray``: Flower's Ray backend, on a local Ray or a cluster (``ray_address``), started
  while this process imports the apps.

With up to ``FAST_POLL_MAX_NODES`` nodes the ServerApp and the engine check for new
messages every few milliseconds instead of Flower's 0.1 s, and wake each other when they
store one (:mod:`pollinate.flower_compat.doorbell`); either way the engine's
threads stop within milliseconds of the last round instead of waiting out Flower's 1 s
queue timeouts (:mod:`pollinate.flower_compat.vce`, :mod:`pollinate.flower_compat.inmemory_grid`).
Every such patch is undone when the run ends.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import tomllib

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from pollinate.simulation.workers import WorkerPool

# Quiet and offline by default; the user's environment wins.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

BACKENDS = ("local", "ray")
# Seconds between the ServerApp's checks for replies on the in-memory grid, and between
# the engine's scans for messages to hand to the backend (Flower: 0.1 s each, paid on
# every message exchange of every round). A scan visits every node, so the short interval
# is used only with a few nodes, not with thousands.
GRID_POLL = 0.005
STOCK_GRID_POLL = 0.1
ENGINE_POLL = 0.005
FAST_POLL_MAX_NODES = 64
# Seconds between the engine threads' checks of the stop event while they wait for work.
STOP_POLL = 0.02
# The thread-pool sizes OpenMP and MKL read when torch loads them, set for the workers.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class AppError(ValueError):
    """A bad app reference or engine setting; its message is one line saying the fix."""


def load_app(ref: str, kind: str) -> Any:
    """``"package.module:attr"`` -> the ``kind`` (``ServerApp`` / ``ClientApp``) it names."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    expected = {"ServerApp": ServerApp, "ClientApp": ClientApp}[kind]
    module_name, attr = _split_reference(ref, kind)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AppError(f"{kind} reference {ref!r}: cannot import {module_name!r} ({err})") from err
    if not hasattr(module, attr):
        raise AppError(f"{kind} reference {ref!r}: module {module_name!r} has no {attr!r}")
    app = getattr(module, attr)
    if not isinstance(app, expected):
        raise AppError(f"{kind} reference {ref!r} is a {type(app).__name__}, not a flwr {kind}")
    return app


def _split_reference(ref: str, kind: str) -> tuple[str, str]:
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise AppError(f"{kind} reference {ref!r} is not 'module:attribute' (e.g. my_app:app)")
    return module_name, attr


def parse_run_config(items: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> a run config; ``v`` is a TOML value (``2``, ``0.1``, ``true``,
    ``"text"``), or else the text as it is (as ``flwr run --run-config``)."""
    config: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise AppError(f"run config item {item!r} is not key=value (e.g. lr=0.1)")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        if not isinstance(value, bool | int | float | str):
            raise AppError(f"run config {key!r}: only a number, true/false or text, not {text!r}")
        config[key] = value
    return config


def reference_of(app: object) -> str | None:
    """``"module:attr"`` naming ``app`` as a module global, if one does (workers load by it)."""
    for name, module in list(sys.modules.items()):
        if name == "__main__":
            continue  # a worker cannot import the caller's script by that name
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if value is app:
                return f"{name}:{attr}"
    return None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_slots(cpus: int, cpus_per_node: float) -> int:
    """ClientApps that run at once: one per ``cpus_per_node`` CPUs (Ray's actor count)."""
    return max(1, int(cpus // cpus_per_node))


def _start_method() -> str:
    """``forkserver`` where the platform has it (Linux, macOS), else ``spawn``."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def _start_fork_server(
    modules: Sequence[str], threads: int, env: Mapping[str, str] | None = None
) -> None:
    """Launch multiprocessing's fork server, which imports ``modules`` (torch, the ClientApp).

    Returns as soon as the server process is launched (its imports run on); started before
    this process imports torch, so the thread settings below reach only the server. ``env``:
    more variables the server (and so every worker) starts with, for what its ``modules``
    read when imported.
    """
    import multiprocessing
    from multiprocessing import forkserver

    from pollinate.simulation.workers import detached_from_main

    multiprocessing.set_forkserver_preload(list(modules))
    # OpenMP sizes its thread pool when torch loads it: as Ray gives an actor
    # OMP_NUM_THREADS = its CPUs. torch.set_num_threads in an already-forked worker is
    # not the same: rounds ran about 1.5x slower with the pool sized for the machine.
    extra = dict(env or {})
    saved = {k: os.environ.get(k) for k in (*THREAD_VARS, *extra)}
    os.environ.update(dict.fromkeys(THREAD_VARS, str(threads)))
    os.environ.update(extra)
    try:
        with detached_from_main():
            forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def prestart_local(
    client_ref: str,
    *,
    cpus_per_node: float = 1.0,
    preload: Sequence[str] = (),
    preload_env: Mapping[str, str] | None = None,
) -> None:
    """Launch the local backend's fork server ahead of :func:`run_apps`, which then finds it
    running: its imports (torch, the ClientApp, ``preload``) run while the caller does what
    comes first (checking the data, say). The same settings as ``run_apps`` must follow."""
    if _start_method() == "forkserver":
        threads = max(1, int(cpus_per_node))
        _start_fork_server([client_ref.partition(":")[0], *preload], threads, preload_env)


def _import_engine(server_app: ServerApp | str, failed: list[BaseException]) -> list[Any]:
    """Import Flower's engine (and the ServerApp, if a reference); errors go to ``failed``."""
    try:
        import pollinate.flower_compat.inmemory_grid
        import pollinate.flower_compat.runtime
        import pollinate.flower_compat.vce  # noqa: F401  (Flower's engine, seconds to import)

        if isinstance(server_app, str):
            return [load_app(server_app, "ServerApp")]
        return [server_app]
    except BaseException as err:  # re-raised in the caller's thread
        failed.append(err)
        return []


def _new_pool(
    size: int, client_ref: str, threads: int, *, verbose: bool, run_config: dict[str, Any]
) -> WorkerPool:
    from pollinate.simulation.workers import WorkerPool

    return WorkerPool(
        size,
        client_ref,
        method=_start_method(),
        threads=threads,
        quiet=not verbose,
        run_config=run_config,
    )


def start_local(
    client_ref: str,
    server_app: ServerApp | str,
    *,
    size: int,
    threads: int,
    preload: Sequence[str] = (),
    preload_env: Mapping[str, str] | None = None,
    verbose: bool = False,
    run_config: dict[str, Any] | None = None,
) -> tuple[WorkerPool, ServerApp]:
    """Start the local backend's workers while this process imports the engine and ServerApp.

    The fork server imports torch and the ClientApp in its own process, on another core,
    while this thread imports the same for the ServerApp: the two imports overlap instead
    of each worker paying for its own after the driver's.
    """
    if _start_method() == "forkserver":
        _start_fork_server([client_ref.partition(":")[0], *preload], threads, preload_env)
    pools: list[WorkerPool] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:
            pools.append(
                _new_pool(size, client_ref, threads, verbose=verbose, run_config=run_config or {})
            )
        except BaseException as err:  # re-raised in the caller's thread
            failed.append(err)

    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    loaded = _import_engine(server_app, failed)
    starter.join()
    if failed:
        for pool in pools:
            pool.close()
        raise failed[0]
    return pools[0], loaded[0]


def ray_init_args(*, ray_address: str | None = None, verbose: bool = False) -> dict[str, Any]:
    # Actor logs stay out of the caller's output; a failing ClientApp still reaches the
    # server as an error reply with its reason.
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": verbose}
    if ray_address:
        init_args["address"] = ray_address
    return init_args


def start_ray(
    server_app: ServerApp | str, *, ray_address: str | None = None, verbose: bool = False
) -> tuple[int, ServerApp]:
    """Start (or attach to) Ray as Flower's Ray backend would; returns its CPUs, the ServerApp.

    Flower's backend skips its own ``ray.init`` when Ray is up, and shuts Ray down at the
    end of the run. Starting it here lets this process import torch and the apps while
    Ray's own processes start, instead of one after the other.
    """
    import ray

    failed: list[BaseException] = []
    loaded: list[Any] = []
    importer = threading.Thread(
        target=lambda: loaded.extend(_import_engine(server_app, failed)), daemon=True
    )
    importer.start()
    if not ray.is_initialized():
        init_args = ray_init_args(ray_address=ray_address, verbose=verbose)
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
    return int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)), loaded[0]


def with_run_config(app: ClientApp, run_config: Mapping[str, Any]) -> ClientApp:
    """``app``, with ``run_config`` filled into each node context's run config.

    ``flwr run`` gives every node the app's run config; Flower's simulation runtime gives
    the nodes none. (The local backend's workers do the same themselves.)
    """
    from flwr.clientapp import ClientApp

    from pollinate.simulation.workers import filled_run_config

    config = dict(run_config)

    class RunConfigured(ClientApp):
        def __call__(self, message: Any, context: Any) -> Any:
            with filled_run_config(context, config):
                return app(message=message, context=context)

    return RunConfigured()


def _check(num_nodes: int, backend: str, cpus_per_node: float) -> None:
    if backend not in BACKENDS:
        raise AppError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if num_nodes < 1:
        raise AppError(f"num_nodes must be at least 1, got {num_nodes}")
    if not cpus_per_node > 0:
        raise AppError(f"cpus_per_node must be above 0, got {cpus_per_node}")


def _client_reference(client_app: ClientApp | str) -> str:
    ref = client_app if isinstance(client_app, str) else reference_of(client_app)
    if ref is None:
        raise AppError(
            "the local backend's workers load the ClientApp by reference: pass it as "
            "'module:attribute' (or define it at module level), or use backend='ray'"
        )
    return ref


def run_apps(
    server_app: ServerApp | str,
    client_app: ClientApp | str,
    *,
    num_nodes: int,
    backend: str = "local",
    cpus_per_node: float = 1.0,
    ray_address: str | None = None,
    run_config: Mapping[str, Any] | None = None,
    preload: Sequence[str] = (),
    preload_env: Mapping[str, str] | None = None,
    verbose: bool = False,
    gpus_per_node: float = 0.0,
) -> None:
    """Run a Flower ServerApp against ``num_nodes`` virtual nodes running a ClientApp.

    Parameters
    ----------
    server_app, client_app
        The apps, or ``"module:attribute"`` references to them. The local backend's
        workers import the ClientApp by reference; an object defined at module level is
        found by name.
    num_nodes
        Virtual SuperNodes; node ``i`` gets ``node_config = {"partition-id": i,
        "num-partitions": num_nodes}`` as in Flower's simulation.
    backend
        ``"local"`` (worker processes on this machine) or ``"ray"`` (Flower's Ray backend).
    cpus_per_node
        CPUs each running ClientApp gets: the local backend runs ``cpus // cpus_per_node``
        workers with that many threads each; Ray gets it as ``client_resources``.
    ray_address
        A running Ray cluster to attach to (``ray`` backend only).
    run_config
        The run config the ServerApp's and every node's ``context.run_config`` carries.
    preload
        Modules the local backend's fork server imports once besides the ClientApp's.
    preload_env
        Environment variables the fork server starts with (read by ``preload``'s modules).
    verbose
        Flower's and the workers' logs on the console.
    gpus_per_node
        Ray only: the share of a GPU each node actor asks for (``client_resources``
        ``num_gpus``; 0.25 = four actors per GPU). The local backend's workers all see
        every GPU and share it.

    Raises
    ------
    AppError
        A bad reference or setting (one line). Otherwise what the ServerApp raised.
    """
    _check(num_nodes, backend, cpus_per_node)
    for app, kind in ((server_app, "ServerApp"), (client_app, "ClientApp")):
        if isinstance(app, str):
            _split_reference(app, kind)  # before any process starts
    config = dict(run_config or {})
    if backend == "local":
        if ray_address:
            raise AppError("ray_address needs backend='ray'")
        client_ref = _client_reference(client_app)
        threads = max(1, int(cpus_per_node))
        size = min(worker_slots(available_cpus(), cpus_per_node), num_nodes)
        pool, server = start_local(
            client_ref,
            server_app,
            size=size,
            threads=threads,
            preload=preload,
            preload_env=preload_env,
            verbose=verbose,
            run_config=config,
        )
        with _closing(pool):
            run_client: ClientApp = load_app(client_ref, "ClientApp")
            _run_engine(
                server,
                run_client,
                num_nodes,
                "local",
                cpus_per_node,
                {},
                config,
                verbose,
                pool=pool,
            )
        return
    _, server = start_ray(server_app, ray_address=ray_address, verbose=verbose)
    init_args = ray_init_args(ray_address=ray_address, verbose=verbose)
    try:
        loaded = load_app(client_app, "ClientApp") if isinstance(client_app, str) else client_app
        client = with_run_config(loaded, config)
        _run_engine(
            server,
            client,
            num_nodes,
            "ray",
            cpus_per_node,
            init_args,
            config,
            verbose,
            gpus_per_node=gpus_per_node,
        )
    finally:
        import ray

        if ray.is_initialized():  # Flower shuts Ray down unless it failed before starting
            ray.shutdown()


@contextmanager
def _closing(pool: WorkerPool) -> Iterator[None]:
    try:
        yield
    finally:  # Flower's engine stops it too, unless the run never started
        pool.close()


def _run_engine(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    backend: str,
    cpus_per_node: float,
    init_args: dict[str, Any],
    run_config: dict[str, Any],
    verbose: bool,
    *,
    pool: WorkerPool | None = None,
    gpus_per_node: float = 0.0,
) -> None:
    from pollinate.flower_compat import inmemory_grid, runtime, vce
    from pollinate.flower_compat.doorbell import Doorbell

    if not verbose:  # after the imports: importing flwr sets its logger's level
        logging.getLogger("flwr").setLevel(logging.WARNING)
    fast = num_nodes <= FAST_POLL_MAX_NODES
    # With a few nodes the grid and the engine also wake each other when they store work
    # (a push, a reply) instead of waiting for their next poll. Not with thousands: each
    # reply would then make the grid pull every reply still outstanding.
    sent = Doorbell(vce.SCAN_RUNG) if fast else None
    replied = Doorbell(inmemory_grid.REPLY_WAIT) if fast else None
    with ExitStack() as patches:
        # Every run: the ServerApp's grid lists the nodes only once all are registered.
        poll = GRID_POLL if fast else STOCK_GRID_POLL
        patches.enter_context(
            inmemory_grid.fast_in_memory_poll(
                poll, expected_nodes=num_nodes, sent=sent, replied=replied
            )
        )
        if fast:
            patches.enter_context(vce.prompt_delivery(ENGINE_POLL, sent=sent))
        patches.enter_context(vce.prompt_stop(STOP_POLL, replied=replied))
        if pool is not None:
            patches.enter_context(vce.local_backend(pool))
        runtime.run_runtime(
            server_app,
            client_app,
            num_nodes=num_nodes,
            backend_name=backend,
            backend_config={
                "client_resources": {"num_cpus": cpus_per_node, "num_gpus": gpus_per_node},
                "init_args": init_args,
            },
            run_config=run_config,
            verbose=verbose,
        )
