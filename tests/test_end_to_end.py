"""End to end through Flower's simulation engine (Ray): `pollinate run`, then inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pollinate.cli import main
from pollinate.client.store import ModelStore
from pollinate.models import load_artifact
from pollinate.server.metrics import read_clients, read_rounds, read_run_info

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")


def pollinate_run(run_dir: Path, *sets: str) -> str:
    argv = ["run", QUICKSTART, "--run-dir", str(run_dir)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return str(run_dir)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    pollinate_run(
        run_dir, "data.num-users=4", "run.num-rounds=2", "model.name=mlp", "train.epochs=1"
    )
    return run_dir


def test_run_produces_readable_round_and_client_metrics(small_run: Path) -> None:
    rounds = read_rounds(small_run)
    assert rounds["round"].tolist() == [0, 1, 2]
    done = rounds[rounds["round"] > 0]
    assert done["train_users"].tolist() == [4, 4] and done["eval_users"].tolist() == [4, 4]
    for col in ("global_accuracy", "personal_accuracy", "server_accuracy"):
        assert done[col].between(0, 1).all()
    assert (done["bytes_sent"] > 0).all() and (done["bytes_received"] > 0).all()
    assert (done["round_seconds"] > 0).all()
    clients = read_clients(small_run)
    assert len(clients) == 8 and clients["user"].nunique() == 4
    assert read_run_info(small_run)["status"] == "finished"


def test_models_outlive_the_run(small_run: Path) -> None:
    final = load_artifact(small_run / "models" / "global.pt")
    assert final.round == 2
    assert (small_run / "models" / "global-round-0001.pt").exists()
    last = small_run / "models" / "global-round-0002.pt"  # global.pt is the last round's file
    assert (small_run / "models" / "global.pt").read_bytes() == last.read_bytes()
    store = ModelStore(small_run / "users")
    assert len(store.users()) == 4
    for user in store.users():
        g, p = store.load(user, "global"), store.load(user, "personal")
        assert g is not None and p is not None
        assert g.round == 2 and g.content_hash == final.content_hash  # users got the final model


def test_resolved_config_is_saved_beside_the_results(small_run: Path) -> None:
    from pollinate import config

    cfg = config.load(small_run / "config.toml")
    assert cfg.data.num_users == 4 and cfg.run_dir == small_run.resolve()


def test_metrics_command_formats(small_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics", str(small_run), "--format", "csv"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert {"round", "global_accuracy", "personal_accuracy"} <= set(header)
    assert main(["metrics", str(small_run), "--clients", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"round", "user", "global_accuracy", "personal_accuracy"} <= set(rows[0])
    assert main(["metrics", str(small_run)]) == 0
    assert "personal_accuracy" in capsys.readouterr().out


def test_metrics_plot(small_run: Path, tmp_path: Path) -> None:
    png = tmp_path / "curves.png"
    assert main(["metrics", str(small_run), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_personal_beats_global_on_strongly_non_iid_users(tmp_path: Path) -> None:
    run_dir = pollinate_run(
        tmp_path / "skewed",
        "data.num-users=10",
        "data.alpha=0.1",
        "run.num-rounds=3",
        "model.name=mlp",
        "personalization.method=finetune",
    )
    last = read_rounds(run_dir).iloc[-1]
    assert last["personal_accuracy"] > last["global_accuracy"] + 0.02
    clients = read_clients(run_dir)
    final = clients[clients["round"] == clients["round"].max()]
    assert isinstance(final, pd.DataFrame)
    # Most users, not just the mean, are better off with their personal model.
    assert (final["personal_accuracy"] >= final["global_accuracy"]).mean() >= 0.7


def test_rerun_in_the_same_folder_needs_overwrite_and_keeps_foreign_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "again"
    sets = (
        "data.num-users=3",
        "run.num-rounds=1",
        "model.name=logreg",
        "personalization.method=ditto",
    )
    pollinate_run(run_dir, *sets)
    stale = run_dir / "users" / "stale-user"
    stale.mkdir()
    (stale / "personal.pt").write_bytes(b"old")
    (run_dir / "notes.txt").write_text("mine")
    first = load_artifact(run_dir / "models" / "global.pt").content_hash
    argv = ["run", QUICKSTART, "--run-dir", str(run_dir), *(f"--set={s}" for s in sets)]
    assert main(argv) == 2  # a finished run is there: --resume or --overwrite
    assert main([*argv, "--overwrite"]) == 0
    assert (stale / "personal.pt").read_bytes() == b"old"  # not Pollinate's: kept
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert load_artifact(run_dir / "models" / "global.pt").content_hash == first  # reproducible
    assert read_rounds(run_dir)["round"].tolist() == [0, 1]
