"""One flat vector per model on the wire: it round-trips, and refuses a different model."""

from __future__ import annotations

import pytest
import torch

from pollinate.models import available_models, create_model
from pollinate.models.flat import flatten, unflatten


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_round_trips(name: str) -> None:
    model = create_model(name, in_features=64, num_classes=3)
    state = model.state_dict()
    flat = flatten(state)
    assert flat.dim() == 1 and flat.numel() == sum(t.numel() for t in state.values())
    back = unflatten(flat, like=state)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)


def test_integer_buffers_come_back_rounded_to_their_dtype() -> None:
    state = {"w": torch.tensor([[0.5, -1.0]]), "steps": torch.tensor(7)}
    flat = flatten(state)
    assert flat.dtype == torch.float32
    back = unflatten(flat + 0.25, like=state)  # as if averaged to a non-whole count
    assert back["steps"].dtype == torch.int64 and int(back["steps"]) == 7


def test_a_vector_of_another_model_is_refused_with_the_reason() -> None:
    small = create_model("mlp", in_features=8, num_classes=2).state_dict()
    large = create_model("mlp", in_features=16, num_classes=2).state_dict()
    with pytest.raises(ValueError, match="different models"):
        unflatten(flatten(small), like=large)
