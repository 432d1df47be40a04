"""Finding a non-public Flower module or attribute, with the one-line error if it is gone."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from pollinate.flower_compat._core import (
    SUPPORTED_RANGE,
    FlowerIncompatible,
    flower_version,
    swapped,
)


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


class ModuleStandIn(ModuleType):
    """Stands in for a module inside one Flower module: what a subclass defines differs,
    every other name is the real module's (looked up when asked, so it is never stale)."""

    def __init__(self, real: ModuleType) -> None:
        super().__init__(real.__name__)
        self._real = real

    def __getattr__(self, name: str) -> Any:  # only names the subclass does not define
        return getattr(self.__dict__["_real"], name)


@contextmanager
def module_stood_in(
    module_name: str, attr: str, stand_in: ModuleStandIn, *, name: str, why: str
) -> Iterator[bool]:
    """Flower's ``module_name.attr`` is ``stand_in`` inside the block; yields whether it is
    (False: that name is not the module ``stand_in`` stands in for, after one warning)."""
    module = flower_module(module_name)
    real = stand_in.__dict__["_real"]
    if getattr(module, attr, None) is not real:
        stock_instead(name, f"does not use the {real.__name__} module", why)
        yield False
        return
    with swapped(module, attr, stand_in, why=why):
        yield True
