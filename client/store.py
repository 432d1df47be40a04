"""The local model store: one folder per user with its latest global and personal models.

Layout (stable, documented in README.md)::

    <root>/<user>/global.pt      # latest aggregated model this user received
    <root>/<user>/personal.pt    # this user's personalized model

State a personalization method keeps between rounds (FedPer's head, Ditto's personal
model) is kept apart, by run and round, so that a round run again after a resume reads
exactly what its first attempt read (:meth:`ModelStore.load_state`)::

    <root>/<user>/.state/<run key>/personal-000005.pt   # trained in round 5 of that run

A version is kept until a newer one from two rounds back exists (a resume goes back at
most to the last checkpoint, which is at most two rounds behind the training in flight),
and a run's state replaces the state of earlier runs. ``<root>/.pollinate-manifest`` lists
the user folders this store made: only their files are ever removed by Pollinate
(:mod:`pollinate.server.rundir`).

Folders are keyed by the *user id* — never by Flower's node id, which is random per run —
so the models outlive the run and a later process (``pollinate node serve``,
``pollinate predict``, :func:`pollinate.client.load_model`) finds them. Every write is
atomic (temp file + rename, see :func:`pollinate.models.save_artifact`): a reader sees the
old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote, unquote

import torch

from pollinate.models import ModelArtifact, ModelSpec, load_artifact, save_artifact

KINDS = ("global", "personal")
MANIFEST = ".pollinate-manifest"
STATE = ".state"
_VERSION = re.compile(r"personal-(\d+)\.pt")


class StoreError(ValueError):
    """A model store problem (bad user id, unknown kind, empty store)."""


def user_folder_name(user: str) -> str:
    """A file-system-safe, reversible folder name for any user id."""
    if not user:
        raise StoreError("user id must not be empty")
    # Percent-encode everything but a conservative set so ids like "../x" stay inside.
    name = quote(user, safe="-_@")
    return name if not name.startswith(".") else "%2E" + name[1:]


class ModelStore:
    """Per-user model folders under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, user: str, kind: str) -> Path:
        if kind not in KINDS:
            raise StoreError(f"unknown model kind '{kind}'; choose one of: {', '.join(KINDS)}")
        return self.root / user_folder_name(user) / f"{kind}.pt"

    def _user_dir(self, user: str) -> Path:
        """The user's folder, listed in the manifest before it is first made."""
        folder = self.root / user_folder_name(user)
        if not folder.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            # One short O_APPEND write: atomic between the processes of a simulation.
            fd = os.open(self.root / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{folder.name}\n".encode())
            finally:
                os.close(fd)
            folder.mkdir(exist_ok=True)
        return folder

    def save(
        self,
        user: str,
        kind: str,
        *,
        spec: ModelSpec,
        state_dict: dict[str, torch.Tensor],
        round: int,
        metrics: dict[str, float] | None = None,
    ) -> ModelArtifact:
        path = self.path(user, kind)
        self._user_dir(user)
        return save_artifact(
            path,
            spec=spec,
            state_dict=state_dict,
            round=round,
            metrics=metrics or {},
            kind=kind,
            user=user,
        )

    # ------------------------------------------------------------------- state
    def _state_dir(self, user: str, run_key: str) -> Path:
        key = run_key if re.fullmatch(r"[0-9A-Za-z_-]{1,64}", run_key) else "default"
        return self.root / user_folder_name(user) / STATE / key

    def _versions(self, folder: Path) -> dict[int, Path]:
        if not folder.is_dir():
            return {}
        found = {}
        for child in folder.iterdir():
            match = _VERSION.fullmatch(child.name)
            if match:
                found[int(match.group(1))] = child
        return found

    def save_state(
        self,
        user: str,
        *,
        run_key: str,
        round: int,
        spec: ModelSpec,
        state_dict: dict[str, torch.Tensor],
    ) -> None:
        """Keep the state ``user`` reached in ``round`` of run ``run_key``."""
        self._user_dir(user)
        folder = self._state_dir(user, run_key)
        for other in folder.parent.glob("*"):  # an earlier run's state is done with
            if other != folder and other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
        save_artifact(
            folder / f"personal-{round:06d}.pt",
            spec=spec,
            state_dict=state_dict,
            round=round,
            kind="state",
            user=user,
        )
        versions = self._versions(folder)
        settled = [r for r in versions if r <= round - 2]
        for r in settled:
            if r < max(settled):
                versions[r].unlink(missing_ok=True)

    def load_state(self, user: str, *, run_key: str, before: int) -> ModelArtifact | None:
        """The newest state of ``user`` in run ``run_key`` from a round before ``before``."""
        versions = self._versions(self._state_dir(user, run_key))
        earlier = [r for r in versions if r < before]
        return load_artifact(versions[max(earlier)]) if earlier else None

    def load(self, user: str, kind: str) -> ModelArtifact | None:
        """The stored artifact, or None when this user has none of that kind yet."""
        path = self.path(user, kind)
        if not path.exists():
            return None
        return load_artifact(path)

    def users(self) -> list[str]:
        """User ids that have at least one stored model, sorted."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            if child.is_dir() and any((child / f"{k}.pt").exists() for k in KINDS):
                found.append(unquote(child.name))
        return sorted(found)


def is_user_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is one user's folder of a store (it holds global.pt or personal.pt)."""
    return any((Path(path) / f"{k}.pt").is_file() for k in KINDS)


class UserFolderStore(ModelStore):
    """One user's folder (``<store>/<user>/``) used as a store that holds that user alone.

    So ``--model-dir ~/.pollinate/node/models/alice`` serves alice, as the store root
    would with ``--user alice``. The user id is the folder's name, decoded as
    :class:`ModelStore` names folders.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        super().__init__(folder)
        self.user = unquote(self.root.name)

    def path(self, user: str, kind: str) -> Path:
        if kind not in KINDS:
            raise StoreError(f"unknown model kind '{kind}'; choose one of: {', '.join(KINDS)}")
        if user != self.user:
            raise StoreError(
                f"{self.root} holds the models of user {self.user!r} only, not {user!r}; "
                "drop the user choice, or pass the store folder above it"
            )
        return self.root / f"{kind}.pt"

    def users(self) -> list[str]:
        return [self.user]


def open_store(root: str | os.PathLike[str], user: str | None = None) -> ModelStore:
    """A store root, or a :class:`UserFolderStore` when ``root`` is one user's folder.

    Raises
    ------
    StoreError
        ``root`` is a user's folder and ``user`` names someone else.
    """
    if is_user_folder(root):
        store = UserFolderStore(root)
        if user is not None:
            store.path(user, KINDS[0])  # raises for another user
        return store
    return ModelStore(root)
