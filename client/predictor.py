"""Use a stored model from any Python program (the model-as-a-dependency pattern).

::

    from pollinate.client import load_model

    model = load_model("~/.pollinate/models", "personal")  # (user inferred if only one)
    model.predict([[0.1, 0.2, ...]])        # (B,) int class labels
    model.predict_proba(x)                  # (B, C) float32 probabilities
    model.version                           # {"round": 7, "hash": "3f2a..."}

:func:`predict_file` scores a whole CSV/Parquet file in batch, in bounded-memory chunks, into
a file and/or a database table (the precompute pattern; ``pollinate predict`` on the
command line; :mod:`pollinate.client.predictions_db` reads the table back). Every bad
input raises a one-line :class:`PredictError` (a ``ValueError``); no stored model yet
raises its subclass :class:`NoModelError`, which the inference service answers with 503.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import torch

from pollinate.client.errors import PredictError, check_kind
from pollinate.client.store import ModelStore, StoreError, open_store
from pollinate.data.tables import SUFFIXES, TableError, iter_table, table_kind
from pollinate.models import ArtifactError, ModelArtifact, atomic_write, load_artifact
from pollinate.text import one_line

__all__ = [
    "LoadedModel",
    "NoModelError",
    "PredictError",
    "load_model",
    "predict_file",
    "resolve_user",
]


# Rows read, scored and written at a time in predict_file: bounds memory, not results.
_CHUNK = 65_536
# Rows per database statement (each one a dict of Python objects while it is sent).
_DB_BATCH = 2_000


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
        A model store root (``<model_dir>/<user>/{global,personal}.pt``), or one user's
        folder in it.
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
    try:
        store = open_store(root, user)  # a store, or one user's folder in it
    except StoreError as e:
        raise PredictError(str(e)) from None
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


# ------------------------------------------------------------------------ batch scoring


def predict_file(
    model_dir: str | os.PathLike[str],
    which: str,
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    user: str | None = None,
    *,
    label_column: str | None = None,
    user_column: str | None = None,
    id_column: str | None = None,
    db: str | os.PathLike[str] | None = None,
    db_table: str = "predictions",
    chunk_rows: int = _CHUNK,
) -> int:
    """Score every row of a CSV/Parquet file into a file and/or a database (the precompute pattern).

    Feature columns are all numeric columns except ``label_column``, ``user_column`` and the
    id column, in file order; there must be exactly as many as the model takes. Other columns
    pass through. The output file (CSV or Parquet, by suffix) holds the input columns plus
    ``prediction``, ``prob_0`` .. ``prob_<C-1>``, ``model_round`` and ``model_hash``, and is
    written atomically: a reader sees the old file or the complete new one. The database
    table (see :mod:`pollinate.client.predictions_db`) gets one row per input row, keyed by
    (id, model kind, round, hash) and upserted, in one transaction committed only when the
    whole file has been scored.

    The input is read ``chunk_rows`` rows at a time (pandas ``chunksize`` for CSV, pyarrow
    ``iter_batches`` for Parquet) and each chunk is scored and written before the next is
    read, so memory stays bounded by the chunk size, not the file size.

    Parameters
    ----------
    id_column
        The column that identifies a row (database key); default ``id`` when the file has
        one. Never a feature. Required with ``db``.
    db
        A SQLite file path or a SQLAlchemy URL; None writes no database rows.
    db_table
        The table's name.
    chunk_rows
        Rows per chunk.

    Returns
    -------
    int
        Rows scored.

    Raises
    ------
    PredictError
        One-line reason for any bad input; the output file and the database are then left
        as they were.
    """
    if out_path is None and db is None:
        raise PredictError(
            "nowhere to write the predictions: give an output file (-o OUT), a database "
            "(--db DB), or both"
        )
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise PredictError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    in_path = Path(in_path)
    out = None if out_path is None else Path(out_path)
    out_kind = None if out is None else _table_kind(out, "output")
    model = load_model(model_dir, which, user)
    text_columns = [c for c in (user_column, id_column or "id") if c]
    chunks = _read_chunks(in_path, text_columns, chunk_rows)
    first = next(chunks, None)
    if first is None:
        raise PredictError(f"input file {str(in_path)!r} has no rows to score")
    plan = _plan_columns(
        first,
        in_path.name,
        model,
        label_column,
        user_column,
        id_column,
        need_id=db is not None,
        adds_columns=out is not None,
    )
    database = None
    if db is not None:
        # Lazy: SQLAlchemy (1.0 s to import, python -X importtime) is only for --db, and the
        # inference service imports this module.
        from pollinate.client.predictions_db import open_db

        database = open_db(db, db_table)

    def score_all(f: BinaryIO | None) -> int:
        from pollinate.client.predictions_db import prediction_rows

        sink = None if f is None or out_kind is None else _sink(f, out_kind, in_path.name)
        n = 0
        with database.transaction() if database is not None else nullcontext() as conn:
            for chunk in itertools.chain([first], chunks):
                x = _chunk_features(chunk, in_path.name, plan, n, chunk_rows)  # (B, F)
                proba = model.predict_proba(x)  # (B, C)
                if sink is not None:
                    sink.write(_scored_frame(chunk, proba, model))
                if database is not None and conn is not None:
                    ids = _chunk_ids(chunk, in_path.name, plan, n)
                    # Row dicts cost ~30x the probabilities they hold: build a few at a time.
                    for i in range(0, len(ids), _DB_BATCH):
                        batch = prediction_rows(
                            ids[i : i + _DB_BATCH], proba[i : i + _DB_BATCH], model
                        )
                        database.upsert(conn, batch)
                n += len(chunk)
            if sink is not None:
                sink.close()
        return n

    try:
        if out is None:
            return score_all(None)
        scored: list[int] = []
        atomic_write(out, lambda f: scored.append(score_all(f)))
        return scored[0]
    finally:
        if database is not None:
            database.close()


@dataclass(frozen=True)
class _Columns:
    """Which input columns are features (in order) and which one is the row id."""

    features: list[str]
    id: str | None


def _table_kind(path: Path, role: str) -> str:
    kind = table_kind(path)
    if kind is None:
        raise PredictError(
            f"{role} file {str(path)!r} has unsupported type "
            f"{path.suffix or '(no suffix)'!r}; use one of: {', '.join(SUFFIXES)}"
        )
    return kind


def _read_chunks(path: Path, text_columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The file's rows, ``chunk_rows`` at a time; a bad file is a one-line PredictError."""
    kind = _table_kind(path, "input")
    if not path.is_file():
        raise PredictError(f"input file {str(path)!r} does not exist")
    return _iter_chunks(path, kind, text_columns, chunk_rows)


