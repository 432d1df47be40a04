"""A device's pull from Flower's real in-memory state: only its own messages are looked at,
and it gets exactly what Flower's own method gives."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
from linkstate_help import link_state, train_message

import pollinate.flower_compat as fc
from pollinate.flower_compat import _names
from pollinate.flower_compat import own_messages as om

STATE = _names.flower_module(om.MODULE).InMemoryLinkState


@pytest.fixture(autouse=True)
def _warnings_said_again() -> None:
    _names._said.clear()
    fc._core._warned.clear()


@pytest.fixture
def plain_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """``store_message_ins`` stores without Flower's validation of runs and nodes (what the
    replacement wraps is the storing, not the checks); both sides of each test use it."""

    def store_message_ins(self: Any, message: Any) -> str | None:
        with self.lock:
            self.message_ins_store[message.metadata.message_id] = message
        return str(message.metadata.message_id)

    monkeypatch.setattr(STATE, "store_message_ins", store_message_ins)


def _store(state: Any, node_run: list[tuple[int, int]]) -> list[str]:
    """Messages to (node, run) pairs, stored through ``store_message_ins`` in that order."""
    ids = []
    for i, (node, run) in enumerate(node_run):
        assert state.store_message_ins(train_message(run, node, f"m{i}")) == f"m{i}"
        ids.append(f"m{i}")
    return ids


def _checked_by_stub(state: Any, expired: set[str]) -> list[str]:
    """``state``'s expiry check replaced by one that deletes ``expired``; the ids checked."""
    checked: list[str] = []

    def check(message_ids: set[str], run_id: int | None = None) -> None:
        checked.extend(sorted(message_ids))
        for msg_id in message_ids & expired:
            state.message_ins_store.pop(msg_id, None)

    state._check_stored_messages = check
    return checked


