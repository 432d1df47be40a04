"""Per-round and per-client metrics of a run, in one SQLite file: ``<run dir>/metrics.db``.

SQLite because it is one file, queryable (``sqlite3 runs/x/metrics.db "select ..."``),
readable with pandas (:func:`read_rounds`, :func:`read_clients`) and safe to read while
the run writes it (WAL journal; each round is one transaction, so a reader sees whole
rounds only).

Tables (documented in README.md, "Metrics"):

``rounds``  — one row per round (round 0 = the initial model, server-side metrics only)::

    round, server_loss, server_accuracy,            -- global model on central test data
    train_loss,                                     -- example-weighted mean over trained users
    global_loss, global_accuracy,                   -- example-weighted means over evaluated users
    personal_loss, personal_accuracy,
    global_accuracy_worst10, personal_accuracy_worst10,  -- mean of the worst 10% of users
    train_users, eval_users, failures,
    round_seconds, bytes_sent, bytes_received, finished_at,
    rejected                                        -- updates refused by validation

``clients`` — one row per (round, user) that trained or evaluated in that round::

    round, user, train_examples, train_loss,
    test_examples, global_loss, global_accuracy, personal_loss, personal_accuracy,
    rejected_reason                                 -- why its update was refused (TEXT)

``run``     — key/value: status (running|finished|failed|interrupted), error, started_at,
finished_at, resumed_at, config (resolved, TOML), num_rounds, pid and host (the writing
process).
"""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pollinate import protocol
from pollinate.server.runlock import effective_status

if TYPE_CHECKING:  # imported by the readers only (1.1 s): the ServerApp's start-up does without
    import pandas as pd

DB_NAME = "metrics.db"

ROUND_COLUMNS = (
    "round",
    "server_loss",
    "server_accuracy",
    "train_loss",
    "global_loss",
    "global_accuracy",
    "personal_loss",
    "personal_accuracy",
    "global_accuracy_worst10",
    "personal_accuracy_worst10",
    "train_users",
    "eval_users",
    "failures",
    "round_seconds",
    "bytes_sent",
    "bytes_received",
    "finished_at",
    "rejected",
    "epsilon",
    "epsilon_mean",
)
CLIENT_COLUMNS = (
    "round",
    "user",
    "train_examples",
    "train_loss",
    "test_examples",
    "global_loss",
    "global_accuracy",
    "personal_loss",
    "personal_accuracy",
    "epsilon",
    "rejected_reason",
)
# Columns added after the first release: a metrics.db written before them gets them
# (ALTER TABLE) when a recorder opens it, and the readers fill them in when reading one.
_ADDED = {
    "rounds": {"rejected": "REAL", "epsilon": "REAL", "epsilon_mean": "REAL"},
    "clients": {"rejected_reason": "TEXT", "epsilon": "REAL"},
}
_TEXT_COLUMNS = ("user", "rejected_reason")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY,
    {", ".join(c + " REAL" for c in ROUND_COLUMNS[1:])});
CREATE TABLE IF NOT EXISTS clients (round INTEGER NOT NULL, user TEXT NOT NULL,
    {", ".join(c + " REAL" for c in CLIENT_COLUMNS[2:-1])}, rejected_reason TEXT,
    PRIMARY KEY (round, user));
"""


class MetricsError(ValueError):
    """A run folder without readable metrics."""


def worst_fraction_mean(values: Iterable[float], fraction: float = 0.1) -> float:
    """Mean of the lowest ``ceil(fraction * n)`` values (at least one); NaN when empty."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    k = max(1, math.ceil(fraction * len(ordered)))
    return sum(ordered[:k]) / k


