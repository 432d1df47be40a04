"""Use a stored model from any Python program (the model-as-a-dependency pattern).

::

    from pollinate.client import load_model

    model = load_model("~/.pollinate/models", "personal")  # (user inferred if only one)
    model.predict([[0.1, 0.2, ...]])        # (B,) int class labels
    model.predict_proba(x)                  # (B, C) float32 probabilities
    model.version                           # {"round": 7, "hash": "3f2a..."}

:func:`predict_file` scores a whole CSV/Parquet file in batch (the precompute pattern;
``pollinate predict`` on the command line). Every bad input raises a one-line
:class:`PredictError` (a ``ValueError``); no stored model yet raises its subclass
:class:`NoModelError`, which the inference service answers with 503.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pollinate.client.store import KINDS, ModelStore, StoreError
from pollinate.models import ArtifactError, ModelArtifact, atomic_write, load_artifact

__all__ = [
    "LoadedModel",
    "NoModelError",
    "PredictError",
    "load_model",
    "predict_file",
    "resolve_user",
]

_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

# Rows scored per forward pass in predict_file: bounds memory, not results.
_CHUNK = 65_536


class PredictError(ValueError):
    """Bad input to prediction (features, files, model choice); the message is one line."""


class NoModelError(PredictError):
    """The store has no model of the requested kind yet (e.g. before the first round)."""


class LoadedModel:
    """A verified, ready-to-run model from the store; safe to share between threads.

    Built once from a :class:`~pollinate.models.ModelArtifact` (whose content hash was
    checked on load) and never mutated afterwards: concurrent ``predict`` calls only read
    the weights, so a server can swap one ``LoadedModel`` reference for a newer one without
    locks.

    Attributes
    ----------
    kind
        ``"global"`` or ``"personal"``.
    user
        Whose store folder it came from (None for an artifact saved without a user).
    round
        Federated round that produced the weights.
    content_hash
        SHA-256 of the weights (see :func:`pollinate.models.weights_hash`).
    num_features, num_classes
        Input width F and number of classes C.
    metrics
        Evaluation metrics saved with the model.
    """

    def __init__(self, artifact: ModelArtifact, *, path: Path | None = None) -> None:
        kwargs = artifact.spec.kwargs
        self.kind: str = artifact.kind
        self.user: str | None = artifact.user
        self.round: int = artifact.round
        self.content_hash: str = artifact.content_hash
        self.num_features: int = int(kwargs["in_features"])
        self.num_classes: int = int(kwargs["num_classes"])
        self.metrics: dict[str, float] = dict(artifact.metrics)
        self.architecture: dict[str, Any] = artifact.spec.to_dict()
        self.created_at: float = artifact.created_at
        self.path = path
        bad = [
            k
            for k, t in artifact.state_dict.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if bad:  # it would answer NaN for every row: refuse it (the previous model keeps serving)
            where = f"{path}: " if path else ""
            raise ArtifactError(f"{where}weights {bad[0]!r} are not finite (NaN or infinite)")
        self._net = artifact.build()  # eval mode, CPU
        for p in self._net.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LoadedModel:
        """Load and verify one artifact file; raises a one-line ``ArtifactError``."""
        return cls(load_artifact(path), path=Path(path))

    @property
    def version(self) -> dict[str, int | str]:
        """``{"round": ..., "hash": ...}``: identifies the weights that answered."""
        return {"round": self.round, "hash": self.content_hash}

    def predict_proba(self, x: np.ndarray | Sequence[Any]) -> np.ndarray:
        """Class probabilities (B, C) float32 for features (B, F); one row (F,) is (1, F)."""
        batch = self.check(x)  # (B, F) float32
        # inference_mode is thread-local, so concurrent callers do not interfere.
        with torch.inference_mode():
            logits = self._net(torch.from_numpy(batch))  # (B, C)
            proba = torch.softmax(logits, dim=1)
        out = proba.numpy()
        finite = np.isfinite(out).all(axis=1)  # (B,)
        if not finite.all():
            # Finite but huge features overflow inside the network (inf - inf = NaN).
            i = int(np.argmin(finite))
            raise PredictError(
                f"the {self.kind} model's output for row {i} is not finite: its features are "
                f"too large in magnitude for this model (largest |x| = "
                f"{float(np.abs(batch[i]).max()):.3g}); scale them like the training data"
            )
        return out

    def predict(self, x: np.ndarray | Sequence[Any]) -> np.ndarray:
        """Predicted class labels (B,) int64 for features (B, F)."""
        return self.predict_proba(x).argmax(axis=1)

    def check(self, x: np.ndarray | Sequence[Any]) -> np.ndarray:
        """``x`` as a C-contiguous float32 (B, F) array, or a one-line ``PredictError``."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError, OverflowError) as e:
            raise PredictError(
                f"features must be a (rows, {self.num_features}) array of "
                "numbers; rows have different lengths or hold non-numbers "
                f"({type(e).__name__})"
            ) from None
        if arr.dtype.kind not in "iuf":
            raise PredictError(
                f"features must be numbers, got dtype {arr.dtype} (text, booleans or mixed values)"
            )
        if arr.ndim in (1, 2) and arr.shape[0] == 0:
            raise PredictError("no rows to predict")
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)  # one row
        if arr.ndim != 2:
            raise PredictError(
                f"features must have shape (rows, {self.num_features}), got {arr.shape}"
            )
        if arr.shape[1] != self.num_features:
            raise PredictError(
                f"rows have {arr.shape[1]} features; the {self.kind} model "
                f"expects {self.num_features}"
            )
        with np.errstate(over="ignore"):  # too large for float32 becomes inf, caught below
            batch = np.ascontiguousarray(arr, dtype=np.float32)
        finite = np.isfinite(batch)
        if not finite.all():
            i, j = (int(v) for v in np.argwhere(~finite)[0])
            raise PredictError(
                f"row {i} feature {j} is {_describe(arr[i, j])}; "
                "features must be finite float32 numbers"
            )
        return batch

    def info(self) -> dict[str, Any]:
        """JSON-able description, as listed by the inference service's ``GET /models``."""
        return {
            "kind": self.kind,
            "user": self.user,
            "round": self.round,
            "hash": self.content_hash,
            "metrics": self.metrics,
            "num_features": self.num_features,
            "num_classes": self.num_classes,
            "architecture": self.architecture,
            "created_at": self.created_at,
        }

    def __repr__(self) -> str:
        return (
            f"LoadedModel(kind={self.kind!r}, user={self.user!r}, round={self.round}, "
            f"hash={self.content_hash[:12]!r}, features={self.num_features}, "
            f"classes={self.num_classes})"
        )


