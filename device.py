"""Which torch device trains: ``auto`` | ``cpu`` | ``cuda``, resolved without poisoning fork.

The simulation's ClientApps run in worker processes forked from a fork server
(:mod:`pollinate.simulation.workers`) or in Ray actors, and a deployed device runs its own.
A child forked from a process that has initialised CUDA cannot use CUDA at all, so the
processes that fork (the driver, the fork server) may ask *whether* a GPU is there but must
never create a CUDA context. torch 2.13's ``torch.cuda.is_available()`` calls
``cudaGetDeviceCount`` (which runs ``cuInit``: fork-poisoning) unless
``PYTORCH_NVML_BASED_CUDA_CHECK=1``, in which case it counts devices through NVML and
initialises nothing (``torch/cuda/__init__.py``: ``is_available`` -> ``_nvml_based_avail``
-> ``device_count``). :func:`cuda_available` sets that variable first; the processes this
one starts inherit it, so theirs is the same check.

This module imports torch only when it has to: with a CPU build of torch (``torch.version.cuda``
is None, read from torch's ``version.py`` without importing torch) ``auto`` is ``cpu`` at
once, so ``pollinate run`` does not pay a torch import before its workers start.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
from pathlib import Path

__all__ = [
    "DEVICES",
    "DeviceUnavailable",
    "cuda_available",
    "resolve_device",
    "torch_cuda_build",
]

#: The values of ``simulation.device`` (and of a device node's ``--device``).
DEVICES = ("auto", "cpu", "cuda")

#: Makes ``torch.cuda.is_available()`` count devices through NVML instead of ``cuInit``.
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"


class DeviceUnavailable(ValueError):
    """The configured device is not on this machine (or not in this build of torch)."""


@functools.cache
def torch_cuda_build() -> str | None:
    """The CUDA version torch was built for (``torch.version.cuda``); None for a CPU build.

    Read from torch's ``version.py`` when torch is not imported yet (a torch import is a
    second or two; this is a file read).
    """
    import sys

    if "torch" in sys.modules:
        cuda: str | None = sys.modules["torch"].version.cuda
        return cuda
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        import torch

        return torch.version.cuda
    for node in tree.body:  # `cuda: Optional[str] = None` (or `cuda = '12.8'`)
        target: ast.expr
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "cuda" and value is not None:
            found = ast.literal_eval(value)
            return found if isinstance(found, str) else None
    return None


@functools.cache
def cuda_available() -> bool:
    """Whether torch can use a CUDA GPU here, asked without creating a CUDA context.

    Cached: asked once per process (the answer does not change during a run).
    """
    if torch_cuda_build() is None:
        return False
    os.environ.setdefault(NVML_CHECK_ENV, "1")
    import torch

    return torch.cuda.is_available()


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` where a GPU is available, else ``cpu``; ``cpu`` / ``cuda`` as is.

    Raises
    ------
    DeviceUnavailable
        ``cuda`` on a machine (or a CPU build of torch) without one; the message says how
        to fix it.
    ValueError
        A name that is none of :data:`DEVICES`.
    """
    if name not in DEVICES:
        raise ValueError(f"device {name!r} is not known; choose one of: {', '.join(DEVICES)}")
    if name == "auto":
        return "cuda" if cuda_available() else "cpu"
    if name == "cuda" and not cuda_available():
        build = torch_cuda_build()
        why = "a CPU-only build of torch" if build is None else f"torch for CUDA {build}, no GPU"
        raise DeviceUnavailable(
            f"'cuda' but this machine has no usable GPU ({why}); set it to 'cpu' or 'auto'"
        )
    return name