def _iter_chunks(
    path: Path, kind: str, text_columns: list[str], chunk_rows: int
) -> Iterator[pd.DataFrame]:
    try:
        # Ids as text, so "007" stays "007" in the output and the database.
        yield from iter_table(path, kind, text_columns=text_columns, chunk_rows=chunk_rows)
    except TableError as e:
        if e.empty:
            raise PredictError(
                f"input file {str(path)!r} is empty; it needs a header row and data"
            ) from None
        raise PredictError(
            f"could not read {str(path)!r} as {kind.upper()} "
            f"({e.reason}); check that it is a valid {kind.upper()} file"
        ) from None


def _plan_columns(
    df: pd.DataFrame,
    name: str,
    model: LoadedModel,
    label_column: str | None,
    user_column: str | None,
    id_column: str | None,
    *,
    need_id: bool,
    adds_columns: bool,
) -> _Columns:
    """Features and id from the first chunk's columns, or a PredictError saying what to fix."""
    columns = list(df.columns)
    for role, column in (("label", label_column), ("user", user_column), ("id", id_column)):
        if column is not None and column not in columns:
            raise PredictError(
                f"{name} has no {role} column {column!r}; it has: {_listing(columns)}"
            )
    if id_column is None and "id" in columns:
        id_column = "id"
    if need_id and id_column is None:
        raise PredictError(
            f"{name} has no column 'id' to key the database rows by; name the column that "
            "identifies each row with --id-column COL"
        )
    unnamed = [c for c in columns if c.startswith("Unnamed: ")]
    if unnamed:
        raise PredictError(
            f"{name} has a column without a header name ({unnamed[0]!r}); name "
            "or drop it (pandas writes one for the index unless index=False)"
        )
    skip = {label_column, user_column, id_column}
    candidates = [c for c in columns if c not in skip]
    features = [c for c in candidates if pd.api.types.is_numeric_dtype(df[c])]
    if len(features) != model.num_features:
        raise PredictError(_count_message(df, name, model, features, candidates))
    added = ["prediction", *(f"prob_{c}" for c in range(model.num_classes))]
    clash = [c for c in [*added, "model_round", "model_hash"] if c in columns]
    if adds_columns and clash:
        raise PredictError(
            f"{name} already has a column {clash[0]!r}, which the output "
            "adds; rename or drop it (is this an already scored file?)"
        )
    return _Columns(features, id_column)


