"""Registry, body/head split and model construction, for every registered model."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from pollinate.models import (
    FedModel,
    ModelSpec,
    UnknownModelError,
    available_models,
    body_keys,
    create_model,
    head_keys,
    register_model,
    registry,
)

F, K = 16, 3  # 16 = 4x4, so the cnn infers a square image


@pytest.fixture(params=available_models())
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_available_models_sorted_and_builtin() -> None:
    names = available_models()
    assert names == sorted(names)
    assert {"cnn", "logreg", "mlp"} <= set(names)


def test_forward_shapes(name: str) -> None:
    model = create_model(name, in_features=F, num_classes=K, seed=0)
    x = torch.randn(5, F)
    z = model.forward_features(x)
    assert z.dim() == 2 and z.shape[0] == 5
    logits = model(x)
    assert logits.shape == (5, K) and logits.dtype == torch.float32
    assert torch.equal(logits, model.forward_head(z))


def test_body_head_split(name: str) -> None:
    model = create_model(name, in_features=F, num_classes=K, seed=0)
    assert isinstance(model, FedModel)
    assert isinstance(model.body, nn.Module) and isinstance(model.head, nn.Module)
    heads, bodies = head_keys(model), body_keys(model)
    assert heads and all(k.startswith("head.") for k in heads)
    assert all(k.startswith("body.") for k in bodies)
    assert sorted(bodies + heads) == sorted(model.state_dict())


def test_seed_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    rng_before = torch.get_rng_state()
    a = create_model(name, in_features=F, num_classes=K, seed=7).state_dict()
    b = create_model(name, in_features=F, num_classes=K, seed=7).state_dict()
    c = create_model(name, in_features=F, num_classes=K, seed=8).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_spec_records_options_and_round_trips(name: str) -> None:
    model = create_model(name, in_features=F, num_classes=K)
    spec = model.spec
    assert spec.name == name
    assert spec.kwargs["in_features"] == F and spec.kwargs["num_classes"] == K
    assert all(isinstance(v, (bool, int, float, str)) for v in spec.kwargs.values())
    d = json.loads(json.dumps(spec.to_dict()))
    assert ModelSpec.from_dict(d) == spec
    rebuilt = create_model(spec.name, **spec.kwargs)
    assert rebuilt.spec == spec
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_mlp_options() -> None:
    model = create_model("mlp", in_features=F, num_classes=K, hidden=8, depth=3)
    assert model.spec.kwargs == {"in_features": F, "num_classes": K, "hidden": 8, "depth": 3}
    assert len([m for m in model.body.children() if isinstance(m, nn.Linear)]) == 3
    assert model.head.in_features == 8


def test_cnn_explicit_image_shape() -> None:
    model = create_model("cnn", in_features=3 * 4 * 6, num_classes=K, channels=3, height=4)
    assert model.spec.kwargs["height"] == 4
    assert model(torch.randn(2, 72)).shape == (2, K)


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'foo'; choose one of: ") as e:
        create_model("foo", in_features=F, num_classes=K)
    assert isinstance(e.value, ValueError)
    assert "cnn, logreg, mlp" in str(e.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("logreg", {"in_features": 0, "num_classes": K}, "in_features must be a positive int"),
        ("mlp", {"in_features": -3, "num_classes": K}, "in_features must be a positive int"),
        ("mlp", {"in_features": F, "num_classes": 0}, "num_classes must be a positive int"),
        ("mlp", {"in_features": True, "num_classes": K}, "in_features must be a positive int"),
        ("mlp", {"in_features": F, "num_classes": K, "hidden": 0}, "hidden must be"),
        ("mlp", {"in_features": F, "num_classes": K, "depth": 0}, "depth must be"),
        ("mlp", {"in_features": F, "num_classes": K, "widht": 3}, "does not accept widht"),
        ("logreg", {"in_features": F, "num_classes": K, "hidden": 3}, "options are: none"),
        ("cnn", {"in_features": 15, "num_classes": K}, "not a perfect square"),
        ("cnn", {"in_features": 16, "num_classes": K, "channels": 3}, "not divisible"),
        ("cnn", {"in_features": 16, "num_classes": K, "height": 3}, "does not match"),
        ("cnn", {"in_features": 3, "num_classes": K, "height": 1}, "at least 2x2"),
        ("mlp", {"in_features": F, "num_classes": K, "seed": 1.5}, "seed must be an int"),
    ],
)
def test_bad_arguments_raise_clear_value_error(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model(name, **kwargs)


def test_register_model_adds_a_model_in_one_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry.MODELS, "_entries", dict(registry.MODELS._entries))

    @register_model("tiny")
    def tiny(*, in_features: int, num_classes: int, width: int = 4) -> tuple[nn.Module, nn.Module]:
        body = nn.Sequential(nn.Linear(in_features, width), nn.Tanh())  # (B, F) -> (B, W)
        return body, nn.Linear(width, num_classes)

    assert "tiny" in available_models()
    model = create_model("tiny", in_features=F, num_classes=K, width=5)
    assert model.spec == ModelSpec("tiny", {"in_features": F, "num_classes": K, "width": 5})
    assert model(torch.randn(2, F)).shape == (2, K)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny")(tiny)


def test_register_model_rejects_bad_builders() -> None:
    with pytest.raises(ValueError, match="lowercase identifier"):
        register_model("My Model")
    with pytest.raises(ValueError, match="must accept num_classes"):
        register_model("nope")(lambda *, in_features: (nn.Identity(), nn.Identity()))
    assert "nope" not in available_models()


def test_spec_from_dict_rejects_malformed() -> None:
    with pytest.raises(ValueError, match="'name' must be a string"):
        ModelSpec.from_dict({"kwargs": {}})
    with pytest.raises(ValueError, match="'kwargs' must be a mapping"):
        ModelSpec.from_dict({"name": "mlp", "kwargs": [1]})
    with pytest.raises(ValueError, match="must be an int, float, str, bool"):
        ModelSpec.from_dict({"name": "mlp", "kwargs": {"hidden": [64]}})


def test_models_package_imports_no_flower_and_nothing_else_of_ours() -> None:
    code = (
        "import sys, pollinate.models; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray') "
        "or (m.startswith('pollinate.') and not m.startswith('pollinate.models') "
        "and m not in ('pollinate.registry', 'pollinate.text'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
