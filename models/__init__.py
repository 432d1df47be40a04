"""Pollinate models: pure PyTorch, no Flower.

- :mod:`.registry`: ``create_model`` and the model registry; every model is a
  :class:`FedModel` with a ``body`` (shared representation) and a ``head`` (classifier).
- :mod:`.train`: ``train`` / ``evaluate`` / ``predict_proba`` on in-memory tensors, with the
  FedProx proximal term and parameter subsets for personalization.
- :mod:`.artifact`: save and load verified model files (weights + spec + metadata).

This package imports nothing else of Pollinate; everything else may import it.
"""

from .artifact import (
    FORMAT,
    ArtifactError,
    ModelArtifact,
    atomic_link,
    atomic_write,
    load_artifact,
    save_artifact,
    weights_hash,
)
from .registry import (
    MAX_PARAMETERS,
    MODELS,
    FedModel,
    ModelEntry,
    ModelSpec,
    UnknownModelError,
    available_models,
    body_keys,
    create_model,
    head_keys,
    parameter_count,
    register_model,
    state_shapes,
)
from .train import EvalStats, TrainConfig, TrainStats, dp_sgd_steps, evaluate, predict_proba, train

__all__ = [
    "FORMAT",
    "MAX_PARAMETERS",
    "MODELS",
    "ArtifactError",
    "EvalStats",
    "FedModel",
    "ModelArtifact",
    "ModelEntry",
    "ModelSpec",
    "TrainConfig",
    "TrainStats",
    "UnknownModelError",
    "atomic_link",
    "atomic_write",
    "available_models",
    "body_keys",
    "create_model",
    "dp_sgd_steps",
    "evaluate",
    "head_keys",
    "load_artifact",
    "parameter_count",
    "predict_proba",
    "register_model",
    "save_artifact",
    "state_shapes",
    "train",
    "weights_hash",
]
