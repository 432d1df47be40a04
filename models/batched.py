"""Train many users' copies of one model at once: weights stacked along a leading user axis.

For the small models of federated simulations, :func:`~pollinate.models.train.train` spends
its time in Python and kernel launches, one user after another. :func:`train_stacked` runs
the same SGD for a cohort in one pass per step: each user's parameters are one slice of a
stacked tensor (U, ...), every user's model is evaluated on its own minibatch in one call
(batched matmuls for models made of Linear/ReLU layers, ``torch.func.functional_call``
under ``vmap`` for the rest, e.g. the CNN), and the update is applied to the whole stack.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from .registry import FedModel
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
) -> torch.Tensor:
    """The row indices of each of the user's S steps, in order — :func:`train`'s loop.

    Returns (S, B): step s takes rows ``[s, :]``, ``-1`` where its batch is short (the last
    of an epoch). The generator is drawn exactly as :func:`train` draws it: one
    ``randperm`` per epoch, and none when a batch is the whole dataset. One tensor per
    user, not one per step: at 2,000 users a round the per-step slices cost more than
    the training itself.
    """
    if epochs == 0 or n == 0:
        return torch.empty((0, 1), dtype=torch.long)
    batch = n if batch_size <= 0 else min(batch_size, n)
    per_epoch = -(-n // batch)  # ceil: the last batch of an epoch may be short
    steps = torch.full((epochs, per_epoch * batch), -1, dtype=torch.long)
    for e in range(epochs):
        steps[e, :n] = torch.randperm(n, generator=generator) if batch < n else torch.arange(n)
    return steps.view(epochs * per_epoch, batch)


def _step_rows(
    schedules: list[torch.Tensor], users: list[StackedUser]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every user's batches as rows of one concatenated dataset, padded.

    Returns ``rows`` (U, S, B): user u's step s takes rows ``rows[u, s]`` of ``x_all``
    (sum N + 1, F) and ``y_all``; the last row is all zeros and pads short batches and
    finished schedules. One gather per step then builds every user's batch at once.
    """
    offsets = [0]
    for u in users:
        offsets.append(offsets[-1] + len(u.x))
    pad = offsets[-1]
    num_steps = max((len(s) for s in schedules), default=0)
    width = max((s.shape[1] for s in schedules if len(s)), default=1)
    rows = torch.full((len(users), num_steps, width), pad, dtype=torch.long)
    for i, steps in enumerate(schedules):
        if len(steps):
            block = torch.where(steps >= 0, steps + offsets[i], pad)  # (S_i, B_i)
            rows[i, : len(steps), : steps.shape[1]] = block
    num_features = users[0].x.shape[1]
    # Concatenated where the data is (a GPU node keeps it there between rounds) and moved
    # once to the model's device by the caller; no-op copies when both are the same.
    at = users[0].x.device
    x_all = torch.cat(
        [u.x.to(at, torch.float32) for u in users] + [torch.zeros(1, num_features, device=at)]
    )
    y_all = torch.cat(
        [u.y.to(at, torch.long) for u in users] + [torch.zeros(1, dtype=torch.long, device=at)]
    )
    return rows, x_all, y_all


