"""Flower's own ``flower-superlink`` and ``flower-supernode``, run inside this process.

Why: Pollinate's launchers (``python -m pollinate.deploy.superlink`` / ``.supernode``) apply
their patches in this process and then run Flower's console entry points,
``flwr.superlink.cli.flower_superlink.flower_superlink()`` and
``flwr.supernode.cli.flower_supernode.flower_supernode()``, non-public modules that read
their options from ``sys.argv``. Running the ``flower-superlink`` script instead would
lose the patches.

Stock: the same entry points, run as their own scripts.
"""

from __future__ import annotations

import sys

from pollinate.flower_compat._core import require_parameters
from pollinate.flower_compat._names import flower_attribute, flower_module


def _run(module: str, name: str, argv: list[str]) -> None:
    entry = flower_attribute(flower_module(module), name)
    require_parameters(entry, (), what=f"{module}.{name}")
    sys.argv = [name.replace("_", "-"), *argv]
    entry()


def flower_superlink(argv: list[str]) -> None:
    """``flower-superlink ARGV`` in this process (returns when the SuperLink stops)."""
    _run("flwr.superlink.cli.flower_superlink", "flower_superlink", argv)


def flower_supernode(argv: list[str]) -> None:
    """``flower-supernode ARGV`` in this process (returns when the SuperNode stops)."""
    _run("flwr.supernode.cli.flower_supernode", "flower_supernode", argv)
