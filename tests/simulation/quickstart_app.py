"""A Flower user's quickstart-style app, written as ``flwr new`` writes one: nothing of Pollinate.

One node per user (``partition-id``), Flower's plain ``FedAvg``, a small linear model
trained with SGD, the weights carried as ``ArrayRecord(model.state_dict())``. The run config
(``num-server-rounds``, ``lr``, ``local-epochs``) comes from ``context.run_config`` with the
defaults below when it is empty (Flower's ``run_simulation`` passes none). The ServerApp keeps
its result in :data:`RESULTS` (in-process runs) and, with run config ``out``, writes it to
that ``.pt`` file (runs in another process).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

FEATURES, CLASSES, SAMPLES = 8, 3, 60
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 2,
    "lr": 0.5,
    "local-epochs": 2,
    "min-nodes": 3,
}
RESULTS: list[dict[str, Any]] = []


def setting(context: Context, key: str) -> Any:
    return context.run_config.get(key, DEFAULTS[key])


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, CLASSES)


def load_data(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's data: the same three class centres for all, a shift per user."""
    gen = torch.Generator().manual_seed(100 + partition_id)
    centres = torch.Generator().manual_seed(7)
    means = torch.randn(CLASSES, FEATURES, generator=centres) * 2
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=gen)
    x = means[y] + torch.randn(SAMPLES, FEATURES, generator=gen) + 0.3 * partition_id
    return x, y


def evaluate_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc


# ----------------------------------------------------------------------------- ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
    x, y = load_data(int(context.node_config["partition-id"]))
    torch.manual_seed(int(context.node_config["partition-id"]))
    opt = torch.optim.SGD(model.parameters(), lr=float(setting(context, "lr")))
    for _ in range(int(setting(context, "local-epochs"))):
        for batch in torch.randperm(SAMPLES).split(20):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    loss, _ = evaluate_model(model, x, y)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {
                    "train_loss": loss,
                    # 1.0 averaged over the nodes: every node's context had the run config
                    "has-run-config": float("lr" in context.run_config),
                    "num-examples": SAMPLES,
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
    loss, acc = evaluate_model(model, *load_data(int(context.node_config["partition-id"])))
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": SAMPLES})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


# ----------------------------------------------------------------------------- ServerApp

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    # Wait for every node before round 1 (as a Flower app should): Flower's own engine can
    # start the ServerApp before all its nodes are registered, and would then train fewer.
    nodes = int(setting(context, "min-nodes"))
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=nodes,
        min_evaluate_nodes=nodes,
        min_available_nodes=nodes,
    )
    initial = net().state_dict()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=int(setting(context, "num-server-rounds")),
    )
    outcome = {
        "initial": initial,
        "final": result.arrays.to_torch_state_dict(),
        "nodes": len(list(grid.get_node_ids())),
        "eval": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
        "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "run_config": dict(context.run_config),
    }
    RESULTS.append(outcome)
    if "out" in context.run_config:
        torch.save(outcome, str(context.run_config["out"]))
