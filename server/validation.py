"""Every training reply checked before the Flower strategy aggregates it.

:class:`~pollinate.server.rounds.UserCohorts` expands each node's reply into one message
per user (or one per cohort mean) and hands them to :func:`screen_updates` before Flower's
``aggregate_train`` sees them. A message passes when it

- has the record layout every good reply has (one ``arrays`` record with the global
  model's arrays, one ``metrics`` record with the round's usual keys: another layout makes
  Flower's consistency check abort the whole run);
- has the global model's shapes and dtypes (7 extra weights would break the aggregate's
  broadcasting);
- holds only finite values;
- claims a positive whole ``num-examples``, at most ``validation.max-examples`` per user
  (FedAvg weights by it: one user claiming 10^9 examples would *be* the mean);
- and, when set, moved the model by at most ``validation.norm-bound`` and at most
  ``validation.norm-bound-median-multiple`` x the round's median update norm.

The checks themselves are :mod:`pollinate.models.checks` (the node-mean path on the
client uses the same ones). A rejected update is dropped from the round; its users and the
reason go to the metrics database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from pollinate import protocol
from pollinate.config import ValidationSection
from pollinate.models.checks import (
    delta_norm,
    examples_reason,
    median_outliers,
    non_finite_reason,
    norm_reason,
    shape_reason,
)


@dataclass(frozen=True, eq=False)  # by identity: two users may send equal updates
class Candidate:
    """One update for the aggregate: a user's own, or a node's mean over ``users``
    (no users: an error reply, which Flower's strategy counts as a failure)."""

    key: str  # orders the updates (the user id, or the cohort's smallest)
    users: tuple[str, ...]
    msg: Message


def global_vector(arrays: ArrayRecord) -> np.ndarray:
    """All arrays of a model record as one flat vector (Pollinate sends just one)."""
    parts = [np.asarray(a.numpy()).reshape(-1) for a in arrays.values()]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)


def _metric_keys(msg: Message) -> tuple[str, ...]:
    records = list(msg.content.metric_records.values())
    return tuple(sorted(records[0])) if len(records) == 1 else ()


def _layout_reason(msg: Message, model: ArrayRecord, usual_keys: tuple[str, ...]) -> str | None:
    content = msg.content
    arrays, metrics, examples = protocol.ARRAYS, protocol.METRICS, protocol.NUM_EXAMPLES
    if list(content.array_records) != [arrays]:
        return f"records {sorted(content.array_records)}; expected one '{arrays}' record"
    if list(content.array_records[arrays]) != list(model):
        return f"arrays {list(content.array_records[arrays])}; the model's are {list(model)}"
    keys = _metric_keys(msg)
    if list(content.metric_records) != [metrics] or examples not in keys:
        return f"no '{metrics}' record with {examples}"
    if keys != usual_keys:
        return f"metrics {list(keys)} differ from the round's usual {list(usual_keys)}"
    return None


def _examples(c: Candidate) -> object:
    return c.msg.content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES]


def _is_empty(c: Candidate) -> bool:
    metrics = c.msg.content.metric_records.get(protocol.METRICS)
    return metrics is not None and metrics.get(protocol.NUM_EXAMPLES) == 0


def _basic_reason(
    c: Candidate, model: ArrayRecord, usual_keys: tuple[str, ...], max_examples: float
) -> str | None:
    reason = _layout_reason(c.msg, model, usual_keys)
    if reason is not None:
        return reason
    update = c.msg.content.array_records[protocol.ARRAYS]
    for name, ref in model.items():
        array = np.asarray(update[name].numpy())
        reason = shape_reason(array, tuple(ref.shape), np.dtype(ref.numpy().dtype), name)
        reason = reason or non_finite_reason(array.reshape(-1))
        if reason is not None:
            return reason
    # A cohort mean counts its users' examples.
    return examples_reason(_examples(c), max_examples * len(c.users))


def screen_updates(
    candidates: Sequence[Candidate], model: ArrayRecord, cfg: ValidationSection
) -> tuple[list[Candidate], dict[Candidate, str]]:
    """The candidates that may be aggregated, and each rejected one's reason.

    ``model`` is the global model the round trained from. An empty reason marks an update
    of 0 examples (``train.epochs = 0``): dropped, as it would weigh nothing.
    """
    layouts = Counter(_metric_keys(c.msg) for c in candidates)
    usual_keys = layouts.most_common(1)[0][0] if layouts else ()
    global_flat = global_vector(model)
    rejected: dict[Candidate, str] = {}
    norms: dict[str, float] = {}
    for c in candidates:
        reason = _basic_reason(c, model, usual_keys, cfg.max_examples)
        if reason is not None and _is_empty(c) and protocol.NUM_EXAMPLES in reason:
            reason = ""
        if reason is None and (cfg.norm_bound > 0 or cfg.norm_bound_median_multiple > 0):
            update = c.msg.content.array_records[protocol.ARRAYS]
            norm = delta_norm(global_vector(update), global_flat)
            reason = norm_reason(norm, cfg.norm_bound, "validation.norm-bound")
            if reason is None:
                norms[c.key] = norm
        if reason is not None:
            rejected[c] = reason
    by_key = {c.key: c for c in candidates}
    for key, reason in median_outliers(norms, cfg.norm_bound_median_multiple).items():
        rejected[by_key[key]] = reason
    return [c for c in candidates if c not in rejected], rejected


__all__ = ["Candidate", "global_vector", "screen_updates"]
