"""The Flower client layer: ClientApp, local model store, and using stored models.

``load_model(model_dir, which)`` returns a :class:`LoadedModel` whose ``.predict(array)``
works in any Python program; :mod:`pollinate.client.serving` serves the same models over
HTTP on a device.
"""

from .predictor import LoadedModel, NoModelError, PredictError, load_model, predict_file

__all__ = ["LoadedModel", "NoModelError", "PredictError", "load_model", "predict_file"]
