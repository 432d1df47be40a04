"""Registries: the one home of every choosable thing (timm's pattern, for every floor).

A :class:`Registry` maps a name (``"fedprox"``) to an entry that carries its own help text
and its own run-config options. The run config (:mod:`pollinate.config`) derives its
schema from them: registering an entry makes its name a valid value of the registry's
config key (``strategy.name``), adds its options as config keys (``strategy.proximal-mu``)
with their defaults, ranges and help, and lists it in error messages and the README's key
table. There are four: models (:mod:`pollinate.models.registry`), datasets
(:mod:`pollinate.data.spec`), strategies (:mod:`pollinate.server.strategies`) and
personalization methods (:mod:`pollinate.client.personalization`).

This module is standard library only, below every floor: models/ and data/, which import
nothing else of Pollinate, import it.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

Scalar = bool | int | float | str

__all__ = [
    "Declared",
    "Option",
    "Options",
    "Range",
    "Registry",
    "Scalar",
    "UnknownNameError",
]

# Registry names and option keys: lowercase words joined by '-' or '_' (config values).
_NAME = re.compile(r"^[a-z][a-z0-9_]*(-[a-z0-9_]+)*$")


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric setting: ``lo..hi``, each end closed unless open.

    Every value must also be finite (NaN and infinities are outside every range). Printed as
    ``1..1000`` for integer settings and as an interval, e.g. ``(0, 1]``, for float ones.
    """

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.open_lo else value >= self.lo
        below = value < self.hi if self.open_hi else value <= self.hi
        return above and below

    def describe(self, integer: bool) -> str:
        """``an integer in 1..10`` or ``a finite number in (0, 1]``."""
        return f"{'an integer' if integer else 'a finite number'} in {self.span(integer)}"

    def span(self, integer: bool) -> str:
        """``1..10`` or ``(0, 1]``."""
        if integer:
            return f"{int(self.lo)}..{int(self.hi)}"
        lo, hi = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
        return f"{lo}{self.lo:g}, {self.hi:g}{hi}"

    def problem(self, key: str, value: object, integer: bool) -> str | None:
        """The one-line error for ``value``, or None if it is allowed."""
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if value in self and (is_int or not integer):
            return None
        return f"{key} must be {self.describe(integer)}, got {value!r}"


@dataclass(frozen=True)
class Option:
    """One run-config option an entry declares: its default (which fixes its type), what it
    means, and its allowed values (numeric options must have a ``range``)."""

    default: Scalar
    help: str
    range: Range | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        numeric = isinstance(self.default, int | float) and not isinstance(self.default, bool)
        if numeric and self.range is None:
            raise ValueError(
                f"option {self.help!r} (default {self.default!r}) is numeric: give it a "
                "range=Range(lo, hi) so a config cannot set it to anything"
            )
        if self.range is not None and not numeric:
            raise ValueError(f"option {self.help!r}: only numeric options take a range")


class Options(Mapping[str, Scalar]):
    """An entry's option values by key (``{"proximal-mu": 0.01}``): read-only, hashable."""

    def __init__(self, items: Mapping[str, Scalar] | None = None) -> None:
        self._items: dict[str, Scalar] = dict(items or {})

    def __getitem__(self, key: str) -> Scalar:
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(self._items) or "none"
            raise KeyError(f"no option {key!r} (options: {known})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"Options({self._items!r})"

    def number(self, key: str) -> float:
        """A numeric option as a float."""
        value = self[key]
        assert isinstance(value, int | float), key
        return float(value)

    def integer(self, key: str) -> int:
        """An integer option."""
        value = self[key]
        assert isinstance(value, int) and not isinstance(value, bool), key
        return value

    def flag(self, key: str) -> bool:
        """A boolean option."""
        value = self[key]
        assert isinstance(value, bool), key
        return value


class Declared(Protocol):
    """What every registry entry says about itself."""

    @property
    def name(self) -> str: ...
    @property
    def help(self) -> str: ...
    @property
    def options(self) -> Mapping[str, Option]: ...


E = TypeVar("E", bound=Declared)


class UnknownNameError(ValueError):
    """A name that is not registered; the message is one line listing the choices."""


@dataclass
class Registry(Generic[E]):
    """Named entries of one kind, in registration order.

    Parameters
    ----------
    key
        The run-config key whose value picks an entry, e.g. ``"strategy.name"``.
    """

    key: str
    _entries: dict[str, E] = field(default_factory=dict)

    def add(self, entry: E) -> E:
        """Register ``entry``; a clash with a registered option of the same key is refused
        (entries share an option only with the same default, range and meaning)."""
        name = entry.name
        if not _NAME.match(name):
            raise ValueError(
                f"{self.key}: {name!r} is not a valid name (lowercase words joined by '-')"
            )
        if name in self._entries:
            raise ValueError(f"{self.key} {name!r} is already registered")
        for key, option in entry.options.items():
            if not _NAME.match(key) or "_" in key:
                raise ValueError(f"{self.key} {name!r}: option {key!r} must be kebab-case")
            owner = self.owner(key)
            if owner is not None and owner.options[key] != option:
                raise ValueError(
                    f"{self.key} {name!r}: option {key!r} differs from the one {owner.name!r} "
                    "registered; reuse that Option (same default, range, help) or rename it"
                )
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> E:
        """The entry named ``name``; :class:`UnknownNameError` listing the choices if none."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown(name)) from None

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def entries(self) -> tuple[E, ...]:
        return tuple(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def owner(self, key: str) -> E | None:
        """The first entry that declared option ``key``."""
        return next((e for e in self._entries.values() if key in e.options), None)

    def options(self) -> dict[str, tuple[Option, tuple[str, ...]]]:
        """Every option key of every entry: the option and the entries that read it."""
        out: dict[str, tuple[Option, tuple[str, ...]]] = {}
        for entry in self._entries.values():
            for key, option in entry.options.items():
                users = out[key][1] if key in out else ()
                out[key] = (option, (*users, entry.name))
        return out

    def unknown(self, name: object) -> str:
        """``strategy.name = 'x' is not known; choose one of: a, b`` (with a close match)."""
        choices = self.names()
        close = difflib.get_close_matches(str(name), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{self.key} = {name!r} is not known{hint}; choose one of: {', '.join(choices)}"
