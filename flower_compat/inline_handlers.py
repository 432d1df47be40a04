"""The SuperLink's Fleet and Runtime API handlers run on its event loop, not in threads.

Why: Flower 1.42 writes its SuperLink's HTTP handlers and their FastAPI dependencies as
plain functions, so Starlette runs each one in a worker thread and back
(``run_in_threadpool``): a device's request makes five such hops (node authentication,
the protobuf request, the API version check, the LinkState, the handler), the
ServerApp's Runtime API requests four. Each hop schedules a task, wakes a worker thread
and wakes the event loop again; with one GIL none of it runs in parallel, and with many
devices the loop and up to 40 workers hand the GIL back and forth. A py-spy profile of a
SuperLink serving 300 emulated devices put about a quarter of its busy time in these
hops (``benchmarks/bench_scale_deploy.py --profile``).

:func:`handlers_inline` calls the listed handlers and dependencies directly on the event
loop. They only read and write the in-memory LinkState and object store, under its
locks, and never wait (a whole device request costs about 1 ms of the SuperLink's CPU
with 10 devices, all layers included); anything else (the Control API, whose
log streams sleep, and any callable not listed) still goes to a worker thread, as in
stock Flower. Only for an in-memory state: with a database every handler waits on
SQLite, which must not hold up the loop.

Stock fallback (``run_in_threadpool`` changed its parameters, or a listed module is
gone): Flower's threads, with a one-line warning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME as MEMORY_DATABASE

from pollinate.flower_compat._core import (
    SUPPORTED_RANGE,
    FlowerIncompatible,
    flower_version,
    mark_engaged,
    swapped,
    warn_fallback,
)
from pollinate.flower_compat._names import flower_module

INLINE = "inline_handlers"
RUN_IN_THREADPOOL_EXPECT = ("func", "args", "kwargs")

# Modules whose functions run inline (their ``__module__``): the Fleet API's and the
# Runtime API's routers, their handlers and the router's own dependencies.
HANDLER_MODULES = frozenset(
    {"flwr.superlink.routers.fleet.router", "flwr.supercore.routers.runtime.router"}
)
# Node authentication and the dependencies of those routes (functions, or the classes
# whose instances are called).
CALLABLE_NAMES = frozenset(
    {
        "flwr.superlink.routers.fleet.node_auth.authenticate_node",
        "flwr.supercore.protobuf.translation.get_protobuf_request",
        "flwr.superlink.dependencies.linkstate.get_linkstate",
        "flwr.supercore.dependencies.version.VersionDependency",
        "flwr.supercore.dependencies.runtime.SuperExecAuthDependency",
        "flwr.supercore.dependencies.runtime.get_runtime_state",
        "flwr.supercore.dependencies.runtime.get_runtime_handlers",
        "flwr.supercore.dependencies.runtime.get_task",
    }
)
# Where Flower and FastAPI call ``run_in_threadpool`` for those: the protobuf route's
# handler call, FastAPI's dependency solver, the node authentication middleware.
CALLERS = (
    "flwr.supercore.protobuf.routing",
    "fastapi.dependencies.utils",
    "flwr.superlink.routers.fleet.node_auth",
)


def _qualified(fn: Any) -> str:
    while isinstance(fn, partial):
        fn = fn.func
    if not hasattr(fn, "__qualname__"):  # a callable instance: name its class
        fn = type(fn)
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"


def runs_inline(fn: Any) -> bool:
    """Whether ``fn`` is one of the listed handlers or dependencies."""
    name = _qualified(fn)
    module, _, _ = name.rpartition(".")
    return module in HANDLER_MODULES or name in CALLABLE_NAMES


def inline_or_threaded(
    threaded: Callable[..., Any], inline: Callable[[Any], bool]
) -> Callable[..., Any]:
    """An async ``run_in_threadpool``: ``func`` called directly where ``inline(func)``,
    else handed to ``threaded`` (Starlette's)."""

    async def run_in_threadpool(func: Any, *args: Any, **kwargs: Any) -> Any:
        if inline(func):
            mark_engaged(INLINE)
            return func(*args, **kwargs)
        return await threaded(func, *args, **kwargs)

    return run_in_threadpool


@contextmanager
def handlers_inline() -> Iterator[bool]:
    """Inside the block the listed handlers run on the event loop. Yields whether every
    caller's ``run_in_threadpool`` is replaced (False: stock threads, after a warning)."""
    why = "each handler's hop to a worker thread costs more CPU than the handler"
    with ExitStack() as stack:
        for caller in CALLERS:
            try:
                owner = flower_module(caller)
            except FlowerIncompatible as err:
                warn_fallback(INLINE, f"{err} ({why})")
                yield False
                return
            original = getattr(owner, "run_in_threadpool", None)
            if original is None:
                gone = f"flwr {flower_version()}: {caller} has no run_in_threadpool"
                warn_fallback(INLINE, f"{gone}; Pollinate supports flwr{SUPPORTED_RANGE} ({why})")
                yield False
                return
            on = stack.enter_context(
                swapped(
                    owner,
                    "run_in_threadpool",
                    inline_or_threaded(original, runs_inline),
                    why=why,
                    expect=RUN_IN_THREADPOOL_EXPECT,
                    stock_fallback=True,
                )
            )
            if not on:
                yield False
                return
        yield True


__all__ = ["MEMORY_DATABASE", "handlers_inline", "inline_or_threaded", "runs_inline"]
