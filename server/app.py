"""The Pollinate ServerApp: federated rounds over users, metrics and global artifacts.

The same app runs under ``pollinate run`` (in-process simulation), ``flwr run .`` and a
deployed SuperLink; the run config comes from ``context.run_config`` and is validated here
once. Model weights travel as one flat vector, ``ArrayRecord {"weights": ...}`` in the order
of the model's ``state_dict`` (:mod:`pollinate.models.flat`; the ClientApp reads and replies
the same). Per round it records metrics (:mod:`pollinate.server.metrics`) and saves the global
model artifact to ``<run dir>/models/``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from pollinate.config import RunConfig, data_spec, model_kwargs, resolve, to_toml
from pollinate.data import load_federated_dataset
from pollinate.models import ModelSpec, create_model, evaluate, save_artifact
from pollinate.models.checks import ensure_finite_model
from pollinate.models.flat import flatten, unflatten
from pollinate.server.datasplit import start_data_split
from pollinate.server.grid import is_deployed, responsive
from pollinate.server.metrics import MetricsRecorder
from pollinate.server.strategy import build_strategy
from pollinate.server.tracking import open_tracking

app = ServerApp()

# Live per-round lines go to this logger; the CLI prints it, Flower's own logs stay quiet.
logger = logging.getLogger("pollinate")


def model_spec(cfg: RunConfig, central: tuple | None = None) -> tuple[ModelSpec, tuple | None]:
    """Architecture from the config, with input/output sizes from the dataset if unset."""
    in_features, num_classes = cfg.model.in_features, cfg.model.num_classes
    if not (in_features and num_classes):
        dataset = load_federated_dataset(data_spec(cfg))
        in_features = in_features or dataset.num_features
        num_classes = num_classes or dataset.num_classes
        central = dataset.central_test
    kwargs = {"in_features": in_features, "num_classes": num_classes, **model_kwargs(cfg)}
    return ModelSpec(cfg.model.name, kwargs), central


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Pin run and store folders to absolute paths: clients may run in another cwd."""
    return cfg.replace(
        **{
            "run.dir": str(cfg.run_dir.resolve()),
            "store.dir": str(cfg.store_dir.resolve()),
        }
    )


def start_fresh(run_dir: Path, store_dir: Path) -> None:
    """A run folder holds one run: drop an earlier run's models before this one starts.

    Stale personal models would otherwise seed this run's Ditto/FedPer users. A store
    outside the run folder (a device's, or a shared one) is never touched.
    """
    if (run_dir / "models").is_dir():
        logger.info("%s held an earlier run; replacing its results", run_dir)
        shutil.rmtree(run_dir / "models")
    if store_dir.is_dir() and run_dir in store_dir.parents:
        shutil.rmtree(store_dir)


def run_federation(grid: Grid, cfg: RunConfig) -> Path:
    """Run every round of ``cfg`` on ``grid``; returns the run folder."""
    cfg = absolute_paths(cfg)
    random.seed(cfg.run.seed)  # Flower samples with the `random` module
    spec, central = model_spec(cfg)
    model = create_model(spec.name, seed=cfg.run.seed, **spec.kwargs)
    run_dir = cfg.run_dir
    start_fresh(run_dir, cfg.store_dir)
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    # Who holds which labels, for the report; a deployed server has no data to count.
    split = start_data_split(run_dir, None if is_deployed(grid) else data_spec(cfg))
    tracker = open_tracking(cfg)  # TensorBoard / MLflow if [tracking] asks; else a no-op
    recorder = MetricsRecorder(run_dir)
    recorder.start(config_toml=to_toml(cfg), num_rounds=cfg.run.num_rounds)
    strategy = build_strategy(cfg, recorder)
    x_c, y_c = (
        (torch.from_numpy(central[0]), torch.from_numpy(central[1])) if central else (None, None)
    )
    started = time.perf_counter()

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Central evaluation, global artifact and the round's metrics row."""
        flat = arrays.to_torch_state_dict()["weights"]
        weights = unflatten(flat, like=model.state_dict())
        # Never written: the strategy checks each aggregate, this guards round 0 too.
        ensure_finite_model(flatten(weights).numpy(), f"round {server_round}'s global model")
        model.load_state_dict(weights)
        server: dict[str, float] = {}
        if x_c is not None:
            stats = evaluate(model, x_c, y_c)
            server = {"loss": stats.loss, "accuracy": stats.accuracy}
        artifact_metrics = dict(server)
        save_artifact(
            run_dir / "models" / f"global-round-{server_round:04d}.pt",
            model,
            round=server_round,
            metrics=artifact_metrics,
        )
        save_artifact(
            run_dir / "models" / "global.pt", model, round=server_round, metrics=artifact_metrics
        )
        row = recorder.end_round(server_round, server)
        tracker.log_round(server_round, row)
        logger.info(
            "round %3d | server acc %s | global acc %s | personal acc %s | %6.2f s",
            server_round,
            _fmt(row["server_accuracy"]),
            _fmt(row["global_accuracy"]),
            _fmt(row["personal_accuracy"]),
            time.perf_counter() - started,
            extra={"round_row": row, "num_rounds": cfg.run.num_rounds},  # the live display's
        )
        return MetricRecord(dict(server)) if server else None

    config = ConfigRecord({**cfg.to_flat(), "model-spec": json.dumps(spec.to_dict())})
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({"weights": flatten(model.state_dict())}),
            num_rounds=cfg.run.num_rounds,
            timeout=cfg.server.round_timeout,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=end_of_round,
        )
    except BaseException as err:
        recorder.finish("failed", error=f"{type(err).__name__}: {err}")
        tracker.close("failed")
        raise
    else:
        recorder.finish("finished")
        tracker.close("finished")
    finally:
        recorder.close()
        split.join()
    return run_dir


def _fmt(value: float) -> str:
    return "  -  " if value != value else f"{value:.3f}"  # NaN check without math import


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(responsive(grid), resolve(dict(context.run_config)))
