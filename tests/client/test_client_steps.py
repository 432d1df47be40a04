"""One user's round: local training and the personalization methods."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pollinate import config
from pollinate.client.steps import (
    RoundContext,
    Workbench,
    evaluate_user,
    evaluate_users,
    train_user,
    train_users,
)
from pollinate.client.store import ModelStore
from pollinate.data import UserData
from pollinate.models import ModelSpec, body_keys, create_model, head_keys


def make_user(seed: int = 0, n: int = 80) -> UserData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0).astype(np.int64)  # 4 classes
    return UserData("u-1", x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :])


def context(
    tmp_path: Path,
    method: str,
    *,
    round_: int = 1,
    mu: float = 0.0,
    sets: dict[str, object] | None = None,
) -> RoundContext:
    cfg = config.resolve(
        {
            "personalization.method": method,
            "model.name": "mlp",
            "train.epochs": 3,
            "train.lr": 0.1,
            **(sets or {}),
        }
    )
    model = create_model("mlp", in_features=6, num_classes=4, seed=0)
    return RoundContext(
        cfg=cfg,
        spec=model.spec,
        global_weights=dict(model.state_dict()),
        server_round=round_,
        store=ModelStore(tmp_path),
        proximal_mu=mu,
    )


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a))


def test_training_is_deterministic_and_moves_the_weights(tmp_path: Path) -> None:
    ctx = context(tmp_path, "none")
    w1, m1 = train_user(Workbench(), ctx, make_user())
    w2, _ = train_user(Workbench(), ctx, make_user())
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert distance(w1, ctx.global_weights) > 0
    assert m1["num-examples"] == 40 and m1["train-loss"] > 0


def test_proximal_term_keeps_the_update_near_the_global_model(tmp_path: Path) -> None:
    free, _ = train_user(Workbench(), context(tmp_path, "none"), make_user())
    prox_ctx = context(tmp_path, "none", mu=5.0)
    prox, _ = train_user(Workbench(), prox_ctx, make_user())
    assert distance(prox, prox_ctx.global_weights) < 0.5 * distance(free, prox_ctx.global_weights)


def test_none_personal_is_the_global_model(tmp_path: Path) -> None:
    m = evaluate_user(Workbench(), context(tmp_path, "none"), make_user())
    assert m["personal-accuracy"] == m["global-accuracy"]
    assert m["personal-loss"] == m["global-loss"]


def test_finetune_personal_fits_the_user_better(tmp_path: Path) -> None:
    m = evaluate_user(
        Workbench(),
        context(tmp_path, "finetune", sets={"personalization.finetune-epochs": 20}),
        make_user(),
    )
    assert m["personal-loss"] < m["global-loss"]
    store = ModelStore(tmp_path)
    glob, pers = store.load("u-1", "global"), store.load("u-1", "personal")
    assert glob is not None and pers is not None and glob.round == pers.round == 1
    assert glob.content_hash != pers.content_hash


def test_finetune_head_only_keeps_the_global_body(tmp_path: Path) -> None:
    ctx = context(tmp_path, "finetune", sets={"personalization.finetune-head-only": True})
    evaluate_user(Workbench(), ctx, make_user())
    pers = ModelStore(tmp_path).load("u-1", "personal")
    assert pers is not None
    model = create_model("mlp", in_features=6, num_classes=4)
    for k in body_keys(model):
        assert torch.equal(pers.state_dict[k], ctx.global_weights[k])
    assert any(not torch.equal(pers.state_dict[k], ctx.global_weights[k]) for k in head_keys(model))


def test_fedper_keeps_the_users_head_and_takes_the_global_body(tmp_path: Path) -> None:
    bench = Workbench()
    update, _ = train_user(bench, context(tmp_path, "fedper"), make_user())
    # Next round: a new global model arrives (different body and head).
    new_global = create_model("mlp", in_features=6, num_classes=4, seed=7)
    ctx2 = context(tmp_path, "fedper", round_=2)
    ctx2 = dataclasses.replace(ctx2, global_weights=dict(new_global.state_dict()))
    evaluate_user(bench, ctx2, make_user())
    pers = ModelStore(tmp_path).load("u-1", "personal")
    assert pers is not None
    for k in head_keys(new_global):
        assert torch.equal(pers.state_dict[k], update[k])  # own head
    for k in body_keys(new_global):
        assert torch.equal(pers.state_dict[k], new_global.state_dict()[k])  # shared body


def test_ditto_personal_model_is_pulled_toward_global_by_lambda(tmp_path: Path) -> None:
    distances = {}
    for lam in (0.0, 5.0):
        ctx = context(
            tmp_path / str(lam),
            "ditto",
            sets={"personalization.ditto-lambda": lam, "personalization.ditto-epochs": 5},
        )
        train_user(Workbench(), ctx, make_user())
        pers = ModelStore(tmp_path / str(lam)).load("u-1", "personal")
        assert pers is not None and pers.round == 1
        distances[lam] = distance(pers.state_dict, ctx.global_weights)
    assert 0 < distances[5.0] < 0.5 * distances[0.0]


def test_final_round_only_writes_the_evaluated_models_in_the_last_round(tmp_path: Path) -> None:
    sets = {"store.save-models": "final-round", "run.num-rounds": 3}
    bench = Workbench()
    for round_ in (1, 2):
        m = evaluate_user(
            bench, context(tmp_path, "finetune", round_=round_, sets=sets), make_user()
        )
        assert m["num-examples"] == 40  # evaluated all the same
        assert ModelStore(tmp_path).load("u-1", "global") is None
    evaluate_user(bench, context(tmp_path, "finetune", round_=3, sets=sets), make_user())
    store = ModelStore(tmp_path)
    glob, pers = store.load("u-1", "global"), store.load("u-1", "personal")
    assert glob is not None and pers is not None and glob.round == pers.round == 3


def test_final_round_only_still_keeps_the_state_between_rounds(tmp_path: Path) -> None:
    # FedPer's own head is state, not output: saved when trained, whatever save-models says.
    sets = {"store.save-models": "final-round", "run.num-rounds": 3}
    update, _ = train_user(Workbench(), context(tmp_path, "fedper", sets=sets), make_user())
    store = ModelStore(tmp_path)
    assert store.load("u-1", "personal") is None  # output: only in the final round
    state = store.load_state("u-1", run_key="", before=2)
    assert state is not None and state.round == 1
    model = create_model("mlp", in_features=6, num_classes=4)
    assert all(torch.equal(state.state_dict[k], update[k]) for k in head_keys(model))


def test_a_round_run_again_reads_the_state_its_first_attempt_read(tmp_path: Path) -> None:
    # After a resume, round t trains again although the store already holds what the
    # first attempt of t (and of t+1) wrote: it must start from the state before t.
    sets: dict[str, object] = {"personalization.ditto-epochs": 3}
    bench, user = Workbench(), make_user()
    for round_ in (1, 2, 3):
        train_user(bench, context(tmp_path, "ditto", round_=round_, sets=sets), user)
    first = ModelStore(tmp_path).load_state("u-1", run_key="", before=3)
    train_user(bench, context(tmp_path, "ditto", round_=2, sets=sets), user)  # again
    again = ModelStore(tmp_path).load_state("u-1", run_key="", before=3)
    assert first is not None and again is not None and first.round == again.round == 2
    assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in first.state_dict)


def test_state_versions_are_pruned_and_kept_per_run(tmp_path: Path) -> None:
    store, spec = ModelStore(tmp_path), ModelSpec("mlp", {"in_features": 6, "num_classes": 4})
    weights = create_model("mlp", in_features=6, num_classes=4).state_dict()
    for round_ in range(1, 7):
        store.save_state("u", run_key="a1", round=round_, spec=spec, state_dict=weights)
    kept = sorted(p.name for p in (tmp_path / "u" / ".state" / "a1").iterdir())
    # Newest at or before round 6 - 2, and everything after it: a resume needs no older.
    assert kept == ["personal-000004.pt", "personal-000005.pt", "personal-000006.pt"]
    state = store.load_state("u", run_key="a1", before=5)
    assert state is not None and state.round == 4
    assert store.load_state("u", run_key="b2", before=9) is None  # another run sees none
    store.save_state("u", run_key="b2", round=1, spec=spec, state_dict=weights)
    assert not (tmp_path / "u" / ".state" / "a1").exists()  # a new run replaces the old


def _cohort(size: int = 5) -> list[UserData]:
    users = []
    for i in range(size):
        u = make_user(seed=i, n=20 + 12 * i)  # different sizes: ragged batches
        users.append(dataclasses.replace(u, user_id=f"u-{i}"))
    return users


@pytest.mark.parametrize("method", ["none", "finetune", "fedper", "ditto"])
def test_stacked_users_train_as_one_by_one(tmp_path: Path, method: str) -> None:
    """train.stack-users: every user's update, and its stored personal model, as if alone."""
    sets = {"train.batch-size": 8, "train.straggler-fraction": 0.5, "train.momentum": 0.5}
    results = {}
    for stack in (0, 3):
        store_dir = tmp_path / f"stack-{stack}"
        ctx = context(store_dir, method, mu=0.05, sets={**sets, "train.stack-users": stack})
        if method in ("fedper", "ditto"):  # a personal model from an earlier round
            for user in _cohort()[:2]:
                start = {k: v + 0.1 for k, v in ctx.global_weights.items()}
                ctx.store.save_state(
                    user.user_id, run_key=ctx.run_key, round=0, spec=ctx.spec, state_dict=start
                )
        trained = list(train_users(Workbench(), ctx, _cohort()))
        personal = {u.user_id: ctx.store.load(u.user_id, "personal") for u, _, _ in trained}
        results[stack] = (trained, personal)
    (one, one_personal), (stacked, stacked_personal) = results[0], results[3]
    assert [u.user_id for u, _, _ in one] == [u.user_id for u, _, _ in stacked]
    assert len({float(m["train-loss"]) for _, _, m in one}) == 5  # the users really differ
    for (_, w1, m1), (_, w2, m2) in zip(one, stacked, strict=True):
        assert m1["num-examples"] == m2["num-examples"]
        assert m2["train-loss"] == pytest.approx(m1["train-loss"], abs=1e-5)
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=2e-5), k
    for user_id, p1 in one_personal.items():
        p2 = stacked_personal[user_id]
        assert (p1 is None) == (p2 is None)
        if p1 is not None and p2 is not None:
            for k in p1.state_dict:
                assert torch.allclose(p1.state_dict[k], p2.state_dict[k], atol=2e-5), k


