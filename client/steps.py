"""One user's share of a round: local training and the global-vs-personal evaluation.

Personalization methods (``personalization.method``):

- ``none``     — the personal model *is* the global model.
- ``finetune`` — personal = global weights + ``finetune-epochs`` local epochs, rebuilt at
  every evaluation from the newest global model.
- ``fedper``   — FedPer (Arivazhagan et al., 2019): the body is shared and averaged, the
  head stays on the device; personal = current global body + the user's own head.
- ``ditto``    — Ditto (Li et al., ICML 2021): a separate personal model v_k trained on
  f_k(v) + lambda/2 ||v - w_global||^2, kept across rounds in the model store.

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
from pollinate.client.store import ModelStore
from pollinate.config import RunConfig
from pollinate.data import UserData
from pollinate.models import (
    FedModel,
    ModelArtifact,
    ModelSpec,
    TrainConfig,
    create_model,
    evaluate,
    head_keys,
    train,
)
from pollinate.models.batched import NotBatchable, StackedUser, train_stacked

_log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class Workbench:
    """Reusable model instances per (spec, role): building a model per user is waste."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], FedModel] = {}

    def model(self, spec: ModelSpec, role: str = "work") -> FedModel:
        key = (json.dumps(spec.to_dict(), sort_keys=True), role)
        if key not in self._models:
            self._models[key] = create_model(spec.name, **spec.kwargs)
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


