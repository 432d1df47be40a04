"""The Pollinate ClientApp (Flower Message API).

One Flower node hosts a cohort of users (see :mod:`pollinate.client.local`). Messages:

- ``query``: which users does this node host? Reply ``ConfigRecord "users"`` with ``ids``.
- ``train``: config ``users`` names the sampled users; for each, train from the global
  ``arrays`` and reply ``arrays/<user>`` + ``metrics/<user>`` (``num-examples``,
  ``train-loss``) so the server sees every user's individual update. When the server's
  strategy aggregates by an example-weighted mean (FedAvg, FedProx, FedAdam, FedYogi) it
  sets config ``node-mean``: the node then replies the cohort's weighted mean as ``arrays``
  + ``metrics`` (the same result up to float rounding, one update to send instead of one
  per user) and still ``metrics/<user>`` per user. A dropped straggler
  (``train.drop-stragglers``) sends nothing.
- ``evaluate``: for each user in ``users``, reply ``metrics/<user>`` with global and
  personal loss/accuracy on the user's own test split.

The full run config travels in every message's ``config`` record, so the same app works
under ``flwr run``, the in-process simulation and a deployed SuperNode. On a device,
node config ``data-file`` / ``user-id`` / ``model-dir`` override the run config.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pollinate.client.local import hosted_cohort
from pollinate.client.steps import (
    RoundContext,
    WeightedMean,
    Workbench,
    evaluate_user,
    is_dropped,
    train_user,
)
from pollinate.client.store import ModelStore
from pollinate.config import RunConfig, resolve
from pollinate.data import UserData
from pollinate.models import ModelSpec

app = ClientApp()

# One per process: models are rebuilt only when the architecture changes.
_BENCH = Workbench()


def _run_config(msg: Message) -> RunConfig:
    # Validated at the server; message-only keys (server-round, users, ...) are skipped.
    return resolve(dict(msg.content["config"]), ignore_unknown=True)


def _store(cfg: RunConfig, context: Context) -> ModelStore:
    model_dir = str(context.node_config.get("model-dir", "") or "")
    return ModelStore(Path(model_dir) if model_dir else cfg.store_dir)


def _round_context(msg: Message, context: Context) -> RoundContext:
    config = msg.content["config"]
    cfg = _run_config(msg)
    return RoundContext(
        cfg=cfg,
        spec=ModelSpec.from_dict(json.loads(str(config["model-spec"]))),
        global_weights=dict(msg.content.array_records["arrays"].to_torch_state_dict()),
        server_round=int(config["server-round"]),  # type: ignore[arg-type]
        store=_store(cfg, context),
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
    )


def _sampled_users(msg: Message, context: Context, cfg: RunConfig) -> Iterator[UserData]:
    # One user at a time: a node hosting thousands of users never holds all their data.
    cohort = hosted_cohort(cfg, context.node_config)
    wanted = msg.content["config"].get("users")
    ids = cohort.user_ids if wanted is None else [str(u) for u in wanted]  # type: ignore[union-attr]
    return (cohort.users[u] for u in ids)


@app.query()
def query(msg: Message, context: Context) -> Message:
    cohort = hosted_cohort(_run_config(msg), context.node_config)
    users = ConfigRecord({"ids": cohort.user_ids})
    return Message(RecordDict({"users": users}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    ctx = _round_context(msg, context)
    mean = WeightedMean() if msg.content["config"].get("node-mean", False) else None
    content = RecordDict()
    ids = []
    for user in _sampled_users(msg, context, ctx.cfg):
        if is_dropped(ctx, user.user_id):
            continue
        update, metrics = train_user(_BENCH, ctx, user)
        if mean is None:
            content[f"arrays/{user.user_id}"] = ArrayRecord(update)
        else:
            mean.add(update, metrics)
        content[f"metrics/{user.user_id}"] = MetricRecord(metrics)
        ids.append(user.user_id)
    if mean is not None and mean.examples > 0:
        content["arrays"] = ArrayRecord(mean.weights())
        content["metrics"] = MetricRecord(mean.metrics())
    content["users"] = ConfigRecord({"ids": ids})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    ctx = _round_context(msg, context)
    content = RecordDict()
    ids = []
    for user in _sampled_users(msg, context, ctx.cfg):
        content[f"metrics/{user.user_id}"] = MetricRecord(evaluate_user(_BENCH, ctx, user))
        ids.append(user.user_id)
    content["users"] = ConfigRecord({"ids": ids})
    return Message(content, reply_to=msg)
