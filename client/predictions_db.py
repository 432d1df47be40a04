"""Precomputed predictions in a database table (the precompute pattern's serving side).

``pollinate predict --db DB`` (:func:`pollinate.client.predictor.predict_file`) writes one
row per scored input row; a web app, a report or a batch job then reads the prediction for
an id with a plain query or :func:`lookup_prediction`::

    from pollinate.client.predictions_db import lookup_prediction

    lookup_prediction("predictions.sqlite", "r007", model="personal")
    # {"id": "r007", "model_kind": "personal", "model_round": 3, "model_hash": "3f2a...",
    #  "model_user": "alice", "label": 2, "probabilities": [0.01, 0.02, 0.97],
    #  "scored_at": 1767225600.0}

``DB`` is a SQLite file path (``predictions.sqlite``) or any SQLAlchemy URL
(``sqlite:///abs/path.db``, ``postgresql://user@host/db``; the URL's driver must be
installed). The table (default ``predictions``)::

    id TEXT, model_kind TEXT, model_round INTEGER, model_hash TEXT,   -- primary key
    model_user TEXT NULL, label INTEGER, probabilities TEXT (JSON list of C floats),
    scored_at FLOAT (unix seconds)

Rescoring the same rows with the same model version updates them in place (an upsert by
the primary key: ``INSERT ... ON CONFLICT DO UPDATE`` on SQLite and PostgreSQL, delete +
insert in one transaction elsewhere); a new model version adds rows beside the old ones, so
the table keeps each version's predictions until you delete them.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from pollinate.client.errors import PredictError, check_kind
from pollinate.text import one_line

if TYPE_CHECKING:  # annotations only: the predictor imports this module
    from pollinate.client.predictor import LoadedModel

__all__ = [
    "DEFAULT_TABLE",
    "PredictionsDB",
    "list_predictions",
    "lookup_prediction",
    "open_db",
]

DEFAULT_TABLE = "predictions"
KEY = ("id", "model_kind", "model_round", "model_hash")
VALUES = ("model_user", "label", "probabilities", "scored_at")

# Ids per DELETE ... IN (...) of the generic upsert: far below every database's limit on
# bound parameters (SQLite's is 32766 since 3.32, 999 before).
_IN_BATCH = 500
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _table(metadata: sa.MetaData, name: str) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("model_kind", sa.Text, primary_key=True),
        sa.Column("model_round", sa.Integer, primary_key=True),
        sa.Column("model_hash", sa.Text, primary_key=True),
        sa.Column("model_user", sa.Text, nullable=True),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("probabilities", sa.Text, nullable=False),
        sa.Column("scored_at", sa.Float, nullable=False),
    )


class PredictionsDB:
    """A predictions table in a database; create with :func:`open_db`.

    Attributes
    ----------
    engine
        The SQLAlchemy engine (one connection pool per ``PredictionsDB``).
    table
        The ``sqlalchemy.Table``; created on open if missing.
    where
        The database as a printable string (password hidden).
    """

    def __init__(self, engine: Engine, table_name: str = DEFAULT_TABLE) -> None:
        self.engine = engine
        self.where = engine.url.render_as_string(hide_password=True)
        self.table = _table(sa.MetaData(), table_name)
        self._create_or_check()

    # ---------------------------------------------------------------- writing

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as e:
            raise PredictError(f"database {self.where}: {_db_reason(e)}") from None

    def upsert(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Insert ``rows``, replacing stored rows with the same (id, kind, round, hash).

        Within ``rows`` a repeated key keeps its last row (as rescoring would).
        """
        if not rows:
            return
        unique = list({tuple(r[k] for k in KEY): r for r in rows}.values())
        dialect = conn.dialect.name
        if dialect in ("sqlite", "postgresql"):
            conn.execute(self.upsert_statement(dialect), unique)
        else:
            self._delete_then_insert(conn, unique)

    def upsert_statement(self, dialect: str) -> Any:
        """``INSERT ... ON CONFLICT (key) DO UPDATE`` for ``sqlite`` or ``postgresql``."""
        stmt: Any  # the two dialects' Insert classes share no typed base with the upsert
        if dialect == "sqlite":
            stmt = sqlite_insert(self.table)
        elif dialect == "postgresql":
            stmt = postgresql_insert(self.table)
        else:
            raise ValueError(f"no native upsert for {dialect!r}")
        return stmt.on_conflict_do_update(
            index_elements=list(KEY), set_={c: stmt.excluded[c] for c in VALUES}
        )

    def _delete_then_insert(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """The portable upsert: delete the rows' keys, insert them, in the caller's transaction."""
        t = self.table
        by_version: dict[tuple[str, int, str], list[str]] = {}
        for r in rows:
            by_version.setdefault((r["model_kind"], r["model_round"], r["model_hash"]), []).append(
                r["id"]
            )
        for (kind, round_, hash_), ids in by_version.items():
            for i in range(0, len(ids), _IN_BATCH):
                conn.execute(
                    t.delete().where(
                        t.c.model_kind == kind,
                        t.c.model_round == round_,
                        t.c.model_hash == hash_,
                        t.c.id.in_(ids[i : i + _IN_BATCH]),
                    )
                )
        conn.execute(t.insert(), rows)

    # ---------------------------------------------------------------- reading

    def get(
        self, id: str, model: str | None = None, *, all_versions: bool = False
    ) -> list[dict[str, Any]]:
        """Stored predictions for ``id``, newest model round first.

        Parameters
        ----------
        id
            The row id (as text, exactly as stored).
        model
            ``"global"`` or ``"personal"``; None: both.
        all_versions
            Every stored model version; default only the newest per model kind.
        """
        t = self.table
        query = sa.select(t).where(t.c.id == str(id))
        if model is not None:
            query = query.where(t.c.model_kind == check_kind(model))
        query = query.order_by(t.c.model_kind, t.c.model_round.desc(), t.c.scored_at.desc())
        try:
            with self.engine.connect() as conn:
                found = [_decode(dict(r._mapping)) for r in conn.execute(query)]
        except sa.exc.SQLAlchemyError as e:
            raise PredictError(f"database {self.where}: {_db_reason(e)}") from None
        if not all_versions:
            newest: dict[str, dict[str, Any]] = {}
            for row in found:
                newest.setdefault(row["model_kind"], row)
            found = list(newest.values())
        return sorted(found, key=lambda r: (-r["model_round"], -r["scored_at"]))

    def count(self) -> int:
        """Rows in the table."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(self.table)).scalar_one()
            )

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> PredictionsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- schema

    def _create_or_check(self) -> None:
        name = self.table.name
        try:
            inspector = sa.inspect(self.engine)
            if not inspector.has_table(name):
                self.table.metadata.create_all(self.engine)
                return
            have = {c["name"] for c in inspector.get_columns(name)}
        except sa.exc.SQLAlchemyError as e:
            raise PredictError(f"cannot open database {self.where}: {_db_reason(e)}") from None
        missing = [c.name for c in self.table.columns if c.name not in have]
        if missing:
            raise PredictError(
                f"table {name!r} in {self.where} exists but is not a predictions table "
                f"(no column {missing[0]!r}); choose another table with --db-table"
            )


def open_db(target: str | os.PathLike[str], table: str = DEFAULT_TABLE) -> PredictionsDB:
    """The predictions table in ``target``: a SQLite file path or a SQLAlchemy URL.

    Raises
    ------
    PredictError
        Unknown URL scheme, missing database driver, unreachable database, bad table name,
        or a table of that name with other columns.
    """
    if not isinstance(table, str) or not _TABLE_NAME.match(table):
        raise PredictError(
            f"table name {table!r} must be letters, digits and _ (not starting with a digit)"
        )
    return PredictionsDB(_engine(target), table)


def lookup_prediction(
    db: str | os.PathLike[str] | PredictionsDB,
    id: str,
    model: str | None = None,
    *,
    table: str = DEFAULT_TABLE,
) -> dict[str, Any] | None:
    """The newest stored prediction for ``id`` (of ``model``'s kind if given), or None."""
    rows = list_predictions(db, id, model, table=table)
    return rows[0] if rows else None


def list_predictions(
    db: str | os.PathLike[str] | PredictionsDB,
    id: str,
    model: str | None = None,
    *,
    all_versions: bool = False,
    table: str = DEFAULT_TABLE,
) -> list[dict[str, Any]]:
    """Stored predictions for ``id``: the newest per model kind, or every version."""
    if isinstance(db, PredictionsDB):
        return db.get(id, model, all_versions=all_versions)
    with open_db(db, table) as opened:
        return opened.get(id, model, all_versions=all_versions)


def prediction_rows(
    ids: Sequence[str], proba: np.ndarray, model: LoadedModel, scored_at: float | None = None
) -> list[dict[str, Any]]:
    """Table rows for ids (B,) and their class probabilities (B, C) from ``model``."""
    now = time.time() if scored_at is None else scored_at
    labels = proba.argmax(axis=1).tolist()  # (B,)
    # float32 -> shortest repr that round-trips float32: 9 significant digits.
    probs = [json.dumps([float(f"{p:.9g}") for p in row]) for row in proba.tolist()]
    return [
        {
            "id": i,
            "model_kind": model.kind,
            "model_round": model.round,
            "model_hash": model.content_hash,
            "model_user": model.user,
            "label": label,
            "probabilities": p,
            "scored_at": now,
        }
        for i, label, p in zip(ids, labels, probs, strict=True)
    ]


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["probabilities"] = json.loads(row["probabilities"])
    row["model_round"] = int(row["model_round"])
    row["label"] = int(row["label"])
    row["scored_at"] = float(row["scored_at"])
    if not math.isfinite(row["scored_at"]):
        row["scored_at"] = 0.0
    return row


def _engine(target: str | os.PathLike[str]) -> Engine:
    text = os.fspath(target)
    if not text:
        raise PredictError("--db is empty; give a SQLite file path or a SQLAlchemy URL")
    if "://" in text:
        url = text
    else:  # a plain path: a SQLite file, its folder made if missing
        path = Path(text).expanduser().resolve()
        if path.is_dir():
            raise PredictError(f"--db {text!r} is a folder; give a file, e.g. {text}/preds.sqlite")
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    try:
        return sa.create_engine(url)
    except sa.exc.NoSuchModuleError:
        scheme = url.split("://", 1)[0]
        raise PredictError(
            f"unknown database URL scheme {scheme!r}; use a SQLite path or a SQLAlchemy URL "
            "such as sqlite:///preds.db or postgresql://user@host/db"
        ) from None
    except sa.exc.ArgumentError as e:
        raise PredictError(f"bad database URL: {_db_reason(e)}") from None
    except ImportError as e:
        raise PredictError(
            f"the database driver for {url.split('://', 1)[0]!r} is not installed "
            f"({e.name or e}); pip install it (e.g. psycopg2-binary for postgresql)"
        ) from None


def _db_reason(e: BaseException) -> str:
    """A database error in one line, without SQLAlchemy's "[SQL: ...]" echo of the query."""
    cause = getattr(e, "orig", None) or e
    text = str(cause).split("\n[SQL", 1)[0]
    return one_line(text) if text.strip() else type(cause).__name__