def resolve_user(store: ModelStore, user: str | None) -> str:
    """The user whose models to use: ``user``, or the store's only user.

    Raises
    ------
    NoModelError
        The store holds no models at all.
    PredictError
        ``user`` is None and the store holds several users.
    """
    if user is not None:
        if not isinstance(user, str) or not user:
            raise PredictError(f"user must be a non-empty string, got {user!r}")
        return user
    users = store.users()
    if not users:
        raise NoModelError(
            f"no models stored yet in {store.root}; a device writes them after "
            "its first federated round"
        )
    if len(users) > 1:
        raise PredictError(
            f"model store {store.root} holds {len(users)} users "
            f"({_listing(users)}); choose one with user= (--user ID)"
        )
    return users[0]


def load_model(
    model_dir: str | os.PathLike[str], which: str = "personal", user: str | None = None
) -> LoadedModel:
    """Load the latest ``which`` model of ``user`` from a model store.

    Parameters
    ----------
    model_dir
        A model store root (``<model_dir>/<user>/{global,personal}.pt``).
    which
        ``"personal"`` (this user's personalized model) or ``"global"`` (the federation's).
    user
        Whose model; None picks the store's only user.

    Raises
    ------
    PredictError
        Bad ``which``, missing store, or an ambiguous user (the message lists the users).
    NoModelError
        Nothing of that kind stored yet.
    ArtifactError
        The file is corrupt or was tampered with.
    """
    check_kind(which)
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise NoModelError(
            f"model store {root} does not exist; pass the --model-dir a device trained into"
        )
    store = ModelStore(root)
    who = resolve_user(store, user)
    try:
        path = store.path(who, which)
    except StoreError as e:
        raise PredictError(str(e)) from None
    if not path.exists():
        users = store.users()
        if who not in users:
            raise NoModelError(
                f"user {who!r} has no models in {root}; it holds: {_listing(users) or '(none)'}"
            )
        raise NoModelError(
            f"no {which} model stored yet for user {who!r} in {root}; "
            "it appears after the user's first federated round"
        )
    return LoadedModel.from_file(path)


