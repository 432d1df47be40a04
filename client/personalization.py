"""The personalization registry: every ``personalization.method``, its options and hooks.

A method is a :class:`Method` subclass, registered with :func:`register_method`; it
overrides only the hooks it needs (Flower's strategies do the same with theirs):

- :meth:`Method.before_training`: the model starts from the global weights; e.g. FedPer
  swaps in the user's own head.
- :meth:`Method.after_training` / :meth:`Method.after_stack`: after local training, e.g.
  keep state in the model store (FedPer's head) or train a personal model (Ditto).
- :meth:`Method.personalize`: at evaluation, turn the global model into the user's
  personal one (the default: the personal model *is* the global model).

Its ``options`` become ``personalization.<key>`` config keys, read from
``ctx.cfg.personalization.options``. The built-in methods:

- ``none``     — the personal model *is* the global model.
- ``finetune`` — personal = global weights + ``finetune-epochs`` local epochs, rebuilt at
  every evaluation from the newest global model.
- ``fedper``   — FedPer (Arivazhagan et al., 2019): the body is shared and averaged, the
  head stays on the device; personal = current global body + the user's own head.
- ``ditto``    — Ditto (Li et al., ICML 2021): a separate personal model v_k trained on
  f_k(v) + lambda/2 ||v - w_global||^2, kept across rounds in the model store.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar

import torch

from pollinate.client.privacy import dp_sgd_for, note_steps
from pollinate.client.tools import StateDict, generator, snapshot, tensors, train_config
from pollinate.client.tools import writes_models as _writes_models
from pollinate.config import RunConfig
from pollinate.data import UserData
from pollinate.models import FedModel, TrainConfig, head_keys, train
from pollinate.models.batched import StackedUser, train_stacked
from pollinate.registry import Option, Range, Registry

if TYPE_CHECKING:
    from pollinate.client.steps import RoundContext, Workbench

__all__ = ["METHODS", "Method", "method_of", "register_method"]


class Method:
    """A personalization method: a name, help, options and the hooks it overrides."""

    name: str = ""
    help: str = ""
    options: ClassVar[Mapping[str, Option]] = MappingProxyType({})

    def before_training(self, model: FedModel, ctx: RoundContext, user: str) -> None:
        """``model`` holds the global weights; change where local training starts."""

    def after_training(
        self,
        bench: Workbench,
        ctx: RoundContext,
        user: UserData,
        update: StateDict,
        data: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """The user trained ``update`` (what goes to the server) on ``data`` (x, y)."""

    def after_stack(
        self,
        bench: Workbench,
        ctx: RoundContext,
        users: list[UserData],
        data: list[tuple[torch.Tensor, torch.Tensor]],
        updates: list[StateDict],
    ) -> None:
        """:meth:`after_training` for users trained as one stack (``train.stack-users``)."""
        for user, xy, update in zip(users, data, updates, strict=True):
            self.after_training(bench, ctx, user, update, xy)

    def personalize(
        self, bench: Workbench, ctx: RoundContext, user: UserData, model: FedModel
    ) -> int | None:
        """Make ``model`` (the global weights) the user's personal model; return the
        round it is from, or None when the personal model is the global one unchanged."""
        return None

    def personalize_stack(
        self, bench: Workbench, ctx: RoundContext, users: list[UserData]
    ) -> list[tuple[StateDict, int]] | None:
        """:meth:`personalize` for users trained as one stack (``train.stack-users``): each
        user's personal weights and round, or None when there is nothing to train (the
        per-user :meth:`personalize` is then called). Raises ``NotBatchable`` to fall back."""
        return None


#: Every method, by name: the choices of ``personalization.method``.
METHODS: Registry[Method] = Registry("personalization.method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: an instance of ``cls`` becomes ``personalization.method = cls.name``."""
    METHODS.add(cls())
    return cls


def method_of(cfg: RunConfig) -> Method:
    """The configured method."""
    return METHODS.get(cfg.personalization.method)


def _keep_personal(ctx: RoundContext, user: str, state_dict: StateDict) -> None:
    """Keep the user's state for later rounds, and write it as its personal model."""
    ctx.keep_state(user, state_dict)
    if _writes_models(ctx):
        ctx.store.save(
            user, "personal", spec=ctx.spec, state_dict=state_dict, round=ctx.server_round
        )


# ------------------------------------------------------------------------ the methods


@register_method
class NoPersonalization(Method):
    name = "none"
    help = "the personal model is the global model"


