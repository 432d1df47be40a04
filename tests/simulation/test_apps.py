"""The generic engine: any Flower app pair, from Python and from the CLI; each patch engages.

``quickstart_app`` is a Flower user's app (plain FedAvg, one node per user, nothing of
Pollinate); ``toyapps`` reports which process ran each ClientApp call.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import quickstart_app
import torch
import toyapps

import pollinate.flower_compat as fc
from pollinate.flower_compat import inmemory_grid, runtime, vce
from pollinate.flower_compat.identity import task_identity
from pollinate.simulation.apps import (
    GRID_POLL,
    AppError,
    load_app,
    parse_run_config,
    reference_of,
    run_apps,
)

HERE = Path(__file__).parent
NODES, ROUNDS = 3, 2
# Messages of a quickstart run: a train and an evaluate message per node per round.
MESSAGES = NODES * ROUNDS * 2


def _engaged_during(run: Any) -> Counter[str]:
    before = Counter(fc.engaged)
    run()
    after = Counter(fc.engaged)
    after.subtract(before)
    return +after


@pytest.fixture(scope="module")
def quickstart_run() -> tuple[dict[str, Any], Counter[str]]:
    """One quickstart run on the local backend: its result and what each patch counted."""
    quickstart_app.RESULTS.clear()
    with task_identity(run_id=1, task_id=1, node_id=1):  # conftest's is function-scoped
        counts = _engaged_during(
            lambda: run_apps(
                quickstart_app.server_app,
                quickstart_app.app,
                num_nodes=NODES,
                run_config={"num-server-rounds": ROUNDS, "lr": 0.5},
            )
        )
    return quickstart_app.RESULTS[-1], counts


def test_a_quickstart_app_trains_on_the_local_backend(
    quickstart_run: tuple[dict[str, Any], Counter[str]],
) -> None:
    result, _ = quickstart_run
    assert result["nodes"] == NODES and sorted(result["eval"]) == [1, 2]
    first, last = result["train"][1], result["train"][ROUNDS]
    assert last["train_loss"] < first["train_loss"]  # rounds build on each other
    assert result["eval"][ROUNDS]["eval_acc"] > 0.9  # chance is 1/3
    changed = [not torch.equal(result["initial"][k], result["final"][k]) for k in result["final"]]
    assert all(changed)
    # The run config reached the ServerApp and every node (averaged 1.0 over the nodes).
    assert result["run_config"] == {"num-server-rounds": ROUNDS, "lr": 0.5}
    assert first["has-run-config"] == 1.0


def test_every_patch_engaged_in_the_run_and_none_is_left(
    quickstart_run: tuple[dict[str, Any], Counter[str]],
) -> None:
    _, counts = quickstart_run
    assert counts[runtime.RUN_SIMULATION] == 1
    assert counts[vce.RUN_API] == 1  # the local backend replaced Ray's
    assert counts[vce.LOCAL_MESSAGE] == MESSAGES  # every message ran in the worker pool
    assert counts[inmemory_grid.IN_MEMORY_GRID] == 1  # the ServerApp's grid polls fast
    assert counts[inmemory_grid.ALL_NODES] == 1  # and listed its nodes once all were there
    assert counts[vce.SCAN] == 1 and counts[vce.SCAN_WAIT] > MESSAGES  # the short scan wait
    # The doorbells: pushes woke the scan and stored replies ended the grid's waits (at
    # most once per message: a ring is taken by the one wait it ends; a ring that comes
    # as a wait ends by itself is not counted, the look that follows sees the work).
    assert 1 <= counts[vce.SCAN_RUNG] <= ROUNDS * 2
    assert 1 <= counts[inmemory_grid.REPLY_WAIT] <= MESSAGES
    assert counts[vce.WORKER] >= 1 and counts[vce.INJECT] == 1
    assert counts[vce.STOP_WAIT] > 0
    assert fc.active_patches() == ()


def test_the_local_backend_runs_the_client_apps_in_worker_processes_not_ray() -> None:
    toyapps.REPLY_PIDS.clear()
    toyapps.GRID_POLLS.clear()
    counts = _engaged_during(lambda: run_apps(toyapps.server_app, toyapps.app, num_nodes=2))
    assert len(toyapps.REPLY_PIDS) == 2 and os.getpid() not in toyapps.REPLY_PIDS
    assert toyapps.GRID_POLLS == [GRID_POLL]  # the fast poll reached the ServerApp's grid
    assert counts[vce.LOCAL_MESSAGE] == 2
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized()


def test_a_bad_reference_is_one_line() -> None:
    for ref, match in [
        ("no_colon", "not 'module:attribute'"),
        ("no_such_module_xyz:app", "cannot import"),
        ("quickstart_app:nothing", "has no 'nothing'"),
        ("quickstart_app:server_app", "is a ServerApp, not a flwr ClientApp"),
    ]:
        with pytest.raises(AppError, match=match) as err:
            load_app(ref, "ClientApp")
        assert "\n" not in str(err.value)


def test_run_config_items_are_toml_values() -> None:
    assert parse_run_config(["lr=0.1", "n=3", "flag=true", "name=abc", 'q="x y"']) == {
        "lr": 0.1,
        "n": 3,
        "flag": True,
        "name": "abc",
        "q": "x y",
    }
    with pytest.raises(AppError, match="not key=value"):
        parse_run_config(["lr"])


def test_an_app_is_found_by_its_module_name() -> None:
    assert reference_of(quickstart_app.app) == "quickstart_app:app"
    assert reference_of(object()) is None


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pollinate", "simulate-app", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_the_cli_runs_a_quickstart_app(tmp_path: Path) -> None:
    out = tmp_path / "result.pt"
    done = _cli(
        "quickstart_app:server_app",
        "quickstart_app:app",
        "--nodes",
        str(NODES),
        "--app-dir",
        str(HERE),
        "--run-config",
        f"num-server-rounds={ROUNDS}",
        "--run-config",
        f"out={out}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = torch.load(out, weights_only=False)
    assert result["nodes"] == NODES and sorted(result["eval"]) == list(range(1, ROUNDS + 1))
    assert result["train"][ROUNDS]["train_loss"] < result["train"][1]["train_loss"]


def test_the_cli_says_a_bad_reference_in_one_line_exit_2(tmp_path: Path) -> None:
    done = _cli(
        "quickstart_app:nope",
        "quickstart_app:app",
        "--nodes",
        "2",
        "--app-dir",
        str(HERE),
        cwd=tmp_path,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no 'nope'" in lines[0]


@pytest.mark.slow
def test_the_quickstart_app_gives_flowers_own_result() -> None:
    """The same app on Flower's public ``run_simulation`` (Ray) ends with the same model."""
    from flwr.simulation import run_simulation

    quickstart_app.RESULTS.clear()
    run_apps(quickstart_app.server_app, quickstart_app.app, num_nodes=NODES)
    ours = quickstart_app.RESULTS[-1]
    run_simulation(
        server_app=quickstart_app.server_app,
        client_app=quickstart_app.app,
        num_supernodes=NODES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    flowers = quickstart_app.RESULTS[-1]
    assert ours is not flowers
    for key, value in flowers["final"].items():
        torch.testing.assert_close(ours["final"][key], value, rtol=0, atol=1e-6)
    assert ours["eval"][ROUNDS]["eval_acc"] == pytest.approx(flowers["eval"][ROUNDS]["eval_acc"])


@pytest.mark.slow
def test_the_quickstart_app_runs_on_ray_too() -> None:
    quickstart_app.RESULTS.clear()
    run_apps(
        quickstart_app.server_app,
        quickstart_app.app,
        num_nodes=NODES,
        backend="ray",
        run_config={"lr": 0.5},
    )
    result = quickstart_app.RESULTS[-1]
    assert result["train"][1]["has-run-config"] == 1.0
    assert fc.active_patches() == ()
