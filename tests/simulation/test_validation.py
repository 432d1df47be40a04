"""Bad updates in real runs: rejected, recorded, and the global model stays good.

The real ServerApp and ClientApp run in this process. A hostile node is the real node
whose reply is rewritten on its way back, as a modified device would send it; attackers
configured with ``[attack]`` poison their updates inside the real ClientApp.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from simhelpers import run_in_process, small_config

from pollinate import config, protocol
from pollinate.models import load_artifact
from pollinate.models.checks import NonFiniteModelError
from pollinate.server.checkpoint import CHECKPOINT, load_checkpoint
from pollinate.server.metrics import read_clients, read_rounds, read_run_info
from pollinate.server.strategies import STRATEGIES as REGISTERED
from pollinate.server.strategies import build_strategy
from pollinate.simulation.inprocess import InProcessGrid

USERS = 5
VICTIM = "user-0002"
NEAR_CLEAN = 0.1

Tamper = Callable[[np.ndarray, dict], tuple[np.ndarray, dict]]


def _nan(w: np.ndarray, m: dict) -> tuple[np.ndarray, dict]:
    return np.full_like(w, np.nan), m


def _inf(w: np.ndarray, m: dict) -> tuple[np.ndarray, dict]:
    return np.full_like(w, np.inf), m


def _times_1e6(w: np.ndarray, m: dict) -> tuple[np.ndarray, dict]:
    return w * np.float32(1e6), m


def _claims_1e9_examples(w: np.ndarray, m: dict) -> tuple[np.ndarray, dict]:
    return w, {**m, "num-examples": 1e9}


def _seven_extra_weights(w: np.ndarray, m: dict) -> tuple[np.ndarray, dict]:
    return np.concatenate([w, np.ones(7, dtype=w.dtype)]), m


def _near_float32_max(w: np.ndarray, m: dict) -> tuple[np.ndarray, dict]:
    return np.full_like(w, 3e38), m  # finite, but a mean of three of them is not


class HostileGrid(InProcessGrid):
    """Nodes whose replies for ``users`` are rewritten by ``tamper`` (one node per user).

    Keeps every reply, to inspect what the nodes sent.
    """

    def __init__(self, num_nodes: int, users: Iterable[str], tamper: Tamper | None) -> None:
        super().__init__(num_nodes)
        self.users = set(users)
        self.tamper = tamper
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if not reply.has_error() and reply.metadata.message_type == "train":
                self._rewrite(reply)
        self.replies += replies
        return replies

    def _rewrite(self, reply: Message) -> None:
        train = protocol.read_train_reply(reply.content)
        for user in list(train.metrics):
            if user not in self.users or self.tamper is None:
                continue
            # A cohort mean of one user is that user's update.
            arrays = train.mean if train.mean is not None else train.updates[user]
            w = arrays["weights"].numpy()
            weights, values = self.tamper(w, dict(train.metrics[user]))
            update = ArrayRecord({"weights": torch.from_numpy(weights)})
            if train.mean is not None:
                train.mean, train.mean_metrics = update, MetricRecord(values)
            else:
                train.updates[user] = update
            train.metrics[user] = MetricRecord(values)
        content = reply.content
        for key in list(content):
            del content[key]
        for key, record in protocol.train_content(train).items():
            content[key] = record


def _config(run_dir: Path, **overrides: object) -> config.RunConfig:
    flat = {
        "data.num-users": USERS,
        "run.num-rounds": 3,
        "train.epochs": 5,
        "strategy.fraction-evaluate": 1.0,
        **overrides,
    }
    return small_config(run_dir, **flat)


STRATEGIES: dict[str, dict[str, object]] = {
    "fedavg": {},
    "fedadam": {"strategy.server-lr": 0.3},
    "fedmedian": {},
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    # Many tiny models: threads only contend (a 2-core machine shared with other tests).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _clean_accuracy(root: str, name: str, extra: tuple[tuple[str, object], ...] = ()) -> float:
    # overwrite: cache keys differ for f(a, b) and f(a, b, ()), the folder does not.
    cfg = _config(
        Path(root) / f"clean-{name}",
        **{"strategy.name": name, "run.overwrite": True, **dict(extra)},
    )
    run_dir, _ = run_in_process(cfg, USERS)
    return float(read_rounds(run_dir)["server_accuracy"].iloc[-1])


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("clean"))


def _all_models_finite(run_dir: Path) -> None:
    """Every model file and the checkpoint (if a round completed) hold finite weights."""
    files = sorted(p for p in run_dir.rglob("*.pt") if p.name != CHECKPOINT)
    assert files
    for path in files:
        weights = load_artifact(path).state_dict
        assert all(torch.isfinite(t).all() for t in weights.values()), path
    if (run_dir / CHECKPOINT).exists():
        assert torch.isfinite(load_checkpoint(run_dir).weights).all()


def _hostile_run(
    tmp_path: Path, tamper: Tamper, users: Iterable[str] = (VICTIM,), **overrides: object
) -> tuple[Path, HostileGrid]:
    grid = HostileGrid(USERS, users, tamper)
    from pollinate.server.app import run_federation

    return run_federation(grid, _config(tmp_path / "run", **overrides)), grid  # type: ignore[arg-type]  # a duck-typed fake Grid


def _assert_victim_rejected(run_dir: Path, phrase: str) -> None:
    assert read_run_info(run_dir)["status"] == "finished"
    rounds = read_rounds(run_dir)
    assert rounds["rejected"].tolist() == [0, 1, 1, 1]
    assert (rounds["train_users"].iloc[1:] == USERS - 1).all()
    clients = read_clients(run_dir)
    trained = clients[clients["round"] >= 1]
    victim = trained[trained["user"] == VICTIM]
    assert len(victim) == 3 and all(phrase in r for r in victim["rejected_reason"])
    assert trained[trained["user"] != VICTIM]["rejected_reason"].isna().all()
    _all_models_finite(run_dir)


BAD_UPDATES: dict[str, tuple[Tamper, str, dict[str, object]]] = {
    "nan": (_nan, "NaN", {}),
    "inf": (_inf, "infinite", {}),
    # A finite update, only absurdly big: a norm bound is what catches it.
    "x1e6": (_times_1e6, "median norm", {"validation.norm-bound-median-multiple": 10.0}),
    "1e9-examples": (_claims_1e9_examples, "above the cap of 1000000", {}),
}


def _check_bad_update(
    tmp_path: Path, clean_root: str, bad: str, name: str
) -> None:  # shared by the fast and the slow matrix
    tamper, phrase, extra = BAD_UPDATES[bad]
    overrides = {"strategy.name": name, **STRATEGIES[name], **extra}
    run_dir, _ = _hostile_run(tmp_path, tamper, (VICTIM,), **overrides)
    _assert_victim_rejected(run_dir, phrase)
    clean = _clean_accuracy(clean_root, name, tuple(sorted(STRATEGIES[name].items())))
    accuracy = float(read_rounds(run_dir)["server_accuracy"].iloc[-1])
    # Three short rounds without one user's data: within a few points of the clean run
    # (a poisoned model sits at chance, 0.10).
    assert accuracy >= clean - NEAR_CLEAN, (accuracy, clean)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_an_all_nan_user_is_rejected_and_the_run_goes_on(
    tmp_path: Path, clean_root: str, name: str
) -> None:
    _check_bad_update(tmp_path, clean_root, "nan", name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("bad", sorted(set(BAD_UPDATES) - {"nan"}))
def test_every_kind_of_bad_update_is_rejected(
    tmp_path: Path, clean_root: str, bad: str, name: str
) -> None:
    _check_bad_update(tmp_path, clean_root, bad, name)


def test_a_huge_example_count_is_rejected_with_fedavg(tmp_path: Path, clean_root: str) -> None:
    _check_bad_update(tmp_path, clean_root, "1e9-examples", "fedavg")


def test_an_update_with_seven_extra_weights_is_rejected_not_a_crash(tmp_path: Path) -> None:
    run_dir, _ = _hostile_run(tmp_path, _seven_extra_weights, **{"strategy.name": "fedmedian"})
    _assert_victim_rejected(run_dir, "(7 extra)")


def test_every_update_rejected_keeps_the_global_model(tmp_path: Path) -> None:
    users = [f"user-{i:04d}" for i in range(USERS)]
    run_dir, _ = _hostile_run(tmp_path, _nan, users, **{"run.num-rounds": 2})
    assert read_run_info(run_dir)["status"] == "finished"
    assert read_rounds(run_dir)["rejected"].tolist() == [0, USERS, USERS]
    first = load_artifact(run_dir / "models" / "global-round-0000.pt").state_dict
    last = load_artifact(run_dir / "models" / "global.pt").state_dict
    assert all(torch.equal(first[k], last[k]) for k in first)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the point
def test_a_non_finite_global_model_stops_the_run_and_is_never_written(tmp_path: Path) -> None:
    # Three of five users send 3e38 (finite): the trimmed mean of three overflows float32.
    users = ["user-0001", "user-0002", "user-0003"]
    overrides = {"strategy.name": "fedtrimmedavg", "strategy.trim-beta": 0.2}
    with pytest.raises(NonFiniteModelError) as err:
        _hostile_run(tmp_path, _near_float32_max, users, **overrides)
    message = str(err.value)
    assert "round 1's global model has non-finite weights" in message and "\n" not in message
    run_dir = tmp_path / "run"
    info = read_run_info(run_dir)
    assert info["status"] == "failed" and "NonFiniteModelError" in info["error"]
    # Only round 0 was written; no node ever got the broken model.
    assert sorted(p.name for p in (run_dir / "models").iterdir()) == [
        "global-round-0000.pt",
        "global.pt",
    ]
    _all_models_finite(run_dir)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_the_cli_reports_a_non_finite_global_model_in_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from pollinate.cli import _run_command

    users = ["user-0001", "user-0002", "user-0003"]
    overrides = {"strategy.name": "fedtrimmedavg", "strategy.trim-beta": 0.2}
    args = argparse.Namespace(
        func=lambda _: _hostile_run(tmp_path, _near_float32_max, users, **overrides) and 0
    )
    assert _run_command(args) == 1
    # The last line: a live-lines handler left by an earlier CLI test in this process may
    # complain above it about its closed stream.
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the run failed: NonFiniteModelError: round 1's global")


# ------------------------------------------------------------------ the node-mean path


def _attack_run(tmp_path: Path, num_nodes: int, **overrides: object) -> tuple[Path, HostileGrid]:
    from pollinate.server.app import run_federation

    grid = HostileGrid(num_nodes, (), None)
    return run_federation(grid, _config(tmp_path / "run", **overrides)), grid  # type: ignore[arg-type]  # a duck-typed fake Grid


def _rejected_by_node(grid: HostileGrid) -> dict[str, str]:
    out: dict[str, str] = {}
    for reply in grid.replies:
        if not reply.has_error() and "rejected" in reply.content.config_records:
            out.update({str(k): str(v) for k, v in reply.content["rejected"].items()})
    return out


def test_a_node_rejects_a_bad_user_before_averaging_its_cohort(
    tmp_path: Path, clean_root: str
) -> None:
    attack = {"attack.kind": "nan", "attack.fraction": 0.2, "attack.seed": 3}
    run_dir, grid = _attack_run(tmp_path, 1, **attack)  # one node hosts all five users
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train and all(m.content["config"]["node-mean"] for m in train)
    (attacker,) = {str(u) for m in train for u in m.content["config"]["attack-users"]}  # type: ignore[union-attr]
    by_node = _rejected_by_node(grid)
    assert list(by_node) == [attacker] and "NaN" in by_node[attacker]
    clients = read_clients(run_dir)
    reasons = clients[(clients["round"] >= 1) & (clients["user"] == attacker)]["rejected_reason"]
    assert len(reasons) == 3 and all("NaN" in r for r in reasons)
    _all_models_finite(run_dir)
    accuracy = float(read_rounds(run_dir)["server_accuracy"].iloc[-1])
    assert accuracy >= _clean_accuracy(clean_root, "fedavg") - NEAR_CLEAN


@pytest.mark.parametrize(
    ("where", "name", "bound", "phrase"),
    [
        # FedAvg: the node checks before it averages (cohort mean path).
        ("node", "fedavg", {"validation.norm-bound": 10.0}, "above the bound 10"),
        # FedMedian: every update goes to the server, which checks it.
        ("server", "fedmedian", {"validation.norm-bound": 10.0}, "validation.norm-bound 10"),
        # The round's median: the server needs every user's own update, even for FedAvg.
        ("server", "fedavg", {"validation.norm-bound-median-multiple": 3.0}, "median norm"),
    ],
)
def test_norm_bounds_reject_a_scaled_update(
    tmp_path: Path, where: str, name: str, bound: dict[str, object], phrase: str
) -> None:
    attack = {"attack.kind": "scaling", "attack.fraction": 0.2, "attack.scale": 100.0}
    run_dir, grid = _attack_run(tmp_path, 1, **{"strategy.name": name, **attack, **bound})
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    (attacker,) = {str(u) for m in train for u in m.content["config"]["attack-users"]}  # type: ignore[union-attr]
    assert all(bool(m.content["config"].get("node-mean")) == (where == "node") for m in train)
    clients = read_clients(run_dir)
    rejected = clients[clients["rejected_reason"].notna()]
    assert set(rejected["user"]) == {attacker} and len(rejected) == 3
    assert all(phrase in r for r in rejected["rejected_reason"])
    assert bool(_rejected_by_node(grid)) == (where == "node")


def test_without_a_bound_the_scaled_update_gets_through(tmp_path: Path) -> None:
    # The control for the test above: the attack is real and does damage unbounded.
    attack = {"attack.kind": "scaling", "attack.fraction": 0.2, "attack.scale": 100.0}
    run_dir, _ = _attack_run(tmp_path, 1, **attack)
    assert read_rounds(run_dir)["rejected"].sum() == 0
    assert float(read_rounds(run_dir)["server_accuracy"].iloc[-1]) < 0.5


# ---------------------------------------------------------------- attacks, strategies


def _sent_attackers(grid: InProcessGrid) -> list[tuple[int, list[str]]]:
    return [
        (int(m.content["config"]["server-round"]), sorted(m.content["config"]["attack-users"]))  # type: ignore[arg-type]
        for m in grid.sent
        if m.metadata.message_type == "train"
    ]


def test_attackers_are_chosen_by_the_attack_seed_and_reproducible(tmp_path: Path) -> None:
    attack = {"attack.kind": "sign-flip", "attack.fraction": 0.4, "run.num-rounds": 2}
    a, grid_a = _attack_run(tmp_path / "a", USERS, **attack, **{"attack.seed": 1})
    b, grid_b = _attack_run(tmp_path / "b", USERS, **attack, **{"attack.seed": 1})
    _, grid_c = _attack_run(tmp_path / "c", USERS, **attack, **{"attack.seed": 2})
    chosen_a = {u for _, users in _sent_attackers(grid_a) for u in users}
    assert len(chosen_a) == 2  # 40 % of 5 users, the same users every round
    assert _sent_attackers(grid_a) == _sent_attackers(grid_b)
    wa = load_artifact(a / "models" / "global.pt").state_dict
    wb = load_artifact(b / "models" / "global.pt").state_dict
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    chosen_c = {u for _, users in _sent_attackers(grid_c) for u in users}
    assert len(chosen_c) == 2 and chosen_c != chosen_a


def test_no_attack_sends_no_attack_config(tmp_path: Path) -> None:
    _, grid = _attack_run(tmp_path, 2, **{"run.num-rounds": 1})
    assert all("attack-users" not in m.content["config"] for m in grid.sent)


@pytest.mark.parametrize("name", ["multikrum", "bulyan"])
def test_multikrum_and_bulyan_run_and_withstand_a_sign_flipper(tmp_path: Path, name: str) -> None:
    # Bulyan needs 4f + 3 updates: 7 users for f = 1.
    overrides = {
        "data.num-users": 7,
        "strategy.name": name,
        "strategy.krum-byzantine": 1,
        "attack.kind": "sign-flip",
        "attack.fraction": 0.15,  # 1 of 7
    }
    run_dir, _ = _attack_run(tmp_path, 7, **overrides)
    rounds = read_rounds(run_dir)
    assert read_run_info(run_dir)["status"] == "finished"
    assert rounds["server_accuracy"].iloc[-1] > rounds["server_accuracy"].iloc[0] + 0.3


def test_an_unknown_strategy_is_a_one_line_config_error() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.resolve({"strategy.name": "krumm"})
    message = str(err.value)
    assert "\n" not in message and "did you mean 'krum'" in message
    assert all(name in message for name in REGISTERED.names())
    # A RunConfig built around resolve() cannot fall through to some other strategy.
    import dataclasses

    cfg = config.resolve({})
    forged = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, name="bogus"))
    with pytest.raises(config.ConfigError, match="choose one of: fedavg"):
        build_strategy(forged)


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"attack.kind": "sign-flip"}, "go together"),
        ({"attack.fraction": 0.2}, "go together"),
        ({"attack.kind": "poison", "attack.fraction": 0.2}, "choose one of: none, sign-flip"),
        ({"attack.kind": "nan", "attack.fraction": 1.5}, "attack.fraction"),
        ({"validation.norm-bound-median-multiple": 0.5}, "0 (off) or >= 1"),
        ({"validation.norm-bound": -1.0}, "validation.norm-bound"),
        ({"validation.max-examples": -1}, "validation.max-examples"),
    ],
)
def test_bad_validation_and_attack_config_is_refused(
    overrides: dict[str, object], phrase: str
) -> None:
    with pytest.raises(config.ConfigError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        config.resolve(overrides)


@pytest.mark.parametrize("stack", [0, 3])
@pytest.mark.parametrize("kind", ["sign-flip", "scaling", "gaussian", "label-flip"])
def test_every_attack_kind_poisons_the_model(tmp_path: Path, kind: str, stack: int) -> None:
    base = {"run.num-rounds": 2, "strategy.name": "fedmedian", "train.stack-users": stack}
    clean, _ = _attack_run(tmp_path / "clean", 1, **base)
    attack = {"attack.kind": kind, "attack.fraction": 0.4, "attack.noise-std": 0.5}
    poisoned, _ = _attack_run(tmp_path / "attacked", 1, **base, **attack)
    assert read_run_info(poisoned)["status"] == "finished"
    a = load_artifact(clean / "models" / "global.pt").state_dict
    b = load_artifact(poisoned / "models" / "global.pt").state_dict
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    _all_models_finite(poisoned)
