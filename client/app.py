"""The Pollinate ClientApp (Flower Message API).

One Flower node hosts a cohort of users (see :mod:`pollinate.client.local`). The record
layout of every message is :mod:`pollinate.protocol`'s; in words:

- ``query``: which users does this node host? Reply ``ConfigRecord "users"`` with ``ids``.
- ``train``: config ``users`` names the sampled users; for each, train from the global
  ``arrays`` and reply ``arrays/<user>`` + that user's metrics (``num-examples``,
  ``train-loss``, all users' in the one ``users`` record) so the server sees every
  user's individual update. When the server's
  strategy aggregates by an example-weighted mean (FedAvg, FedProx, FedAdam, FedYogi) it
  sets config ``node-mean``: the node then replies the cohort's weighted mean as ``arrays``
  + ``metrics`` (the same result up to float rounding, one update to send instead of one
  per user) and still each user's metrics in ``users``. A dropped straggler
  (``train.drop-stragglers``) sends nothing. Before a user's update enters that mean the
  node checks it (:mod:`pollinate.models.checks`: finite, the model's size, an example
  count within the user's real training set, ``validation.norm-bound``); a refused one is
  left out and named in ``ConfigRecord "rejected"`` (user -> reason).
- Config ``attack-users`` (only with an ``[attack]`` config) names the sampled users that
  play attacker this round: they poison their own update (:mod:`pollinate.models.attacks`).
- ``evaluate``: for each user in ``users``, reply its global and personal loss/accuracy
  on the user's own test split (in the reply's one ``users`` record).
- A ``train`` message may also carry the previous round's evaluation (config
  ``evaluate-users`` and ``evaluate-round``; it evaluates the same global model): the node
  evaluates those users first, as a separate ``evaluate`` message would have, and adds
  their metrics to the reply's ``users`` record under ``evaluate/``.

Model weights travel as one flat vector, ``ArrayRecord {"weights": ...}`` in the order of
the model's ``state_dict`` (:mod:`pollinate.models.flat`): on a deployment every array is a
request per hop, so one array per model instead of one per tensor.

The full run config travels in every message's ``config`` record, so the same app works
under ``flwr run``, the in-process simulation and a deployed SuperNode. On a device,
node config ``data-file`` / ``user-id`` / ``model-dir`` override the run config.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pollinate import protocol
from pollinate.client.local import hosted_cohort, user_seed
from pollinate.client.ondevice import node_device
from pollinate.client.privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    STOPPED_USERS,
    USERS_KEY,
    first_round_over_budget,
)
from pollinate.client.secagg import secure_aggregation_mod
from pollinate.client.steps import (
    RoundContext,
    StateDict,
    WeightedMean,
    Workbench,
    evaluate_users,
    is_dropped,
    train_users,
)
from pollinate.client.store import ModelStore
from pollinate.config import RunConfig, resolve
from pollinate.data import UserData
from pollinate.models import ModelSpec
from pollinate.models.attacks import flip_labels, poison
from pollinate.models.checks import UpdateBounds, ensure_finite_model, update_reason
from pollinate.models.flat import flatten, unflatten
from pollinate.models.privacy import clip_update

app = ClientApp()

# One per process: models are rebuilt only when the architecture changes.
_BENCH = Workbench()


def _run_config(msg: Message) -> RunConfig:
    # Validated at the server; message-only keys (server-round, users, ...) are skipped.
    # Every config key is `section.key`: the run's keys, the same in every message of the
    # run, are the cache key (resolving them cost ~10 ms per message).
    config = protocol.message_config(msg.content)
    return _resolved(tuple(sorted((k, v) for k, v in config.items() if "." in k)))


@functools.lru_cache(maxsize=8)
def _resolved(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return resolve(dict(items), ignore_unknown=True)


def _store(cfg: RunConfig, context: Context) -> ModelStore:
    model_dir = protocol.read_node_config(context.node_config).model_dir
    return ModelStore(Path(model_dir) if model_dir else cfg.store_dir)


def _global_weights(msg: Message, spec: ModelSpec) -> StateDict:
    flat = protocol.read_weights(protocol.global_arrays(msg.content))
    weights = unflatten(flat, like=_BENCH.model(spec).state_dict())
    # A node never trains on, evaluates or stores a broken global model (checked in the
    # model's own dtypes: a float64 1e39 is infinite in a float32 model).
    ensure_finite_model(flatten(weights).numpy(), "the global model this node received")
    return weights


def _round_context(msg: Message, context: Context, ask: protocol.Instruction) -> RoundContext:
    cfg = _run_config(msg)
    spec = ModelSpec.from_dict(json.loads(ask.model_spec))
    device = node_device(cfg, context.node_config)
    # On the device from here on; updates come back to the CPU at the reply (flatten(...).cpu()).
    weights = {k: v.to(device) for k, v in _global_weights(msg, spec).items()}
    return RoundContext(
        cfg=cfg,
        spec=spec,
        global_weights=weights,
        server_round=ask.server_round,
        store=_store(cfg, context),
        proximal_mu=ask.proximal_mu,
        run_key=ask.run_key,
        device=device,
    )


def _users(context: Context, cfg: RunConfig, wanted: list[str] | None) -> Iterator[UserData]:
    """The named users of this node (None: all it hosts)."""
    # One user at a time: a node hosting thousands of users never holds all their data.
    cohort = hosted_cohort(cfg, context.node_config)
    ids = cohort.user_ids if wanted is None else wanted
    return (cohort.users[u] for u in ids)


@app.query()
def query(msg: Message, context: Context) -> Message:
    cohort = hosted_cohort(_run_config(msg), context.node_config)
    return Message(protocol.users_content(cohort.user_ids), reply_to=msg)


def _evaluate(ctx: RoundContext, users: Iterator[UserData]) -> protocol.EvaluateReply:
    """Each user's global and personal model on its own test split."""
    reply = protocol.EvaluateReply()
    for user, metrics in evaluate_users(_BENCH, ctx, users):
        reply.metrics[user.user_id] = protocol.metric_record(metrics)
    return reply


