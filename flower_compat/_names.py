"""Finding a non-public Flower module or attribute, with the one-line error if it is gone."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

from pollinate.flower_compat._core import SUPPORTED_RANGE, FlowerIncompatible, flower_version


def flower_module(name: str) -> ModuleType:
    """``import name``, or :class:`FlowerIncompatible` naming the supported range."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise FlowerIncompatible(
            f"flwr {flower_version()} has no module {name}; "
            f"Pollinate supports flwr{SUPPORTED_RANGE}"
        ) from err


def flower_attribute(owner: Any, attr: str) -> Any:
    """``owner.attr``, or :class:`FlowerIncompatible` naming the supported range."""
    try:
        return getattr(owner, attr)
    except AttributeError as err:
        where = getattr(owner, "__name__", type(owner).__name__)
        raise FlowerIncompatible(
            f"flwr {flower_version()}: {where} has no {attr}; "
            f"Pollinate supports flwr{SUPPORTED_RANGE}"
        ) from err


_said: set[str] = set()


def stock_instead(name: str, what_changed: str, why: str) -> None:
    """Say once, in one line, that ``name`` is not patched and stock Flower runs instead."""
    if name in _said:
        return
    _said.add(name)
    logging.getLogger("pollinate.flower_compat").warning(
        "flwr %s: %s %s (%s); using stock Flower's path (Pollinate supports flwr%s)",
        flower_version(),
        name,
        what_changed,
        why,
        SUPPORTED_RANGE,
    )