# 40 messages for nodes 1-4, runs 7 and 8; m5 (node 2) has expired.
LAYOUT = [(1 + i % 4, 7 + (i // 20)) for i in range(40)]
PULLS = [(1, None, None), (2, 3, None), (2, None, None), (3, None, 8), (3, None, 8), (9, 1, None)]


@pytest.mark.usefixtures("plain_store")
def test_a_pull_checks_only_the_nodes_own_messages_and_gets_what_flower_gives() -> None:
    results, checks = [], []
    for replaced in (False, True):
        block: AbstractContextManager[Any] = (
            om.pulls_find_own_messages() if replaced else nullcontext(True)
        )
        with block as on:
            assert on
            state = link_state()
            _store(state, LAYOUT)
            checked = _checked_by_stub(state, expired={"m5"})
            got = []
            for node, limit, run in PULLS:
                checked.clear()
                messages = state.get_message_ins(node, limit, run_id=run)
                assert all(m.metadata.delivered_at for m in messages)
                got.append([m.metadata.message_id for m in messages])
                checks.append((replaced, node, list(checked)))
        results.append(got)
    assert results[0] == results[1]
    assert results[1][1] == ["m1", "m9", "m13"]  # node 2, limit 3: m5 expired
    assert results[1][4] == []  # node 3's run-8 messages were all delivered by pull 4
    stock_first, own_first = checks[0][2], checks[len(PULLS)][2]
    assert len(stock_first) == 40  # Flower checks the whole store on node 1's pull
    assert own_first == [f"m{i}" for i in range(0, 40, 4)]  # node 1's ten only
    for _, node, checked_ids in checks[len(PULLS) :]:
        assert all(LAYOUT[int(m[1:])][0] == node for m in checked_ids)  # never another's
    assert not fc.active_patches()


@pytest.mark.usefixtures("plain_store")
def test_messages_gone_elsewhere_are_dropped_and_the_list_empties() -> None:
    with om.pulls_find_own_messages() as on:
        assert on
        state = link_state()
        _checked_by_stub(state, expired=set())
        ids = _store(state, [(1, 7), (1, 7), (1, 7), (2, 7)])
        state.delete_messages({ids[1]})  # e.g. its run was stopped
        state.message_ins_store[ids[2]].metadata.delivered_at = "2026-12-02T00:00:00"
        assert [m.metadata.message_id for m in state.get_message_ins(1, None)] == [ids[0]]
        assert state.get_message_ins(1, None) == []  # delivered once only
        assert [m.metadata.message_id for m in state.get_message_ins(2, None)] == [ids[3]]
        assert state.__dict__[om.INDEX] == {}  # nothing left behind for any node


@pytest.mark.usefixtures("plain_store")
def test_a_node_that_never_pulls_again_leaves_no_ids_behind() -> None:
    """A device gone for good: the ServerApp's replies-read deletes its messages each round,
    it never pulls, and the lists still stay within twice the store plus the floor."""
    with om.pulls_find_own_messages() as on:
        assert on
        state = link_state()
        _checked_by_stub(state, expired=set())
        rounds, gone, live = 60, 50, 50  # node 1 is gone; nodes 2.. pull theirs each round
        per_round = gone + live
        largest = 0
        for r in range(rounds):
            layout = [(1, 7)] * gone + [(2 + i, 7) for i in range(live)]
            ids = [
                state.store_message_ins(train_message(7, node, f"r{r}m{i}"))
                for i, (node, _) in enumerate(layout)
            ]
            for node in range(2, 2 + live):
                assert len(state.get_message_ins(node, None)) == 1
            state.delete_messages(set(ids))  # what reading the round's replies does
            largest = max(largest, sum(len(v) for v in state.__dict__[om.INDEX].values()))
        assert largest <= 2 * per_round + om.SWEEP_FLOOR
        assert set(state.__dict__[om.INDEX]) <= {1}
        assert rounds * gone > 2 * (2 * per_round + om.SWEEP_FLOOR)  # unswept, it would fail
        # What node 1 would still get, were it to pull: nothing (all deleted), as in Flower.
        assert state.get_message_ins(1, None) == []
        assert state.__dict__[om.INDEX] == {}


def test_flowers_real_store_and_check_inside_the_block() -> None:
    """Flower's own ``store_message_ins`` and ``_check_stored_messages`` (its run, node and
    federation checks included): a message it refuses is not listed, one it stores is
    pulled once, by its node only."""
    from flwr.supercore.constant import NOOP_FEDERATION_ID

    with om.pulls_find_own_messages() as on:
        assert on
        state = link_state()
        run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, "x")
        node, other = (state.create_node("aid", "n", key, 30.0) for key in (b"k1", b"k2"))
        assert state.activate_node(node, 30.0) and state.activate_node(other, 30.0)
        refused = train_message(run_id + 1, node, ttl=60.0)  # no such run
        assert state.store_message_ins(refused) is None
        assert state.__dict__.get(om.INDEX, {}) == {}
        stored = state.store_message_ins(train_message(run_id, node, ttl=60.0))
        assert stored is not None
        assert state.get_message_ins(other, None) == []
        assert [m.metadata.message_id for m in state.get_message_ins(node, None)] == [stored]
        assert state.get_message_ins(node, None) == []


@pytest.mark.parametrize("method", ["store_message_ins", "get_message_ins"])
def test_a_changed_method_falls_back_to_flowers_pair(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    caplog.set_level(logging.WARNING, logger="pollinate.flower_compat")

    def changed(self: Any, other: Any) -> None:
        return None

    monkeypatch.setattr(STATE, method, changed)
    stock = (STATE.store_message_ins, STATE.get_message_ins)
    with om.pulls_find_own_messages() as on:
        assert not on
        assert (STATE.store_message_ins, STATE.get_message_ins) == stock  # neither replaced
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and method in warnings[0]


@pytest.mark.parametrize("full_scan", [False, True])
def test_the_launcher_applies_it_with_the_state_in_memory_only(
    monkeypatch: pytest.MonkeyPatch, full_scan: bool
) -> None:
    from pollinate.deploy import server, superlink

    if full_scan:
        monkeypatch.setenv("POLLINATE_FULL_SCAN_PULLS", "1")
    else:
        monkeypatch.delenv("POLLINATE_FULL_SCAN_PULLS", raising=False)
    with superlink.patched_flower():  # the state database
        assert om.PULL not in fc.active_patches()
    with superlink.patched_flower(["--database", server.MEMORY_STATE]):
        assert (om.PULL in fc.active_patches()) is not full_scan
