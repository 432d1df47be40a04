"""Local training and evaluation loops: plain SGD on cross-entropy, on in-memory tensors.

Client datasets in federated simulation are tiny, so the loops index tensors directly instead
of going through a DataLoader. The same ``train`` serves FedAvg / FedSGD (``batch_size <= 0``),
FedProx and Ditto (``anchor`` + ``proximal_mu``) and FedPer / FedRep / fine-tuning
(``parameters`` restricts what is updated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .privacy import DPSGD, private_step_gradient

__all__ = [
    "EvalStats",
    "TrainConfig",
    "TrainStats",
    "dp_sgd_steps",
    "evaluate",
    "predict_proba",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyperparameters.

    Parameters
    ----------
    epochs
        Passes over the local data; 0 means no training.
    batch_size
        Minibatch size; ``<= 0`` (or ``>= len(x)``) means full batch, one step per epoch
        (FedSGD, McMahan et al. 2017).
    lr, momentum, weight_decay
        Passed to ``torch.optim.SGD``.
    proximal_mu
        Weight mu of the proximal term (mu/2)*||w - w_anchor||^2 (FedProx, Li et al. 2020).
        Only used when ``train`` is given an ``anchor``.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("momentum", "weight_decay", "proximal_mu"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class TrainStats:
    """Result of :func:`train`.

    Attributes
    ----------
    loss
        Mean cross-entropy over all batches seen, weighted by batch size, measured before each
        step and excluding the proximal term.
    num_examples
        Local dataset size ``len(x)`` (the FedAvg weight); 0 when no training happened.
    steps
        Optimizer steps taken.
    """

    loss: float
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvalStats:
    """Result of :func:`evaluate`: mean cross-entropy, accuracy in [0, 1], dataset size."""

    loss: float
    accuracy: float
    num_examples: int


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    anchor: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    parameters: list[str] | None = None,
    private: DPSGD | None = None,
) -> TrainStats:
    """Train ``model`` in place with SGD on cross-entropy.

    Parameters
    ----------
    model
        Any classifier mapping (B, F) to logits (B, K); typically a ``FedModel``.
    x
        Features, float32 (N, F). Moved to the model's device.
    y
        Labels, int64 (N,).
    cfg
        Hyperparameters.
    anchor
        Reference weights w_anchor by parameter name (e.g. the global model). With
        ``cfg.proximal_mu > 0`` adds (mu/2)*||w - w_anchor||^2 over the trained parameters
        present in ``anchor`` (FedProx; Ditto's personal objective).
    generator
        CPU generator for the per-epoch shuffle; makes training deterministic. Without it the
        global RNG is used.
    parameters
        Names of the parameters to update (e.g. ``head_keys(model)``); the rest stay
        bit-identical. Buffer names are accepted and ignored. Default: all parameters with
        ``requires_grad``.
    private
        DP-SGD (:mod:`.privacy`): each step's batch is a Poisson sample (every example in
        with probability q = batch / N, N / batch steps an epoch) and its gradient the
        noisy mean of clipped per-example gradients. The proximal term's gradient depends
        on no example and is added unclipped.

    Returns
    -------
    TrainStats
        Zeros if ``cfg.epochs == 0`` or ``x`` is empty. If ``parameters`` selects no
        parameter, the loss is measured but no step is taken (``steps == 0``).

    Notes
    -----
    The model's train/eval mode and every ``requires_grad`` flag are restored on return.
    Optimizer state (momentum) starts fresh on each call, as in FedAvg's local update. The
    update is ``torch.optim.SGD``'s, bit for bit, without its per-process import cost.
    """
    n = _check_data(x, y)
    if cfg.epochs == 0 or n == 0:
        return TrainStats(loss=0.0, num_examples=0, steps=0)

    named = dict(model.named_parameters())
    if parameters is None:
        # Respect parameters the caller already froze.
        selected = [p_name for p_name, w in named.items() if w.requires_grad]
    else:
        known = set(named) | set(model.state_dict())
        unknown = [p for p in parameters if p not in known]
        if unknown:
            raise ValueError(f"parameters not in the model: {', '.join(unknown)}")
        wanted = set(parameters)
        selected = [p for p in named if p in wanted]

    device = _device_of(model, x)
    x, y = x.to(device=device, dtype=torch.float32), y.to(device=device, dtype=torch.long)

    # Proximal pairs (w, w_anchor); frozen parameters contribute a constant, so skip them.
    prox: list[tuple[torch.Tensor, torch.Tensor]] = []
    if anchor is not None and cfg.proximal_mu > 0:
        for p_name in selected:
            if p_name in anchor:
                w, w0 = named[p_name], anchor[p_name]
                if w0.shape != w.shape:
                    raise ValueError(
                        f"anchor {p_name!r} has shape {tuple(w0.shape)}, expected {tuple(w.shape)}"
                    )
                # Copy: an anchor aliasing the live parameter would make the term always 0.
                prox.append((w, w0.detach().to(device=device, dtype=w.dtype, copy=True)))

    batch = n if cfg.batch_size <= 0 else min(cfg.batch_size, n)
    was_training = model.training
    requires_grad = {p_name: w.requires_grad for p_name, w in named.items()}
    loss_sum = torch.zeros((), device=device)
    steps = 0
    try:
        # Freezing via requires_grad (not just leaving them out of the optimizer) also skips
        # computing their gradients, e.g. the whole body when fine-tuning the head.
        chosen = set(selected)
        for p_name, w in named.items():
            w.requires_grad_(p_name in chosen)
        trainable = [named[p_name] for p_name in selected]
        opt = _SGD(trainable, cfg) if trainable else None
        model.train()
        if private is not None and opt is not None:
            steps, dp_loss, dp_seen = _train_private(
                model, x, y, cfg, private, selected, prox, opt, generator
            )
            return TrainStats(loss=dp_loss / max(dp_seen, 1), num_examples=n, steps=steps)
        for _ in range(cfg.epochs):
            # Full batch: order does not change the gradient, so do not draw from the RNG.
            order = torch.randperm(n, generator=generator).to(device) if batch < n else None
            for start in range(0, n, batch):
                if order is None:
                    xb, yb = x, y
                else:
                    idx = order[start : start + batch]
                    xb, yb = x[idx], y[idx]  # (b, F), (b,)
                with torch.set_grad_enabled(opt is not None):
                    loss = F.cross_entropy(model(xb), yb)
                loss_sum += loss.detach() * len(yb)
                if opt is None:
                    continue
                objective = loss
                if prox:
                    sq = sum(((w - w0) ** 2).sum() for w, w0 in prox)
                    objective = loss + 0.5 * cfg.proximal_mu * sq
                opt.zero_grad()
                objective.backward()
                opt.step()
                steps += 1
    finally:
        for p_name, w in named.items():
            w.requires_grad_(requires_grad[p_name])
        model.train(was_training)
    seen = n * cfg.epochs
    return TrainStats(loss=float(loss_sum) / seen, num_examples=n, steps=steps)


def _train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    private: DPSGD,
    selected: list[str],
    prox: list[tuple[torch.Tensor, torch.Tensor]],
    opt: _SGD,
    generator: torch.Generator | None,
) -> tuple[int, float, int]:
    """DP-SGD epochs: (steps, summed loss, examples seen)."""
    n = len(x)
    batch = n if cfg.batch_size <= 0 else min(cfg.batch_size, n)
    rate = batch / n
    steps_per_epoch = math.ceil(n / batch)
    named = dict(model.named_parameters())
    loss_sum, seen, steps = 0.0, 0, 0
    for _ in range(cfg.epochs * steps_per_epoch):
        # Poisson sampling: the batch size varies, the expected one is q * n = batch.
        take = (
            torch.rand(n, generator=generator) < rate
            if rate < 1
            else torch.ones(n, dtype=torch.bool)
        )
        xb, yb = x[take.to(x.device)], y[take.to(y.device)]  # (b, F), (b,)
        if len(xb):
            with torch.no_grad():
                loss_sum += float(F.cross_entropy(model(xb), yb)) * len(yb)
            seen += len(yb)
        grads = private_step_gradient(model, selected, xb, yb, private, rate * n, generator)
        opt.zero_grad()
        for name, g in grads.items():
            named[name].grad = g
        for w, w0 in prox:
            w.grad = w.grad + cfg.proximal_mu * (w.detach() - w0)  # type: ignore[operator]
        opt.step()
        steps += 1
    return steps, loss_sum, seen


def dp_sgd_steps(num_examples: int, cfg: TrainConfig) -> tuple[float, int]:
    """(sampling rate q, steps) of :func:`train` with ``private`` on ``num_examples``."""
    if cfg.epochs == 0 or num_examples == 0:
        return 1.0, 0
    batch = num_examples if cfg.batch_size <= 0 else min(cfg.batch_size, num_examples)
    return batch / num_examples, cfg.epochs * math.ceil(num_examples / batch)


class _SGD:
    """SGD with momentum and weight decay: exactly ``torch.optim.SGD``'s update on CPU.

    (dampening 0, no Nesterov: ``torch.optim.sgd._single_tensor_sgd``, bit for bit.)
    ``torch.optim`` would do the same, but its first optimizer in a process imports
    ``torch._dynamo`` (about a second, paid again by every simulation worker) and each of
    its steps costs some 30 us more, a quarter of a step of the small models trained here.
    """

    def __init__(self, params: Sequence[torch.Tensor], cfg: TrainConfig) -> None:
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = cfg.lr, cfg.momentum, cfg.weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self) -> None:
        for w in self.params:
            w.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, w in enumerate(self.params):
            grad = w.grad
            if grad is None:
                continue
            if self.weight_decay != 0:
                grad = grad.add(w, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1)
                grad = buf
            w.add_(grad, alpha=-self.lr)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024
) -> EvalStats:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode.

    Batches of ``batch_size`` bound memory; ``<= 0`` means one batch. Empty ``x`` gives
    ``EvalStats(0.0, 0.0, 0)``. The model's train/eval mode is restored.
    """
    n = _check_data(x, y)
    if n == 0:
        return EvalStats(loss=0.0, accuracy=0.0, num_examples=0)
    device = _device_of(model, x)
    batch = n if batch_size <= 0 else batch_size
    was_training = model.training
    model.eval()
    try:
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for start in range(0, n, batch):
            xb = x[start : start + batch].to(device=device, dtype=torch.float32)  # (b, F)
            yb = y[start : start + batch].to(device=device, dtype=torch.long)  # (b,)
            logits = model(xb)  # (b, K)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    return EvalStats(loss=float(loss_sum) / n, accuracy=int(correct) / n, num_examples=n)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, K) for features (N, F), in eval mode, on the model's device."""
    was_training = model.training
    model.eval()
    try:
        logits = model(x.to(device=_device_of(model, x), dtype=torch.float32))  # (N, K)
    finally:
        model.train(was_training)
    return torch.softmax(logits, dim=1)


def _device_of(model: nn.Module, x: torch.Tensor) -> torch.device:
    w = next(model.parameters(), None)
    return x.device if w is None else w.device


def _check_data(x: torch.Tensor, y: torch.Tensor) -> int:
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, F), got {tuple(x.shape)}")
    if y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"y must have shape (N,) matching x's {len(x)} rows, got {tuple(y.shape)}")
    if y.is_floating_point():
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    return len(x)
