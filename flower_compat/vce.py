"""Flower's simulation engine loop (``vce_api``): a local backend, prompt scans, prompt stop.

Why: Flower 1.42's engine (``flwr.server.superlink.fleet.vce.vce_api``) has one backend,
Ray's, which costs seconds per run on one machine (starting Ray, workers importing torch
afresh, stopping it); it scans for new messages every 0.1 s and its threads wait for work
with 1 s queue timeouts, so every message exchange pays up to 0.1 s and every run ends with
up to a second of waiting. Three patches, each for one run (``with``) and undone after:

- :func:`local_backend`: ``run_api`` gets a factory for a :class:`LocalBackend` over a pool
  of worker processes instead of Flower's Ray backend. Stock Flower: Ray. No stock
  fallback (a run asked to be local would silently run on Ray): a mismatch is an error.
- :func:`prompt_delivery`: ``add_messages_to_queue`` runs unchanged but its stop event
  waits at most ``poll`` s between scans, less when the grid rings ``sent`` (it stored
  messages: :mod:`pollinate.flower_compat.doorbell`). Stock fallback: Flower's 0.1 s scan.
- :func:`prompt_stop`: ``worker`` and ``put_message_into_state`` run unchanged over
  queues whose timed ``get`` gives up within ``poll`` s once the run stops; the injector
  rings ``replied`` after storing each reply, so the grid's wait for it ends then. Stock
  fallback: Flower's 1 s timeouts.

Everything else (node registration, the queues, the threads, the link state) is Flower's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from queue import Empty
from typing import Any, Protocol

from flwr.app import Context, Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import Backend

from pollinate.flower_compat._core import mark_engaged, signature_matches, swapped
from pollinate.flower_compat.doorbell import Doorbell

_MODULE = vce_api.__name__
RUN_API = f"{_MODULE}.run_api"
SCAN = f"{_MODULE}.add_messages_to_queue"
WORKER = f"{_MODULE}.worker"
INJECT = f"{_MODULE}.put_message_into_state"
# Counted each time a patched loop's shortened wait runs (tests: the short poll applies).
SCAN_WAIT = f"{SCAN}:short-wait"
SCAN_RUNG = f"{SCAN}:doorbell"  # a Doorbell's name: a scan woken by new messages
STOP_WAIT = f"{WORKER}:stop-aware-get"
LOCAL_MESSAGE = f"{RUN_API}:local-backend-message"

RUN_API_PARAMS = (
    "app_fn",
    "backend_fn",
    "nodes_mapping",
    "state_factory",
    "node_info_stores",
    "f_stop",
    "metrics",
)
SCAN_PARAMS = ("state", "queue", "nodes_mapping", "f_stop")
WORKER_PARAMS = (
    "messageins_queue",
    "messageres_queue",
    "node_info_store",
    "backend",
    "f_stop",
    "metrics",
)
INJECT_PARAMS = ("state", "queue", "f_stop")


class Pool(Protocol):
    """What :class:`LocalBackend` needs of a worker pool."""

    @property
    def size(self) -> int: ...

    def has_idle(self) -> bool: ...

    def run(self, message: Message, context: Context) -> tuple[Message, Context]: ...

    def close(self) -> None: ...


class LocalBackend(Backend):
    """Flower's ``Backend`` contract over a worker pool, one message per worker at a time."""

    def __init__(self, pool: Pool) -> None:
        super().__init__({})
        self._pool = pool

    def build(self, app_fn: Any) -> None:
        pass  # the workers load the ClientApp by reference (a ClientApp need not pickle)

    @property
    def num_workers(self) -> int:
        return self._pool.size

    def is_worker_idle(self) -> bool:
        return self._pool.has_idle()

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        mark_engaged(LOCAL_MESSAGE)
        return self._pool.run(message, context)

    def terminate(self) -> None:
        self._pool.close()


@contextmanager
def local_backend(pool: Pool) -> Iterator[None]:
    """Flower's engine loop with :class:`LocalBackend` over ``pool`` in Ray's place."""
    run_api = vce_api.run_api

    def run_api_locally(app_fn: Any, backend_fn: Any, *rest: Any) -> None:
        mark_engaged(RUN_API)
        run_api(app_fn, lambda: LocalBackend(pool), *rest)

    with swapped(
        vce_api,
        "run_api",
        run_api_locally,
        why="the local backend replaces Ray's there; use the ray backend with this Flower",
        expect=RUN_API_PARAMS,
    ):
        yield


