"""Secure aggregation (SecAgg+): the sum is right, individual updates never reach the server,
and a round survives nodes that drop out mid-protocol (up to the threshold)."""

from __future__ import annotations

import contextlib
from typing import Any, cast

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from secagg_harness import LoopbackGrid

from pollinate import config
from pollinate.client.secagg import secure_aggregation_mod
from pollinate.flower_compat.secagg import RECORD_KEY_CONFIGS, Key, Stage
from pollinate.server.secagg import (
    SecAggSettings,
    SecureAggregationGrid,
    is_secure_aggregate,
)

DIM = 300
NODES = [11, 22, 33, 44, 55]
GLOBAL = torch.linspace(-1, 1, DIM, dtype=torch.float32)


def node_model(node: int) -> torch.Tensor:
    """Node ``node``'s example-weighted mean model: the global model plus its own update."""
    g = torch.Generator().manual_seed(node)
    return GLOBAL + 0.3 * torch.randn(DIM, generator=g)


def node_examples(node: int) -> int:
    return 40 + node  # unequal weights: the mean must be weighted


toy = ClientApp()


@toy.train(mods=[secure_aggregation_mod])
def _train(msg: Message, context: Context) -> Message:
    """What Pollinate's ClientApp replies with config ``node-mean``: the cohort's mean model,
    its metrics, and each user's own metrics."""
    node = context.node_id
    user = f"u{node}"
    metrics: Any = {"num-examples": node_examples(node), "train-loss": node / 100, "dp-users": 1}
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"weights": node_model(node)}),
                "metrics": MetricRecord(metrics),
                f"metrics/{user}": MetricRecord(metrics),
                "users": ConfigRecord({"ids": [user]}),
            }
        ),
        reply_to=msg,
    )


@toy.query()
def _query(msg: Message, context: Context) -> Message:
    return Message(
        RecordDict({"users": ConfigRecord({"ids": [f"u{context.node_id}"]})}), reply_to=msg
    )


def train_messages(nodes: list[int]) -> list[Message]:
    return [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"weights": GLOBAL.clone()}),
                    "config": ConfigRecord({"server-round": 1, "node-mean": True}),
                }
            ),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for n in nodes
    ]


def weighted_mean(nodes: list[int]) -> np.ndarray:
    w = np.array([node_examples(n) for n in nodes], dtype=np.float64)
    x = np.stack([node_model(n).double().numpy() for n in nodes])
    return (w[:, None] * x).sum(0) / w.sum()


def secure_round(
    nodes: list[int], die_at: dict[int, str] | None = None, **settings: Any
) -> tuple[list[Message], LoopbackGrid, SecAggSettings]:
    loop = LoopbackGrid(toy, nodes, die_at=die_at)
    s = SecAggSettings(**{"num_shares": len(nodes), "reconstruction_threshold": 3, **settings})
    replies = list(SecureAggregationGrid(loop, s).send_and_receive(train_messages(nodes)))
    return replies, loop, s


def aggregate_of(replies: list[Message]) -> np.ndarray:
    (agg,) = [r for r in replies if is_secure_aggregate(r)]
    return agg.content.array_records["arrays"]["weights"].numpy().astype(np.float64)


def quantization_bound(s: SecAggSettings, nodes: list[int]) -> float:
    """Per value: stochastic rounding moves each node's r_i x_i by less than one step
    2c/Q; the mean divides the sum of those by sum r_i (and the weights' own rounding)."""
    step = 2 * s.clipping_range / s.quantization_range
    ratio = sum(node_examples(n) for n in nodes) / s.max_weight
    return 2 * len(nodes) * step / ratio


def test_aggregate_is_the_weighted_mean_within_quantization_error() -> None:
    replies, _, s = secure_round(NODES)
    got, want = aggregate_of(replies), weighted_mean(NODES)
    err = np.abs(got - want).max()
    assert err <= quantization_bound(s, NODES)
    # ... and the error is quantization's, not an exact copy that bypassed the protocol.
    assert err > 0
    # A coarser quantization gives a proportionally larger (still bounded) error.
    coarse, _, s2 = secure_round(NODES, quantization_range=2**12)
    coarse_err = np.abs(aggregate_of(coarse) - want).max()
    assert err < coarse_err <= quantization_bound(s2, NODES)


def test_a_uniform_mean_weighs_by_the_weight_key() -> None:
    """User-level DP's mean is uniform over users: weight = the node's user count."""
    replies, _, s = secure_round(NODES, weight_key="dp-users", max_weight=10.0)
    uniform = np.stack([node_model(n).double().numpy() for n in NODES]).mean(0)
    step = 2 * s.clipping_range / s.quantization_range
    assert np.abs(aggregate_of(replies) - uniform).max() <= 2 * len(NODES) * step / 0.5
    (agg,) = [r for r in replies if is_secure_aggregate(r)]
    metrics = cast(Any, agg.content["metrics"])
    assert metrics["dp-users"] == len(NODES)  # counts are summed: DP's m
    assert metrics["num-examples"] == sum(node_examples(n) for n in NODES)


def _arrays_in(msg: Message) -> list[np.ndarray]:
    """Every array a reply carries: array records, and bytes that decode as ndarrays."""
    if msg.has_error():
        return []
    out = [a.numpy() for rec in msg.content.array_records.values() for a in rec.values()]
    for rec in msg.content.config_records.values():
        for value in rec.values():
            for b in value if isinstance(value, list) else [value]:
                if isinstance(b, bytes):
                    with contextlib.suppress(Exception):  # keys, shares, ciphertexts
                        out.append(bytes_to_ndarray(b))
    return out


