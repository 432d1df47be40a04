"""Version and signature checks, and patches that announce themselves and are undone."""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# The Flower releases whose internals this package was written against and tested with.
SUPPORTED_RANGE = ">=1.42.0,<1.43"
SUPPORTED_FLOWER = SpecifierSet(SUPPORTED_RANGE)

log = logging.getLogger("pollinate.flower_compat")

# Patches in force now, by name ("module.attr"), and how often each replacement has run:
# tests read both to prove that a patch engages and is undone.
_active: Counter[str] = Counter()
engaged: Counter[str] = Counter()
_warned: set[str] = set()


class FlowerIncompatible(RuntimeError):
    """The installed Flower is not one Pollinate's Flower layer was written for."""


def flower_version() -> str:
    """The installed ``flwr`` distribution's version."""
    try:
        return version("flwr")
    except PackageNotFoundError as err:  # pragma: no cover - flwr is a dependency
        raise FlowerIncompatible(
            f"flwr is not installed; Pollinate needs flwr{SUPPORTED_RANGE}"
        ) from err


def check_flower_version(installed: str | None = None) -> None:
    """Raise :class:`FlowerIncompatible` unless ``installed`` (default: flwr's) is supported."""
    found = installed or flower_version()
    if Version(found) not in SUPPORTED_FLOWER:
        raise FlowerIncompatible(
            f"flwr {found} is installed; Pollinate supports flwr{SUPPORTED_RANGE} "
            f'(pip install "flwr{SUPPORTED_RANGE}")'
        )


def parameters(fn: Callable[..., Any]) -> tuple[str, ...]:
    """``fn``'s parameter names, in order."""
    return tuple(inspect.signature(fn).parameters)


def _mismatch(what: str, found: Sequence[str], expected: Sequence[str]) -> str:
    return (
        f"flwr {flower_version()}: {what} takes ({', '.join(found)}), Pollinate expects "
        f"({', '.join(expected)}); Pollinate supports flwr{SUPPORTED_RANGE}"
    )


def require_parameters(fn: Callable[..., Any], expected: Sequence[str], *, what: str) -> None:
    """Raise :class:`FlowerIncompatible` unless ``fn`` takes exactly ``expected``."""
    found = parameters(fn)
    if found != tuple(expected):
        raise FlowerIncompatible(_mismatch(what, found, expected))


def mark_engaged(name: str) -> None:
    """Record that the patch ``name``'s replacement has run (tests assert on it)."""
    engaged[name] += 1


def active_patches() -> tuple[str, ...]:
    """Names of the patches in force now."""
    return tuple(sorted(name for name, n in _active.items() if n > 0))


@contextmanager
def swapped(
    owner: Any,
    attr: str,
    replacement: Any,
    *,
    why: str,
    expect: Sequence[str] | None = None,
    stock_fallback: bool = False,
) -> Iterator[bool]:
    """``owner.attr`` replaced by ``replacement`` inside the block; yields whether it is.

    ``expect``: the parameter names the original must have (the replacement relies on
    them). On a mismatch: :class:`FlowerIncompatible`, or with ``stock_fallback`` (stock
    Flower still does the job, only slower) a one-line warning, once, and the original.
    ``why`` is said in that warning and in the error.
    """
    name = f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}"
    original = getattr(owner, attr)
    if expect is not None and parameters(original) != tuple(expect):
        message = f"{_mismatch(name, parameters(original), expect)} ({why})"
        if not stock_fallback:
            raise FlowerIncompatible(message)
        if name not in _warned:
            _warned.add(name)
            log.warning("%s; using stock Flower's path", message)
        yield False
        return
    setattr(owner, attr, replacement)
    _active[name] += 1
    try:
        yield True
    finally:
        setattr(owner, attr, original)
        _active[name] -= 1


@contextmanager
def swapped_together(
    owner: Any, replacements: Sequence[tuple[str, Any, Sequence[str]]], *, why: str
) -> Iterator[bool]:
    """Each ``(attr, replacement, expect)`` swapped as :func:`swapped` with
    ``stock_fallback``, in order; yields whether all are. The first mismatch stops there
    (after its one warning): the ones before it stay in place for the block."""
    with ExitStack() as stack:
        for attr, replacement, expect in replacements:
            on = stack.enter_context(
                swapped(owner, attr, replacement, why=why, expect=expect, stock_fallback=True)
            )
            if not on:
                yield False
                return
        yield True


def warn_fallback(name: str, message: str) -> None:
    """Say once, on one line, that ``name`` falls back to stock Flower, and why."""
    if name not in _warned:
        _warned.add(name)
        log.warning("%s; using stock Flower's path", message)


def signature_matches(
    fn: Callable[..., Any], expected: Sequence[str], *, what: str, why: str
) -> bool:
    """True if ``fn`` takes exactly ``expected``; else the stock-fallback warning, once."""
    found = parameters(fn)
    if found == tuple(expected):
        return True
    warn_fallback(what, f"{_mismatch(what, found, expected)} ({why})")
    return False


def require_leading_parameters(
    fn: Callable[..., Any], expected: Sequence[str], *, what: str
) -> None:
    """Raise :class:`FlowerIncompatible` unless ``fn``'s first parameters are ``expected``.

    For functions called by keyword whose later parameters have defaults Pollinate leaves.
    """
    found = parameters(fn)
    if found[: len(expected)] != tuple(expected):
        raise FlowerIncompatible(_mismatch(what, found, expected))
