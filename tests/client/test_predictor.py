"""load_model / LoadedModel (model as a dependency) and predict_file (batch scoring)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from pollinate import cli
from pollinate.client import LoadedModel, NoModelError, PredictError, load_model, predict_file
from pollinate.client.store import ModelStore
from pollinate.models import ArtifactError, create_model, predict_proba

F, C = 8, 3


def save(root: Path, user: str = "alice", kind: str = "personal", round: int = 1, seed: int = 0):
    """Store a small MLP as ``user``'s ``kind`` model; returns the artifact."""
    model = create_model("mlp", in_features=F, num_classes=C, hidden=16, seed=seed)
    return ModelStore(root).save(
        user,
        kind,
        spec=model.spec,
        state_dict=model.state_dict(),
        round=round,
        metrics={"accuracy": 0.75},
    )


def one_line(err: pytest.ExceptionInfo[BaseException], *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    save(root, kind="personal", round=3, seed=1)
    save(root, kind="global", round=4, seed=2)
    return root


# ------------------------------------------------------------------------------- LoadedModel


def test_predictions_equal_the_artifacts_model(store: Path) -> None:
    art = ModelStore(store).load("alice", "personal")
    assert art is not None
    x = np.random.default_rng(0).normal(size=(17, F)).astype(np.float32)
    expected = predict_proba(art.build(), torch.from_numpy(x)).numpy()

    model = load_model(store)  # the only user, personal by default
    assert isinstance(model, LoadedModel)
    assert (model.kind, model.user, model.round) == ("personal", "alice", 3)
    assert (model.num_features, model.num_classes) == (F, C)
    assert model.metrics == {"accuracy": 0.75}
    assert model.version == {"round": 3, "hash": art.content_hash}
    proba = model.predict_proba(x)
    assert proba.shape == (17, C) and proba.dtype == np.float32
    np.testing.assert_allclose(proba, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(model.predict(x), expected.argmax(axis=1))
    # Lists, float64, ints and a single (F,) row are all accepted.
    np.testing.assert_allclose(model.predict_proba(x.tolist()), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.predict_proba(x[0]), expected[:1], rtol=1e-6, atol=1e-7)
    assert model.predict(np.ones((2, F), dtype=np.int64)).dtype == np.int64

    glob = load_model(store, "global", user="alice")
    assert glob.kind == "global" and glob.round == 4


def test_concurrent_predictions_agree(store: Path) -> None:
    model = load_model(store)
    x = np.random.default_rng(1).normal(size=(64, F))
    expected = model.predict_proba(x)
    results: list[bool] = []

    def work() -> None:
        results.extend(np.array_equal(model.predict_proba(x), expected) for _ in range(50))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200 and all(results)


@pytest.mark.parametrize(
    ("x", "needle"),
    [
        ([[1.0, 2.0]], "rows have 2 features; the personal model expects 8"),
        ([["a"] * F], "must be numbers"),
        ([[True] * F], "must be numbers"),
        ([[1.0] * F, [1.0] * (F - 1)], "different lengths"),
        ([[1.0] * (F - 1) + [float("nan")]], "row 0 feature 7 is NaN"),
        ([[1.0] * F, [float("inf")] * F], "row 1 feature 0 is infinite"),
        ([[1e39] * F], "beyond float32 range"),
        ([], "no rows"),
        (np.empty((0, F)), "no rows"),
        (np.ones((2, 2, F)), "shape (rows, 8)"),
    ],
)
def test_bad_features_are_one_line_errors(store: Path, x: Any, needle: str) -> None:
    model = load_model(store)
    with pytest.raises(PredictError) as err:
        model.predict(x)
    one_line(err, needle)


# -------------------------------------------------------------------------------- load_model


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(NoModelError) as err:
        load_model(tmp_path / "missing")
    one_line(err, "does not exist")
    with pytest.raises(NoModelError) as err:
        load_model(tmp_path)
    one_line(err, "no models stored yet")

    save(tmp_path, "alice", "global")
    with pytest.raises(PredictError) as bad:
        load_model(tmp_path, "best")
    one_line(bad, "unknown model 'best'", "global, personal")
    with pytest.raises(NoModelError) as err:
        load_model(tmp_path, "personal")
    one_line(err, "no personal model stored yet for user 'alice'")
    with pytest.raises(NoModelError) as err:
        load_model(tmp_path, "global", user="bob")
    one_line(err, "user 'bob' has no models", "alice")

    save(tmp_path, "bob", "global")
    with pytest.raises(PredictError) as bad:
        load_model(tmp_path, "global")
    one_line(bad, "holds 2 users (alice, bob)", "user=")
    assert load_model(tmp_path, "global", user="bob").user == "bob"


def test_load_model_rejects_a_corrupt_file(store: Path) -> None:
    path = ModelStore(store).path("alice", "personal")
    path.write_bytes(b"not a model")
    with pytest.raises(ArtifactError) as err:
        load_model(store)
    one_line(err, "not a Pollinate model file")


# ------------------------------------------------------------------------------ predict_file


def features_frame(n: int = 10, seed: int = 0) -> pd.DataFrame:
    x = np.random.default_rng(seed).normal(size=(n, F))
    df = pd.DataFrame(x, columns=[f"f{j}" for j in range(F)])
    df.insert(0, "id", [f"r{i:03d}" for i in range(n)])  # text: passes through
    return df


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_predict_file_round_trip(store: Path, tmp_path: Path, suffix: str) -> None:
    df = features_frame()
    df["label"] = np.arange(len(df)) % C
    src = tmp_path / f"in{suffix}"
    df.to_csv(src, index=False) if suffix == ".csv" else df.to_parquet(src, index=False)
    out = tmp_path / "scored" / f"out{suffix}"

    n = predict_file(store, "personal", src, out, label_column="label")

    assert n == len(df)
    got = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    model = load_model(store)
    proba = model.predict_proba(df[[f"f{j}" for j in range(F)]].to_numpy())
    assert list(got.columns) == [
        *df.columns,
        "prediction",
        "prob_0",
        "prob_1",
        "prob_2",
        "model_round",
        "model_hash",
    ]
    np.testing.assert_array_equal(got["prediction"], proba.argmax(axis=1))
    np.testing.assert_allclose(got[["prob_0", "prob_1", "prob_2"]], proba, rtol=1e-6)
    assert (got["model_round"] == 3).all() and (got["model_hash"] == model.content_hash).all()
    assert list(got["id"]) == list(df["id"]) and list(got["label"]) == list(df["label"])
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left


def test_predict_file_keeps_user_ids_as_text(store: Path, tmp_path: Path) -> None:
    df = features_frame(3)
    df["user"] = ["007", "007", "8"]
    df.to_csv(tmp_path / "in.csv", index=False)
    predict_file(
        store, "global", tmp_path / "in.csv", tmp_path / "out.csv", user="alice", user_column="user"
    )
    got = pd.read_csv(tmp_path / "out.csv", dtype={"user": str})
    assert list(got["user"]) == ["007", "007", "8"] and (got["model_round"] == 4).all()


def text(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


def write(path: Path, df: pd.DataFrame) -> Path:
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("make", "kwargs", "needle"),
    [
        (lambda d: d / "missing.csv", {}, "does not exist"),
        (lambda d: d / "in.txt", {}, "unsupported type '.txt'"),
        (lambda d: text(d / "empty.csv", ""), {}, "is empty"),
        (lambda d: text(d / "bad.parquet", "not parquet"), {}, "could not read"),
        (lambda d: write(d / "h.csv", features_frame(0)), {}, "no rows"),
        (
            lambda d: write(d / "few.csv", features_frame().drop(columns="f7")),
            {},
            "7 numeric feature columns but the personal model expects 8",
        ),
        (
            lambda d: write(d / "lab.csv", features_frame().assign(label=1)),
            {},
            "--label-column label",
        ),
        (
            lambda d: write(d / "text.csv", features_frame().assign(f3=["x"] + [1.0] * 9)),
            {},
            "column 'f3' is not numeric (e.g. 'x' at data row 1)",
        ),
        (
            lambda d: write(d / "nan.csv", features_frame().assign(f2=[1.0] * 4 + [None] * 6)),
            {},
            "feature column 'f2' in nan.csv has 6 missing or infinite values (first at data row 5)",
        ),
        (
            lambda d: write(d / "inf.csv", features_frame().assign(f1=np.inf)),
            {},
            "'f1' in inf.csv has 10 missing or infinite",
        ),
        (
            lambda d: write(d / "x.csv", features_frame()),
            {"label_column": "y"},
            "no label column 'y'",
        ),
        (
            lambda d: write(d / "sc.csv", features_frame().assign(prediction="a")),
            {},
            "already has a column 'prediction'",
        ),
        (
            lambda d: write(d / "ix.csv", features_frame().rename(columns={"id": "Unnamed: 0"})),
            {},
            "without a header name",
        ),
    ],
)
def test_predict_file_bad_input(
    store: Path, tmp_path: Path, make: object, kwargs: dict[str, Any], needle: str
) -> None:
    src = make(tmp_path)  # type: ignore[operator]
    out = tmp_path / "out" / "scores.csv"
    out.parent.mkdir()
    out.write_text("previous results\n")
    with pytest.raises(PredictError) as err:
        predict_file(store, "personal", src, out, **kwargs)
    one_line(err, needle)
    assert out.read_text() == "previous results\n"  # untouched, and no temp file beside it
    assert os.listdir(out.parent) == ["scores.csv"]


def test_predict_file_bad_output_suffix_and_model(store: Path, tmp_path: Path) -> None:
    src = write(tmp_path / "in.csv", features_frame())
    with pytest.raises(PredictError) as err:
        predict_file(store, "personal", src, tmp_path / "out.json")
    one_line(err, "output file", "unsupported type '.json'")
    with pytest.raises(PredictError) as err:
        predict_file(store, "best", src, tmp_path / "out.csv")
    one_line(err, "unknown model 'best'")
    assert not (tmp_path / "out.csv").exists()


# ----------------------------------------------------------------------------------- the CLI


def test_cli_predict(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path / "in.csv", features_frame())
    out = tmp_path / "out.parquet"
    code = cli.main(
        ["predict", "--model-dir", str(store), "--model", "global", str(src), "-o", str(out)]
    )
    assert code == 0
    assert "scored 10 rows with the global model" in capsys.readouterr().out
    assert (pd.read_parquet(out)["model_round"] == 4).all()

    code = cli.main(
        ["predict", "--model-dir", str(store), str(tmp_path / "nope.csv"), "-o", str(out)]
    )
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT
    assert err.startswith("error: input file") and err.count("\n") == 1
