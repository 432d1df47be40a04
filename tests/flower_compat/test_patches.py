"""Each patch of Flower: a changed signature is caught (error or warned stock fallback),
and every patch is undone. The patches engaging in a real run: tests/simulation/test_apps.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from queue import Empty, Queue
from typing import Any, cast

import pytest
from flwr.server.superlink.fleet.vce import vce_api
from flwr.superlink.grid import http_grid

import pollinate.flower_compat as fc
from pollinate.flower_compat import _core, inmemory_grid, runtime, vce
from pollinate.flower_compat import http_grid as compat_http
from pollinate.flower_compat.doorbell import Doorbell
from pollinate.flower_compat.identity import task_identity, task_identity_kept


@pytest.fixture(autouse=True)
def fresh_warnings() -> Iterator[None]:
    """Each test sees the once-per-process fallback warnings afresh."""
    saved = set(_core._warned)
    _core._warned.clear()
    yield
    _core._warned.clear()
    _core._warned.update(saved)


def _changed(*params: str) -> Any:
    """A stand-in for a Flower function whose signature changed in a release."""
    namespace: dict[str, Any] = {}
    exec(f"def changed({', '.join(params)}): return None", namespace)
    return namespace["changed"]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pollinate.flower_compat"]


class _Pool:
    size = 1

    def has_idle(self) -> bool:
        return True

    def run(self, message: Any, context: Any) -> Any:
        return message, context

    def close(self) -> None:
        pass


def test_local_backend_refuses_a_changed_run_api_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vce_api, "run_api", _changed("app_fn", "backend_fn", "nodes"))
    with pytest.raises(fc.FlowerIncompatible) as err, vce.local_backend(_Pool()):
        pass
    message = str(err.value)
    assert "\n" not in message and fc.SUPPORTED_RANGE in message and "run_api" in message
    assert "ray backend" in message  # the way out


def test_local_backend_is_in_force_inside_and_undone_after() -> None:
    stock = vce_api.run_api
    with vce.local_backend(_Pool()):
        assert vce_api.run_api is not stock and vce.RUN_API in fc.active_patches()
    assert vce_api.run_api is stock and fc.active_patches() == ()


@pytest.mark.parametrize(
    ("patch", "attr", "owner"),
    [
        (lambda: vce.prompt_delivery(0.005), "add_messages_to_queue", vce_api),
        (lambda: vce.prompt_stop(0.02), "worker", vce_api),
        (lambda: vce.prompt_stop(0.02), "put_message_into_state", vce_api),
        (lambda: inmemory_grid.fast_in_memory_poll(0.005), "InMemoryGrid", inmemory_grid._runtime),
        (
            lambda: compat_http.guarded_object_pull(lambda f, *a, **k: f(*a, **k)),
            "pull_objects",
            http_grid,
        ),
    ],
)
def test_a_changed_signature_falls_back_to_stock_flower_with_one_warning(
    patch: Any,
    attr: str,
    owner: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    changed = _changed("state", "queue", "new_argument")
    monkeypatch.setattr(owner, attr, changed)
    caplog.set_level(logging.WARNING, logger="pollinate.flower_compat")
    for _ in range(2):
        with patch() as applied:
            assert applied is False
            assert getattr(owner, attr) is changed  # Flower's own, untouched
            assert fc.active_patches() == ()
    said = _warnings(caplog)
    assert len(said) == 1 and "\n" not in said[0]
    assert attr in said[0] and fc.SUPPORTED_RANGE in said[0] and "stock Flower" in said[0]


@pytest.mark.parametrize(
    ("patch", "names"),
    [
        (lambda: vce.prompt_delivery(0.005), ["add_messages_to_queue"]),
        (lambda: vce.prompt_stop(0.02), ["worker", "put_message_into_state"]),
    ],
)
def test_engine_patches_are_undone_even_when_the_run_fails(patch: Any, names: list[str]) -> None:
    stock = {n: getattr(vce_api, n) for n in names}
    with pytest.raises(RuntimeError), patch() as applied:
        assert applied and all(getattr(vce_api, n) is not stock[n] for n in names)
        raise RuntimeError("the run failed")
    assert all(getattr(vce_api, n) is stock[n] for n in names) and fc.active_patches() == ()


def test_the_prompt_scan_runs_flowers_scan_with_the_short_wait() -> None:
    class Recorded(threading.Event):
        """The run's stop event; records how long each wait between scans is, stops at 3."""

        def __init__(self) -> None:
            super().__init__()
            self.waits: list[float | None] = []

        def wait(self, timeout: float | None = None) -> bool:
            self.waits.append(timeout)
            if len(self.waits) >= 3:
                self.set()
            return super().wait(0)

    stop = Recorded()
    before = fc.engaged[vce.SCAN_WAIT]
    with vce.prompt_delivery(0.005):
        # Flower's own scan over no nodes: only its waits between scans run.
        vce_api.add_messages_to_queue(None, Queue(), {}, stop)  # type: ignore[arg-type]
    assert stop.waits == [0.005] * 3  # Flower's scan asks for 0.1 s; the patch shortens it
    assert fc.engaged[vce.SCAN_WAIT] - before == 3


def test_the_engine_queues_give_up_waiting_once_the_run_stops() -> None:
    stop = threading.Event()
    queue: Queue[int] = Queue()
    waiting = vce._StopAwareQueue(queue, stop, 0.02)
    queue.put(1)
    assert waiting.get(timeout=1.0) == 1
    with pytest.raises(Empty):
        waiting.get(timeout=0.05)  # nothing came: Empty, as queue.Queue would raise
    threading.Timer(0.1, stop.set).start()
    outcome: list[str] = []

    def wait() -> None:
        try:
            waiting.get(timeout=600.0)  # Flower's threads wait like this between messages
        except Empty:
            outcome.append("stopped")

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(30.0)  # a generous bound: it gives up ~20 ms after the stop, not at 600 s
    assert outcome == ["stopped"]
    queue.put(2)
    assert waiting.get(timeout=1.0) == 2  # what is already queued is still handed out


