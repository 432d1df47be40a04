"""predict --db: the predictions table (upsert, versions, lookup), chunked input, the CLI."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from pollinate import cli
from pollinate.client import PredictError, load_model, predict_file
from pollinate.client.predictions_db import (
    list_predictions,
    lookup_prediction,
    open_db,
)
from pollinate.client.store import ModelStore
from pollinate.models import create_model

F, C = 8, 3


def save(root: Path, kind: str = "personal", round: int = 1, seed: int = 0) -> None:
    model = create_model("mlp", in_features=F, num_classes=C, hidden=16, seed=seed)
    ModelStore(root).save(
        "alice", kind, spec=model.spec, state_dict=model.state_dict(), round=round
    )


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    save(root, "personal", round=3, seed=1)
    save(root, "global", round=4, seed=2)
    return root


def features(n: int, seed: int = 0) -> pd.DataFrame:
    x = np.random.default_rng(seed).normal(size=(n, F))
    df = pd.DataFrame(x, columns=[f"f{j}" for j in range(F)])
    df.insert(0, "id", [f"r{i:05d}" for i in range(n)])
    return df


def rows_in(db: Path) -> pd.DataFrame:
    with sa.create_engine(f"sqlite:///{db}").connect() as conn:
        return pd.read_sql("select * from predictions order by id, model_kind, model_round", conn)


def test_upsert_twice_gives_no_duplicates_and_lookup_returns_the_prediction(
    store: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in.csv"
    df = features(50)
    df.to_csv(src, index=False)
    db = tmp_path / "preds.sqlite"
    assert predict_file(store, "personal", src, db=db) == 50
    first = rows_in(db)
    assert predict_file(store, "personal", src, db=db, chunk_rows=7) == 50  # rerun: upsert
    again = rows_in(db)
    assert len(first) == len(again) == 50
    assert again["id"].is_unique
    assert (again["scored_at"] >= first["scored_at"]).all()

    model = load_model(store, "personal")
    expected = model.predict_proba(df[[f"f{j}" for j in range(F)]].to_numpy())
    got = lookup_prediction(db, "r00007")
    assert got is not None
    assert {k: got[k] for k in ("id", "model_kind", "model_round", "model_hash", "model_user")} == {
        "id": "r00007",
        "model_kind": "personal",
        "model_round": 3,
        "model_hash": model.content_hash,
        "model_user": "alice",
    }
    assert got["label"] == int(expected[7].argmax())
    np.testing.assert_allclose(got["probabilities"], expected[7], rtol=1e-6)
    assert lookup_prediction(db, "nobody") is None
    assert lookup_prediction(db, "r00007", model="global") is None


def test_a_new_model_version_adds_rows_beside_the_old(store: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    features(20).to_parquet(src, index=False)
    db = tmp_path / "preds.sqlite"
    predict_file(store, "personal", src, db=db)
    predict_file(store, "global", src, db=db)
    save(store, "personal", round=5, seed=9)  # the next round's personal model
    predict_file(store, "personal", src, db=db)
    table = rows_in(db)
    assert len(table) == 60
    assert sorted(set(zip(table["model_kind"], table["model_round"], strict=True))) == [
        ("global", 4),
        ("personal", 3),
        ("personal", 5),
    ]
    newest = list_predictions(db, "r00003")  # newest per kind, newest round first
    assert [(r["model_kind"], r["model_round"]) for r in newest] == [("personal", 5), ("global", 4)]
    every = list_predictions(db, "r00003", "personal", all_versions=True)
    assert [r["model_round"] for r in every] == [5, 3]


def test_sqlalchemy_url_and_the_portable_upsert(store: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    features(30).to_csv(src, index=False)
    url = f"sqlite:///{tmp_path / 'url.db'}"
    predict_file(store, "personal", src, db=url, db_table="scores")
    with open_db(url, "scores") as db:
        assert db.count() == 30
        # The delete + insert path other databases take, run here on SQLite.
        from pollinate.client.predictions_db import prediction_rows

        model = load_model(store, "personal")
        rows = prediction_rows(["r00001", "new"], np.full((2, C), 1 / C, np.float32), model)
        with db.transaction() as conn:
            db._delete_then_insert(conn, rows)
        assert db.count() == 31
        assert db.get("r00001")[0]["probabilities"] == pytest.approx([1 / C] * C)
    # PostgreSQL gets the same ON CONFLICT statement (compiled here; no server needed).
    from sqlalchemy.dialects import postgresql

    with open_db(url, "scores") as db:
        sql = str(db.upsert_statement("postgresql").compile(dialect=postgresql.dialect()))
    assert "ON CONFLICT (id, model_kind, model_round, model_hash) DO UPDATE" in sql


def test_chunked_scoring_matches_one_pass(store: Path, tmp_path: Path) -> None:
    df = features(1000)
    for suffix in (".csv", ".parquet"):
        src = tmp_path / f"in{suffix}"
        df.to_csv(src, index=False) if suffix == ".csv" else df.to_parquet(src, index=False)
        whole, parts = tmp_path / f"whole{suffix}", tmp_path / f"parts{suffix}"
        predict_file(store, "personal", src, whole)
        db = tmp_path / f"chunks{suffix}.sqlite"
        n = predict_file(store, "personal", src, parts, db=db, chunk_rows=64)  # 16 chunks
        assert n == 1000
        read = pd.read_csv if suffix == ".csv" else pd.read_parquet
        pd.testing.assert_frame_equal(read(whole), read(parts))
        assert len(rows_in(db)) == 1000


def test_errors_leave_the_file_and_the_database_as_they_were(store: Path, tmp_path: Path) -> None:
    db = tmp_path / "preds.sqlite"
    good = tmp_path / "good.csv"
    features(10).to_csv(good, index=False)
    predict_file(store, "personal", good, db=db)
    bad = features(200)
    bad.loc[150, "f2"] = np.nan  # in the third chunk of 64
    bad["id"] = [f"b{i}" for i in range(200)]
    bad.to_csv(tmp_path / "bad.csv", index=False)
    out = tmp_path / "out.csv"
    with pytest.raises(
        PredictError, match=r"'f2' .* in data rows 129-192 \(first at data row 151\)"
    ):
        predict_file(store, "personal", tmp_path / "bad.csv", out, db=db, chunk_rows=64)
    assert len(rows_in(db)) == 10 and not out.exists()  # rolled back, nothing renamed

    with pytest.raises(PredictError, match="nowhere to write"):
        predict_file(store, "personal", good)
    features(5).drop(columns="id").to_csv(tmp_path / "noid.csv", index=False)
    with pytest.raises(PredictError, match="--id-column COL"):
        predict_file(store, "personal", tmp_path / "noid.csv", db=db)
    with pytest.raises(PredictError, match="unknown database URL scheme 'nosuch'"):
        predict_file(store, "personal", good, db="nosuch://x")
    with pytest.raises(PredictError, match="table name"):
        predict_file(store, "personal", good, db=db, db_table="x; drop")
    with sa.create_engine(f"sqlite:///{db}").begin() as conn:
        conn.execute(sa.text("create table other (a int)"))
    with pytest.raises(PredictError, match="not a predictions table"):
        predict_file(store, "personal", good, db=db, db_table="other")


def test_cli_predict_db_and_predictions_get(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.csv"
    df = features(5)
    df["key"] = ["007", "8", "9", "10", "11"]
    df = df.drop(columns="id")
    df.to_csv(src, index=False)
    db = str(tmp_path / "p.sqlite")
    args = ["predict", str(src), "--model-dir", str(store), "--db", db, "--id-column", "key"]
    assert cli.main(args) == 0
    assert "scored 5 rows with the personal model -> " in capsys.readouterr().out
    assert cli.main(["predictions", "get", "--db", db, "--id", "007", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["id"] == "007" and got["model_kind"] == "personal" and len(got["probabilities"]) == C
    assert cli.main(["predictions", "get", "--db", db, "--id", "nobody"]) == 2
    assert "no prediction stored for id 'nobody'" in capsys.readouterr().err


def peak_traced_kib(run: Callable[[], object]) -> int:
    """The peak of memory allocated through Python's allocators (numpy and pandas
    buffers included) while ``run`` runs, in KiB; unlike the RSS it is not hidden by
    memory the process touched earlier."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1] // 1024
    finally:
        tracemalloc.stop()


