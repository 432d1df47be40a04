"""The local model store: one folder per user with its latest global and personal models.

Layout (stable, documented in README.md)::

    <root>/<user>/global.pt      # latest aggregated model this user received
    <root>/<user>/personal.pt    # this user's personalized model

Folders are keyed by the *user id* — never by Flower's node id, which is random per run —
so the models outlive the run and a later process (``pollinate node serve``,
``pollinate predict``, :func:`pollinate.client.load_model`) finds them. Every write is
atomic (temp file + rename, see :func:`pollinate.models.save_artifact`): a reader sees the
old file or the new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, unquote

import torch

from pollinate.models import ModelArtifact, ModelSpec, load_artifact, save_artifact

KINDS = ("global", "personal")


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
        return save_artifact(
            self.path(user, kind),
            spec=spec,
            state_dict=state_dict,
            round=round,
            metrics=metrics or {},
            kind=kind,
            user=user,
        )

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