@pytest.mark.parametrize(
    ("method", "sets"),
    [
        ("none", {}),
        ("finetune", {"personalization.finetune-epochs": 3, "personalization.finetune-lr": 0.05}),
        ("finetune", {"personalization.finetune-head-only": True}),
        ("fedper", {}),
        ("ditto", {}),
    ],
)
def test_stacked_evaluation_equals_one_by_one(
    tmp_path: Path, method: str, sets: dict[str, object]
) -> None:
    """Personal models made at evaluation (fine-tuning) as one stack: the same metrics and
    the same stored personal models as user by user (float32 tolerance)."""
    sets = {**sets, "train.batch-size": 8, "train.momentum": 0.5}
    results = {}
    for stack in (0, 3):
        ctx = context(
            tmp_path / f"stack-{stack}", method, sets={**sets, "train.stack-users": stack}
        )
        bench = Workbench()
        list(train_users(bench, ctx, _cohort()))  # FedPer's heads, Ditto's models to evaluate
        evaluated = list(evaluate_users(bench, ctx, _cohort()))
        personal = {u.user_id: ctx.store.load(u.user_id, "personal") for u, _ in evaluated}
        results[stack] = (evaluated, personal)
    (one, one_personal), (stacked, stacked_personal) = results[0], results[3]
    assert (
        [u.user_id for u, _ in one]
        == [u.user_id for u, _ in stacked]
        == [u.user_id for u in _cohort()]
    )
    for (_, m1), (_, m2) in zip(one, stacked, strict=True):
        assert m1.keys() == m2.keys()
        for key in m1:
            assert m2[key] == pytest.approx(m1[key], abs=1e-5), key
    if method == "finetune":  # it really trained: personal differs from global
        assert any(m["personal-loss"] != m["global-loss"] for _, m in one)
    for user_id, p1 in one_personal.items():
        p2 = stacked_personal[user_id]
        assert p1 is not None and p2 is not None and p1.round == p2.round
        for k in p1.state_dict:
            gap = (p1.state_dict[k] - p2.state_dict[k]).abs().max()
            assert gap <= 2e-5, (k, float(gap))


def test_stacked_finetuning_falls_back_for_a_model_with_buffers(tmp_path: Path) -> None:
    """A model the stack cannot train (BatchNorm's statistics) is fine-tuned one by one,
    with the same results as without stacking."""
    from torch import nn

    from pollinate.models import MODELS, register_model

    saved = dict(MODELS._entries)

    @register_model("bn_mlp")
    def bn_mlp(*, in_features: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
        return nn.Sequential(nn.Linear(in_features, 8), nn.BatchNorm1d(8)), nn.Linear(
            8, num_classes
        )

    try:
        results = []
        for stack in (0, 3):
            ctx = context(tmp_path / str(stack), "finetune", sets={"train.stack-users": stack})
            model = create_model("bn_mlp", in_features=6, num_classes=4, seed=0)
            ctx = dataclasses.replace(ctx, spec=model.spec, global_weights=dict(model.state_dict()))
            results.append([m for _, m in evaluate_users(Workbench(), ctx, _cohort())])
    finally:
        MODELS._entries = saved
    one, stacked = results
    assert one == stacked  # the same per-user path: bit for bit
    assert all(m["personal-loss"] != m["global-loss"] for m in one)
