"""Small real runs for the tests: the report tests' digits config, and quickstart runs
with ``--set`` items on each device (tests/test_device.py, tests/test_gpu.py)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from pollinate import config

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml")


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


def quickstart_rounds(
    tmp_path: Path, devices: Iterable[str], sets: list[str]
) -> dict[str, tuple[pd.DataFrame, config.RunConfig]]:
    """``pollinate run`` of the quickstart with ``sets`` once per ``simulation.device``:
    by device, the rounds it recorded and the config it wrote (which names the device
    the run resolved)."""
    from pollinate.cli import main
    from pollinate.server.metrics import read_rounds

    runs = {}
    for dev in devices:
        argv = ["run", QUICKSTART, "--run-dir", str(tmp_path / dev)]
        for item in [*sets, f"simulation.device={dev}"]:
            argv += ["--set", item]
        assert main(argv) == 0
        runs[dev] = (read_rounds(tmp_path / dev), config.load(tmp_path / dev / "config.toml"))
    return runs