def test_the_guarded_pull_wraps_flowers_download_for_the_block_only() -> None:
    stock = http_grid.pull_objects
    calls: list[dict[str, Any]] = []

    def wrapper(flower_pull: Any, ids: list[str], pull_object_fn: Any, **kw: Any) -> Any:
        calls.append(kw)
        return flower_pull(ids, pull_object_fn, initial_backoff=0.01, **kw)

    tries: list[str] = []

    def pull_one(object_id: str) -> bytes:
        tries.append(object_id)
        if len(tries) < 3:
            raise compat_http.ObjectUnavailableError(object_id)
        return b"arrays"

    before = fc.engaged[compat_http.PULL_OBJECTS]
    with compat_http.guarded_object_pull(wrapper) as applied:
        assert applied
        got = http_grid.pull_objects(["a"], pull_object_fn=pull_one, max_time=5)
    assert got == {"a": b"arrays"} and len(tries) == 3  # Flower's retry loop, ours in it
    assert calls == [{"max_time": 5}] and fc.engaged[compat_http.PULL_OBJECTS] == before + 1
    assert http_grid.pull_objects is stock


def test_the_runtime_refuses_a_changed_engine_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        runtime._runtime, "_run_simulation", _changed("num_supernodes", "client_app")
    )
    with pytest.raises(fc.FlowerIncompatible) as err:
        runtime.run_runtime(
            cast(Any, None),
            cast(Any, None),
            num_nodes=1,
            backend_name="local",
            backend_config={},
            run_config={},
        )
    assert "\n" not in str(err.value) and "_run_simulation" in str(err.value)


def test_task_identity_is_restored() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    with task_identity(run_id=7, task_id=8, node_id=9):
        assert (TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id) == (7, 8, 9)
        with task_identity_kept():
            TaskIdentity.run_id = 99  # as Flower's runtime does, for the whole process
        assert TaskIdentity.run_id == 7
    assert TaskIdentity.run_id == 1  # conftest's


def test_a_doorbell_ends_a_wait_early_and_is_kept_until_one_wait_takes_it() -> None:
    bell = Doorbell("test:bell")
    before = fc.engaged["test:bell"]
    assert bell.wait(0.01) is False  # not rung: the whole (short) wait, then False
    bell.ring()  # rung while nobody waits: the next wait returns at once ...
    assert bell.wait(600.0) is True
    assert bell.wait(0.01) is False  # ... and only that one
    woken: list[bool] = []
    waiter = threading.Thread(target=lambda: woken.append(bell.wait(600.0)), daemon=True)
    waiter.start()
    bell.ring()
    waiter.join(30.0)  # the ring ends a 600 s wait
    assert woken == [True] and fc.engaged["test:bell"] - before == 2


def test_the_reply_injector_rings_after_flowers_state_stored_the_reply() -> None:
    stored: list[str] = []
    bell = Doorbell("test:replied")

    class State:
        rung_before_store = False

        def store_message_res(self, message: str) -> str:
            State.rung_before_store = bell.wait(0)
            stored.append(message)
            return "id"

        def other(self) -> str:
            return "passed through"

    seen = vce._Ringing(State(), bell)
    assert seen.store_message_res("reply") == "id" and stored == ["reply"]  # type: ignore[arg-type]
    assert not State.rung_before_store and bell.wait(0)  # rung after the store, not before
    assert seen.other() == "passed through"


def test_the_scan_wakes_when_the_grid_rings_and_still_sees_a_stop() -> None:
    bell = Doorbell("test:sent")
    stop = threading.Event()
    hurried = vce._Hurried(stop, 600.0, bell)  # a poll so long only a ring can end a wait
    woken: list[bool] = []
    waiter = threading.Thread(target=lambda: woken.append(hurried.wait(0.1)), daemon=True)
    waiter.start()
    waiter.join(30.0)
    assert woken == [False]  # Flower's own 0.1 s bound still holds
    waiter = threading.Thread(target=lambda: woken.append(hurried.wait(600.0)), daemon=True)
    waiter.start()
    stop.set()
    bell.ring()
    waiter.join(30.0)
    assert woken == [False, True]  # woken by the ring; it reports the stop Flower checks


@pytest.mark.parametrize("method", ["send_and_receive", "push_messages", "pull_messages"])
def test_a_changed_grid_method_keeps_the_fast_poll_without_doorbells(
    method: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    flower_grid = inmemory_grid._runtime.InMemoryGrid
    monkeypatch.setattr(flower_grid, method, _changed("self", "messages", "new_argument"))
    caplog.set_level(logging.WARNING, logger="pollinate.flower_compat")
    sent, replied = Doorbell("test:sent"), Doorbell("test:replied")
    with inmemory_grid.fast_in_memory_poll(0.005, sent=sent, replied=replied) as applied:
        assert applied  # the short poll and the node wait still apply
        built = inmemory_grid._runtime.InMemoryGrid
        assert built is not flower_grid
        # Flower's own push / pull / send-and-receive, not the doorbells' versions:
        assert all(getattr(built, m) is getattr(flower_grid, m) for m in inmemory_grid.RUNG)
    said = _warnings(caplog)
    assert len(said) == 1 and "\n" not in said[0]
    assert method in said[0] and fc.SUPPORTED_RANGE in said[0] and "stock Flower" in said[0]
