"""Model artifacts: weights plus the metadata needed to rebuild an identical model.

A file is ``torch.save`` of a plain dict, so it loads with ``torch.load(weights_only=True)``
(no pickled code runs)::

    {"format": "pollinate-model/1", "spec": {"name": ..., "kwargs": {...}},
     "state_dict": {key: cpu tensor}, "round": int, "metrics": {str: float},
     "hash": sha256 hex of the weights, "kind": "global" | ..., "user": str | None,
     "created_at": unix seconds}

Saving is atomic (temp file in the same directory, fsync, ``os.replace``), so a reader never
sees a half-written model. Loading checks the format, the content hash and that the weights fit
the architecture, and reports any problem as a one-line :class:`ArtifactError`.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from pollinate.text import one_line

from .registry import MAX_PARAMETERS, FedModel, ModelSpec, create_model, state_shapes

__all__ = [
    "FORMAT",
    "ArtifactError",
    "ModelArtifact",
    "load_artifact",
    "save_artifact",
    "weights_hash",
]

#: Value of the ``"format"`` key; bump the suffix on incompatible layout changes.
FORMAT = "pollinate-model/1"

#: Largest model file read: MAX_PARAMETERS float64 values plus room for metadata. Bigger
#: files are refused before torch reads them.
MAX_FILE_BYTES = 8 * MAX_PARAMETERS + (16 << 20)


class ArtifactError(ValueError):
    """A model file is missing, unreadable, tampered with or does not fit its architecture."""


@dataclass(frozen=True)
class ModelArtifact:
    """Weights plus metadata, as saved by :func:`save_artifact`.

    Attributes
    ----------
    spec
        Architecture; ``create_model(spec.name, **spec.kwargs)`` rebuilds it.
    state_dict
        CPU tensors by state-dict key.
    round
        Federated round that produced these weights.
    metrics
        Evaluation metrics at save time, e.g. ``{"accuracy": 0.91}``.
    content_hash
        :func:`weights_hash` of ``state_dict``.
    kind
        What the model is for, e.g. ``"global"`` or ``"personal"``.
    user
        Owner of a personal model; None for global models.
    created_at
        Unix time of saving.
    """

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    round: int
    metrics: dict[str, float]
    content_hash: str
    kind: str = "global"
    user: str | None = None
    created_at: float = 0.0

    @property
    def version(self) -> dict[str, int | str]:
        """``{"round": ..., "hash": ...}``: identifies these weights."""
        return {"round": self.round, "hash": self.content_hash}

    def build(self) -> FedModel:
        """A fresh model with these weights, on CPU, in eval mode."""
        # Any seed will do since every weight is overwritten; seeding keeps the caller's
        # global RNG stream untouched.
        model = create_model(self.spec.name, seed=0, **self.spec.kwargs)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def weights_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 hex digest of a state dict: keys, dtypes, shapes and raw bytes.

    Keys are visited in sorted order, so the digest does not depend on dict order or device.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state_dict[{key!r}] is a {type(t).__name__}, not a tensor")
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        # Length-prefixed header, so no two different state dicts feed the same byte stream.
        header = f"{len(key)}:{key}|{t.dtype}|{tuple(t.shape)}|{raw.numel()}\n"
        h.update(header.encode())
        h.update(raw.numpy().data)
    return h.hexdigest()


def save_artifact(
    path: str | os.PathLike[str],
    model: FedModel | None = None,
    *,
    spec: ModelSpec | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    round: int,
    metrics: dict[str, float] | None = None,
    kind: str = "global",
    user: str | None = None,
) -> ModelArtifact:
    """Atomically write a model artifact to ``path``, creating parent directories.

    Parameters
    ----------
    path
        Target file; replaced if it exists.
    model
        Model to save; or give ``spec`` and ``state_dict`` instead.
    spec, state_dict
        Architecture and weights, when there is no model object at hand (e.g. on a server
        that aggregated arrays).
    round
        Federated round that produced the weights (>= 0).
    metrics
        Metric name -> value, stored as floats.
    kind, user
        What the model is for and, for personal models, whose it is.

    Returns
    -------
    ModelArtifact
        What was written, with CPU copies of the weights.

    Raises
    ------
    ValueError
        Neither or both of ``model`` and ``spec``/``state_dict`` given, or bad metadata.
    ArtifactError
        ``state_dict`` does not fit ``spec``'s architecture.
    """
    if model is not None:
        if spec is not None or state_dict is not None:
            raise ValueError("pass either model or spec and state_dict, not both")
        spec, state_dict = model.spec, model.state_dict()
    elif spec is None or state_dict is None:
        raise ValueError("pass a model, or both spec and state_dict")
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be an int >= 0, got {round!r}")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    if user is not None and not isinstance(user, str):
        raise ValueError(f"user must be a string or None, got {user!r}")
    metrics = {str(k): float(v) for k, v in (metrics or {}).items()}

    path = Path(path)
    # Own, compact CPU copies: torch.save of a view would write its whole base storage.
    weights = {
        k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for k, v in state_dict.items()
    }
    reason = _misfit(spec, weights)
    if reason:
        raise ArtifactError(
            f"{path} model {spec.name!r} weights do not fit the architecture: {reason}"
        )
    artifact = ModelArtifact(
        spec=ModelSpec(name=spec.name, kwargs=dict(spec.kwargs)),
        state_dict=weights,
        round=round,
        metrics=metrics,
        content_hash=weights_hash(weights),
        kind=kind,
        user=user,
        created_at=time.time(),
    )
    payload = {
        "format": FORMAT,
        "spec": artifact.spec.to_dict(),
        "state_dict": weights,
        "round": artifact.round,
        "metrics": artifact.metrics,
        "hash": artifact.content_hash,
        "kind": artifact.kind,
        "user": artifact.user,
        "created_at": artifact.created_at,
    }
    atomic_write(path, lambda f: torch.save(payload, f))
    return artifact


def load_artifact(path: str | os.PathLike[str]) -> ModelArtifact:
    """Read and verify a model artifact written by :func:`save_artifact`.

    Raises
    ------
    ArtifactError
        With a one-line message naming the file, if it is missing, not a Pollinate model file
        (corrupt, truncated, other format), its weights do not match the stored hash, or they do
        not fit the stored architecture.
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ArtifactError(f"{path}: model file {what}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ArtifactError(
            f"{path} is {size:,} bytes, larger than any allowed model "
            f"({MAX_PARAMETERS:,} parameters, {MAX_FILE_BYTES:,} bytes)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise ArtifactError(f"{path} is not a Pollinate model file (corrupt or truncated)") from e

    if not isinstance(payload, dict) or "format" not in payload:
        raise ArtifactError(f"{path} is not a Pollinate model file (no 'format' key)")
    if payload["format"] != FORMAT:
        raise ArtifactError(
            f"{path} has unsupported format {payload['format']!r}; expected {FORMAT!r}"
        )
    try:
        artifact = _from_payload(payload)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path} is not a valid Pollinate model file: {one_line(e)}") from e

    if weights_hash(artifact.state_dict) != artifact.content_hash:
        raise ArtifactError(f"{path} weights do not match its content hash")
    reason = _misfit(artifact.spec, artifact.state_dict)
    if reason:
        raise ArtifactError(
            f"{path} model {artifact.spec.name!r} weights do not fit the architecture: {reason}"
        )
    return artifact


