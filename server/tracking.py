"""Experiment tracking: every round's metrics, the config and the final models, exported to
TensorBoard and/or MLflow as the run goes (the ``[tracking]`` config section).

Both are opt-in and imported only when turned on: a run with ``[tracking]`` off never
imports ``tensorboard`` or ``mlflow``. The metric names are the ``rounds`` table's columns
(``global_accuracy``, ``personal_accuracy_worst10``, ``server_accuracy`` = central test,
...), logged with ``step = round``; values never measured (NaN) are left out.

- **TensorBoard**: event files in ``tracking.tensorboard-dir`` (default
  ``<run dir>/tensorboard``; ``tensorboard --logdir runs`` shows every run), one scalar
  per metric, the config and the final model files as text.
- **MLflow**: one MLflow run per Pollinate run in experiment ``tracking.mlflow-experiment``
  at ``tracking.mlflow-uri`` (default a file store in ``<run dir>/mlruns``; view it with
  ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri runs/NAME/mlruns``):
  params = the whole config, metrics per round, artifacts = ``config.toml``,
  ``models/global.pt`` and the users' models (``users/<user>/{global,personal}.pt``)
  when the store is in the run folder; the MLflow run ends FINISHED or FAILED with the
  Pollinate run.

A tracker that fails mid-run (an MLflow server gone away) logs one warning and is dropped:
the run and its ``metrics.db`` go on.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pollinate.config import ConfigError, RunConfig, to_toml

logger = logging.getLogger("pollinate")

# Round-table columns that are not metrics.
NOT_METRICS = frozenset({"round", "finished_at"})
DEFAULT_EXPERIMENT = "pollinate"
# What each exporter needs installed (the import name, and the pip package that has it).
REQUIRES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}


class TrackingError(ConfigError):
    """Tracking turned on but not possible (package missing, tracking URI unusable)."""


class Tracker(Protocol):
    """What the ServerApp calls: once per round, then once at the end."""

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None: ...

    def close(self, status: str) -> None: ...


def round_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one round row: numeric, measured values only."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in NOT_METRICS or isinstance(value, str) or value is None:
            continue
        v = float(value)
        if not math.isnan(v):
            out[key] = v
    return out


def check_tracking(cfg: RunConfig) -> None:
    """One clear line, before anything starts, if an exporter is on but not installed."""
    for name in ("tensorboard", "mlflow"):
        module, package = REQUIRES[name]
        if getattr(cfg.tracking, name) and importlib.util.find_spec(module) is None:
            raise TrackingError(
                f"tracking.{name} = true needs the {package} package: "
                f"pip install 'pollinate[tracking]' (or {package}), or set it to false"
            )


def final_models(cfg: RunConfig) -> dict[str, Path]:
    """Artifact path -> file: the final global model and, in the run folder, users' models."""
    run_dir = cfg.run_dir
    files = {"models/global.pt": run_dir / "models" / "global.pt"}
    store = cfg.store_dir
    if store.is_dir() and run_dir.resolve() in store.resolve().parents:
        for f in sorted(store.glob("*/*.pt")):
            files[f"users/{f.parent.name}/{f.name}"] = f
    return {k: v for k, v in files.items() if v.is_file()}


class TensorBoardTracker:
    """Scalars per round, the config and the final models' paths as text."""

    def __init__(self, cfg: RunConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.cfg = cfg
        self.log_dir = (
            Path(cfg.tracking.tensorboard_dir)
            if cfg.tracking.tensorboard_dir
            else cfg.run_dir / "tensorboard"
        )
        if not cfg.tracking.tensorboard_dir and self.log_dir.is_dir():
            shutil.rmtree(self.log_dir)  # the run folder holds one run, so does its default
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_text("config", _markdown_code(to_toml(cfg)), global_step=0)

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None:
        for key, value in round_metrics(row).items():
            self.writer.add_scalar(key, value, global_step=server_round)
        self.writer.flush()  # a live `tensorboard --logdir` sees each round as it lands

    def close(self, status: str) -> None:
        models = "\n".join(f"- `{name}`: {path}" for name, path in final_models(self.cfg).items())
        self.writer.add_text("models", f"run {status}\n\n{models}", global_step=0)
        self.writer.close()


class MlflowTracker:
    """An MLflow run: params = the config, metrics per round, the final models as artifacts.

    Uses ``MlflowClient`` (no fluent API): it keeps no process-wide active run, so runs in
    the same process (tests, a driver script) do not interfere.
    """

    def __init__(self, cfg: RunConfig) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.uri = cfg.tracking.mlflow_uri or (cfg.run_dir / "mlruns").resolve().as_uri()
        if self.uri.startswith("file:"):
            # MLflow 3 keeps its file store in "maintenance mode" and refuses it unless this is
            # set; its database store costs ~5 s of schema migrations per new file, more than
            # a small run. The file store is what `mlruns/` under the run folder is.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        name = cfg.tracking.mlflow_experiment or DEFAULT_EXPERIMENT
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            found = self.client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found else self.client.create_experiment(name)
            run = self.client.create_run(
                experiment_id,
                run_name=cfg.run.name,
                tags={"pollinate.run_dir": str(cfg.run_dir)},
            )
        except Exception as err:  # the URI is the user's input: say which and why
            raise TrackingError(
                f"tracking.mlflow-uri '{self.uri}' is not usable: {type(err).__name__}: {err}"
            ) from None
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in cfg.to_flat().items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, server_round) for key, value in round_metrics(row).items()
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        config_file = self.cfg.run_dir / "config.toml"
        if config_file.is_file():
            self.client.log_artifact(self.run_id, str(config_file))
        for name, path in final_models(self.cfg).items():
            self.client.log_artifact(self.run_id, str(path), artifact_path=str(Path(name).parent))
        self.client.set_terminated(self.run_id, "FINISHED" if status == "finished" else "FAILED")


class Trackers:
    """The trackers a config turns on, behind one object; does nothing when none is on."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None:
        self._each("log_round", server_round, row)

    def close(self, status: str) -> None:
        self._each("close", status)
        self.trackers = []

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # tracking is a copy: never fail the run over it
                logger.warning(
                    "tracking: %s failed (%s: %s); it is off for the rest of this run",
                    type(tracker).__name__,
                    type(err).__name__,
                    err,
                )
                self.trackers.remove(tracker)


def open_tracking(cfg: RunConfig) -> Trackers:
    """The trackers ``cfg.tracking`` turns on (none: a no-op that imports nothing)."""
    check_tracking(cfg)
    trackers: list[Tracker] = []
    if cfg.tracking.tensorboard:
        trackers.append(TensorBoardTracker(cfg))
    if cfg.tracking.mlflow:
        trackers.append(MlflowTracker(cfg))
    return Trackers(trackers)


def _markdown_code(text: str) -> str:
    # TensorBoard renders text as Markdown: an indented block keeps the TOML as it is.
    return "\n".join("    " + line for line in text.splitlines())