def _chunk_features(
    df: pd.DataFrame, name: str, plan: _Columns, offset: int, chunk_rows: int
) -> np.ndarray:
    """The chunk's features as float32 (B, F); ``offset`` = data rows before this chunk."""
    x = np.empty((len(df), len(plan.features)), dtype=np.float32)  # (B, F)
    for j, column in enumerate(plan.features):
        series = df[column]
        if not pd.api.types.is_numeric_dtype(series):  # numbers in earlier chunks, not here
            parsed = pd.to_numeric(series, errors="coerce")
            bad = (parsed.isna() & series.notna()).to_numpy()
            row = int(np.argmax(bad))
            raise PredictError(
                f"feature column {column!r} in {name} is not numeric (e.g. "
                f"{series.to_numpy()[row]!r} at data row {offset + row + 1}): encode it as numbers"
            )
        with np.errstate(over="ignore"):
            col = series.to_numpy(dtype=np.float64, na_value=np.nan).astype(np.float32)
        bad = ~np.isfinite(col)
        if bad.any():
            first = offset + int(np.argmax(bad)) + 1
            count = f"{int(bad.sum())} missing or infinite values"
            if offset or len(df) == chunk_rows:  # a chunk of a larger file: say which part
                count += f" in data rows {offset + 1}-{offset + len(df)}"
            raise PredictError(
                f"feature column {column!r} in {name} has {count} (first at data row "
                f"{first}); fill or drop those rows"
            )
        x[:, j] = col
    return x


def _chunk_ids(df: pd.DataFrame, name: str, plan: _Columns, offset: int) -> list[str]:
    """The chunk's row ids as text (database keys); integral floats lose their ``.0``."""
    assert plan.id is not None
    series = df[plan.id]
    missing = series.isna().to_numpy()
    if missing.any():
        raise PredictError(
            f"id column {plan.id!r} in {name} is empty at data row "
            f"{offset + int(np.argmax(missing)) + 1}; every row needs an id"
        )
    if pd.api.types.is_float_dtype(series) and bool((series == series.round()).all()):
        series = series.astype(np.int64)
    return [str(v) for v in series.tolist()]


def _scored_frame(df: pd.DataFrame, proba: np.ndarray, model: LoadedModel) -> pd.DataFrame:
    """The chunk plus prediction, prob_0..prob_<C-1>, model_round and model_hash."""
    added: dict[str, Any] = {"prediction": proba.argmax(axis=1)}
    added.update({f"prob_{c}": proba[:, c] for c in range(model.num_classes)})
    added["model_round"] = np.full(len(df), model.round, dtype=np.int64)
    added["model_hash"] = model.content_hash
    return pd.concat([df, pd.DataFrame(added, index=df.index)], axis=1)


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


class _CsvSink:
    """Chunks appended to one CSV file: the header once, then rows."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._header = True

    def write(self, df: pd.DataFrame) -> None:
        df.to_csv(self._f, index=False, header=self._header)
        self._header = False

    def close(self) -> None:
        self._f.flush()


class _ParquetSink:
    """Chunks appended to one Parquet file as row groups, all with the first chunk's schema."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self._f = f
        self._name = name
        self._writer: Any = None

    def write(self, df: pd.DataFrame) -> None:
        # Lazy: pyarrow.parquet (0.7 s to import, python -X importtime) only for Parquet out.
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            table = pa.Table.from_pandas(df, preserve_index=False)
            self._writer = pq.ParquetWriter(self._f, table.schema)
        else:
            try:
                table = pa.Table.from_pandas(df, schema=self._writer.schema, preserve_index=False)
            except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as e:
                raise PredictError(
                    f"a column of {self._name} changes type partway through ({one_line(e)}); "
                    "give it one type throughout, or write CSV output"
                ) from None
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _sink(f: BinaryIO, kind: str, name: str) -> _CsvSink | _ParquetSink:
    return _CsvSink(f) if kind == "csv" else _ParquetSink(f, name)


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
