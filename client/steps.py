"""One user's share of a round: local training and the global-vs-personal evaluation.

What a personalization method (``personalization.method``) adds to both is its own, in
:mod:`pollinate.client.personalization` (one class per method, in a registry).

Nothing here knows about Flower messages: the ClientApp converts records to tensors and
calls these functions.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch

from pollinate import protocol
from pollinate.client.local import user_seed
from pollinate.client.personalization import Method, method_of
from pollinate.client.privacy import dp_metrics, dp_sgd_for, local_dp_on, take_noted_steps
from pollinate.client.store import ModelStore
from pollinate.client.tools import StateDict, generator, snapshot, tensors, train_config
from pollinate.client.tools import writes_models as _writes_models
from pollinate.config import RunConfig
from pollinate.data import UserData
from pollinate.models import (
    FedModel,
    ModelArtifact,
    ModelSpec,
    create_model,
    evaluate,
    train,
)
from pollinate.models.batched import NotBatchable, StackedUser, train_stacked

_log = logging.getLogger(__name__)

__all__ = [
    "RoundContext",
    "StateDict",
    "WeightedMean",
    "Workbench",
    "evaluate_user",
    "evaluate_users",
    "is_dropped",
    "local_epochs",
    "train_user",
    "train_users",
]


class Workbench:
    """Reusable model instances per (spec, role): building a model per user is waste."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, str], FedModel] = {}

    def model(self, spec: ModelSpec, role: str = "work", device: str = "cpu") -> FedModel:
        key = (json.dumps(spec.to_dict(), sort_keys=True), role, device)
        if key not in self._models:
            self._models[key] = create_model(spec.name, **spec.kwargs).to(device)
        return self._models[key]


@dataclass(frozen=True)
class RoundContext:
    """What every user step in one message shares."""

    cfg: RunConfig
    spec: ModelSpec
    global_weights: StateDict
    server_round: int
    store: ModelStore
    proximal_mu: float = 0.0
    # Names this run's per-user state in the store (a resumed run keeps it).
    run_key: str = ""
    # Where models train and evaluate (`cpu` / `cuda`); global_weights are there already.
    device: str = "cpu"

    def state(self, user: str, *, before: int) -> ModelArtifact | None:
        """The user's kept state (FedPer head, Ditto model) from a round before ``before``.

        Training in round t reads what rounds < t left, evaluation of round r what rounds
        <= r left: a round run again (after a resume) reads what its first attempt read.
        """
        return self.store.load_state(user, run_key=self.run_key, before=before)

    def keep_state(self, user: str, state_dict: StateDict) -> None:
        self.store.save_state(
            user,
            run_key=self.run_key,
            round=self.server_round,
            spec=self.spec,
            state_dict=state_dict,
        )


def _straggler_draw(ctx: RoundContext, user: str) -> random.Random | None:
    """The user's straggler stream this round, positioned after the straggler draw, or
    None when the user is not a straggler this round."""
    t = ctx.cfg.train
    if t.straggler_fraction <= 0 or t.epochs == 0:
        return None
    rng = random.Random(user_seed(ctx.cfg.run.seed, ctx.server_round, user, "straggler"))
    return rng if rng.random() < t.straggler_fraction else None


def local_epochs(ctx: RoundContext, user: str) -> int:
    """This round's local epochs: ``train.epochs``, or a uniformly random 1..epochs for a
    straggler (FedProx, Li et al. 2020, Sec. 5.2: systems heterogeneity).

    Each sampled user is a straggler with probability ``train.straggler-fraction``, drawn
    from a stream seeded by (run seed, round, user): reproducible, and the same user gets
    the same draw whichever node hosts it.
    """
    rng = _straggler_draw(ctx, user)
    return ctx.cfg.train.epochs if rng is None else rng.randint(1, ctx.cfg.train.epochs)


def is_dropped(ctx: RoundContext, user: str) -> bool:
    """True for a straggler when ``train.drop-stragglers`` is set: it sends no update
    (how the FedProx paper runs FedAvg under systems heterogeneity)."""
    return ctx.cfg.train.drop_stragglers and _straggler_draw(ctx, user) is not None