def _attacked(ctx: RoundContext, user: UserData, attacker: bool) -> UserData:
    """The user's data, labels flipped if it is a label-flipping attacker."""
    if not attacker or ctx.cfg.attack.kind != "label-flip":
        return user
    classes = int(ctx.spec.kwargs["num_classes"])
    return replace(user, y_train=flip_labels(user.y_train, classes))


def _sent_update(ctx: RoundContext, user: str, update: StateDict, attacker: bool) -> torch.Tensor:
    """The flat vector this user sends: its update, poisoned if it is an attacker."""
    flat = flatten(update).cpu()
    if not attacker:
        return flat
    a = ctx.cfg.attack
    seed = user_seed(a.seed, ctx.server_round, user, "attack")
    return poison(
        flat,
        flatten(ctx.global_weights).cpu(),
        a.kind,
        scale=a.scale,
        noise_std=a.noise_std,
        generator=torch.Generator().manual_seed(seed),
    )


@app.train(mods=[secure_aggregation_mod])  # SecAgg+ stages, when the server runs them
def train(msg: Message, context: Context) -> Message:
    ask = protocol.read_instruction(msg.content)
    ctx = _round_context(msg, context, ask)
    reply = protocol.TrainReply()
    if ask.evaluation is not None:
        # The previous round's evaluation of this same global model comes first.
        evaluated = replace(ctx, server_round=ask.evaluation.round)
        reply.evaluation = _evaluate(evaluated, _users(context, ctx.cfg, ask.evaluation.users))
    mean = WeightedMean() if ask.node_mean else None
    global_flat = flatten(ctx.global_weights).cpu().numpy()
    # [privacy] (client/privacy.py): under user-level DP every user counts once in the mean,
    # its update clipped to C here (client-side clipping) before it enters the cohort's
    # mean or leaves the node; a user whose ε budget is spent trains no more.
    config = protocol.message_config(msg.content)
    user_dp = ctx.cfg.privacy.method == "user"
    clip = config.get(KEY_CLIPPING_NORM, 0.0)
    clip_norm = float(clip) if isinstance(clip, int | float) else 0.0
    stopped_users = config.get(STOPPED_USERS, [])
    stopped = {str(u) for u in stopped_users} if isinstance(stopped_users, list) else set()
    clipped_users = 0
    trainers = (
        _attacked(ctx, user, user.user_id in ask.attack_users)
        for user in _users(context, ctx.cfg, ask.users)
        if not is_dropped(ctx, user.user_id)
        and user.user_id not in stopped
        and not first_round_over_budget(ctx.cfg, user.num_train)
    )
    for user, update, metrics in train_users(_BENCH, ctx, trainers):
        attacker = user.user_id in ask.attack_users
        flat = _sent_update(ctx, user.user_id, update, attacker)
        if user_dp:
            clipped = False
            if clip_norm > 0:
                flat, clipped = clip_update(flat, flatten(ctx.global_weights).cpu(), clip_norm)
            metrics[USERS_KEY] = 1
            metrics[KEY_NORM_BIT] = int(clipped)
        examples = metrics[protocol.NUM_EXAMPLES]
        if mean is None:
            reply.updates[user.user_id] = protocol.weights_record(flat)
        else:
            bounds = UpdateBounds(
                size=global_flat.size,
                dtype=global_flat.dtype,
                max_examples=user.num_train,  # the node knows the user's real count
                norm_bound=ctx.cfg.validation.norm_bound,
            )
            reason = update_reason(flat.numpy(), examples, bounds, global_flat)
            if examples == 0:
                pass  # nothing trained (no examples, or train.epochs = 0): nothing to add
            elif reason is None:
                mean.add({protocol.WEIGHTS: flat}, metrics, weight=1 if user_dp else 0)
                clipped_users += int(metrics.get(KEY_NORM_BIT, 0))
            else:
                reply.rejected[user.user_id] = reason
        reply.metrics[user.user_id] = protocol.metric_record(metrics)
    if mean is not None and mean.examples > 0:
        reply.mean = protocol.weights_record(mean.weights()[protocol.WEIGHTS])
        mean_metrics = mean.metrics()
        if user_dp:  # the cohort stands for this many users, this many of them clipped
            mean_metrics[USERS_KEY] = int(mean.total_weight)
            mean_metrics[KEY_NORM_BIT] = clipped_users
        reply.mean_metrics = protocol.metric_record(mean_metrics)
    return Message(protocol.train_content(reply), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    ask = protocol.read_instruction(msg.content)
    ctx = _round_context(msg, context, ask)
    reply = _evaluate(ctx, _users(context, ctx.cfg, ask.users))
    return Message(protocol.evaluate_content(reply), reply_to=msg)
