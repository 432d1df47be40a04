"""The benchmark job as users write it today: a quickstart-style Flower app.

This is the baseline "(b) Flower's default simulation" of ``bench_speed.py``: the shape of
Flower's PyTorch quickstart (``flwr new``), with nothing of Pollinate's Flower layer in it —
one Flower node per user (``partition-id`` = user index), Flower's plain ``FedAvg``, the
model weights converted with ``ArrayRecord(model.state_dict())`` per call, a model built
per call, the data partition looked up through a module-level cache (the quickstart's
``fds``), and Flower's default simulation resources (``run_simulation`` without a backend
config: 2 CPUs per ClientApp). Only the ML code — model, data, the local training loop —
is Pollinate's, so that all three benchmark variants run exactly the same training.
"""

from __future__ import annotations

import time
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from pollinate.data import DataSpec, FederatedDataset, load_federated_dataset
from pollinate.models import TrainConfig, create_model, train

# ----------------------------------------------------------------------------- ClientApp

app = ClientApp()


def _int(value: object) -> int:
    return int(cast(int, value))


def _float(value: object) -> float:
    return float(cast(float, value))


_fds: FederatedDataset | None = None  # the quickstart's module-level dataset cache


def load_data(partition_id: int, cfg: ConfigRecord) -> tuple[torch.Tensor, torch.Tensor, str]:
    global _fds
    if _fds is None:
        _fds = load_federated_dataset(
            DataSpec(
                dataset=str(cfg["dataset"]),
                num_users=_int(cfg["num-users"]),
                synthetic_alpha=_float(cfg["synthetic-alpha"]),
                synthetic_beta=_float(cfg["synthetic-beta"]),
                seed=_int(cfg["seed"]),
            )
        )
    user = _fds.user(_fds.user_ids[partition_id])
    return torch.from_numpy(user.x_train), torch.from_numpy(user.y_train), user.user_id


def net(cfg: ConfigRecord) -> torch.nn.Module:
    return create_model(
        str(cfg["model"]),
        in_features=_int(cfg["in-features"]),
        num_classes=_int(cfg["num-classes"]),
        **({"hidden": _int(cfg["hidden"])} if cfg["model"] == "mlp" else {}),
    )


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    cfg: ConfigRecord = msg.content["config"]  # type: ignore[assignment]
    model = net(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
    x, y, user_id = load_data(int(context.node_config["partition-id"]), cfg)
    from pollinate.client.local import user_seed  # the same shuffle seed as the other variants

    seed = user_seed(_int(cfg["seed"]), _int(cfg["server-round"]), user_id, "train")
    stats = train(
        model,
        x,
        y,
        TrainConfig(
            epochs=_int(cfg["epochs"]),
            batch_size=_int(cfg["batch-size"]),
            lr=_float(cfg["lr"]),
        ),
        generator=torch.Generator().manual_seed(seed),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": stats.loss, "num-examples": stats.num_examples}),
        }
    )
    return Message(content=content, reply_to=msg)


# ----------------------------------------------------------------------------- ServerApp


def server_app(job: dict[str, Any], round_ends: list[float], final: dict[str, Any]) -> ServerApp:
    """A ServerApp running ``job`` with FedAvg; appends ``time.time()`` after each round."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        model = create_model(
            str(job["model"]),
            in_features=int(job["in-features"]),
            num_classes=int(job["num-classes"]),
            hidden=int(job["hidden"]),
            seed=int(job["seed"]),
        )
        strategy = FedAvg(
            fraction_train=float(job["fraction"]),
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_available_nodes=1,
        )

        def on_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            round_ends.append(time.time())
            return None

        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=int(job["rounds"]),
            train_config=ConfigRecord(job),
            evaluate_fn=on_round,
        )
        final["state_dict"] = result.arrays.to_torch_state_dict()

    return server
