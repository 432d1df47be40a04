"""On a CUDA GPU: training, evaluation and a small simulation give the CPU's results.

Skipped (with the reason) where torch sees no GPU: every machine without one, and any CPU
build of torch. ``benchmarks/gpu_check.sh`` runs this file on a GPU machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from runhelp import quickstart_rounds

from pollinate import config
from pollinate.client.ondevice import DeviceData
from pollinate.client.steps import RoundContext, Workbench, evaluate_users, train_users
from pollinate.client.store import ModelStore
from pollinate.data import UserData
from pollinate.device import cuda_available
from pollinate.models import available_models, create_model, head_keys, train
from pollinate.models.batched import StackedUser, train_stacked
from pollinate.models.train import TrainConfig

pytestmark = pytest.mark.skipif(
    not cuda_available(), reason="no CUDA GPU here (or a CPU-only build of torch)"
)

# float32 in another summation order (and other kernels) over a few dozen SGD steps.
ATOL = 1e-4
IN_FEATURES, NUM_CLASSES = 64, 10  # 8x8: the CNN's shape too


@pytest.fixture(autouse=True)
def exact_float32() -> Iterator[None]:
    """cuDNN's convolutions default to TF32 (10-bit mantissa): compare in true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _data(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(n, IN_FEATURES, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))
        for n in sizes
    ]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].cpu() - b[k].cpu()).abs().max()) for k in a)


@pytest.mark.parametrize("name", available_models())
def test_per_user_training_on_cuda_equals_cpu(name: str) -> None:
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.5, proximal_mu=0.1)
    (x, y) = _data([37])[0]
    out = {}
    for dev in ("cpu", "cuda"):
        model = create_model(name, in_features=IN_FEATURES, num_classes=NUM_CLASSES, seed=0)
        model.to(dev)
        anchor = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stats = train(
            model,
            x.to(dev),
            y.to(dev),
            cfg,
            anchor=anchor,
            generator=torch.Generator().manual_seed(7),
        )
        assert all(p.device.type == dev for p in model.parameters())
        out[dev] = (dict(model.state_dict()), stats)
    (w_cpu, s_cpu), (w_gpu, s_gpu) = out["cpu"], out["cuda"]
    assert s_cpu.steps == s_gpu.steps and s_gpu.loss == pytest.approx(s_cpu.loss, abs=1e-5)
    assert _close(w_cpu, w_gpu) <= ATOL


@pytest.mark.parametrize("head_only", [False, True])
@pytest.mark.parametrize("name", available_models())
def test_stacked_training_on_cuda_equals_cpu(name: str, head_only: bool) -> None:
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.5)
    data = _data([21, 8, 3, 13])
    results = {}
    for dev in ("cpu", "cuda"):
        model = create_model(name, in_features=IN_FEATURES, num_classes=NUM_CLASSES, seed=0)
        model.to(dev)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        users = [
            StackedUser(
                x=x.to(dev),
                y=y.to(dev),
                start=start,
                epochs=[2, 1, 2, 0][i],
                generator=torch.Generator().manual_seed(100 + i),
            )
            for i, (x, y) in enumerate(data)
        ]
        results[dev] = train_stacked(
            model, users, cfg, parameters=head_keys(model) if head_only else None
        )
    for (w_cpu, s_cpu), (w_gpu, s_gpu) in zip(results["cpu"], results["cuda"], strict=True):
        assert all(v.device.type == "cuda" for v in w_gpu.values())
        assert (s_cpu.num_examples, s_cpu.steps) == (s_gpu.num_examples, s_gpu.steps)
        assert _close(w_cpu, w_gpu) <= ATOL


def _cohort() -> list[UserData]:
    users = []
    for i in range(5):
        rng = np.random.default_rng(i)
        n = 20 + 12 * i
        x = rng.normal(size=(n, 6)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0).astype(np.int64)
        users.append(UserData(f"u-{i}", x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :]))
    return users


@pytest.mark.parametrize("method", ["none", "finetune", "fedper", "ditto"])
@pytest.mark.parametrize("stack", [0, 3])
def test_a_round_on_cuda_equals_cpu(tmp_path: Path, method: str, stack: int) -> None:
    """A node's round (training, then evaluation with personalization) on the GPU: the
    updates and metrics the CPU gives, and the updates back on the CPU only at the end."""
    cfg = config.resolve(
        {
            "personalization.method": method,
            "model.name": "mlp",
            "train.epochs": 2,
            "train.batch-size": 8,
            "train.stack-users": stack,
        }
    )
    model = create_model("mlp", in_features=6, num_classes=4, seed=0)
    out = {}
    for dev in ("cpu", "cuda"):
        ctx = RoundContext(
            cfg=cfg,
            spec=model.spec,
            global_weights={k: v.to(dev) for k, v in model.state_dict().items()},
            server_round=1,
            store=ModelStore(tmp_path / dev),
            device=dev,
        )
        bench = Workbench()
        trained = list(train_users(bench, ctx, _cohort()))
        assert all(v.device.type == dev for _, update, _ in trained for v in update.values())
        evaluated = list(evaluate_users(bench, ctx, _cohort()))
        out[dev] = (trained, evaluated)
    for (_, w1, m1), (_, w2, m2) in zip(out["cpu"][0], out["cuda"][0], strict=True):
        assert m2["train-loss"] == pytest.approx(m1["train-loss"], abs=1e-5)
        assert _close(w1, w2) <= ATOL
    for (_, e1), (_, e2) in zip(out["cpu"][1], out["cuda"][1], strict=True):
        assert e2 == pytest.approx(e1, abs=1e-4)


def test_users_data_stays_on_the_gpu() -> None:
    cache = DeviceData(max_bytes=1 << 20)
    x, y = np.ones((10, 3), np.float32), np.zeros(10, np.int64)
    xt, yt = cache.tensors(x, y, "cuda")
    assert xt.device.type == yt.device.type == "cuda"
    assert cache.tensors(x, y, "cuda")[0] is xt  # no second host-to-device copy
    assert cache.bytes == x.nbytes + y.nbytes


def test_a_simulation_on_cuda_matches_the_cpu_run(tmp_path: Path) -> None:
    """Several worker processes share the GPU (forked from a fork server with no CUDA
    context); the run records the device and ends where the CPU run ends."""
    sets = ["data.num-users=8", "run.num-rounds=3", "simulation.num-nodes=4"]
    runs = quickstart_rounds(tmp_path, ("cpu", "cuda"), sets)
    for dev, (_, recorded) in runs.items():
        assert recorded.simulation.device == dev
    rounds = {dev: frame for dev, (frame, _) in runs.items()}
    last_cpu, last_gpu = rounds["cpu"].iloc[-1], rounds["cuda"].iloc[-1]
    for col in ("global_accuracy", "personal_accuracy", "server_accuracy"):
        assert abs(last_gpu[col] - last_cpu[col]) <= 0.01, col
