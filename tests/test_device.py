"""simulation.device = auto | cpu | cuda on any machine (GPU-only checks: tests/test_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from runhelp import QUICKSTART, quickstart_rounds

from pollinate import config, device
from pollinate.cli import main
from pollinate.client.ondevice import DeviceData

NO_GPU = "this machine has a CUDA GPU: the CPU-only behaviour cannot be seen here"
ON_CPU_ONLY = pytest.mark.skipif(device.cuda_available(), reason=NO_GPU)


def test_the_config_choices_are_the_device_module_s() -> None:
    assert config.DEVICES == device.DEVICES
    assert config.resolve({}).simulation.device == "auto"
    with pytest.raises(config.ConfigError, match="choose one of: auto, cpu, cuda"):
        config.resolve({"simulation.device": "tpu"})


@ON_CPU_ONLY
def test_auto_is_cpu_and_cuda_is_refused_with_the_fix() -> None:
    assert device.resolve_device("auto") == "cpu"
    assert device.resolve_device("cpu") == "cpu"
    with pytest.raises(device.DeviceUnavailable) as info:
        device.resolve_device("cuda")
    assert "\n" not in str(info.value) and "set it to 'cpu' or 'auto'" in str(info.value)


@ON_CPU_ONLY
def test_pollinate_run_with_cuda_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["run", QUICKSTART, "--run-dir", str(tmp_path / "r"), "--set", "simulation.device=cuda"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "simulation.device = 'cuda'" in err and "set it to 'cpu' or 'auto'" in err
    assert not (tmp_path / "r").exists()  # refused before anything ran


@ON_CPU_ONLY
def test_node_start_with_cuda_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "u.csv"
    data.write_text("user,f1,label\nu,1.0,0\nu,2.0,1\n")
    code = main(
        ["node", "start", "--server", "127.0.0.1:9", "--data", str(data), "--insecure",
         "--device", "cuda", "--state-dir", str(tmp_path / "state"), "--serve", "none"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.endswith("set it to 'cpu' or 'auto'")


def test_a_cpu_build_resolves_auto_without_importing_torch() -> None:
    """The driver resolves the device before its fork server starts: no torch import (the
    fork server's import overlaps the driver's), and never a CUDA context."""
    code = (
        "import sys; from pollinate.device import resolve_device, torch_cuda_build;"
        "d = resolve_device('auto'); print(d, 'torch' in sys.modules, torch_cuda_build())"
    )
    env = {k: v for k, v in os.environ.items() if k != device.NVML_CHECK_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    import torch

    if torch.version.cuda is None:
        assert out == ["cpu", "False", "None"]
    else:  # a CUDA build: torch is imported, but only NVML is asked
        assert out[2] == torch.version.cuda


@pytest.mark.skipif(
    device.torch_cuda_build() is None, reason="a CPU build of torch never asks the GPU"
)
def test_the_nvml_check_is_what_a_cuda_build_asks() -> None:
    """torch's own availability check is the NVML one once ours ran (no cuInit, no fork
    poisoning), in this process and in the processes it starts."""
    device.cuda_available()
    import torch

    assert os.environ[device.NVML_CHECK_ENV] == "1"
    assert torch.cuda._nvml_based_avail()


def test_device_data_is_bounded_least_recently_used() -> None:
    rng = np.random.default_rng(0)
    users = [
        (rng.normal(size=(50, 4)).astype(np.float32), np.zeros(50, np.int64)) for _ in range(5)
    ]
    each = users[0][0].nbytes + users[0][1].nbytes
    cache = DeviceData(max_bytes=3 * each)
    for x, y in users:
        xt, yt = cache.tensors(x, y, "cpu")
        assert np.array_equal(xt.numpy(), x) and np.array_equal(yt.numpy(), y)
    assert len(cache) == 3 and cache.bytes == 3 * each  # the two oldest are gone
    again = cache.tensors(*users[4], "cpu")[0]
    assert again is cache.tensors(*users[4], "cpu")[0]  # kept: the same tensor, not a copy
    cache.tensors(*users[2], "cpu")  # 2 is now the newest: 3 goes next
    cache.tensors(*users[0], "cpu")
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    assert cache.tensors(*users[2], "cpu")[0] is cache.tensors(*users[2], "cpu")[0]
    big = DeviceData(max_bytes=each - 1)  # too big to keep: copied, never cached
    big.tensors(*users[0], "cpu")
    assert len(big) == 0 and big.bytes == 0


@ON_CPU_ONLY
def test_a_run_on_cpu_equals_the_default_run(tmp_path: Path) -> None:
    """device = cpu is what auto is here; the config records the resolved device."""
    sets = ["data.num-users=6", "run.num-rounds=2", "model.name=logreg", "train.stack-users=3"]
    runs = quickstart_rounds(tmp_path, ("auto", "cpu"), sets)
    for _, recorded in runs.values():
        assert recorded.simulation.device == device.resolve_device("auto")
    rounds = {name: frame for name, (frame, _) in runs.items()}
    cols = ["global_accuracy", "personal_accuracy", "server_accuracy", "train_loss"]
    cols = [c for c in cols if c in rounds["cpu"]]
    # Equal up to the order in which the server sums the nodes' replies (float64).
    pd.testing.assert_frame_equal(rounds["auto"][cols], rounds["cpu"][cols], rtol=1e-9)


def test_a_node_s_own_device_overrides_the_run_s() -> None:
    from pollinate import protocol
    from pollinate.client.ondevice import node_device

    node = protocol.device_node_config("/d.csv", "/m", device="cpu")
    assert protocol.read_node_config(node).device == "cpu"
    on_gpu = config.resolve({"simulation.device": "cuda"})
    assert node_device(on_gpu, node) == "cpu"  # the device's own choice wins
    simulated = protocol.simulated_node_config(0, 2)
    assert node_device(config.resolve({}), simulated) == device.resolve_device("auto")
    if not device.cuda_available():  # the run's `cuda` on a node without a GPU: one line
        with pytest.raises(config.ConfigError, match="this node's device = 'cuda'"):
            node_device(on_gpu, simulated)