def test_the_server_side_never_holds_an_individual_update() -> None:
    replies, loop, s = secure_round(NODES)
    updates = {n: (node_model(n) - GLOBAL).double().numpy() for n in NODES}
    seen = [a for r in loop.received for a in _arrays_in(r)]
    assert seen, "the masked vectors arrive as arrays"
    for n, update in updates.items():
        scaled = update * node_examples(n) / s.max_weight
        quantized = (np.clip(scaled, -8, 8) + 8) * s.quantization_range / 16
        for arr in seen:
            flat = np.asarray(arr, dtype=np.float64).reshape(-1)
            if flat.size < DIM:
                continue
            body = flat[-DIM:]
            # Neither the update, the model, nor its quantized form: the masked vector is
            # uniform on [0, 2^32), uncorrelated with what it hides.
            for plain in (update, node_model(n).double().numpy(), quantized):
                assert not np.allclose(body, plain, atol=1e-3)
                assert abs(np.corrcoef(body, plain)[0, 1]) < 0.3
    # What the strategy gets: each node's reply (its users' metrics) and one aggregate,
    # carried by one of them; no other arrays.
    with_arrays = [r for r in replies if not r.has_error() and r.content.array_records]
    assert len(with_arrays) == 1 and is_secure_aggregate(with_arrays[0])
    assert sorted(u for r in replies for u in cast(Any, r.content["users"])["ids"]) == sorted(
        f"u{n}" for n in NODES
    )
    assert {r.metadata.src_node_id for r in replies} == set(NODES)
    # Every reply the nodes sent had its arrays cleared by Flower's mod.
    for r in loop.received:
        assert all(len(rec) == 0 for rec in r.content.array_records.values())


@pytest.mark.parametrize("stage", [Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_round_completes_with_a_node_dropped_after_sharing_keys(stage: str) -> None:
    dropped = NODES[2]
    replies, loop, s = secure_round(NODES, die_at={dropped: stage})
    assert loop.stages_seen[dropped][:2] == [Stage.SETUP, Stage.SHARE_KEYS]
    # Dropped before sending its masked vector: the mean of the others (its pairwise masks
    # rebuilt from its neighbours' shares). Dropped after: its vector is in the sum (its
    # private mask removed with the others' shares of its seed).
    summed = [n for n in NODES if n != dropped] if stage != Stage.UNMASK else NODES
    err = np.abs(aggregate_of(replies) - weighted_mean(summed)).max()
    assert err <= quantization_bound(s, summed)
    failures = [r for r in replies if r.has_error()]
    assert len(failures) == 1


def test_too_many_dropouts_halt_the_round_with_the_reason() -> None:
    # Threshold 4 of 5: two nodes lost before training leave each node 3 live neighbours.
    replies, _, _ = secure_round(
        NODES,
        die_at={NODES[0]: Stage.SHARE_KEYS, NODES[1]: Stage.SHARE_KEYS},
        reconstruction_threshold=4,
    )
    assert all(r.has_error() for r in replies) and len(replies) == len(NODES)
    reasons = {r.error.reason for r in replies if "secagg" in (r.error.reason or "")}
    assert reasons and all("secagg-reconstruction-threshold" in str(x) for x in reasons)


def test_dropouts_after_training_beyond_threshold_reject_the_round() -> None:
    replies, _, _ = secure_round(
        NODES,
        die_at={NODES[0]: Stage.UNMASK, NODES[1]: Stage.UNMASK},
        reconstruction_threshold=4,
    )
    good = [r for r in replies if not r.has_error()]
    assert not any(r.content.array_records for r in good)  # no aggregate: the model stays
    rejected = {u for r in good for u in r.content.config_records["rejected"]}
    assert rejected == {f"u{n}" for n in NODES}  # every user trained, none counted


def test_sparse_graph_secagg_plus() -> None:
    """num-shares 3 of 5: each node shares with its two ring neighbours only."""
    replies, _, s = secure_round(
        NODES, num_shares=3, reconstruction_threshold=2, die_at={NODES[4]: "collect_masked_vectors"}
    )
    summed = NODES[:4]
    assert np.abs(aggregate_of(replies) - weighted_mean(summed)).max() <= quantization_bound(
        s, summed
    )


def test_plain_exchanges_pass_through() -> None:
    loop = LoopbackGrid(toy, NODES)
    grid = SecureAggregationGrid(loop, SecAggSettings())
    query = Message(RecordDict(), dst_node_id=NODES[0], message_type=MessageType.QUERY)
    (reply,) = grid.send_and_receive([query])
    assert reply.content["users"]["ids"] == [f"u{NODES[0]}"]
    assert loop.stages_seen[NODES[0]] == ["plain"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"strategy.name": "krum"}, "strategy.name = 'krum' needs every user's own update"),
        ({"strategy.name": "fedmedian"}, "fedmedian"),
        ({"validation.norm-bound-median-multiple": 3.0}, "norm-bound-median-multiple"),
        ({"privacy.secagg-num-shares": 2}, "secagg-num-shares"),
        ({"privacy.secagg-num-shares": 5, "privacy.secagg-reconstruction-threshold": 5}, "below"),
        ({"privacy.secagg-reconstruction-threshold": 2.5}, "secagg-reconstruction-threshold"),
    ],
)
def test_config_errors_are_one_line(overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.resolve({"privacy.secure-aggregation": True, **overrides})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_shares_are_odd_and_at_most_the_rounds_nodes() -> None:
    assert SecAggSettings(num_shares=3).shares_for(20) == 3
    assert SecAggSettings(num_shares=4).shares_for(20) == 5  # symmetric ring neighbourhoods
    assert SecAggSettings(num_shares=7).shares_for(4) == 4  # every node of a small round


def test_stage_keys_are_flowers() -> None:
    assert Key.MASKED_PARAMETERS == "masked_params" and RECORD_KEY_CONFIGS == "secaggplus_configs"