def train_user(
    bench: Workbench, ctx: RoundContext, user: UserData
) -> tuple[StateDict, dict[str, float]]:
    """Local training from the global weights; returns the update and its train metrics."""
    method = method_of(ctx.cfg)
    model = bench.model(ctx.spec, device=ctx.device)
    model.load_state_dict(ctx.global_weights)
    method.before_training(model, ctx, user.user_id)
    x, y = tensors(user.x_train, user.y_train, ctx)
    mu = ctx.proximal_mu
    stats = train(
        model,
        x,
        y,
        train_config(ctx.cfg, epochs=local_epochs(ctx, user.user_id), proximal_mu=mu),
        anchor=ctx.global_weights if mu > 0 else None,
        generator=generator(ctx, user.user_id, "train"),
        private=dp_sgd_for(ctx.cfg, user.num_train),
    )
    update = snapshot(model)
    method.after_training(bench, ctx, user, update, (x, y))
    metrics = protocol.train_metrics(stats.num_examples, stats.loss)
    if local_dp_on(ctx.cfg):  # the update's DP-SGD steps and the personal model's (Ditto)
        steps = stats.steps + take_noted_steps(user.user_id)
        metrics.update(dp_metrics(ctx.cfg, user.num_train, steps))
    return update, metrics


def train_users(
    bench: Workbench, ctx: RoundContext, users: Iterable[UserData]
) -> Iterator[tuple[UserData, StateDict, dict[str, float]]]:
    """:func:`train_user` for each user, ``train.stack-users`` of them at a time.

    Each chunk of users is trained as one stack of models (:mod:`pollinate.models.batched`):
    the same schedule per user, the same results up to float32 rounding. A model the stack
    cannot train falls back to one user at a time, said once per process.
    """
    size = _stack_size(ctx)
    it = iter(users)
    while chunk := list(islice(it, max(size, 1))):
        if size > 1:
            try:
                yield from _train_stack(bench, ctx, chunk)
                continue
            except NotBatchable as why:
                _fall_back_once(str(why))
        for user in chunk:
            yield (user, *train_user(bench, ctx, user))


_FELL_BACK: set[str] = set()


def _stack_size(ctx: RoundContext) -> int:
    """How many users to stack at once: ``train.stack-users``, or 0 (one at a time)."""
    size = ctx.cfg.train.stack_users
    if size > 1 and local_dp_on(ctx.cfg):
        # DP-SGD clips each example's gradient: per-user loops, not the stacked models.
        _fall_back_once("privacy.method = 'local' trains with DP-SGD", logging.INFO)
        return 0
    return size


def _fall_back_once(why: str, level: int = logging.WARNING) -> None:
    """Say once per process why users are trained one at a time. DP-SGD's fall-back is
    documented and expected (information); a model the stack cannot train is a warning."""
    if why not in _FELL_BACK:
        _FELL_BACK.add(why)
        _log.log(level, "train.stack-users: training one user at a time (%s)", why)


def _train_stack(
    bench: Workbench, ctx: RoundContext, users: list[UserData]
) -> Iterator[tuple[UserData, StateDict, dict[str, float]]]:
    """:func:`train_user` for ``users`` as one stack (and Ditto's personal models as another)."""
    method = method_of(ctx.cfg)
    model = bench.model(ctx.spec, device=ctx.device)
    mu = ctx.proximal_mu
    data = [tensors(u.x_train, u.y_train, ctx) for u in users]
    starts = _starting_weights(method, model, ctx, users)
    trained = train_stacked(
        model,
        [
            StackedUser(
                x=x,
                y=y,
                start=start,
                epochs=local_epochs(ctx, user.user_id),
                anchor=ctx.global_weights if mu > 0 else None,
                generator=generator(ctx, user.user_id, "train"),
            )
            for user, (x, y), start in zip(users, data, starts, strict=True)
        ],
        train_config(ctx.cfg, epochs=ctx.cfg.train.epochs, proximal_mu=mu),
    )
    method.after_stack(bench, ctx, users, data, [update for update, _ in trained])
    for user, (update, stats) in zip(users, trained, strict=True):
        yield user, update, protocol.train_metrics(stats.num_examples, stats.loss)


def _starting_weights(
    method: Method, model: FedModel, ctx: RoundContext, users: list[UserData]
) -> list[StateDict]:
    """Where each user's local training starts: the global weights, as changed by the
    method's ``before_training`` (FedPer: the user's own head).

    A method that changes nothing there (the base hook) gives every user the same start,
    built once: loading and copying the model per user was most of a stack's set-up.
    """
    if type(method).before_training is Method.before_training:
        model.load_state_dict(ctx.global_weights)
        return [snapshot(model)] * len(users)  # read only: train_stacked copies each start
    starts = []
    for user in users:
        model.load_state_dict(ctx.global_weights)
        method.before_training(model, ctx, user.user_id)
        starts.append(snapshot(model))
    return starts


