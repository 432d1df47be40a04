"""A node's torch device, and its users' data kept on it between rounds.

The device is the node's ``device`` (``pollinate node start --device``) or the run's
``simulation.device``, resolved in the ClientApp's own process
(:func:`pollinate.device.resolve_device`): a simulation's driver has resolved ``auto``
already, a device resolves it on its own hardware.

On a GPU, copying a user's data host-to-device costs more than one of its small training
steps, and a user sampled again trains on the same arrays. :class:`DeviceData` keeps each
user's tensors on the device, least recently used evicted once the cache holds more than
``simulation.device-cache-mb``: a process never holds more than that on the GPU for data,
whatever the number of users. On the CPU there is nothing to cache (``torch.from_numpy``
shares the arrays' memory).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pollinate import protocol
from pollinate.config import ConfigError, RunConfig
from pollinate.device import DeviceUnavailable, resolve_device

__all__ = ["DATA", "DeviceData", "node_device"]


@functools.cache
def _resolved(name: str) -> str:
    try:
        return resolve_device(name)
    except DeviceUnavailable as err:
        raise ConfigError(f"this node's device = {err}") from None


def node_device(cfg: RunConfig, node_config: Mapping[str, Any]) -> str:
    """``cpu`` or ``cuda``: the node's own ``device`` if set, else ``simulation.device``."""
    return _resolved(protocol.read_node_config(node_config).device or cfg.simulation.device)


class DeviceData:
    """Users' ``(x, y)`` as tensors on a device, least recently used evicted past a budget.

    Entries are keyed by the arrays' identity and hold the arrays themselves, so an id is
    never reused while its entry lives; new arrays for a user (a reloaded dataset, flipped
    labels) are a new entry and the old one ages out.
    """

    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[
            tuple[int, int, str], tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]
        ] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def tensors(
        self, x: np.ndarray, y: np.ndarray, device: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` on ``device``: from the cache, or copied there (and cached if it fits)."""
        key = (id(x), id(y), device)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[2], hit[3]
        xt = torch.from_numpy(x).to(device, non_blocking=True)
        yt = torch.from_numpy(y).to(device, non_blocking=True)
        size = x.nbytes + y.nbytes
        if size <= self.max_bytes:
            self._entries[key] = (x, y, xt, yt)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (ox, oy, _, _) = self._entries.popitem(last=False)
                self.bytes -= ox.nbytes + oy.nbytes
        return xt, yt


#: This process's cache (one ClientApp process = one node at a time).
DATA = DeviceData()
