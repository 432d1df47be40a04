"""The Pollinate ServerApp: federated rounds over users, metrics and global artifacts.

The same app runs under ``pollinate run`` (in-process simulation), ``flwr run .`` and a
deployed SuperLink; the run config comes from ``context.run_config`` and is validated here
once. Model weights travel as one flat vector in the order of the model's ``state_dict``
(:mod:`pollinate.models.flat`; the record layout is :mod:`pollinate.protocol`'s). The rounds
themselves are :meth:`pollinate.server.rounds.UserCohorts.run`; as each ends, this module
evaluates the global model centrally, records the round's metrics
(:mod:`pollinate.server.metrics`), saves the global model artifact to
``<run dir>/models/`` and the checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import tomllib
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from pollinate import protocol
from pollinate.config import RunConfig, data_spec, model_kwargs, resolve, to_toml
from pollinate.config import flatten as flatten_tables
from pollinate.data import shared_federated_dataset
from pollinate.models import (
    FedModel,
    ModelSpec,
    atomic_link,
    create_model,
    evaluate,
    save_artifact,
)
from pollinate.models.checks import ensure_finite_model
from pollinate.models.flat import flatten, unflatten
from pollinate.server import rundir
from pollinate.server.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    load_checkpoint,
    new_run_key,
    restore_strategy,
    save_checkpoint,
    strategy_state,
)
from pollinate.server.datasplit import DATA_SPLIT_NAME, start_data_split
from pollinate.server.grid import is_deployed, responsive
from pollinate.server.metrics import MetricsRecorder
from pollinate.server.secagg import secure_grid
from pollinate.server.strategies import build_strategy
from pollinate.server.strategy import UserCohorts
from pollinate.server.tracking import open_tracking

app = ServerApp()

# Live per-round lines go to this logger; the CLI prints it, Flower's own logs stay quiet.
logger = logging.getLogger("pollinate")


def model_spec(cfg: RunConfig, central: tuple | None = None) -> tuple[ModelSpec, tuple | None]:
    """Architecture from the config, with input/output sizes from the dataset if unset."""
    in_features, num_classes = cfg.model.in_features, cfg.model.num_classes
    if not (in_features and num_classes):
        dataset = shared_federated_dataset(data_spec(cfg))  # read once per process
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


class RunFailed(RuntimeError):
    """The run cannot give a result (e.g. every user failed in every round)."""


class RunInterrupted(RuntimeError):
    """The run was stopped (Ctrl-C, SIGTERM) while the ServerApp was going on."""


def recorded_config(cfg: RunConfig) -> str:
    """The config as saved beside the results: without this invocation's resume/overwrite."""
    return to_toml(cfg.replace(**{"run.resume": False, "run.overwrite": False}))


def resume_point(cfg: RunConfig) -> Checkpoint:
    """The run folder's checkpoint, checked against this run's config."""
    ckpt = load_checkpoint(cfg.run_dir)
    saved = resolve(dict(config_flat(ckpt.config)))
    ours, theirs = _comparable(cfg), _comparable(saved)
    for key, value in theirs.items():
        if key not in rundir.RESUME_MAY_CHANGE and ours[key] != value:
            raise rundir.RunDirError(
                f"cannot resume {cfg.run_dir}: {key} = {ours[key]!r} here but {value!r} in "
                "the run; a resumed run keeps its config (resume without changing it)"
            )
    return ckpt


def _comparable(cfg: RunConfig) -> dict[str, object]:
    flat: dict[str, object] = dict(cfg.to_flat())
    if cfg.run_dir in cfg.store_dir.parents:
        flat["store.dir"] = str(cfg.store_dir.relative_to(cfg.run_dir))
    return flat


def config_flat(toml_text: str) -> dict[str, object]:
    return flatten_tables(tomllib.loads(toml_text))


def run_federation(grid: Grid, cfg: RunConfig) -> Path:
    """Run every round of ``cfg`` on ``grid`` (or the rounds left, with ``run.resume``).

    Holds the run folder's lock throughout (:mod:`pollinate.server.rundir`); returns it.
    """
    cfg = absolute_paths(cfg)
    with rundir.held(cfg.run_dir):
        rundir.prepare(cfg.run_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)
        return _federate(grid, cfg)