def check_kind(which: object) -> str:
    """``which`` if it is a model kind, else a one-line ``PredictError``."""
    if not isinstance(which, str) or which not in KINDS:
        raise PredictError(f"unknown model {which!r}; choose one of: {', '.join(KINDS)}")
    return which


# ------------------------------------------------------------------------ batch scoring


def predict_file(
    model_dir: str | os.PathLike[str],
    which: str,
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    user: str | None = None,
    *,
    label_column: str | None = None,
    user_column: str | None = None,
) -> int:
    """Score every row of a CSV/Parquet file and write the results (the precompute pattern).

    Feature columns are all numeric columns except ``label_column`` and ``user_column``, in
    file order; there must be exactly as many as the model takes. Other columns pass through.
    The output (CSV or Parquet, by suffix) holds the input columns plus ``prediction``,
    ``prob_0`` .. ``prob_<C-1>``, ``model_round`` and ``model_hash``, and is written
    atomically: a reader sees the old file or the complete new one.

    Returns
    -------
    int
        Rows scored.

    Raises
    ------
    PredictError
        One-line reason for any bad input; nothing is written then.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    out_kind = _table_kind(out_path, "output")
    model = load_model(model_dir, which, user)
    df = _read_table(in_path, user_column)
    x = _feature_matrix(df, in_path.name, model, label_column, user_column)  # (N, F)

    proba = np.concatenate(
        [model.predict_proba(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)]
    )  # (N, C)
    added: dict[str, Any] = {"prediction": proba.argmax(axis=1)}
    added.update({f"prob_{c}": proba[:, c] for c in range(model.num_classes)})
    added["model_round"] = np.full(len(df), model.round, dtype=np.int64)
    added["model_hash"] = model.content_hash
    clash = [c for c in added if c in df.columns]
    if clash:
        raise PredictError(
            f"{in_path.name} already has a column {clash[0]!r}, which the output "
            "adds; rename or drop it (is this an already scored file?)"
        )
    out = pd.concat([df, pd.DataFrame(added, index=df.index)], axis=1)
    _write_table(out, out_path, out_kind)
    return len(out)


def _table_kind(path: Path, role: str) -> str:
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise PredictError(
            f"{role} file {str(path)!r} has unsupported type "
            f"{path.suffix or '(no suffix)'!r}; use one of: {', '.join(_SUFFIXES)}"
        )
    return kind


def _read_table(path: Path, user_column: str | None) -> pd.DataFrame:
    kind = _table_kind(path, "input")
    if not path.is_file():
        raise PredictError(f"input file {str(path)!r} does not exist")
    try:
        if kind == "csv":
            # Ids as text, so "007" stays "007" in the output.
            dtype = {user_column: str} if user_column else None
            df = pd.read_csv(path, dtype=dtype)
        else:
            df = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise PredictError(
            f"input file {str(path)!r} is empty; it needs a header row and data"
        ) from None
    except Exception as e:  # parser, arrow, decoding and I/O errors all mean "unreadable"
        raise PredictError(
            f"could not read {str(path)!r} as {kind.upper()} "
            f"({_one_line(e)}); check that it is a valid {kind.upper()} file"
        ) from None
    if len(df) == 0:
        raise PredictError(f"input file {str(path)!r} has no rows to score")
    named = any(level is not None for level in df.index.names)
    df = df.reset_index(drop=not named)
    df.columns = [str(c) for c in df.columns]
    return df


def _feature_matrix(
    df: pd.DataFrame,
    name: str,
    model: LoadedModel,
    label_column: str | None,
    user_column: str | None,
) -> np.ndarray:
    columns = list(df.columns)
    for role, column in (("label", label_column), ("user", user_column)):
        if column is not None and column not in columns:
            raise PredictError(
                f"{name} has no {role} column {column!r}; it has: {_listing(columns)}"
            )
    unnamed = [c for c in columns if c.startswith("Unnamed: ")]
    if unnamed:
        raise PredictError(
            f"{name} has a column without a header name ({unnamed[0]!r}); name "
            "or drop it (pandas writes one for the index unless index=False)"
        )
    skip = {label_column, user_column}
    candidates = [c for c in columns if c not in skip]
    features = [c for c in candidates if pd.api.types.is_numeric_dtype(df[c])]
    if len(features) != model.num_features:
        raise PredictError(_count_message(df, name, model, features, candidates))

    x = np.empty((len(df), len(features)), dtype=np.float32)  # (N, F)
    for j, column in enumerate(features):
        with np.errstate(over="ignore"):
            col = df[column].to_numpy(dtype=np.float64, na_value=np.nan).astype(np.float32)
        bad = ~np.isfinite(col)
        if bad.any():
            raise PredictError(
                f"feature column {column!r} in {name} has {int(bad.sum())} "
                f"missing or infinite values (first at data row "
                f"{int(np.argmax(bad)) + 1}); fill or drop those rows"
            )
        x[:, j] = col
    return x


def _count_message(
    df: pd.DataFrame, name: str, model: LoadedModel, features: list[str], candidates: list[str]
) -> str:
    msg = (
        f"{name} has {len(features)} numeric feature columns but the {model.kind} model "
        f"expects {model.num_features}"
    )
    text = [c for c in candidates if c not in features]
    if text and len(features) < model.num_features:
        # A column of numbers with a few stray words is the likely culprit.
        parsed = {c: pd.to_numeric(df[c], errors="coerce") for c in text}
        mixed = sorted(
            (c for c in text if parsed[c].notna().any()), key=lambda c: -parsed[c].notna().mean()
        )
        if not mixed:
            return (
                f"{msg}; text columns are not features ({_listing(text)}): encode them as "
                "numbers if they should be"
            )
        column = mixed[0]
        bad = (parsed[column].isna() & df[column].notna()).to_numpy()
        if not bad.any():
            return f"{msg}; column {column!r} holds numbers stored as text: convert it"
        row = int(np.argmax(bad))
        return (
            f"{msg}; column {column!r} is not numeric (e.g. "
            f"{df[column].to_numpy()[row]!r} at data row {row + 1}): encode it as numbers"
        )
    hints = [c for c in ("label", "user") if c in features]
    if hints and len(features) > model.num_features:
        opts = " ".join(f"--{h}-column {h}" for h in hints)
        return f"{msg}; exclude non-feature columns, e.g. {opts}"
    return f"{msg}; features: {_listing(features)}"


def _write_table(df: pd.DataFrame, path: Path, kind: str) -> None:
    """CSV or Parquet, written atomically (temp file beside ``path``, fsync, rename)."""
    if kind == "csv":
        atomic_write(path, lambda f: df.to_csv(f, index=False))
    else:
        atomic_write(path, lambda f: df.to_parquet(f, index=False))


def _describe(value: Any) -> str:
    v = float(value)
    if np.isnan(v):
        return "NaN"
    if np.isinf(v):
        return "infinite"
    return f"{v!r}, beyond float32 range"


def _listing(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