class _Hurried:
    """A stop event whose ``wait`` lasts at most ``poll`` s (Flower's scan waits 0.1 s),
    and ends when ``bell`` rings. Flower's scan loop only waits on it between scans and
    checks ``is_set`` itself, so a stop is still seen within ``poll`` s."""

    def __init__(self, event: threading.Event, poll: float, bell: Doorbell | None = None) -> None:
        self._event = event
        self._poll = poll
        self._bell = bell

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        mark_engaged(SCAN_WAIT)
        wait = self._poll if timeout is None else min(timeout, self._poll)
        if self._bell is None:
            return self._event.wait(wait)
        self._bell.wait(wait)
        return self._event.is_set()


class _Ringing:
    """The link state as Flower's reply injector sees it: each stored reply rings ``bell``."""

    def __init__(self, state: Any, bell: Doorbell) -> None:
        self._state = state
        self._bell = bell

    def store_message_res(self, message: Message) -> Any:
        stored = self._state.store_message_res(message)
        self._bell.ring()
        return stored

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


@contextmanager
def prompt_delivery(poll: float, *, sent: Doorbell | None = None) -> Iterator[bool]:
    """Flower's scan for new messages every ``poll`` s instead of 0.1 s, and at once when
    ``sent`` rings; yields if applied."""
    scan = vce_api.add_messages_to_queue

    def prompt_scan(state: Any, queue: Any, nodes: Any, f_stop: threading.Event) -> None:
        mark_engaged(SCAN)
        scan(state, queue, nodes, _Hurried(f_stop, poll, sent))  # type: ignore[arg-type]

    with swapped(
        vce_api,
        "add_messages_to_queue",
        prompt_scan,
        why="new messages are then picked up every 0.1 s",
        expect=SCAN_PARAMS,
        stock_fallback=True,
    ) as applied:
        yield applied


class _StopAwareQueue:
    """A queue whose timed ``get`` gives up within ``poll`` s once ``stop`` is set.

    Flower's engine threads wait for work with ``get(timeout=1.0)`` and check the stop
    event in between, so every run ended with up to a second of waiting.
    """

    def __init__(self, queue: Any, stop: threading.Event, poll: float) -> None:
        self._queue = queue
        self._stop = stop
        self._poll = poll

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        mark_engaged(STOP_WAIT)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._queue.get_nowait()
            except Empty:
                pass
            left = self._poll if deadline is None else min(self._poll, deadline - time.monotonic())
            if not block or left <= 0 or self._stop.is_set():
                raise Empty
            try:
                return self._queue.get(timeout=left)
            except Empty:
                continue

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


@contextmanager
def prompt_stop(poll: float, *, replied: Doorbell | None = None) -> Iterator[bool]:
    """Flower's engine worker and reply injector on stop-aware queues; yields if applied.
    The injector rings ``replied`` after storing each reply.

    Both functions are checked before either is swapped: one without the other would
    still leave the run's end waiting out a 1 s timeout.
    """
    worker, inject = vce_api.worker, vce_api.put_message_into_state
    why = "a run's end then waits up to 1 s for Flower's queue timeouts"
    if not (
        signature_matches(worker, WORKER_PARAMS, what=WORKER, why=why)
        and signature_matches(inject, INJECT_PARAMS, what=INJECT, why=why)
    ):
        yield False
        return

    def prompt_worker(
        ins: Any, res: Any, stores: Any, backend: Any, f_stop: threading.Event, metrics: Any
    ) -> None:
        mark_engaged(WORKER)
        stop_aware = _StopAwareQueue(ins, f_stop, poll)
        worker(stop_aware, res, stores, backend, f_stop, metrics)  # type: ignore[arg-type]

    def prompt_inject(state: Any, queue: Any, f_stop: threading.Event) -> None:
        mark_engaged(INJECT)
        seen = state if replied is None else _Ringing(state, replied)
        inject(seen, _StopAwareQueue(queue, f_stop, poll), f_stop)  # type: ignore[arg-type]

    with ExitStack() as patches:
        patches.enter_context(swapped(vce_api, "worker", prompt_worker, why=why))
        patches.enter_context(swapped(vce_api, "put_message_into_state", prompt_inject, why=why))
        yield True


__all__ = [
    "INJECT",
    "LOCAL_MESSAGE",
    "RUN_API",
    "SCAN",
    "SCAN_RUNG",
    "SCAN_WAIT",
    "STOP_WAIT",
    "WORKER",
    "LocalBackend",
    "Pool",
    "local_backend",
    "prompt_delivery",
    "prompt_stop",
]