def _stacked_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model as a chain of (parameter prefix, Linear/ReLU/Identity), or None.

    Models built only of these (logreg, MLPs) are evaluated for the whole stack with one
    batched matmul per layer, which costs far less per step than ``vmap``'s dispatch.
    """
    chain: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> bool:
        if isinstance(module, nn.Linear | nn.ReLU | nn.Identity):
            chain.append((prefix, module))
            return True
        if isinstance(module, nn.Sequential):
            return all(walk(child, f"{prefix}{name}.") for name, child in module.named_children())
        if isinstance(module, FedModel):  # forward = head(body(x))
            return walk(module.body, f"{prefix}body.") and walk(module.head, f"{prefix}head.")
        return False

    return chain if walk(model, "") else None


def _chain_losses_and_grads(
    chain: list[tuple[str, nn.Module]],
    weights: StateDict,
    selected: Sequence[str],
    x: torch.Tensor,  # (A, B, F)
    y: torch.Tensor,  # (A, B)
    mask: torch.Tensor,  # (A, B) 1 for real rows
) -> tuple[torch.Tensor, StateDict]:
    """Each user's masked mean cross-entropy (A,) and the gradient of their sum with
    respect to the ``selected`` parameters, by the chain rule written out.

    The same numbers autograd gives for the chain's batched matmuls + :func:`_masked_mean_ce`
    (up to float32 rounding), at a fraction of the cost per step: autograd's graph and
    engine cost more than the arithmetic of these small layers. d(sum of losses)/d logits
    is (softmax - onehot(y)) x mask / rows per user; a Linear layer y = x W^T + b passes
    back g W and gets g^T x and the sum of g over rows; a ReLU passes g where its output
    is positive. The backward pass stops below the lowest selected layer (a head alone).
    """
    inputs: list[torch.Tensor] = []  # what each layer got: Linear's x, ReLU's output
    for prefix, layer in chain:
        inputs.append(x)
        if isinstance(layer, nn.Linear):
            w = weights[f"{prefix}weight"].transpose(1, 2)  # (A, in, out)
            bias = weights.get(f"{prefix}bias")
            x = torch.bmm(x, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, w)
        elif isinstance(layer, nn.ReLU):
            x = torch.relu(x)
            inputs[-1] = x
    # log-softmax as logits - logsumexp: the same value, and ~3x faster than
    # torch.log_softmax on CPU at these sizes (a few hundred rows of ten classes).
    lse = x.logsumexp(dim=-1, keepdim=True)  # (A, B, 1)
    ce = (lse - x.gather(-1, y.unsqueeze(-1))).squeeze(-1)  # (A, B)
    rows = mask.sum(dim=-1).clamp(min=1.0)  # (A,)
    losses = (ce * mask).sum(dim=-1) / rows

    wanted = set(selected)
    lowest = min(
        (
            i
            for i, (prefix, _) in enumerate(chain)
            if f"{prefix}weight" in wanted or f"{prefix}bias" in wanted
        ),
        default=len(chain),
    )
    g = x.sub_(lse).exp_()  # softmax, in place: the logits are not needed any more
    g.scatter_add_(-1, y.unsqueeze(-1), -torch.ones_like(ce).unsqueeze(-1))
    g.mul_((mask / rows.unsqueeze(-1)).unsqueeze(-1))  # (A, B, K): d sum / d logits
    grads: StateDict = {}
    for i in range(len(chain) - 1, lowest - 1, -1):
        prefix, layer = chain[i]
        if isinstance(layer, nn.Linear):
            weight_key, bias_key = f"{prefix}weight", f"{prefix}bias"
            if weight_key in wanted:
                grads[weight_key] = torch.bmm(g.transpose(1, 2), inputs[i])  # (A, out, in)
            if bias_key in wanted and bias_key in weights:
                grads[bias_key] = g.sum(dim=1)  # (A, out)
            if i > lowest:
                g = torch.bmm(g, weights[weight_key])  # (A, B, in)
        elif isinstance(layer, nn.ReLU):
            g = g * (inputs[i] > 0)
    return losses, grads


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
    # Users sorted by their number of steps, longest first: at every step the users still
    # training are a prefix of the stack, so a step computes on a view of just those users
    # (no work for users whose schedule is over: with power-law dataset sizes most are).
    order = sorted(range(len(users)), key=lambda i: -len(schedules[i]))
    lengths = [len(schedules[i]) for i in order]

    def stack(of: list[StateDict], keys: list[str]) -> StateDict:
        return {
            k: torch.stack([of[i][k].detach().to(device, torch.float32) for i in order])
            for k in keys
        }

    # (U, ...) per parameter, in `order`; a user's slice starts at its own weights.
    stacked = stack([u.start for u in users], names)
    anchors: StateDict = {}
    if users[0].anchor is not None and cfg.proximal_mu > 0:
        given = [u.anchor for u in users if u.anchor is not None]
        anchors = stack(given, [k for k in selected if all(k in a for a in given)])

    def user_loss(
        weights: StateDict,
        xb: torch.Tensor,  # (L, F), padded
        yb: torch.Tensor,  # (L,)
        mask: torch.Tensor,  # (L,) 1 for real rows
    ) -> torch.Tensor:
        return _masked_mean_ce(functional_call(model, weights, (xb,)), yb, mask)

    chain = _stacked_layers(model)
    # Linear/ReLU chains: batched matmuls and the backward pass by hand. Other models: vmap
    # for the forward pass, autograd for the rest. Either way each user's slice of the
    # stack sees only its own batch, so the gradient of the summed losses is every user's
    # own gradient. (Not torch.func.grad: its first call imports torch._dynamo, seconds.)
    losses_of = vmap(user_loss)
    momentum = {k: torch.zeros_like(stacked[k]) for k in selected} if cfg.momentum else {}
    loss_sum = torch.zeros(len(users), device=device)
    rows, x_all, y_all = _step_rows([schedules[i] for i in order], [users[i] for i in order])
    rows, x_all, y_all = rows.to(device), x_all.to(device), y_all.to(device)
    pad = len(x_all) - 1

    was_training = model.training
    model.train()
    try:
        active = len(users)
        for step in range(lengths[0] if lengths else 0):
            while lengths[active - 1] <= step:
                active -= 1
            at = rows[:active, step]  # (A, B) rows of the concatenated data, `pad` = none
            xb, yb = x_all[at], y_all[at]  # (A, B, F), (A, B)
            mask = (at != pad).to(torch.float32)  # (A, B)
            live = {k: v[:active] for k, v in stacked.items()}  # views: updated in place
            if chain is not None:
                with torch.no_grad():
                    losses, grads = _chain_losses_and_grads(chain, live, selected, xb, yb, mask)
            else:
                losses, grads = _autograd_losses_and_grads(losses_of, live, selected, xb, yb, mask)
            loss_sum[:active] += losses.detach() * mask.sum(dim=1)
            if not selected:
                continue  # nothing to train (an empty parameter subset): loss only
            if anchors:  # FedProx / Ditto: d/dw of mu/2 ||w - anchor||^2 = mu (w - anchor)
                for k, a in anchors.items():
                    grads[k] = grads[k].add(live[k] - a[:active], alpha=cfg.proximal_mu)
            _sgd_step(live, grads, momentum, step == 0, cfg)
    finally:
        model.train(was_training)

    results: list[tuple[StateDict, TrainStats]] = [None] * len(users)  # type: ignore[list-item]
    for p, i in enumerate(order):
        seen = sizes[i] * epochs[i]
        if seen == 0:
            start = {k: v.detach().clone() for k, v in users[i].start.items()}
            results[i] = (start, TrainStats(0.0, 0, 0))
            continue
        weights = {k: stacked[k][p].clone() for k in names}
        steps = lengths[p] if selected else 0
        results[i] = (weights, TrainStats(float(loss_sum[p]) / seen, sizes[i], steps))
    return results


def _autograd_losses_and_grads(
    losses_of: Callable[..., torch.Tensor],
    live: StateDict,
    selected: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, StateDict]:
    """:func:`_chain_losses_and_grads` for any model, by autograd over ``losses_of``."""
    trained = {k: live[k].detach().requires_grad_() for k in selected}
    with torch.set_grad_enabled(bool(selected)):
        losses = losses_of({**live, **trained}, x, y, mask)  # (A,)
    if not selected:
        return losses, {}
    grads = torch.autograd.grad(losses.sum(), list(trained.values()))
    return losses.detach(), dict(zip(trained, grads, strict=True))


def _masked_mean_ce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the real rows (mask 1) along the last batch axis.

    The same log-softmax + NLL as ``F.cross_entropy``, written out: cross_entropy's rule
    under vmap is a decomposition that imports sympy (about a second, once per process).
    """
    ce = -torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (..., B)
    return (ce * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


@torch.no_grad()
def _sgd_step(
    live: StateDict,  # the training users' slices of the stack (A, ...), updated in place
    grads: StateDict,
    momentum: StateDict,  # the whole stack's buffers (U, ...)
    first: bool,
    cfg: TrainConfig,
) -> None:
    """``torch.optim.SGD``'s update (dampening 0, no Nesterov) on the training users.

    Users train from step 0 until their schedule ends, so every buffer starts at step 0.
    """
    for k, g in grads.items():
        w = live[k]
        if cfg.weight_decay != 0:
            g = g.add(w, alpha=cfg.weight_decay)
        if cfg.momentum != 0:
            buf = momentum[k][: len(w)]
            if first:  # torch's SGD seeds the buffer with the first gradient
                buf.copy_(g)
            else:
                buf.mul_(cfg.momentum).add_(g, alpha=1)
            g = buf
        w.add_(g, alpha=-cfg.lr)
