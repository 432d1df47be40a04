"""What is wrong with a request to use a stored model: one line, for every way of using it.

Below :mod:`.predictor` and :mod:`.predictions_db` (which the predictor uses), so the two
need not import each other.
"""

from __future__ import annotations

from pollinate.client.store import KINDS

__all__ = ["PredictError", "check_kind"]


class PredictError(ValueError):
    """Bad input to prediction (features, files, model choice); the message is one line."""


def check_kind(which: object) -> str:
    """``which`` if it is a model kind, else a one-line ``PredictError``."""
    if not isinstance(which, str) or which not in KINDS:
        raise PredictError(f"unknown model {which!r}; choose one of: {', '.join(KINDS)}")
    return which
