"""Helpers for the simulation tests: a small config and in-process runs."""

from __future__ import annotations

from pathlib import Path

import torch

from pollinate import config
from pollinate.models import load_artifact
from pollinate.server.app import run_federation
from pollinate.simulation.inprocess import InProcessGrid


def small_config(run_dir: Path, **overrides: object) -> config.RunConfig:
    """A few digits users, an MLP, two rounds: seconds to run."""
    flat: dict[str, object] = {
        "run.dir": str(run_dir),
        "run.num-rounds": 2,
        "data.dataset": "digits",
        "data.num-users": 6,
        "data.alpha": 1.0,
        "model.name": "mlp",
        "model.hidden": 16,
        "train.epochs": 2,
        "train.batch-size": 16,
        "train.lr": 0.1,
        "strategy.fraction-evaluate": 0.0,
        "personalization.method": "none",
    }
    flat.update(overrides)
    return config.resolve(flat)


def run_in_process(cfg: config.RunConfig, num_nodes: int) -> tuple[Path, InProcessGrid]:
    """The federation run in this process; also returns the grid, to inspect its messages."""
    grid = InProcessGrid(num_nodes)
    return run_federation(grid, cfg), grid  # type: ignore[arg-type]  # a duck-typed fake Grid


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_artifact(run_dir / "models" / "global.pt").state_dict


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
