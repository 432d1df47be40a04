"""The inference service's model slots: load, verify and hot-swap the stored models.

One slot per model kind (``personal``, ``global``). :meth:`ModelSlots.poll` compares each
store file's (mtime, size, inode) with what it last saw; a changed file is loaded and
verified (content hash, architecture, kind) off the request path, and only then is the
served model replaced, in one reference assignment. A request holds the model it started
with, so none sees a half-loaded model and none fails during a swap; a file that fails to
load is recorded (``reload_errors``, a metric) and the previous model keeps serving.
:class:`Watcher` runs ``poll`` every few tenths of a second on a daemon thread.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pollinate.client.predictor import LoadedModel, PredictError, resolve_user
from pollinate.client.store import KINDS, ModelStore, open_store
from pollinate.text import one_line

__all__ = ["ModelSlots", "SwapObserver", "Watcher"]

log = logging.getLogger("pollinate.serving")

#: What identifies a file's version without reading it: (mtime ns, size, inode).
Stamp = tuple[int, int, int]


class SwapObserver(Protocol):
    """Told of every swap and every rejected file (the service's metrics)."""

    def served_round(self, kind: str, round: int, *, swapped: bool) -> None: ...
    def reload_failed(self, kind: str) -> None: ...


class ModelSlots:
    """The models being served, swapped atomically as newer files land in the store.

    Parameters
    ----------
    root
        The model store, or one user's folder in it.
    user
        Whose models to serve; None adopts the store's only user once it appears.
    observer
        Told of swaps and rejected files.

    Raises
    ------
    StoreError
        ``root`` cannot be a model store.
    """

    def __init__(self, root: Path, user: str | None, observer: SwapObserver) -> None:
        self.store: ModelStore = open_store(root, user)
        self.user = user
        self.problem: str | None = None  # why nothing can be served (e.g. several users)
        self.reload_errors: dict[str, str] = {}  # kind -> why the latest file was rejected
        self._observer = observer
        # Copy-on-write: readers take self._models once; a swap assigns a new dict.
        self._models: dict[str, LoadedModel] = {}
        self._stamps: dict[str, Stamp | None] = {}
        self._poll_lock = threading.Lock()

    def get(self, kind: str) -> LoadedModel | None:
        """The model of ``kind`` being served, or None while none is stored."""
        return self._models.get(kind)

    def loaded(self) -> dict[str, LoadedModel]:
        """Every served model by kind; a snapshot that later swaps do not change."""
        return self._models

    def stored_kinds(self) -> list[str]:
        """The kinds with a file in the store (loaded or not)."""
        if self.user is None:
            return []
        return [k for k in KINDS if self.store.path(self.user, k).exists()]

    def missing_message(self, kind: str) -> str:
        """Why there is no ``kind`` model to answer with, and what to do (one line)."""
        if self.problem:
            return self.problem
        where = f"{self.store.root}" + (f" for user {self.user!r}" if self.user else "")
        other = [k for k in KINDS if k != kind and k in self._models]
        alt = f', or ask for "model": "{other[0]}"' if other else ""
        return (
            f"no {kind} model stored yet in {where}; the device writes it after its first "
            f"federated round (GET /models lists what is stored{alt})"
        )

    def poll(self) -> None:
        """Load every changed model file; swap in those that verify. Never raises for bad files."""
        with self._poll_lock:
            if self.user is None and not self._adopt_user():
                return
            assert self.user is not None
            for kind in KINDS:
                self._poll_kind(kind, self.store.path(self.user, kind))

    def _adopt_user(self) -> bool:
        try:
            self.user = resolve_user(self.store, None)
        except PredictError as e:  # none yet, or several: wait, and say why
            users = self.store.users()
            self.problem = None if not users else f"{e}; restart the service with --user ID"
            return False
        self.problem = None
        log.info("serving models of user %r from %s", self.user, self.store.root)
        return True

    def _poll_kind(self, kind: str, path: Path) -> None:
        stamp = _stamp(path)
        if kind in self._stamps and stamp == self._stamps[kind]:
            return
        self._stamps[kind] = stamp
        if stamp is None:
            if kind in self._models:
                log.warning(
                    "%s disappeared; still serving %s round %d",
                    path,
                    kind,
                    self._models[kind].round,
                )
            return
        try:
            model = _load_verified(path, kind)
        except Exception as e:  # corrupt, truncated, tampered, unreadable: keep the old model
            self._reject(kind, one_line(e))
            return
        self.reload_errors.pop(kind, None)
        old = self._models.get(kind)
        if old is not None and old.version == model.version:
            return  # rewritten with identical weights and round
        self._models = {**self._models, kind: model}  # the swap: one reference assignment
        self._observer.served_round(kind, model.round, swapped=old is not None)
        log.info(
            "serving %s model round %d (hash %s) of user %r",
            kind,
            model.round,
            model.content_hash[:12],
            model.user,
        )

    def _reject(self, kind: str, reason: str) -> None:
        self.reload_errors[kind] = reason
        self._observer.reload_failed(kind)
        old = self._models.get(kind)
        keep = f"; still serving round {old.round}" if old else ""
        log.warning("could not load %s model: %s%s", kind, reason, keep)


def _stamp(path: Path) -> Stamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _load_verified(path: Path, kind: str) -> LoadedModel:
    """The model in ``path`` (hash and architecture checked on load), if it is a ``kind``."""
    model = LoadedModel.from_file(path)
    if model.kind != kind:
        raise PredictError(f"{path} holds a {model.kind!r} model, expected {kind!r}")
    return model


@dataclass
class Watcher:
    """Polls the slots every ``interval`` seconds on a daemon thread until stopped."""

    slots: ModelSlots
    interval: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="pollinate-model-watcher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.slots.poll()
            except Exception:  # the watcher must outlive any surprise (e.g. a vanished disk)
                log.exception("model watcher: unexpected error; retrying")
