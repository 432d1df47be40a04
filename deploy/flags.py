"""The command-line flags every device command spells the same way.

One form each, everywhere a command takes it:

- ``--serve HOST:PORT``: where the local inference service listens (``node start``,
  ``node serve``; ``node start --serve none`` skips it). The old ``node serve --host H
  --port P`` still works, hidden, with a one-line deprecation note.
- ``--user ID``: whose models / which user of the data file (``node start``, ``node serve``,
  ``predict``). The old ``node start --user-id`` still works likewise.
- ``--model-dir DIR``: a model store, or one user's folder in it (holding ``global.pt`` /
  ``personal.pt``), which then serves that user.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pollinate.deploy.certs import DeployError
from pollinate.deploy.proc import parse_address

__all__ = ["DEFAULT_SERVE", "add_serve_option", "add_user_option", "serve_address"]

DEFAULT_SERVE = "127.0.0.1:8080"


class _Deprecated(argparse.Action):
    """An old spelling of a flag: stores its value as given and says what replaced it."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kw: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_user_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--user ID`` (dest ``user``), with the hidden old spelling ``--user-id``."""
    parser.add_argument("--user", dest="user", metavar="ID", help=help)
    parser.add_argument(
        "--user-id", dest="user", action=_Deprecated, new="--user", help=argparse.SUPPRESS
    )


def add_serve_option(
    parser: argparse.ArgumentParser, *, allow_none: bool, default: str = DEFAULT_SERVE
) -> None:
    """``--serve HOST:PORT`` (dest ``serve``), with the hidden old ``--host`` / ``--port``."""
    extra = ", or none to skip it" if allow_none else "; port 0 picks a free one"
    parser.add_argument(
        "--serve",
        default=default,
        metavar="HOST:PORT",
        help=f"inference service address (default {default}){extra}",
    )
    parser.add_argument(
        "--host",
        dest="serve_host",
        action=_Deprecated,
        new="--serve HOST:PORT",
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--port",
        dest="serve_port",
        type=int,
        action=_Deprecated,
        new="--serve HOST:PORT",
        help=argparse.SUPPRESS,
    )


def serve_address(args: argparse.Namespace, *, allow_none: bool) -> tuple[str, int] | None:
    """(host, port) from ``--serve`` (None for ``none``), the old ``--host``/``--port`` applied.

    Raises
    ------
    DeployError
        A malformed address, or ``none`` where a service is the point of the command.
    """
    text = str(args.serve).strip()
    old_host = getattr(args, "serve_host", None)
    old_port = getattr(args, "serve_port", None)
    if text.lower() == "none":
        if not allow_none:
            raise DeployError("--serve none: this command is the inference service; give HOST:PORT")
        if old_host is None and old_port is None:
            return None
        text = DEFAULT_SERVE
    try:
        host, port = _parse(text, allow_zero=not allow_none)
    except ValueError as err:
        tail = ", or none" if allow_none else ""
        raise DeployError(f"--serve: {err}{tail}") from None
    if old_port is not None and not 0 <= old_port <= 65535:
        raise DeployError(f"--port {old_port} must be in 0..65535")
    return (old_host or host, port if old_port is None else old_port)


def _parse(text: str, *, allow_zero: bool) -> tuple[str, int]:
    if allow_zero and text.endswith(":0"):  # a free port: the service prints the one it got
        host, _ = parse_address(text[:-2] + ":1")
        return host, 0
    return parse_address(text)
