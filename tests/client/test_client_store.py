"""The per-user model store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pollinate.client.store import ModelStore, StoreError, user_folder_name
from pollinate.models import create_model


@pytest.mark.parametrize("user", ["../escape", "a/b", ".hidden", "ü-ser 7", "..", "."])
def test_any_user_id_stays_inside_the_store(tmp_path: Path, user: str) -> None:
    store = ModelStore(tmp_path)
    path = store.path(user, "global").resolve()
    assert tmp_path.resolve() in path.parents
    assert path.parent.parent == tmp_path.resolve()
    assert "/" not in user_folder_name(user)


def test_save_load_and_list(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    model = create_model("mlp", in_features=4, num_classes=3, seed=0)
    assert store.load("u/1", "personal") is None
    store.save(
        "u/1",
        "personal",
        spec=model.spec,
        state_dict=model.state_dict(),
        round=3,
        metrics={"accuracy": 0.5},
    )
    art = store.load("u/1", "personal")
    assert art is not None and art.round == 3 and art.user == "u/1" and art.kind == "personal"
    x = torch.randn(5, 4)
    assert torch.equal(art.build()(x), model.eval()(x))
    assert store.users() == ["u/1"]
    assert not list(tmp_path.rglob("*.tmp*"))


def test_bad_kind_and_empty_user(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="choose one of: global, personal"):
        ModelStore(tmp_path).path("u", "best")
    with pytest.raises(StoreError, match="empty"):
        ModelStore(tmp_path).path("", "global")