def weighted_mean(values: Iterable[tuple[float, float]]) -> float:
    """Sum(w * v) / Sum(w) over (value, weight) pairs; NaN when the weights sum to 0."""
    pairs = [(v, w) for v, w in values if not math.isnan(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else math.nan


@dataclass
class _RoundBuffer:
    started: float = field(default_factory=time.perf_counter)
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evals: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: int = 0
    rejected: dict[str, str] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    # [privacy]: ε spent by the end of the round (largest and mean over users), per user.
    epsilon: float = math.nan
    epsilon_mean: float = math.nan
    user_epsilon: dict[str, float] = field(default_factory=dict)


class MetricsRecorder:
    """Collects one round's per-user metrics and writes the round atomically."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / DB_NAME
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        _add_missing_columns(self._db)
        self._rounds: dict[int, _RoundBuffer] = {}
        self.first_failure = ""  # the first failed reply's reason, for a run that fails

    # -- run level ------------------------------------------------------------
    def start(self, *, config_toml: str, num_rounds: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM rounds")
            self._db.execute("DELETE FROM clients")
            self._db.execute("DELETE FROM run")
            self._set(
                status="running",
                started_at=time.time(),
                config=config_toml,
                num_rounds=num_rounds,
                error="",
                # Who writes: `pollinate metrics --follow` stops when this process is gone.
                pid=os.getpid(),
                host=socket.gethostname(),
            )

    def resume(self, *, after_round: int) -> None:
        """Go on with a run from ``after_round``: later rows (a round cut short) are dropped."""
        with self._db:
            self._db.execute("DELETE FROM rounds WHERE round > ?", (after_round,))
            self._db.execute("DELETE FROM clients WHERE round > ?", (after_round,))
            self._set(status="running", resumed_at=time.time(), finished_at="", error="")

    def trained_users(self) -> tuple[int, int]:
        """(user updates received, failed replies) over every recorded round."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(train_users), 0), COALESCE(SUM(failures), 0) FROM rounds"
        ).fetchone()
        return int(row[0]), int(row[1])

    def finish(self, status: str = "finished", error: str = "") -> None:
        with self._db:
            self._set(status=status, finished_at=time.time(), error=error)

    def close(self) -> None:
        self._db.close()

    def _set(self, **items: object) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO run (key, value) VALUES (?, ?)",
            [(k, str(v)) for k, v in items.items()],
        )

    # -- per round ------------------------------------------------------------
    def _buffer(self, server_round: int) -> _RoundBuffer:
        return self._rounds.setdefault(server_round, _RoundBuffer())

    def begin_round(self, server_round: int) -> None:
        self._buffer(server_round)

    def add_bytes(self, server_round: int, *, sent: int = 0, received: int = 0) -> None:
        buf = self._buffer(server_round)
        buf.bytes_sent += sent
        buf.bytes_received += received

    def add_failures(self, server_round: int, count: int) -> None:
        self._buffer(server_round).failures += count

    def note_failure(self, reason: str) -> None:
        self.first_failure = self.first_failure or reason

    def user_trained(self, server_round: int, user: str, metrics: dict[str, float]) -> None:
        self._buffer(server_round).train[user] = metrics

    def user_rejected(self, server_round: int, user: str, reason: str) -> None:
        """The user's update was refused (update validation): it counts in ``rejected``."""
        self._buffer(server_round).rejected[user] = reason

    def user_evaluated(self, server_round: int, user: str, metrics: dict[str, float]) -> None:
        self._buffer(server_round).evals[user] = metrics

    def privacy_spent(
        self,
        server_round: int,
        *,
        epsilon: float,
        epsilon_mean: float,
        per_user: dict[str, float] | None = None,
    ) -> None:
        """The ε spent so far (the run's, or the largest user's), and per user."""
        buf = self._buffer(server_round)
        buf.epsilon, buf.epsilon_mean = epsilon, epsilon_mean
        buf.user_epsilon = dict(per_user or {})

    def end_round(
        self, server_round: int, server_metrics: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Write the round's rows in one transaction; returns the round row."""
        buf = self._rounds.pop(server_round, None) or _RoundBuffer()
        row = self._round_row(server_round, buf, server_metrics or {})
        clients = self._client_rows(server_round, buf)
        with self._db:
            self._db.execute(
                f"INSERT OR REPLACE INTO rounds ({', '.join(ROUND_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(ROUND_COLUMNS))})",
                [row[c] for c in ROUND_COLUMNS],
            )
            self._db.executemany(
                f"INSERT OR REPLACE INTO clients ({', '.join(CLIENT_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(CLIENT_COLUMNS))})",
                [[r[c] for c in CLIENT_COLUMNS] for r in clients],
            )
        return row

    @staticmethod
    def _round_row(r: int, buf: _RoundBuffer, server: dict[str, float]) -> dict[str, float]:
        def mean(source: dict[str, dict[str, float]], key: str) -> float:
            return weighted_mean((m[key], m[protocol.NUM_EXAMPLES]) for m in source.values())

        nan = math.nan
        evals = buf.evals
        # A rejected update's own claims (its loss, its examples) are not believed.
        trained = {u: m for u, m in buf.train.items() if u not in buf.rejected}
        return {
            "round": r,
            "server_loss": server.get("loss", nan),
            "server_accuracy": server.get("accuracy", nan),
            "train_loss": mean(trained, protocol.TRAIN_LOSS),
            "global_loss": mean(evals, protocol.GLOBAL_LOSS),
            "global_accuracy": mean(evals, protocol.GLOBAL_ACCURACY),
            "personal_loss": mean(evals, protocol.PERSONAL_LOSS),
            "personal_accuracy": mean(evals, protocol.PERSONAL_ACCURACY),
            "global_accuracy_worst10": worst_fraction_mean(
                m[protocol.GLOBAL_ACCURACY] for m in evals.values()
            ),
            "personal_accuracy_worst10": worst_fraction_mean(
                m[protocol.PERSONAL_ACCURACY] for m in evals.values()
            ),
            "train_users": len(trained),
            "eval_users": len(evals),
            "failures": buf.failures,
            "round_seconds": time.perf_counter() - buf.started,
            "bytes_sent": buf.bytes_sent,
            "bytes_received": buf.bytes_received,
            "finished_at": time.time(),
            "rejected": len(buf.rejected),
            "epsilon": buf.epsilon,
            "epsilon_mean": buf.epsilon_mean,
        }

    @staticmethod
    def _client_rows(r: int, buf: _RoundBuffer) -> list[dict[str, object]]:
        nan = math.nan
        rows = []
        for user in sorted(set(buf.train) | set(buf.evals) | set(buf.rejected)):
            t = buf.train.get(user, {})
            e = buf.evals.get(user, {})
            rows.append(
                {
                    "round": r,
                    "user": user,
                    "train_examples": t.get(protocol.NUM_EXAMPLES, nan),
                    "train_loss": t.get(protocol.TRAIN_LOSS, nan),
                    "test_examples": e.get(protocol.NUM_EXAMPLES, nan),
                    "global_loss": e.get(protocol.GLOBAL_LOSS, nan),
                    "global_accuracy": e.get(protocol.GLOBAL_ACCURACY, nan),
                    "personal_loss": e.get(protocol.PERSONAL_LOSS, nan),
                    "personal_accuracy": e.get(protocol.PERSONAL_ACCURACY, nan),
                    "epsilon": buf.user_epsilon.get(user, nan),
                    "rejected_reason": buf.rejected.get(user),
                }
            )
        return rows


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a metrics.db from an older Pollinate up to this schema (columns only added)."""
    with db:
        for table, columns in _ADDED.items():
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


# ----------------------------------------------------------------------------- reading


def _connect_ro(run_dir: str | Path) -> sqlite3.Connection:
    path = Path(run_dir) / DB_NAME
    if not Path(run_dir).is_dir():
        raise MetricsError(f"run folder '{run_dir}' does not exist")
    if not path.is_file():
        raise MetricsError(f"'{run_dir}' has no {DB_NAME}: is it a Pollinate run folder?")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.execute("SELECT 1 FROM rounds LIMIT 1")
    except sqlite3.DatabaseError as err:
        raise MetricsError(f"'{path}' is not a readable metrics database: {err}") from None
    return db


def read_rounds(run_dir: str | Path) -> pd.DataFrame:
    """Per-round rows (round 0 first), as stored; safe while the run is writing."""
    with _connect_ro(run_dir) as db:
        import pandas as pd

        df = pd.read_sql_query("SELECT * FROM rounds ORDER BY round", db)
    if "rejected" not in df:  # written before validation existed: nothing was rejected
        df["rejected"] = 0
    return _ints(df, ROUND_COUNTS)


def read_clients(run_dir: str | Path) -> pd.DataFrame:
    """Per-(round, user) rows."""
    with _connect_ro(run_dir) as db:
        import pandas as pd

        df = pd.read_sql_query("SELECT * FROM clients ORDER BY round, user", db)
    if "rejected_reason" not in df:
        df["rejected_reason"] = None
    return _ints(df, ("round",))


def read_run_info(run_dir: str | Path) -> dict[str, str]:
    """The ``run`` table; a ``running`` run whose process is gone reads ``interrupted``."""
    with _connect_ro(run_dir) as db:
        info = dict(db.execute("SELECT key, value FROM run").fetchall())
    if "status" in info:
        info["status"] = effective_status(Path(run_dir), info["status"])
    return info


# The rounds table's columns that count things (read back as integers).
ROUND_COUNTS = (
    "round",
    "train_users",
    "eval_users",
    "failures",
    "bytes_sent",
    "bytes_received",
    "rejected",
)
# The clients table's.
CLIENT_COUNTS = ("train_examples", "test_examples")


def _ints(df: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    import pandas as pd

    # SQLite hands back NULL (never measured) as None; make those columns float NaN.
    for c in df.columns:
        if c not in columns and c not in _TEXT_COLUMNS:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in columns:
        if c in df and not df[c].isna().any():
            df[c] = df[c].astype("int64")
    return df