def _federate(grid: Grid, cfg: RunConfig) -> Path:
    spec, central = model_spec(cfg)
    model = create_model(spec.name, seed=cfg.run.seed, **spec.kwargs)
    run_dir = cfg.run_dir
    ckpt = resume_point(cfg) if cfg.run.resume else None
    saved = recorded_config(cfg)
    store = cfg.store_dir
    in_folder = [f"{store.relative_to(run_dir)}/"] if run_dir in store.parents else []
    rundir.record(
        run_dir,
        "config.toml",
        "metrics.db",
        CHECKPOINT,
        DATA_SPLIT_NAME,
        "tensorboard/*",
        *in_folder,
    )
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(saved)
    # Who holds which labels, for the report; a deployed server has no data to count.
    split = start_data_split(run_dir, None if is_deployed(grid) else data_spec(cfg))
    tracker = open_tracking(cfg)  # TensorBoard / MLflow if [tracking] asks; else a no-op
    recorder = MetricsRecorder(run_dir)
    writer = rundir.RunWriter(lambda reason: recorder.finish("interrupted", error=reason))
    strategy = build_strategy(cfg, recorder)
    assert isinstance(strategy, Strategy)  # UserCohorts mixed into a Flower strategy
    first = 0
    if ckpt is None:
        run_key = new_run_key()
        recorder.start(config_toml=saved, num_rounds=cfg.run.num_rounds)
    else:
        first, run_key = ckpt.round, ckpt.run_key
        recorder.resume(after_round=first)
        _restore(strategy, ckpt)
        logger.info("resuming %s after round %d", run_dir, first)
    x_c, y_c = (
        (torch.from_numpy(central[0]), torch.from_numpy(central[1])) if central else (None, None)
    )
    started = time.perf_counter()

    def end_of_round(server_round: int, arrays: ArrayRecord, sampler: object) -> None:
        """Central evaluation, global artifact, the round's metrics row, the checkpoint
        (``sampler``: the user sampler's state to resume the next round from)."""
        flat = protocol.read_weights(arrays)
        weights = unflatten(flat, like=model.state_dict())
        # Never written: the strategy checks each aggregate, this guards round 0 too.
        ensure_finite_model(flatten(weights).numpy(), f"round {server_round}'s global model")
        model.load_state_dict(weights)
        server: dict[str, float] = {}
        if x_c is not None and y_c is not None:
            stats = evaluate(model, x_c, y_c)
            server = {"loss": stats.loss, "accuracy": stats.accuracy}
        with writer.lock:
            if writer.stopped:
                raise RunInterrupted(writer.stopped)
            row = _commit_round(run_dir, model, server_round, server, recorder)
            save_checkpoint(
                run_dir,
                Checkpoint(
                    round=server_round,
                    weights=flat,
                    config=saved,
                    run_key=run_key,
                    strategy=strategy_state(strategy),
                    sampler=sampler,
                ),
            )
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

    initial = protocol.weights_record(
        ckpt.weights if ckpt is not None else flatten(model.state_dict())
    )
    config = protocol.run_config_record(cfg.to_flat(), json.dumps(spec.to_dict()), run_key)
    with rundir.writing(writer):
        try:
            if ckpt is None:
                end_of_round(0, initial, strategy.rng.getstate())  # the initial model
            strategy.run(
                secure_grid(grid, cfg.privacy),  # SecAgg+ train exchanges if asked
                initial,
                rounds=range(first + 1, cfg.run.num_rounds + 1),
                timeout=cfg.server.round_timeout,
                train_config=config,
                evaluate_config=ConfigRecord(dict(config)),
                end_of_round=end_of_round,
            )
            _check_some_user_trained(recorder, cfg.run.num_rounds - first)
        except BaseException as err:
            _finish(writer, recorder, "failed", f"{type(err).__name__}: {err}")
            tracker.close("failed")
            raise
        else:
            _finish(writer, recorder, "finished")
            tracker.close("finished")
        finally:
            recorder.close()
            split.join()
    return run_dir


def _restore(strategy: UserCohorts, ckpt: Checkpoint) -> None:
    restore_strategy(strategy, ckpt.strategy)
    strategy.restore_sampler(ckpt.sampler)


def _commit_round(
    run_dir: Path,
    model: FedModel,
    server_round: int,
    server: dict[str, float],
    recorder: MetricsRecorder,
) -> dict[str, float]:
    """The round's global artifacts, then its metrics row (the checkpoint comes last).

    ``global.pt`` is a second name for the round's file: written once, not twice.
    """
    name = f"global-round-{server_round:04d}.pt"
    rundir.record(run_dir, f"models/{name}", "models/global.pt")
    save_artifact(run_dir / "models" / name, model, round=server_round, metrics=dict(server))
    atomic_link(run_dir / "models" / name, run_dir / "models" / "global.pt")
    return recorder.end_round(server_round, server)


def _check_some_user_trained(recorder: MetricsRecorder, rounds_run: int) -> None:
    """A run in which every user failed in every round has no result: it failed."""
    trained, failures = recorder.trained_users()
    if rounds_run > 0 and trained == 0 and failures > 0:
        why = recorder.first_failure or "no reason given"
        raise RunFailed(f"every user failed in every round ({failures} failed replies): {why}")


def _finish(
    writer: rundir.RunWriter, recorder: MetricsRecorder, status: str, error: str = ""
) -> None:
    with writer.lock:
        if not writer.stopped:  # an interrupted run has been marked so already
            recorder.finish(status, error=error)


def _fmt(value: float) -> str:
    return "  -  " if value != value else f"{value:.3f}"  # NaN check without math import


@app.main()
def main(grid: Grid, context: Context) -> None:
    with responsive(grid) as fast_grid:
        run_federation(fast_grid, resolve(dict(context.run_config)))
