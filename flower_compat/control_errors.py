"""Flower's error codes, read from the replies of its ``flwr`` CLI.

Why: Pollinate talks to the SuperLink's Control API through Flower's own ``flwr ... --format
json`` commands; a refused request comes back as ``{"success": false, "error-message":
"..."}``, where Flower's CLI (``flwr.cli.utils._format_flower_error``) writes a
``FlowerError`` as ``[code: N] message``. ``N`` is an ``ApiErrorCode``
(``flwr.supercore.error``, non-public): Pollinate decides on the code, never on the wording
of the message (e.g. "this key is registered already" is ``PUBLIC_KEY_ALREADY_IN_USE``).

Stock: there is no other channel for the reason; a code Flower renumbers is caught by the
test that compares these names with Flower's enum.
"""

from __future__ import annotations

import re
from functools import cache

from pollinate.flower_compat._names import flower_attribute, flower_module

_CODE = re.compile(r"\[code: (\d+)\]")


def flower_error_code(message: str) -> int | None:
    """The ``ApiErrorCode`` in a message from Flower's CLI, None if it carries none."""
    found = _CODE.search(message)
    return int(found.group(1)) if found else None


@cache
def api_error_code(name: str) -> int:
    """The number of Flower's ``ApiErrorCode.<name>`` (imported once, when first asked)."""
    codes = flower_attribute(flower_module("flwr.supercore.error"), "ApiErrorCode")
    return int(flower_attribute(codes, name))
