"""The Flower client layer: ClientApp, local model store, and using stored models.

``load_model(model_dir, which)`` returns a :class:`LoadedModel` whose ``.predict(array)``
works in any Python program; :mod:`pollinate.client.serving` serves the same models over
HTTP on a device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .predictor import LoadedModel, NoModelError, PredictError, load_model, predict_file

__all__ = ["LoadedModel", "NoModelError", "PredictError", "load_model", "predict_file"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the predictor needs pandas, which a simulation worker that
    # only runs the ClientApp (``pollinate.client.app``) would otherwise load for nothing.
    if name in __all__:
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
