"""Small real runs for the report tests (tests/server/test_report.py, tests/test_cli_report.py)."""

from __future__ import annotations

from pathlib import Path

from pollinate import config


def digits_config(run_dir: Path, **overrides: object) -> config.RunConfig:
    """Six digits users, an MLP, two rounds; some stragglers drop out."""
    flat: dict[str, object] = {
        "run.dir": str(run_dir),
        "run.num-rounds": 2,
        "data.num-users": 6,
        "data.alpha": 1.0,
        "model.name": "mlp",
        "model.hidden": 16,
        "train.batch-size": 16,
        "train.lr": 0.1,
        "personalization.method": "finetune",
        # Some sampled users straggle and send nothing: fewer trained than sampled.
        "train.straggler-fraction": 0.3,
        "train.drop-stragglers": True,
    }
    flat.update(overrides)
    return config.resolve(flat)