@register_method
class FineTune(Method):
    name = "finetune"
    help = "global weights + a few local epochs, rebuilt at every evaluation"
    options: ClassVar[Mapping[str, Option]] = {
        "finetune-epochs": Option(2, "fine-tuning epochs at each evaluation", Range(0, 10_000)),
        # Smaller than train.lr: the global model is a good start and a user's few samples
        # are easy to overfit.
        "finetune-lr": Option(0.0, "fine-tuning step size; 0 = train.lr", Range(0, 10)),
        # Steadier on very small users.
        "finetune-head-only": Option(False, "fine-tune only the head (the body stays global)"),
    }

    def personalize(
        self, bench: Workbench, ctx: RoundContext, user: UserData, model: FedModel
    ) -> int | None:
        o = ctx.cfg.personalization.options
        x, y = tensors(user.x_train, user.y_train, ctx)
        stats = train(
            model,
            x,
            y,
            train_config(ctx.cfg, epochs=o.integer("finetune-epochs"), lr=o.number("finetune-lr")),
            generator=generator(ctx, user.user_id, "finetune"),
            parameters=head_keys(model) if o.flag("finetune-head-only") else None,
            private=dp_sgd_for(ctx.cfg, user.num_train),  # local DP: training on private data
        )
        note_steps(user.user_id, stats.steps)
        return ctx.server_round

    def personalize_stack(
        self, bench: Workbench, ctx: RoundContext, users: list[UserData]
    ) -> list[tuple[StateDict, int]] | None:
        # What personalize() does user by user, as one stack: every user starts from the
        # global weights and gets its own shuffles (its own "finetune" generator).
        o = ctx.cfg.personalization.options
        model = bench.model(ctx.spec, device=ctx.device)
        trained = train_stacked(
            model,
            [
                StackedUser(
                    *tensors(user.x_train, user.y_train, ctx),
                    start=ctx.global_weights,
                    generator=generator(ctx, user.user_id, "finetune"),
                )
                for user in users
            ],
            train_config(ctx.cfg, epochs=o.integer("finetune-epochs"), lr=o.number("finetune-lr")),
            parameters=head_keys(model) if o.flag("finetune-head-only") else None,
        )
        return [(weights, ctx.server_round) for weights, _ in trained]


def with_own_head(model: FedModel, ctx: RoundContext, user: str, *, before: int) -> None:
    """FedPer: keep the global body, swap in this user's stored head if it has one."""
    stored = ctx.state(user, before=before)
    if stored is None:
        return
    head = {k: stored.state_dict[k] for k in head_keys(model)}
    model.load_state_dict(head, strict=False)


@register_method
class FedPer(Method):
    name = "fedper"
    help = "FedPer (Arivazhagan et al., 2019): shared body, each user keeps its own head"

    def before_training(self, model: FedModel, ctx: RoundContext, user: str) -> None:
        with_own_head(model, ctx, user, before=ctx.server_round)

    def after_training(
        self,
        bench: Workbench,
        ctx: RoundContext,
        user: UserData,
        update: StateDict,
        data: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        # The trained head is this user's; the body part of `update` goes to the server.
        _keep_personal(ctx, user.user_id, update)

    def personalize(
        self, bench: Workbench, ctx: RoundContext, user: UserData, model: FedModel
    ) -> int | None:
        with_own_head(model, ctx, user.user_id, before=ctx.server_round + 1)
        return ctx.server_round


@register_method
class Ditto(Method):
    name = "ditto"
    help = "Ditto (Li et al., 2021): a personal model pulled towards the global one"
    options: ClassVar[Mapping[str, Option]] = {
        "ditto-lambda": Option(
            0.1, "Ditto's pull lambda towards the global model", Range(0, 1_000)
        ),
        "ditto-epochs": Option(1, "epochs of the personal model per round", Range(1, 10_000)),
    }

    def _start(self, ctx: RoundContext, user: str) -> StateDict:
        stored = ctx.state(user, before=ctx.server_round)
        return stored.state_dict if stored is not None else ctx.global_weights

    def _config(self, ctx: RoundContext) -> tuple[float, TrainConfig]:
        """lambda, and the personal model's training: lambda is its proximal weight."""
        o = ctx.cfg.personalization.options
        lam = o.number("ditto-lambda")
        return lam, train_config(ctx.cfg, epochs=o.integer("ditto-epochs"), proximal_mu=lam)

    def after_training(
        self,
        bench: Workbench,
        ctx: RoundContext,
        user: UserData,
        update: StateDict,
        data: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        personal = bench.model(ctx.spec, "personal", ctx.device)
        personal.load_state_dict(self._start(ctx, user.user_id))
        lam, config = self._config(ctx)
        x, y = data
        stats = train(
            personal,
            x,
            y,
            config,
            anchor=ctx.global_weights if lam > 0 else None,
            generator=generator(ctx, user.user_id, "ditto"),
            private=dp_sgd_for(ctx.cfg, user.num_train),  # local DP: training on private data
        )
        note_steps(user.user_id, stats.steps)
        _keep_personal(ctx, user.user_id, snapshot(personal))

    def after_stack(
        self,
        bench: Workbench,
        ctx: RoundContext,
        users: list[UserData],
        data: list[tuple[torch.Tensor, torch.Tensor]],
        updates: list[StateDict],
    ) -> None:
        lam, config = self._config(ctx)
        personal = train_stacked(
            bench.model(ctx.spec, "personal", ctx.device),
            [
                StackedUser(
                    x=x,
                    y=y,
                    start=self._start(ctx, user.user_id),
                    anchor=ctx.global_weights if lam > 0 else None,
                    generator=generator(ctx, user.user_id, "ditto"),
                )
                for user, (x, y) in zip(users, data, strict=True)
            ],
            config,
        )
        for user, (weights, _) in zip(users, personal, strict=True):
            _keep_personal(ctx, user.user_id, weights)

    def personalize(
        self, bench: Workbench, ctx: RoundContext, user: UserData, model: FedModel
    ) -> int | None:
        # The stored personal model, trained only when this user was sampled.
        stored = ctx.state(user.user_id, before=ctx.server_round + 1)
        if stored is None:
            return ctx.server_round
        model.load_state_dict(stored.state_dict)
        return stored.round
