"""Model registry: every model is a body (feature extractor) plus a head (classifier).

The body/head split is what personalization needs: FedPer and FedRep share the body and keep
the head per user, Ditto and fine-tuning retrain the head alone. A new model is one builder
function that returns ``(body, head)``::

    @register_model("tiny", options={"width": Option(8, "hidden width", Range(1, 4096))})
    def tiny(*, in_features: int, num_classes: int, width: int = 8):
        body = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())  # (B, F) -> (B, W)
        return body, nn.Linear(width, num_classes)  # head: (B, W) -> (B, K)

``create_model("tiny", in_features=4, num_classes=2, width=16)`` then builds it, validates the
options against the builder's signature and records them in ``model.spec`` so that the exact
architecture can be rebuilt later (see ``pollinate.models.artifact``). The ``options`` it
declares are what a run config may set (``model.name = "tiny"``, ``model.width = 16``):
each becomes a ``model.<option>`` key with that default, range and help.

Inputs are always flat float32 features of shape (B, F); a model that wants another layout
(e.g. images) reshapes inside its body.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pollinate.registry import Option, Range, Registry

__all__ = [
    "MAX_PARAMETERS",
    "MODELS",
    "FedModel",
    "ModelEntry",
    "ModelSpec",
    "UnknownModelError",
    "available_models",
    "body_keys",
    "create_model",
    "head_keys",
    "parameter_count",
    "register_model",
    "state_shapes",
]

#: Most parameters (and buffer elements) a model may have: 400 MB as float32 per copy,
#: and a run keeps several copies per user. Checked before any weight is allocated.
MAX_PARAMETERS = 100_000_000

#: A builder takes keyword-only ``in_features``, ``num_classes`` and its own options, and
#: returns ``(body, head)``.
ModelBuilder = Callable[..., tuple[nn.Module, nn.Module]]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder and the builder options a run config may set."""

    name: str
    help: str
    builder: ModelBuilder
    options: dict[str, Option] = field(default_factory=dict)

    def kwargs(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Builder keyword arguments from config option values (``base-width`` ->
        ``base_width``)."""
        return {key.replace("-", "_"): values[key] for key in self.options}


#: Every model, by name: the choices of ``model.name``.
MODELS: Registry[ModelEntry] = Registry("model.name")

# Arguments every builder receives; everything else in its signature is a model option.
_REQUIRED = ("in_features", "num_classes")


class UnknownModelError(ValueError):
    """Raised for a model name that is not in the registry."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown model {name!r}; choose one of: {', '.join(available_models())}")
        self.name = name


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture (not its weights).

    Parameters
    ----------
    name
        Registry name, e.g. ``"mlp"``.
    kwargs
        All builder arguments with defaults filled in, including ``in_features`` and
        ``num_classes``, except those left at None ("infer"). Values are int, float, str or
        bool.
    """

    name: str
    kwargs: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able form: ``{"name": ..., "kwargs": {...}}``."""
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`; raises ValueError on a malformed mapping."""
        if not isinstance(d, Mapping):
            raise ValueError(f"model spec must be a mapping, got {type(d).__name__}")
        name, kwargs = d.get("name"), d.get("kwargs")
        if not isinstance(name, str):
            raise ValueError(f"model spec 'name' must be a string, got {name!r}")
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise ValueError(f"model spec 'kwargs' must be a mapping of str keys, got {kwargs!r}")
        _check_scalars(name, kwargs)
        return cls(name=name, kwargs=dict(kwargs))


class FedModel(nn.Module):
    """A classifier split into a shared-able body and a personal-able head.

    ``forward(x) == forward_head(forward_features(x))``; state_dict keys start with
    ``"body."`` or ``"head."`` (see :func:`body_keys`, :func:`head_keys`).

    Parameters
    ----------
    body
        Maps flat features (B, F) to a representation (B, D).
    head
        Maps the representation (B, D) to logits (B, num_classes).
    spec
        How to rebuild this architecture with :func:`create_model`.
    """

    def __init__(self, body: nn.Module, head: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.spec = spec

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Body: (B, F) -> (B, D)."""
        z: torch.Tensor = self.body(x)
        return z

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        """Head: (B, D) -> logits (B, num_classes)."""
        logits: torch.Tensor = self.head(z)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for flat features (B, F)."""
        return self.forward_head(self.forward_features(x))


def register_model(
    name: str, *, options: Mapping[str, Option] | None = None, help: str = ""
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator that adds a builder to the registry under ``name``.

    The builder must take keyword-only ``in_features`` and ``num_classes`` plus its own
    options (with defaults), and return ``(body, head)``.

    Parameters
    ----------
    name
        A lowercase identifier: the value of ``model.name``.
    options
        The builder options a run config may set, by config key (``hidden``, or
        ``base-width`` for a ``base_width`` parameter); each default must equal the
        builder's. Options left out keep the builder's default under a config.
    help
        One line for the README's table; the builder's docstring's first line if empty.
    """
    if not name or not name.isidentifier() or name != name.lower():
        raise ValueError(f"model name must be a lowercase identifier, got {name!r}")
    declared = dict(options or {})

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        params = inspect.signature(builder).parameters
        missing = [p for p in _REQUIRED if p not in params]
        if missing:
            raise ValueError(f"builder for {name!r} must accept {', '.join(missing)}")
        for key, option in declared.items():
            param = params.get(key.replace("-", "_"))
            if param is None or param.default != option.default:
                raise ValueError(
                    f"model {name!r}: option {key!r} needs a builder parameter "
                    f"{key.replace('-', '_')} with default {option.default!r}"
                )
        doc = (builder.__doc__ or "").strip().splitlines()
        MODELS.add(ModelEntry(name, help or (doc[0] if doc else name), builder, declared))
        return builder

    return decorator


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS.names())


def create_model(
    name: str,
    *,
    in_features: int,
    num_classes: int,
    seed: int | None = None,
    **kwargs: Any,
) -> FedModel:
    """Build a registered model.

    Parameters
    ----------
    name
        One of :func:`available_models`.
    in_features
        Number of flat input features F.
    num_classes
        Number of output classes.
    seed
        If given, initialization is deterministic. The global torch RNG state is left as it was.
    **kwargs
        Model options (e.g. ``hidden`` and ``depth`` for ``mlp``).

    Returns
    -------
    FedModel
        On CPU, in training mode, with ``model.spec`` recording every option.

    Raises
    ------
    UnknownModelError
        ``name`` is not registered.
    ValueError
        An argument is invalid or not accepted by this model.
    """
    if name not in MODELS:
        raise UnknownModelError(name)
    builder = MODELS.get(name).builder
    _check_positive_int("in_features", in_features, name)
    _check_positive_int("num_classes", num_classes, name)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")

    sig = inspect.signature(builder)
    options = [p for p in sig.parameters if p not in _REQUIRED]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        accepted = ", ".join(options) if options else "none"
        raise ValueError(
            f"model {name!r} does not accept {', '.join(unknown)}; its options are: {accepted}"
        )
    bound = sig.bind(in_features=in_features, num_classes=num_classes, **kwargs)
    bound.apply_defaults()
    # None means "infer" (e.g. cnn's height/width); leaving it out keeps every recorded value
    # an int/float/str/bool, which Flower config records and JSON both carry.
    spec_kwargs = {k: v for k, v in bound.arguments.items() if v is not None}
    _check_scalars(name, spec_kwargs)

    if seed is None:
        body, head = builder(**spec_kwargs)
    else:
        # Layer initializers draw from the global RNG; fork it so seeding here does not
        # change the random stream of the caller.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            body, head = builder(**spec_kwargs)
    return FedModel(body, head, ModelSpec(name=name, kwargs=spec_kwargs))


def state_shapes(name: str, **kwargs: Any) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of an architecture, without allocating its weights.

    The model is built on PyTorch's ``meta`` device (shapes only, no storage), so a spec
    that declares billions of parameters costs microseconds, not gigabytes. Raises what
    :func:`create_model` raises for bad arguments.
    """
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def parameter_count(name: str, **kwargs: Any) -> int:
    """Elements in the state dict of an architecture (counted on the meta device)."""
    return sum(math.prod(shape) for shape in state_shapes(name, **kwargs).values())


def head_keys(model: FedModel) -> list[str]:
    """State-dict keys of the head (``"head.*"``), in state-dict order."""
    return [k for k in model.state_dict() if k.startswith("head.")]


def body_keys(model: FedModel) -> list[str]:
    """State-dict keys of the body (``"body.*"``), in state-dict order."""
    return [k for k in model.state_dict() if k.startswith("body.")]


# ---------------------------------------------------------------------------- validation


def _check_positive_int(arg: str, value: Any, model: str) -> None:
    # bool is an int subclass; `hidden=True` is a bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"model {model!r}: {arg} must be a positive int, got {value!r}")


def _check_scalars(model: str, kwargs: Mapping[str, Any]) -> None:
    # Specs are saved with artifacts and loaded with weights_only=True, and shown as JSON.
    for key, value in kwargs.items():
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(
                f"model {model!r}: option {key} must be an int, float, str, bool or None, "
                f"got {type(value).__name__}"
            )


# ---------------------------------------------------------------------------- models


@register_model("logreg", help="multinomial logistic regression: a linear head, no body")
def logreg(*, in_features: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Multinomial logistic regression: no body parameters, a linear head."""
    body = nn.Identity()  # (B, F) -> (B, F)
    head = nn.Linear(in_features, num_classes)  # (B, F) -> (B, K)
    return body, head


@register_model(
    "mlp",
    help="multilayer perceptron: `depth` Linear-ReLU layers of width `hidden`",
    options={
        "hidden": Option(64, "width of each hidden layer", Range(1, 16_384)),
        "depth": Option(1, "number of hidden Linear-ReLU layers", Range(1, 64)),
    },
)
def mlp(
    *, in_features: int, num_classes: int, hidden: int = 64, depth: int = 1
) -> tuple[nn.Module, nn.Module]:
    """Multilayer perceptron with ``depth`` hidden Linear-ReLU layers of width ``hidden``."""
    _check_positive_int("hidden", hidden, "mlp")
    _check_positive_int("depth", depth, "mlp")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]  # (B, width) -> (B, hidden)
        width = hidden
    return nn.Sequential(*layers), nn.Linear(hidden, num_classes)  # head: (B, H) -> (B, K)


@register_model(
    "cnn", help="small CNN for square images given as flat features (2 conv layers, 1 dense)"
)
def cnn(
    *,
    in_features: int,
    num_classes: int,
    channels: int = 1,
    height: int | None = None,
    width: int | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Small CNN for images given as flat features in (C, H, W) order.

    ``height`` and ``width`` default to ``sqrt(in_features / channels)``, i.e. square images;
    give one or both for other shapes.
    """
    _check_positive_int("channels", channels, "cnn")
    c, h, w = channels, height, width
    for arg, value in (("height", h), ("width", w)):
        if value is not None:
            _check_positive_int(arg, value, "cnn")
    if in_features % c:
        raise ValueError(f"model 'cnn': in_features={in_features} is not divisible by channels={c}")
    pixels = in_features // c
    if h is None and w is None:
        side = math.isqrt(pixels)
        if side * side != pixels:
            raise ValueError(
                f"model 'cnn': in_features/channels={pixels} is not a perfect square; "
                "pass height= and width= for non-square images"
            )
        h = w = side
    elif h is None:
        assert w is not None
        h = pixels // w
    elif w is None:
        w = pixels // h
    if c * h * w != in_features:
        raise ValueError(
            f"model 'cnn': channels*height*width = {c}*{h}*{w} = {c * h * w} "
            f"does not match in_features={in_features}"
        )
    if h < 2 or w < 2:
        raise ValueError(f"model 'cnn': images must be at least 2x2 to pool, got {h}x{w}")

    flat = 32 * (h // 2) * (w // 2)
    body = nn.Sequential(
        nn.Unflatten(1, (c, h, w)),  # (B, C*H*W) -> (B, C, H, W)
        nn.Conv2d(c, 16, kernel_size=3, padding=1),  # (B, 16, H, W)
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),  # (B, 32, H, W)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 32, H//2, W//2)
        nn.Flatten(),  # (B, 32*(H//2)*(W//2))
        nn.Linear(flat, 64),  # (B, 64)
        nn.ReLU(),
    )
    head = nn.Linear(64, num_classes)  # (B, 64) -> (B, K)
    return body, head