def _tensors(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(x), torch.from_numpy(y)


def _snapshot(model: torch.nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_config(
    cfg: RunConfig, *, epochs: int, proximal_mu: float = 0.0, lr: float = 0.0
) -> TrainConfig:
    t = cfg.train
    return TrainConfig(
        epochs=epochs,
        batch_size=t.batch_size,
        lr=lr or t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        proximal_mu=proximal_mu,
    )


def _generator(ctx: RoundContext, user: str, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(
        user_seed(ctx.cfg.run.seed, ctx.server_round, user, purpose)
    )


def _with_own_head(model: FedModel, ctx: RoundContext, user: str, *, before: int) -> None:
    """FedPer: keep the global body, swap in this user's stored head if it has one."""
    stored = ctx.state(user, before=before)
    if stored is None:
        return
    head = {k: stored.state_dict[k] for k in head_keys(model)}
    model.load_state_dict(head, strict=False)


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
    method = ctx.cfg.personalization.method
    model = bench.model(ctx.spec)
    model.load_state_dict(ctx.global_weights)
    if method == "fedper":
        _with_own_head(model, ctx, user.user_id, before=ctx.server_round)
    x, y = _tensors(user.x_train, user.y_train)
    mu = ctx.proximal_mu
    stats = train(
        model,
        x,
        y,
        _train_config(ctx.cfg, epochs=local_epochs(ctx, user.user_id), proximal_mu=mu),
        anchor=ctx.global_weights if mu > 0 else None,
        generator=_generator(ctx, user.user_id, "train"),
    )
    update = _snapshot(model)
    if method == "fedper":
        # The trained head is this user's; the body part of `update` goes to the server.
        ctx.keep_state(user.user_id, update)
        if _writes_models(ctx):
            ctx.store.save(
                user.user_id, "personal", spec=ctx.spec, state_dict=update, round=ctx.server_round
            )
    elif method == "ditto":
        _train_ditto_personal(bench, ctx, user, x, y)
    return update, protocol.train_metrics(stats.num_examples, stats.loss)


def train_users(
    bench: Workbench, ctx: RoundContext, users: Iterable[UserData]
) -> Iterator[tuple[UserData, StateDict, dict[str, float]]]:
    """:func:`train_user` for each user, ``train.stack-users`` of them at a time.

    Each chunk of users is trained as one stack of models (:mod:`pollinate.models.batched`):
    the same schedule per user, the same results up to float32 rounding. A model the stack
    cannot train falls back to one user at a time, said once per process.
    """
    size = ctx.cfg.train.stack_users
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


def _fall_back_once(why: str) -> None:
    if why not in _FELL_BACK:
        _FELL_BACK.add(why)
        _log.warning("train.stack-users: training one user at a time (%s)", why)


def _train_stack(
    bench: Workbench, ctx: RoundContext, users: list[UserData]
) -> Iterator[tuple[UserData, StateDict, dict[str, float]]]:
    """:func:`train_user` for ``users`` as one stack (and Ditto's personal models as another)."""
    method = ctx.cfg.personalization.method
    model = bench.model(ctx.spec)
    mu = ctx.proximal_mu
    data = [_tensors(u.x_train, u.y_train) for u in users]
    starts = []
    for user in users:
        model.load_state_dict(ctx.global_weights)
        if method == "fedper":
            _with_own_head(model, ctx, user.user_id, before=ctx.server_round)
        starts.append(_snapshot(model))
    trained = train_stacked(
        model,
        [
            StackedUser(
                x=x,
                y=y,
                start=start,
                epochs=local_epochs(ctx, user.user_id),
                anchor=ctx.global_weights if mu > 0 else None,
                generator=_generator(ctx, user.user_id, "train"),
            )
            for user, (x, y), start in zip(users, data, starts, strict=True)
        ],
        _train_config(ctx.cfg, epochs=ctx.cfg.train.epochs, proximal_mu=mu),
    )
    if method == "ditto":
        _train_ditto_stack(bench, ctx, users, data)
    for user, (update, stats) in zip(users, trained, strict=True):
        if method == "fedper":
            ctx.keep_state(user.user_id, update)
            if _writes_models(ctx):
                ctx.store.save(
                    user.user_id,
                    "personal",
                    spec=ctx.spec,
                    state_dict=update,
                    round=ctx.server_round,
                )
        yield user, update, protocol.train_metrics(stats.num_examples, stats.loss)


def _train_ditto_stack(
    bench: Workbench,
    ctx: RoundContext,
    users: list[UserData],
    data: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """:func:`_train_ditto_personal` for ``users`` as one stack."""
    lam = ctx.cfg.personalization.ditto_lambda
    starts = []
    for user in users:
        stored = ctx.state(user.user_id, before=ctx.server_round)
        starts.append(stored.state_dict if stored is not None else ctx.global_weights)
    personal = train_stacked(
        bench.model(ctx.spec, "personal"),
        [
            StackedUser(
                x=x,
                y=y,
                start=start,
                anchor=ctx.global_weights if lam > 0 else None,
                generator=_generator(ctx, user.user_id, "ditto"),
            )
            for user, (x, y), start in zip(users, data, starts, strict=True)
        ],
        _train_config(ctx.cfg, epochs=ctx.cfg.personalization.ditto_epochs, proximal_mu=lam),
    )
    for user, (weights, _) in zip(users, personal, strict=True):
        ctx.keep_state(user.user_id, weights)
        if _writes_models(ctx):
            ctx.store.save(
                user.user_id, "personal", spec=ctx.spec, state_dict=weights, round=ctx.server_round
            )


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

    def add(self, update: StateDict, metrics: dict[str, float]) -> None:
        n = int(metrics[protocol.NUM_EXAMPLES])
        if n <= 0:
            return
        for key, value in update.items():
            term = value.detach().to(torch.float64) * n
            if key in self._sum:
                self._sum[key] += term
            else:
                self._sum[key] = term
                self._dtypes[key] = value.dtype
        self._loss += float(metrics[protocol.TRAIN_LOSS]) * n
        self.examples += n

    def weights(self) -> StateDict:
        out = {}
        for key, total in self._sum.items():
            dtype = self._dtypes[key]
            mean = total / self.examples
            out[key] = mean.to(dtype) if dtype.is_floating_point else mean
        return out

    def metrics(self) -> dict[str, float]:
        return protocol.train_metrics(self.examples, self._loss / self.examples)


def _train_ditto_personal(
    bench: Workbench, ctx: RoundContext, user: UserData, x: torch.Tensor, y: torch.Tensor
) -> None:
    personal = bench.model(ctx.spec, "personal")
    stored = ctx.state(user.user_id, before=ctx.server_round)
    personal.load_state_dict(stored.state_dict if stored is not None else ctx.global_weights)
    lam = ctx.cfg.personalization.ditto_lambda
    train(
        personal,
        x,
        y,
        _train_config(ctx.cfg, epochs=ctx.cfg.personalization.ditto_epochs, proximal_mu=lam),
        anchor=ctx.global_weights if lam > 0 else None,
        generator=_generator(ctx, user.user_id, "ditto"),
    )
    trained = _snapshot(personal)
    ctx.keep_state(user.user_id, trained)
    if _writes_models(ctx):
        ctx.store.save(
            user.user_id, "personal", spec=ctx.spec, state_dict=trained, round=ctx.server_round
        )


def _writes_models(ctx: RoundContext) -> bool:
    store = ctx.cfg.store
    return store.save_models == "every-round" or ctx.server_round >= ctx.cfg.run.num_rounds


def evaluate_user(bench: Workbench, ctx: RoundContext, user: UserData) -> dict[str, float]:
    """Loss/accuracy of the global and the personal model on the user's own test split.

    Also writes both models to the user's store, so they outlive the run (every round, or
    in the final round only: ``store.save-models``).
    """
    method = ctx.cfg.personalization.method
    write = _writes_models(ctx)
    model = bench.model(ctx.spec)
    model.load_state_dict(ctx.global_weights)
    x_test, y_test = _tensors(user.x_test, user.y_test)
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

    personal_round = ctx.server_round
    if method == "none":
        p = g
    elif method == "finetune":
        x, y = _tensors(user.x_train, user.y_train)
        pers = ctx.cfg.personalization
        train(
            model,
            x,
            y,
            _train_config(ctx.cfg, epochs=pers.finetune_epochs, lr=pers.finetune_lr),
            generator=_generator(ctx, user.user_id, "finetune"),
            parameters=head_keys(model) if pers.finetune_head_only else None,
        )
        p = evaluate(model, x_test, y_test)
    elif method == "fedper":
        _with_own_head(model, ctx, user.user_id, before=ctx.server_round + 1)
        p = evaluate(model, x_test, y_test)
    else:  # ditto: the stored personal model, trained only when this user was sampled
        stored = ctx.state(user.user_id, before=ctx.server_round + 1)
        if stored is not None:
            model.load_state_dict(stored.state_dict)
            personal_round = stored.round
        p = evaluate(model, x_test, y_test)
    if write:
        ctx.store.save(
            user.user_id,
            "personal",
            spec=ctx.spec,
            state_dict=_snapshot(model),
            round=personal_round,
            metrics={"loss": p.loss, "accuracy": p.accuracy, protocol.NUM_EXAMPLES: p.num_examples},
        )
    return protocol.evaluate_metrics(g.num_examples, g.loss, g.accuracy, p.loss, p.accuracy)
