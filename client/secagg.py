"""The node's side of secure aggregation (SecAgg+; the server's: ``pollinate.server.secagg``).

:func:`secure_aggregation_mod` wraps the ClientApp's ``train`` handler. A train message
that carries SecAgg+'s stage record goes to Flower's own ``secaggplus_mod``, which keeps
the protocol's state in the node's ``context.state`` and does the cryptography; any other
train message goes straight to the handler.

In the stage that trains (``collect_masked_vectors``) the handler runs unchanged and
replies the node's example-weighted mean of its users' models (the ``node-mean`` layout,
:mod:`pollinate.client.app`). This module hands Flower's mod that reply as the *update*
``mean - global`` with weight = the node's training examples, in the legacy ``FitRes``
layout the mod reads; the mod scales it by ``examples / max-weight``, quantizes, masks,
and clears every array of the reply, so only the masked vector leaves the node (and the
plain metrics). A node whose users had nothing to train still takes part, with weight 0:
its masks must cancel.

Why the update and not the model: it is small, so the quantization's clipping range can
be tight, and it is what user-level DP clips on the device before it enters the sum.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from pollinate import protocol
from pollinate.flower_compat.secagg import (
    RECORD_KEY_CONFIGS,
    Code,
    FitRes,
    Key,
    Stage,
    Status,
    fitres_to_recorddict,
    ndarrays_to_parameters,
    secaggplus_mod,
)

_logger = logging.getLogger("pollinate")

# Where the setup stage's parameters are kept between stages (ours, beside Flower's state).
_SETTINGS = "pollinate-secagg-settings"
# = pollinate.server.secagg.WEIGHT_KEY (client/ and server/ never import each other)
WEIGHT_KEY = "pollinate-weight-key"


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: SecAgg+ for train messages that ask for it, the handler otherwise."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return call_next(msg, context)
    if configs.get(Key.STAGE) == Stage.SETUP:
        context.state.config_records[_SETTINGS] = configs.copy()

    def train_as_fitres(inner: Message, ctx: Context) -> Message:
        return _update_as_fitres(inner, ctx, call_next)

    return secaggplus_mod(msg, context, train_as_fitres)


def node_update(
    msg: Message, reply: Message, weight_key: str = protocol.NUM_EXAMPLES
) -> tuple[np.ndarray, int]:
    """The node's mean update (its mean model minus the global model) and its weight (the
    reply metric ``weight_key``: its examples); zeros and 0 if none of its users trained."""
    global_flat = (
        msg.content.array_records[protocol.ARRAYS][protocol.WEIGHTS].numpy().astype(np.float64)
    )
    content = reply.content
    if protocol.ARRAYS not in content.array_records:
        return np.zeros_like(global_flat), 0
    mean = content.array_records[protocol.ARRAYS][protocol.WEIGHTS].numpy().astype(np.float64)
    weight = int(cast(Any, content.metric_records[protocol.METRICS])[weight_key])
    return mean - global_flat, weight


def _update_as_fitres(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    settings = context.state.config_records.get(_SETTINGS)
    key = (
        str(settings.get(WEIGHT_KEY, protocol.NUM_EXAMPLES))
        if settings is not None
        else protocol.NUM_EXAMPLES
    )
    update, examples = node_update(msg, reply, key)
    _warn_if_clipped(update, examples, context)
    fit = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([update]),
        num_examples=examples,
        metrics={},
    )
    for name, record in fitres_to_recorddict(fit, keep_input=False).items():
        reply.content[name] = record
    return reply


def _warn_if_clipped(update: np.ndarray, examples: int, context: Context) -> None:
    """Say so on the node when quantization will clip: the aggregate is then biased."""
    settings = context.state.config_records.get(_SETTINGS)
    if settings is None or examples == 0:
        return
    max_weight = float(cast(Any, settings[Key.MAX_WEIGHT]))
    clip = float(cast(Any, settings[Key.CLIPPING_RANGE]))
    clipped = int(np.count_nonzero(np.abs(update * (examples / max_weight)) > clip))
    if examples > max_weight or clipped:
        _logger.warning(
            "secure aggregation: this node's weight (%d examples) over "
            "privacy.secagg-max-weight = %g clips %d of %d update values to "
            "privacy.secagg-clipping-range = %g; raise them",
            examples,
            max_weight,
            clipped,
            update.size,
            clip,
        )
