"""What a run needs to go on after its last completed round: ``<run dir>/checkpoint.pt``.

Written atomically (temp file, fsync, rename) at the end of every round, *after* the
round's metrics are committed, so the file always names a round whose rows are in
``metrics.db``; a resumed run drops any rows past it. It holds

- ``round``: the last completed round r (0 = the initial model);
- ``weights``: the global model after round r (the flat vector the ServerApp sends);
- ``strategy``: what Flower's strategy object keeps between rounds (FedAdam/FedYogi/
  FedAdagrad's moments ``m_t``/``v_t``, FedAvgM's ``momentum_vector``); every other
  attribute is configuration, rebuilt from the config;
- ``sampler``: the user sampler's ``random`` state as it was when round r's sampling was
  done (before round r+1's training was drawn, which rides in round r's evaluation
  exchange: see :mod:`pollinate.server.rounds`);
- ``run_key``: the token that names this run's per-user state in the model store
  (:mod:`pollinate.client.store` keeps FedPer heads / Ditto models by run key and round,
  so a resumed round reads the state its first attempt read);
- ``config``: the run config (TOML), which a resumed run must match.

It loads with ``torch.load(weights_only=True)``: tensors, lists, ints and strings only.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pollinate.models import atomic_write

CHECKPOINT = "checkpoint.pt"
FORMAT = "pollinate-checkpoint/1"
# Attributes of Flower 1.42's strategies that change from round to round (read in
# flwr/serverapp/strategy: fedopt.py, fedadam.py, fedyogi.py, fedadagrad.py, fedavgm.py).
# `current_arrays` is set again by configure_train from the global model.
STRATEGY_STATE = ("m_t", "v_t", "momentum_vector")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    weights: torch.Tensor
    config: str
    run_key: str = field(default_factory=lambda: secrets.token_hex(8))
    strategy: dict[str, Any] = field(default_factory=dict)
    sampler: Any = None


def new_run_key() -> str:
    return secrets.token_hex(8)


def _to_torch(value: Any) -> Any:
    """numpy arrays (in dicts or lists) as tensors, bit for bit; None stays None."""
    if isinstance(value, dict):
        return {str(k): _to_torch(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_torch(v) for v in value]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    return value


def _to_numpy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_numpy(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return value


def strategy_state(strategy: object) -> dict[str, Any]:
    """The round-to-round state of a Flower strategy object (see STRATEGY_STATE)."""
    return {
        name: _to_torch(getattr(strategy, name))
        for name in STRATEGY_STATE
        if hasattr(strategy, name)
    }


def restore_strategy(strategy: object, state: dict[str, Any]) -> None:
    for name, value in state.items():
        if name in STRATEGY_STATE and hasattr(strategy, name):
            setattr(strategy, name, _to_numpy(value))


def _sampler_in(state: Any) -> Any:
    """``random.setstate`` wants tuples; a loaded state may hold lists."""
    if state is None:
        return None
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    payload = {
        "format": FORMAT,
        "round": ckpt.round,
        "weights": ckpt.weights.detach().cpu().contiguous().clone(),
        "config": ckpt.config,
        "run_key": ckpt.run_key,
        "strategy": ckpt.strategy,
        "sampler": ckpt.sampler,
    }
    atomic_write(run_dir / CHECKPOINT, lambda f: torch.save(payload, f))


def load_checkpoint(run_dir: Path) -> Checkpoint:
    path = run_dir / CHECKPOINT
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise CheckpointError(f"{path} is not a readable checkpoint: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Pollinate checkpoint ({FORMAT})")
    return Checkpoint(
        round=int(payload["round"]),
        weights=payload["weights"],
        config=str(payload["config"]),
        run_key=str(payload["run_key"]),
        strategy=dict(payload["strategy"]),
        sampler=_sampler_in(payload["sampler"]),
    )
