"""Local worker processes that run the ClientApp: the engine's ``local`` backend.

Flower's simulation engine (see :mod:`pollinate.flower_compat.vce`) hands every message for a
virtual node to a *backend*, which runs the ClientApp on it and returns the reply and the
node's updated context. Flower 1.42 ships one backend, Ray's. On one machine Ray costs
seconds that a run of a few seconds of training cannot hide (``benchmarks/RESULTS.md``):
starting its gcs, raylet and helper processes (~2 s), workers that each import torch and
Flower afresh (~1-3 s each, on cores the driver is using), and stopping it all (~1.5 s).

:class:`WorkerPool` backs the same contract with local processes instead (the engine
wraps it as a Flower ``Backend``). The workers are forked from a ``multiprocessing`` fork
server that imported the ClientApp's module once (torch included), so a worker is ready
milliseconds after it is asked for, and the fork server does that import while the driver
does its own, on the other core (:func:`pollinate.simulation.engine.start_local`); this
module imports nothing heavy, so that it can start early. A worker runs one message at a
time, exactly as a Ray actor does: it gets ``(message, context)``, calls
the ClientApp and sends back ``(reply, context)``; an exception in the ClientApp comes back
as Flower's ``ClientAppException`` (the engine turns it into an error reply and the round
goes on), and a worker that dies is replaced. Ray stays the engine for more than one
machine (:mod:`pollinate.simulation.engine` picks).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from queue import Queue
from typing import TYPE_CHECKING, Any

from pollinate.text import one_line

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

# Seconds a worker is given to exit after being told to, before it is killed.
STOP_GRACE = 2.0


def load_app(app_ref: str) -> ClientApp:
    """``"package.module:attr"`` -> the ClientApp object it names."""
    from flwr.clientapp import ClientApp

    module, _, attr = app_ref.partition(":")
    app = getattr(importlib.import_module(module), attr or "app")
    if not isinstance(app, ClientApp):
        raise TypeError(f"{app_ref} is a {type(app).__name__}, not a flwr ClientApp")
    return app


def _serve(
    conn: Connection, app_ref: str, threads: int, quiet: bool, run_config: dict[str, Any]
) -> None:
    """A worker's life: run the ClientApp on each ``(message, context)`` until told to stop.

    ``run_config`` fills in the node context's run config (as ``flwr run`` gives every
    node the app's config; Flower's simulation runtime gives it none).
    """
    # Ctrl-C (and a SIGTERM to the process group, as a service manager sends) reaches every
    # process: the driver decides, and stops the workers itself (a `None` message, then
    # SIGKILL after STOP_GRACE), instead of each dying mid-message with a traceback. A worker
    # whose driver is gone reads EOF and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if quiet:  # as Ray with log_to_driver=False: failures travel back as replies instead
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        logging.getLogger("flwr").setLevel(logging.ERROR)
    if "torch" in sys.modules:  # as Ray gives an actor OMP_NUM_THREADS = its CPUs
        sys.modules["torch"].set_num_threads(threads)
    try:
        app: ClientApp | None = load_app(app_ref)
        load_error = ""
    except Exception as err:
        # Every message gets the reason as its error reply (the run reports it), instead of
        # a worker that dies on each start and tells nothing.
        app, load_error = (
            None,
            f"could not load the ClientApp {app_ref}: " + one_line(err, with_type=True),
        )
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the driver is gone
            return
        if job is None:
            return
        message, context = job
        if app is None:
            conn.send((None, None, load_error))
            continue
        try:
            with filled_run_config(context, run_config):
                reply = app(message=message, context=context)
        except Exception as err:
            conn.send((None, None, one_line(err, with_type=True)))
        else:
            conn.send((reply, context, None))


@contextmanager
def filled_run_config(context: Context, run_config: dict[str, Any]) -> Iterator[None]:
    """``context.run_config`` with ``run_config``'s keys it lacks, inside the block only.

    Flower refuses a node context whose run config changed, so it is put back after.
    """
    if not run_config:
        yield
        return
    own = dict(context.run_config)
    context.run_config.update({k: v for k, v in run_config.items() if k not in own})
    try:
        yield
    finally:
        context.run_config.clear()
        context.run_config.update(own)


@contextmanager
def detached_from_main() -> Iterator[None]:
    """Start processes as if from an interactive session, not from the ``__main__`` script.

    A spawned or fork-server process re-runs the parent's main script (as ``__mp_main__``)
    before its target; a script calling ``run_simulation`` without an
    ``if __name__ == "__main__":`` guard would then start a federation in every worker.
    The workers load the ClientApp by reference and need nothing from that script.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process of the chosen context
    conn: Connection

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Ask the worker to exit, kill it after ``grace`` s, and reap it."""
        with suppress(OSError):
            self.conn.send(None)
        self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class WorkerPool:
    """``size`` worker processes running the ClientApp ``app_ref``; thread-safe."""

    def __init__(
        self,
        size: int,
        app_ref: str,
        *,
        method: str = "forkserver",
        threads: int = 1,
        quiet: bool = True,
        run_config: dict[str, Any] | None = None,
    ):
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {size}")
        self.app_ref = app_ref
        self.threads = threads
        self.quiet = quiet
        self.run_config = dict(run_config or {})
        self._ctx = multiprocessing.get_context(method)
        self._idle: Queue[_Worker] = Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(size):
            self._idle.put(self._spawn())

    @property
    def size(self) -> int:
        return len(self._all)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._all]

    def has_idle(self) -> bool:
        return not self._idle.empty()

    def _spawn(self) -> _Worker:
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_serve,
            args=(theirs, self.app_ref, self.threads, self.quiet, self.run_config),
            name="pollinate-clientapp",
            daemon=True,  # never outlives the driver
        )
        with detached_from_main():
            process.start()
        theirs.close()
        worker = _Worker(process, ours)
        with self._lock:
            self._all.append(worker)
        return worker

    def _replace(self, dead: _Worker) -> _Worker | None:
        """A new worker for one that died; None once the pool is closing (no new ones)."""
        dead.stop(grace=0)
        with self._lock:
            if dead in self._all:  # close() may have taken it already
                self._all.remove(dead)
            if self._closed:
                return None
        new = self._spawn()
        with self._lock:
            late = self._closed and new in self._all
            if late:
                self._all.remove(new)
        if late:  # closed while it started: close() did not see it
            new.stop(grace=0)
            return None
        return new

    def run(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on one message in an idle worker (waits for one)."""
        from pollinate.flower_compat.clientapp import ClientAppException, error_reply

        worker: _Worker | None = self._idle.get()
        assert worker is not None
        try:
            worker.conn.send((message, context))
            reply, new_context, error = worker.conn.recv()
        except (EOFError, OSError) as err:
            if self._closed:
                # close() stopped the workers (Ctrl-C, SIGTERM) with this message in
                # flight: the run is ending, the ClientApp did not fail. An error reply
                # nobody reads, instead of Flower's engine logging a traceback.
                worker = None
                return error_reply(message, "the run stopped during this message"), context
            worker.process.join(STOP_GRACE)  # reaped, so its exit code is known
            code = worker.process.exitcode
            worker = self._replace(worker)
            raise ClientAppException(
                f"the ClientApp's worker process died (exit code {code}) while running a "
                f"{message.metadata.message_type} message"
            ) from err
        finally:
            if worker is not None:
                self._idle.put(worker)
        if error is not None:
            raise ClientAppException(error)
        return reply, new_context

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = list(self._all), []
        for worker in workers:
            worker.stop()
