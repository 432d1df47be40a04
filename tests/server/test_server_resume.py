"""Checkpoints and exact resume, in process: a run cut at any message, resumed, equals one
that never stopped, bit for bit (weights, metrics, every user's models)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Message

from pollinate import config
from pollinate.client.store import ModelStore
from pollinate.models import load_artifact
from pollinate.server.checkpoint import load_checkpoint
from pollinate.server.metrics import read_clients, read_rounds, read_run_info
from pollinate.server.rundir import RunDirError
from pollinate.simulation.inprocess import InProcessGrid, run_in_process

# Transport and timing columns: a resumed run sends its first round's training again.
MEASURED = ["round_seconds", "finished_at", "bytes_sent"]


class Crash(BaseException):
    """Stands for kill -9: nothing after it runs in the ServerApp."""


class CrashingGrid(InProcessGrid):
    """Runs the ClientApp on messages until the ``at``-th, which it runs, then crashes.

    The node has then written its users' models and state, and the server never hears
    of it: the store is ahead of the last checkpoint, as after a kill mid-round.
    """

    def __init__(self, num_nodes: int, at: int) -> None:
        super().__init__(num_nodes)
        self.at = at

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            replies += super().send_and_receive([msg], timeout=timeout)
            if len(self.sent) == self.at:
                raise Crash()
        return replies[::-1]


def small_config(run_dir: Path, **overrides: object) -> config.RunConfig:
    """Six digits users, logistic regression, full-batch steps: well under a second a run."""
    flat: dict[str, object] = {
        "run.dir": str(run_dir),
        "run.num-rounds": 2,
        "data.num-users": 6,
        "data.alpha": 1.0,
        "model.name": "logreg",
        "train.batch-size": 0,
        "train.lr": 0.1,
        "personalization.method": "none",
        **overrides,
    }
    return config.resolve(flat)


def resume_config(run_dir: Path, **overrides: object) -> config.RunConfig:
    return small_config(
        run_dir,
        **{
            "run.num-rounds": 3,
            "strategy.name": "fedadam",  # server optimizer state: m_t, v_t
            "strategy.fraction-train": 0.7,  # the sampler's RNG state matters
            "strategy.fraction-evaluate": 0.7,
            "personalization.method": "ditto",  # per-user state in the store
            **overrides,
        },
    )


def run_with_crash(cfg: config.RunConfig, nodes: int, at: int) -> None:
    from pollinate.server.app import run_federation

    with pytest.raises(Crash):
        run_federation(CrashingGrid(nodes, at), cfg)  # type: ignore[arg-type]  # a duck-typed fake Grid


def assert_same_run(ref: Path, cut: Path) -> None:
    a, b = load_artifact(ref / "models" / "global.pt"), load_artifact(cut / "models" / "global.pt")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    rounds_a, rounds_b = (
        read_rounds(ref).drop(columns=MEASURED),
        read_rounds(cut).drop(columns=MEASURED),
    )
    assert rounds_a.equals(rounds_b)
    assert read_clients(ref).equals(read_clients(cut))
    store_a, store_b = ModelStore(ref / "users"), ModelStore(cut / "users")
    assert store_a.users() == store_b.users()
    for user in store_a.users():
        for kind in ("global", "personal"):
            x, y = store_a.load(user, kind), store_b.load(user, kind)
            assert x is not None and y is not None and x.content_hash == y.content_hash
    assert read_run_info(cut)["status"] == "finished"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "ref"
    return run_in_process(resume_config(run_dir), 2)


# Two nodes: 2 query messages, then 2 per exchange: round 1's training (3-4), two folded
# exchanges of round r's evaluation + round r+1's training (5-6, 7-8), round 3's evaluation
# (9-10). 3: a node trained round 1, the other not; 6: both trained round 2 but round 1 is
# not checkpointed yet (the store is two rounds ahead); 9: in the last evaluation.
@pytest.mark.parametrize("at", [3, 6, 9])
def test_a_run_cut_at_any_message_resumes_to_the_same_result(
    reference: Path, tmp_path: Path, at: int
) -> None:
    cfg = resume_config(tmp_path / "cut")
    run_with_crash(cfg, 2, at)
    assert read_run_info(cfg.run_dir)["status"] == "failed"  # what the crash left
    done = load_checkpoint(cfg.run_dir).round
    run_in_process(cfg.replace(**{"run.resume": True}), 2)
    assert_same_run(reference, cfg.run_dir)
    assert done < 3


@pytest.mark.slow
def test_fedper_and_fedyogi_resume_exactly(tmp_path: Path) -> None:
    sets = {"personalization.method": "fedper", "strategy.name": "fedyogi"}
    ref = run_in_process(resume_config(tmp_path / "ref", **sets), 2)
    cfg = resume_config(tmp_path / "cut", **sets)
    run_with_crash(cfg, 2, 7)
    run_in_process(cfg.replace(**{"run.resume": True}), 2)
    assert_same_run(ref, cfg.run_dir)


def test_the_checkpoint_holds_the_optimizer_state(reference: Path) -> None:
    ckpt = load_checkpoint(reference)
    assert ckpt.round == 3
    assert set(ckpt.strategy) >= {"m_t", "v_t"} and ckpt.strategy["m_t"]
    assert ckpt.sampler is not None and len(ckpt.run_key) == 16


def test_resume_refuses_a_changed_config_and_a_folder_without_checkpoint(
    reference: Path, tmp_path: Path
) -> None:
    changed = resume_config(reference, **{"train.lr": 0.5, "run.resume": True})
    with pytest.raises(RunDirError, match=r"train\.lr"):
        run_in_process(changed, 2)
    with pytest.raises(RunDirError, match="no checkpoint"):
        run_in_process(resume_config(tmp_path / "new", **{"run.resume": True}), 2)