class WeightedMean:
    """Example-weighted mean of several users' updates and train metrics.

    What FedAvg's server computes over these users, done on the node that trained them, so
    the node sends one update instead of one per user. Sums run in float64; the mean is cast
    back to each tensor's dtype (integer buffers stay float64, as Flower's mean gives them).
    """

    def __init__(self) -> None:
        self._sum: StateDict = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._loss = 0.0
        self.examples = 0
        self.total_weight = 0.0

    def add(self, update: StateDict, metrics: dict[str, float], weight: float = 0.0) -> None:
        """Add one user's update, weighted by its examples (or by ``weight`` if given:
        user-level DP weights every user 1)."""
        n = int(metrics[protocol.NUM_EXAMPLES])
        if n <= 0:
            return
        w = weight or n
        for key, value in update.items():
            term = value.detach().to(torch.float64) * w
            if key in self._sum:
                self._sum[key] += term
            else:
                self._sum[key] = term
                self._dtypes[key] = value.dtype
        self._loss += float(metrics[protocol.TRAIN_LOSS]) * n
        self.examples += n
        self.total_weight += w

    def weights(self) -> StateDict:
        out = {}
        for key, total in self._sum.items():
            dtype = self._dtypes[key]
            mean = total / self.total_weight
            out[key] = mean.to(dtype) if dtype.is_floating_point else mean
        return out

    def metrics(self) -> dict[str, float]:
        return protocol.train_metrics(self.examples, self._loss / self.examples)


def evaluate_users(
    bench: Workbench, ctx: RoundContext, users: Iterable[UserData]
) -> Iterator[tuple[UserData, dict[str, float]]]:
    """:func:`evaluate_user` for each user; personal models made ``train.stack-users`` at a
    time as one stack where the method trains them (fine-tuning), with the same fall-back
    to one user at a time as :func:`train_users`."""
    method = method_of(ctx.cfg)
    size = _stack_size(ctx)
    it = iter(users)
    while chunk := list(islice(it, max(size, 1))):
        personal: list[tuple[StateDict, int]] | None = None
        if size > 1:
            try:
                personal = method.personalize_stack(bench, ctx, chunk)
            except NotBatchable as why:
                _fall_back_once(str(why))
        for i, user in enumerate(chunk):
            yield (
                user,
                evaluate_user(bench, ctx, user, personal=None if personal is None else personal[i]),
            )


def evaluate_user(
    bench: Workbench,
    ctx: RoundContext,
    user: UserData,
    *,
    personal: tuple[StateDict, int] | None = None,
) -> dict[str, float]:
    """Loss/accuracy of the global and the personal model on the user's own test split.

    Also writes both models to the user's store, so they outlive the run (every round, or
    in the final round only: ``store.save-models``). ``personal``: the user's personal
    weights and their round, made already (a stack of fine-tuned users).
    """
    method = method_of(ctx.cfg)
    write = _writes_models(ctx)
    model = bench.model(ctx.spec, device=ctx.device)
    model.load_state_dict(ctx.global_weights)
    x_test, y_test = tensors(user.x_test, user.y_test, ctx)
    g = evaluate(model, x_test, y_test)
    if write:
        ctx.store.save(
            user.user_id,
            "global",
            spec=ctx.spec,
            state_dict=ctx.global_weights,
            round=ctx.server_round,
            metrics={"loss": g.loss, "accuracy": g.accuracy, protocol.NUM_EXAMPLES: g.num_examples},
        )

    if personal is None:
        personal_round = method.personalize(bench, ctx, user, model)
    else:
        model.load_state_dict(personal[0])
        personal_round = personal[1]
    p = g if personal_round is None else evaluate(model, x_test, y_test)
    if write:
        ctx.store.save(
            user.user_id,
            "personal",
            spec=ctx.spec,
            state_dict=snapshot(model),
            round=ctx.server_round if personal_round is None else personal_round,
            metrics={"loss": p.loss, "accuracy": p.accuracy, protocol.NUM_EXAMPLES: p.num_examples},
        )
    metrics = protocol.evaluate_metrics(g.num_examples, g.loss, g.accuracy, p.loss, p.accuracy)
    if local_dp_on(ctx.cfg):  # fine-tuning is DP-SGD on the user's data too: it spends ε
        metrics.update(dp_metrics(ctx.cfg, user.num_train, take_noted_steps(user.user_id)))
    return metrics
