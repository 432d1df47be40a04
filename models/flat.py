"""A model's weights as one flat vector, and back.

Flower 1.42 sends every array of a message as its own object: on a deployment each is one
HTTP request per hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back), and the
SuperLink's CPU per request is what a small model's round costs. One vector per model
instead of one array per tensor halves the objects of a model-carrying message.

Element-wise aggregates (FedAvg's weighted mean, FedAdam/FedYogi, the coordinate-wise
median and trimmed mean) give the same numbers on the vector as tensor by tensor, and
Krum's distances are over all weights either way.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

StateDict = dict[str, torch.Tensor]


def flatten(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every tensor of ``state``, in order, as one 1-D tensor.

    Its dtype is the first floating tensor's (the weights'); integer buffers (e.g. batch
    norm's counters) travel in it too and are rounded back by :func:`unflatten`.
    """
    tensors = list(state.values())
    if not tensors:
        return torch.empty(0)
    floats = [t.dtype for t in tensors if t.dtype.is_floating_point]
    dtype = floats[0] if floats else torch.float64
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> StateDict:
    """``flat`` cut back into tensors with the names, shapes and dtypes of ``like``."""
    sizes = [t.numel() for t in like.values()]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(
            f"a flat vector of {tuple(flat.shape)} does not fit this model's "
            f"{sum(sizes)} weights: server and device built different models"
        )
    out: StateDict = {}
    for (name, ref), part in zip(like.items(), torch.split(flat, sizes), strict=True):
        part = part.reshape(ref.shape)
        if not ref.dtype.is_floating_point:
            part = part.round()  # a counter averaged by FedAvg is no longer whole
        out[name] = part.to(ref.dtype)
    return out


__all__ = ["flatten", "unflatten"]
