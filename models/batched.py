"""Train many users' copies of one model at once: weights stacked along a leading user axis.

For the small models of federated simulations, :func:`~pollinate.models.train.train` spends
its time in Python and kernel launches, one user after another. :func:`train_stacked` runs
the same SGD for a cohort in one pass per step: each user's parameters are one slice of a
stacked tensor (U, ...), ``torch.func.functional_call`` under ``vmap`` evaluates every
user's model on its own minibatch, and the update is applied to the whole stack.

Every user gets exactly the schedule :func:`train` would give it alone — its own shuffle
(the same ``randperm`` calls on its own generator), its own number of epochs (stragglers),
batches cut from its own dataset size — so results match training users one by one up to
float32 summation order. Per step, users' minibatches are padded to the longest and masked:
a padded row adds nothing to the loss or the gradient, and a user whose schedule is over
(fewer epochs, or fewer batches) takes no step at all (no weight decay, no momentum).

Not batchable (:class:`NotBatchable`, the caller trains one by one): models with buffers
(e.g. BatchNorm running statistics change in training), or users that differ in anything
but data, starting weights, anchors and epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from .train import TrainConfig, TrainStats, _check_data, _device_of

__all__ = ["NotBatchable", "StackedUser", "train_stacked"]

StateDict = dict[str, torch.Tensor]


class NotBatchable(ValueError):
    """These users or this model cannot be trained as one stack; train them one by one."""


@dataclass(frozen=True)
class StackedUser:
    """One user's share of a stacked training call.

    Attributes
    ----------
    x, y
        The user's features (N, F) and labels (N,).
    start
        Starting weights by name (every parameter of the template model).
    epochs
        Local epochs for this user (a straggler's may be fewer); ``None`` = ``cfg.epochs``.
    anchor
        w_anchor for the proximal term (FedProx, Ditto), as in :func:`train`.
    generator
        The user's CPU generator for its per-epoch shuffles.
    """

    x: torch.Tensor
    y: torch.Tensor
    start: StateDict
    epochs: int | None = None
    anchor: StateDict | None = None
    generator: torch.Generator | None = None


def _schedule(
    n: int, epochs: int, batch_size: int, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """The row indices of each of the user's steps, in order — :func:`train`'s loop.

    The generator is drawn exactly as :func:`train` draws it: one ``randperm`` per epoch,
    and none when a batch is the whole dataset.
    """
    if epochs == 0 or n == 0:
        return []
    batch = n if batch_size <= 0 else min(batch_size, n)
    steps: list[torch.Tensor] = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator) if batch < n else torch.arange(n)
        steps.extend(order[start : start + batch] for start in range(0, n, batch))
    return steps


def _check_batchable(model: nn.Module, users: Sequence[StackedUser]) -> None:
    if any(True for _ in model.buffers()):
        raise NotBatchable("the model has buffers (e.g. BatchNorm statistics)")
    with_anchor = {u.anchor is not None for u in users}
    if len(with_anchor) > 1:
        raise NotBatchable("some users have a proximal anchor and some do not")
    names = {name for name, _ in model.named_parameters()}
    for u in users:
        if set(u.start) != names:
            raise NotBatchable("a user's starting weights do not name the model's parameters")


def train_stacked(
    model: nn.Module,
    users: Sequence[StackedUser],
    cfg: TrainConfig,
    *,
    parameters: list[str] | None = None,
) -> list[tuple[StateDict, TrainStats]]:
    """Train each user's copy of ``model`` with SGD on cross-entropy, all at once.

    Parameters
    ----------
    model
        The architecture (its weights are not used or changed): a classifier (B, F) -> (B, K)
        without buffers.
    users
        One :class:`StackedUser` each; ``cfg.epochs`` unless the user sets its own.
    cfg
        The hyperparameters every user shares (batch size, lr, momentum, weight decay, mu).
    parameters
        Names of the parameters to update, as in :func:`train`; the rest keep each user's
        starting values. Default: all parameters.

    Returns
    -------
    list of (weights, TrainStats)
        Per user, in order: its trained weights (every parameter, detached) and the same
        statistics :func:`train` reports.
    """
    if not users:
        return []
    _check_batchable(model, users)
    names = [name for name, _ in model.named_parameters()]
    selected = names if parameters is None else [p for p in names if p in set(parameters)]
    if parameters is not None:
        unknown = [p for p in parameters if p not in set(names)]
        if unknown:
            raise ValueError(f"parameters not in the model: {', '.join(unknown)}")
    device = _device_of(model, users[0].x)

    sizes = [_check_data(u.x, u.y) for u in users]
    epochs = [cfg.epochs if u.epochs is None else u.epochs for u in users]
    schedules = [
        _schedule(n, e, cfg.batch_size, u.generator)
        for n, e, u in zip(sizes, epochs, users, strict=True)
    ]
    num_users = len(users)

    # (U, ...) per parameter; a user's slice starts at its own weights.
    stacked = {
        k: torch.stack([u.start[k].detach().to(device, torch.float32) for u in users])
        for k in names
    }
    use_prox = users[0].anchor is not None and cfg.proximal_mu > 0
    anchors = (
        {
            k: torch.stack([u.anchor[k].detach().to(device, torch.float32) for u in users])  # type: ignore[index]
            for k in selected
            if all(u.anchor is not None and k in u.anchor for u in users)
        }
        if use_prox
        else {}
    )

    def user_loss(
        weights: StateDict,
        xb: torch.Tensor,  # (L, F), padded
        yb: torch.Tensor,  # (L,)
        mask: torch.Tensor,  # (L,) 1 for real rows
    ) -> torch.Tensor:
        logits = functional_call(model, weights, (xb,))  # (L, K)
        # cross_entropy's own rule under vmap is a decomposition that imports sympy
        # (about a second, once per process); this is the same log-softmax + NLL.
        ce = -torch.log_softmax(logits, dim=-1).gather(-1, yb.unsqueeze(-1)).squeeze(-1)  # (L,)
        return (ce * mask).sum() / mask.sum().clamp(min=1.0)

    # vmap for the forward pass only: each user's slice of the stack sees only its own
    # batch, so the gradient of the summed losses is every user's own gradient. (Not
    # torch.func.grad: its first call imports torch._dynamo, seconds in every worker.)
    losses_of = vmap(user_loss)
    momentum: dict[str, torch.Tensor | None] = dict.fromkeys(selected)
    started = torch.zeros(num_users, dtype=torch.bool, device=device)
    loss_sum = torch.zeros(num_users, device=device)
    steps_taken = [0] * num_users
    xs = [u.x.to(device=device, dtype=torch.float32) for u in users]
    ys = [u.y.to(device=device, dtype=torch.long) for u in users]
    num_features = xs[0].shape[1]

    was_training = model.training
    model.train()
    try:
        for step in range(max((len(s) for s in schedules), default=0)):
            active = [step < len(s) for s in schedules]
            width = max(len(s[step]) for s, a in zip(schedules, active, strict=True) if a)
            xb = torch.zeros(num_users, width, num_features, device=device)  # (U, L, F)
            yb = torch.zeros(num_users, width, dtype=torch.long, device=device)  # (U, L)
            mask = torch.zeros(num_users, width, device=device)  # (U, L)
            for i, idx in enumerate(schedules):
                if active[i]:
                    rows = idx[step].to(device)
                    xb[i, : len(rows)] = xs[i][rows]
                    yb[i, : len(rows)] = ys[i][rows]
                    mask[i, : len(rows)] = 1.0
            on = torch.tensor(active, device=device)
            trained = [stacked[k].requires_grad_() for k in selected]
            with torch.set_grad_enabled(bool(selected)):
                losses = losses_of(stacked, xb, yb, mask)  # (U,)
            loss_sum += torch.where(on, losses.detach() * mask.sum(dim=1), 0.0)
            if not selected:
                continue  # nothing to train (an empty parameter subset): loss only
            objective = losses.sum()
            if anchors:
                sq = sum(((stacked[k] - a) ** 2).sum() for k, a in anchors.items())
                objective = objective + 0.5 * cfg.proximal_mu * sq
            grads = dict(zip(selected, torch.autograd.grad(objective, trained), strict=True))
            for k in selected:
                stacked[k] = stacked[k].detach()
            _sgd_step(stacked, grads, momentum, on, started, cfg)
            started |= on
            for i, a in enumerate(active):
                steps_taken[i] += int(a)
    finally:
        model.train(was_training)

    results: list[tuple[StateDict, TrainStats]] = []
    for i, user in enumerate(users):
        seen = sizes[i] * epochs[i]
        if seen == 0:
            results.append(
                ({k: v.detach().clone() for k, v in user.start.items()}, TrainStats(0.0, 0, 0))
            )
            continue
        weights = {k: stacked[k][i].detach().clone() for k in names}
        stats = TrainStats(
            loss=float(loss_sum[i]) / seen, num_examples=sizes[i], steps=steps_taken[i]
        )
        results.append((weights, stats))
    return results


@torch.no_grad()
def _sgd_step(
    stacked: StateDict,
    grads: StateDict,
    momentum: dict[str, torch.Tensor | None],
    active: torch.Tensor,  # (U,) bool: users whose schedule has this step
    started: torch.Tensor,  # (U,) bool: users whose momentum buffer exists
    cfg: TrainConfig,
) -> None:
    """``torch.optim.SGD``'s update (dampening 0, no Nesterov) on the active users only."""
    for k, g in grads.items():
        w = stacked[k]
        on = active.view(-1, *([1] * (w.dim() - 1)))  # (U, 1, ...)
        if cfg.weight_decay != 0:
            g = g + cfg.weight_decay * w
        if cfg.momentum != 0:
            buf = momentum[k]
            first = (~started).view_as(on)
            # A user's first step seeds its buffer with the gradient, as torch's SGD does.
            new = g.clone() if buf is None else torch.where(first, g, cfg.momentum * buf + g)
            momentum[k] = new if buf is None else torch.where(on, new, buf)
            g = new
        stacked[k] = torch.where(on, w - cfg.lr * g, w)
