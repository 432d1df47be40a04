"""One-line error text: the house rule is that every error a user sees fits on one line.

It sits at the package root beneath every floor: standard library only, so ``models/``, a
simulation worker or the deploy CLI can import it without pulling torch, pandas or Flower.
"""

from __future__ import annotations

import traceback

__all__ = ["one_line"]


def one_line(error: BaseException | str, *, with_type: bool = False) -> str:
    """``error``'s text with every run of whitespace (newlines too) folded into one space.

    Parameters
    ----------
    error
        An exception (its ``str``), or text such as a child process's stderr.
    with_type
        Prefix an exception's text with its class name (``ValueError: ...``), as Python's
        last traceback line does.

    Returns
    -------
    str
        Never empty: an exception without a message gives its class name, empty text gives
        ``"unknown error"``.
    """
    if isinstance(error, str):
        return " ".join(error.split()) or "unknown error"
    text = str(error)
    if with_type:
        text = "".join(traceback.format_exception_only(type(error), error))
    return " ".join(text.split()) or type(error).__name__