# ---------------------------------------------------------------------------- helpers


def _from_payload(payload: dict[str, Any]) -> ModelArtifact:
    """Typed fields of a loaded payload; KeyError/TypeError/ValueError name what is wrong."""

    def get(key: str, types: type | tuple[type, ...]) -> Any:
        if key not in payload:
            raise ValueError(f"missing {key!r}")
        value = payload[key]
        # bool is an int subclass, but round=True is corruption, not round 1.
        if not isinstance(value, types) or (isinstance(value, bool) and types is int):
            raise ValueError(f"{key!r} has type {type(value).__name__}")
        return value

    state_dict = get("state_dict", dict)
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict entry {key!r} is not a named tensor")
    metrics = get("metrics", dict)
    return ModelArtifact(
        spec=ModelSpec.from_dict(get("spec", dict)),
        state_dict=state_dict,
        round=get("round", int),
        metrics={str(k): float(v) for k, v in metrics.items()},
        content_hash=get("hash", str),
        kind=get("kind", str),
        user=get("user", (str, type(None))),
        created_at=float(get("created_at", (int, float))),
    )


def _misfit(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state_dict`` cannot load into ``spec``'s architecture, or None if it can."""
    # Shapes only (meta device): a spec declaring a huge model is refused without
    # allocating it; only a file whose tensors fit is ever built for real.
    try:
        expected = state_shapes(spec.name, **spec.kwargs)
    except Exception as e:  # a tampered spec may fail anywhere in a builder
        return f"invalid model spec: {one_line(e)}"
    declared = sum(math.prod(shape) for shape in expected.values())
    if declared > MAX_PARAMETERS:
        return f"it declares {declared:,} parameters, more than the {MAX_PARAMETERS:,} allowed"

    def more(names: list[str]) -> str:
        return f"{names[0]!r}" + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")

    missing = [k for k in expected if k not in state_dict]
    if missing:
        return f"missing {more(missing)}"
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        return f"unexpected {more(unexpected)}"
    for key, want in expected.items():
        got = state_dict[key]
        if tuple(got.shape) != want:
            return f"{key!r} has shape {tuple(got.shape)}, expected {want}"
    return None


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *, mode: int = 0o600
) -> None:
    """Write a file so readers see the old file or the new one, never part of one.

    ``write`` fills a temp file created beside ``path`` (O_EXCL, owner-only while it is
    written), which is fsynced, given ``mode`` and renamed over ``path``; the folder is
    fsynced too where the platform allows, so the rename survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_link(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Make ``path`` the same file as ``source`` (written and fsynced), atomically: readers
    of ``path`` see its old file or ``source``'s, never part of one.

    A hard link to a temp name renamed over ``path``: the bytes are written once however
    many names they have (a run's ``global.pt`` and its round's file). Where the file
    system has no hard links, an :func:`atomic_write` copy instead. Files written with
    :func:`atomic_write` are never changed in place, so a second name stays valid.
    """
    source, path = Path(source), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named as atomic_write's temp files, so a crash's leftover is found and removed the same way.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here (e.g. FAT, some network shares), or another device
        with source.open("rb") as src:
            mode = source.stat().st_mode & 0o777
            atomic_write(path, lambda f: shutil.copyfileobj(src, f), mode=mode)
        return
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Persist a rename in ``folder``; not possible on every platform (e.g. Windows), hence
    best effort."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
