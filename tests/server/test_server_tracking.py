"""Experiment tracking read back with TensorBoard's and MLflow's own readers."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from pollinate.cli import main
from pollinate.server.metrics import read_rounds

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")
TINY = ["data.num-users=3", "run.num-rounds=2", "model.name=logreg", "train.epochs=1"]


def run(run_dir: Path, *sets: str) -> int:
    argv = ["run", QUICKSTART, "--run-dir", str(run_dir)]
    for s in [*TINY, *sets]:
        argv += ["--set", s]
    return main(argv)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("tracking") / "run"
    out = io.StringIO()  # not a terminal, as in CI or a pipe
    with contextlib.redirect_stdout(out):
        assert run(run_dir, "tracking.tensorboard=true", "tracking.mlflow=true") == 0
    (run_dir.parent / "stdout.txt").write_text(out.getvalue())
    return run_dir


def test_off_a_terminal_the_run_prints_plain_lines(tracked_run: Path) -> None:
    text = (tracked_run.parent / "stdout.txt").read_text()
    assert "\x1b" not in text  # no progress bar, no escape codes
    lines = [ln for ln in text.splitlines() if re.match(r"round\s+\d+ \| server acc", ln)]
    assert [int(ln.split()[1]) for ln in lines] == [0, 1, 2]
    assert "final round 2" in text


def test_tensorboard_has_every_round_and_the_config(tracked_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    rounds = read_rounds(tracked_run)
    scalars = events.Tags()["scalars"]
    for column in ("global_accuracy", "personal_accuracy", "server_accuracy", "train_users"):
        assert column in scalars
        logged = events.Scalars(column)
        expected = rounds[rounds[column].notna()]
        assert [e.step for e in logged] == expected["round"].tolist()
        assert [e.value for e in logged] == pytest.approx(expected[column].tolist(), rel=1e-6)
    assert "finished_at" not in scalars and "round" not in scalars
    texts = events.Tags()["tensors"]
    config_tag = next(t for t in texts if t.startswith("config"))
    config_text = events.Tensors(config_tag)[0].tensor_proto.string_val[0].decode()
    assert "num-users = 3" in config_text
    models_tag = next(t for t in texts if t.startswith("models"))
    assert "models/global.pt" in events.Tensors(models_tag)[0].tensor_proto.string_val[0].decode()


def test_mlflow_run_has_params_metrics_per_round_and_the_models(tracked_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("pollinate")
    assert experiment is not None
    (mlrun,) = client.search_runs([experiment.experiment_id])
    run_id = mlrun.info.run_id
    assert mlrun.info.status == "FINISHED"
    params = client.get_run(run_id).data.params
    assert params["data.num-users"] == "3" and params["model.name"] == "logreg"
    assert params["train.lr"] == "0.05" and "tracking.mlflow" in params
    rounds = read_rounds(tracked_run)
    for column in ("global_accuracy", "personal_accuracy", "server_accuracy"):
        history = sorted(client.get_metric_history(run_id, column), key=lambda m: m.step)
        expected = rounds[rounds[column].notna()]
        assert [m.step for m in history] == expected["round"].tolist()
        assert [m.value for m in history] == pytest.approx(expected[column].tolist())
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.toml", "models", "users"} <= top
    assert {a.path for a in client.list_artifacts(run_id, "models")} == {"models/global.pt"}
    users = [a.path for a in client.list_artifacts(run_id, "users")]
    assert len(users) == 3
    user_models = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, users[0])}
    assert user_models == {"global.pt", "personal.pt"}
    local = Path(client.download_artifacts(run_id, "models/global.pt", str(tracked_run / "dl")))
    assert local.read_bytes() == (tracked_run / "models" / "global.pt").read_bytes()


def test_an_unusable_mlflow_uri_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(tmp_path / "r", "tracking.mlflow=true", 'tracking.mlflow-uri="nope://x"')
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "tracking.mlflow-uri 'nope://x'" in err[0], err


@pytest.mark.parametrize(
    ("name", "package"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow-skinny")]
)
def test_tracking_without_its_package_is_one_line_before_anything_runs(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    package: str,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, name, None)  # as if not installed: find_spec says None
    code = run(tmp_path / "r", f"tracking.{name}=true")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"tracking.{name} = true needs the {package} package" in err[0]
    assert not (tmp_path / "r").exists()
