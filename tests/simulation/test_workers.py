"""The local backend: worker processes that run a ClientApp, and runs on them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from simhelpers import final_weights, small_config

from pollinate.config import ConfigError, resolve
from pollinate.flower_compat.clientapp import ClientAppException
from pollinate.simulation.engine import engine_backend, run_simulation
from pollinate.simulation.workers import WorkerPool

TOY_APP = "toyapps:app"


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    workers = WorkerPool(2, TOY_APP)
    yield workers
    workers.close()


def message(mode: str) -> Message:
    return Message(
        RecordDict({"config": ConfigRecord({"mode": mode})}), dst_node_id=7, message_type="train"
    )


def context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_worker_runs_the_client_app_and_returns_the_updated_context(pool: WorkerPool) -> None:
    reply, ctx = pool.run(message("count"), context())
    reply, ctx = pool.run(message("count"), ctx)
    assert reply.content["metrics"]["seen"] == 2  # the node's state went there and back
    assert reply.content["metrics"]["pid"] in pool.pids()
    assert reply.metadata.reply_to_message_id == message("count").metadata.reply_to_message_id


def test_messages_run_in_parallel_on_different_workers(pool: WorkerPool) -> None:
    pids: list[int] = []
    barrier = threading.Barrier(2)

    def call() -> None:
        barrier.wait()
        reply, _ = pool.run(message("count"), context())
        pids.append(int(reply.content["metrics"]["pid"]))  # type: ignore[arg-type]

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pids) == 2 and set(pids) <= set(pool.pids())


def test_a_client_app_error_comes_back_as_flowers_exception(pool: WorkerPool) -> None:
    before = pool.pids()
    with pytest.raises(ClientAppException, match="ValueError: bad user data in row 3"):
        pool.run(message("raise"), context())
    assert pool.pids() == before  # the worker survives its ClientApp's exception
    reply, _ = pool.run(message("count"), context())
    assert reply.content["metrics"]["seen"] == 1


def test_a_dead_worker_is_reported_and_replaced(pool: WorkerPool) -> None:
    before = set(pool.pids())
    with pytest.raises(ClientAppException, match="exit code 3"):
        pool.run(message("die"), context())
    after = set(pool.pids())
    assert len(after) == 2 and len(after - before) == 1
    for _ in range(4):  # every worker, the new one included, still serves
        reply, _ = pool.run(message("count"), context())
        assert reply.content["metrics"]["pid"] in after


def test_close_stops_every_worker() -> None:
    workers = WorkerPool(2, TOY_APP)
    pids = workers.pids()
    workers.close()
    assert not any(alive(pid) for pid in pids)


def test_auto_picks_ray_only_for_a_cluster_address(tmp_path: Path) -> None:
    assert engine_backend(small_config(tmp_path)) == "local"
    ray_cfg = small_config(tmp_path, **{"simulation.ray-address": "10.0.0.1:6379"})
    assert engine_backend(ray_cfg) == "ray"
    with pytest.raises(ConfigError, match=r"simulation\.backend = 'ray'"):
        small_config(tmp_path, **{"simulation.backend": "local", "simulation.ray-address": "h:1"})
    with pytest.raises(ConfigError, match="did you mean 'local'"):
        small_config(tmp_path, **{"simulation.backend": "locale"})


def test_local_and_ray_backends_give_the_same_model(tmp_path: Path) -> None:
    overrides = {"strategy.fraction-train": 0.5, "simulation.num-nodes": 2}
    local = run_simulation(small_config(tmp_path / "local", **overrides))
    ray = run_simulation(
        small_config(tmp_path / "ray", **overrides, **{"simulation.backend": "ray"})
    )
    a, b = final_weights(local), final_weights(ray)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same ClientApp, same numbers


def test_a_script_without_a_main_guard_runs_once(tmp_path: Path) -> None:
    # Worker processes must not re-run the caller's script (multiprocessing's default).
    cfg = small_config(tmp_path / "run")
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from pollinate.config import resolve
            from pollinate.simulation.engine import run_simulation

            print("starting", flush=True)
            run_simulation(resolve({cfg.to_flat()!r}))
            print("finished", flush=True)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["starting", "finished"]
    assert (tmp_path / "run" / "models" / "global.pt").exists()


def test_resolve_keeps_backend_key() -> None:
    assert resolve({"simulation.backend": "ray"}).simulation.backend == "ray"


def test_a_client_app_that_cannot_load_is_reported_on_every_message() -> None:
    workers = WorkerPool(1, "no_such_module:app")
    try:
        pids = workers.pids()
        for _ in range(2):
            with pytest.raises(ClientAppException, match="could not load the ClientApp"):
                workers.run(message("count"), context())
        assert workers.pids() == pids  # the worker reports; it is not restarted in a loop
    finally:
        workers.close()