@pytest.mark.slow  # scores a 100k-row file twice (~15 s; ~1.5 min on a loaded 2-core machine)
def test_a_large_file_streams_with_bounded_memory(store: Path, tmp_path: Path) -> None:
    n = 100_000
    df = features(n)
    big, small = tmp_path / "big.csv", tmp_path / "small.csv"
    df.to_csv(big, index=False)
    df.head(n // 5).to_csv(small, index=False)
    in_memory_kib = df.memory_usage(deep=True).sum() // 1024  # the frame alone, before scoring
    del df
    out, db = tmp_path / "out.csv", tmp_path / "big.sqlite"

    def chunked(src: Path) -> int:
        return peak_traced_kib(
            lambda: predict_file(store, "personal", src, out, db=db, chunk_rows=5_000)
        )

    chunked(small)  # once first: one-time allocations (imports, caches) are not the file's
    small_kib = chunked(small)
    big_kib = chunked(big)
    assert len(rows_in(db)) == n and sum(1 for _ in out.open()) == n + 1
    # The control: the same file as one chunk, so a measurement that sees nothing fails.
    whole_kib = peak_traced_kib(lambda: predict_file(store, "personal", big, out, chunk_rows=n))
    print(
        f"peak allocated in chunks of 5k rows: {small_kib} KiB for {n // 5} rows, {big_kib} KiB "
        f"for {n}; {whole_kib} KiB as one chunk; the input frame alone {in_memory_kib} KiB"
    )
    assert whole_kib > in_memory_kib  # a whole-file read shows up
    assert big_kib < 1.5 * small_kib  # 5x the rows, about the same peak: bounded by the chunk
    assert big_kib < whole_kib / 2
