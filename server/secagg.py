"""Secure aggregation: SecAgg+ (Bell et al., 2020) on Pollinate's Message-API rounds.

With ``privacy.secure-aggregation`` the server learns only the example-weighted *sum* of a
round's updates, never one node's. Each node (a device, or a simulated node hosting a
cohort) sends its users' example-weighted sum of updates, quantized and masked: a
pairwise mask per neighbour that cancels in the sum, plus a private mask whose seed is
secret-shared among the neighbours. Dropped nodes are tolerated while every node keeps at
least ``t`` live neighbours (``privacy.secagg-reconstruction-threshold``): the server
rebuilds a dropped node's pairwise masks, and each survivor's private mask, from ``t``
shares.

The protocol is Flower's own (``flwr.server.workflow.SecAggPlusWorkflow`` /
``flwr.client.mod.secaggplus_mod``, four ``train`` exchanges: setup, share keys, collect
masked vectors, unmask). Flower's workflow drives a legacy ``Strategy``; here
:class:`SecureAggregationGrid` drives the same stages under a Message-API strategy:

- it wraps the ServerApp's grid; a ``train`` exchange (one message per node, from
  :class:`~pollinate.server.rounds.UserCohorts`) becomes the four stages, the strategy's
  own train message travelling with the third; other exchanges pass through;
- its replies to the strategy are the nodes' replies without arrays (each user's plain
  metrics, the carried evaluation), one of which carries the unmasked aggregate (the
  global model plus the weighted mean of the updates) as its "cohort mean", and the error
  replies of the nodes that dropped. The strategy's ``aggregate_train`` (FedAvg, FedProx,
  FedAdam, FedYogi) so holds one update per round, never a node's;
- the client side is Flower's ``secaggplus_mod`` (:mod:`pollinate.client.secagg`).

The cryptography (ECDH key agreement, Shamir shares, Fernet, the mask generator,
quantization) is Flower's, imported through :mod:`pollinate.flower_compat.secagg`.
The same code runs in simulation and on a deployment.

Differential privacy (``[privacy]``, user-level): updates are clipped on the device before
they enter the node's sum; noise belongs on the aggregate, i.e. in a strategy wrapper's
``aggregate_train`` around the Flower strategy, which receives exactly the one unmasked
aggregate per round this module produces (:func:`is_secure_aggregate` tells it apart).

What it does not protect against: a server that lies about who dropped (the semi-honest
model; SecAgg+'s consistency checks against a malicious server are not in Flower's
implementation), per-user plain metrics (``num-examples``, ``train-loss`` travel in the
clear), and Flower's mask generator expands each 32-byte secret through a 32-bit seed of
NumPy's Mersenne Twister, which is not a cryptographic generator.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import bytes_to_ndarray
from flwr.serverapp import Grid

from pollinate import protocol
from pollinate.flower_compat.secagg import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
    bytes_to_private_key,
    bytes_to_public_key,
    combine_shares,
    dequantize,
    factor_extract,
    generate_shared_key,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
    pseudo_rand_gen,
)
from pollinate.privacy_options import PrivacyOptions

_logger = logging.getLogger("pollinate")

MODULUS = 2**32  # Flower's: masks and sums live in Z_{2^32}
# Marks the aggregate reply (config record), for strategy wrappers such as DP's.
SECURE_AGGREGATE = "secure-aggregate"
# An error reply's code for a round the protocol had to give up (Flower's ErrorCode has
# none for it; the reason says what happened).
HALTED = 1001
# The setup stage's extra key: which metric of the node's reply is its weight.
WEIGHT_KEY = "pollinate-weight-key"


@dataclass(frozen=True)
class SecAggSettings:
    """The protocol's parameters (``[privacy]``'s ``secagg-*`` keys)."""

    num_shares: int = 3
    reconstruction_threshold: int = 2
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    max_weight: float = 1000.0
    modulus_range: int = MODULUS
    # The node metric that weighs its update in the mean (FedAvg's: its examples). A
    # uniform mean over users (user-level DP) weighs by the node's user count instead;
    # max-weight must then bound that count.
    weight_key: str = protocol.NUM_EXAMPLES

    @classmethod
    def from_config(cls, p: PrivacyOptions) -> SecAggSettings:
        return cls(
            num_shares=p.secagg_num_shares,
            reconstruction_threshold=p.secagg_reconstruction_threshold,
            clipping_range=p.secagg_clipping_range,
            quantization_range=p.secagg_quantization_range,
            max_weight=p.secagg_max_weight,
            # User-level DP's mean is uniform over users: weigh a node by its users.
            weight_key=protocol.DP_USERS if p.method == "user" else protocol.NUM_EXAMPLES,
        )

    def shares_for(self, num_nodes: int) -> int:
        """Shares per secret in a round of ``num_nodes``: odd (a node's neighbours sit
        symmetrically around it on the ring), at most the round's nodes."""
        k = min(int(self.num_shares), num_nodes)
        if k < num_nodes and k % 2 == 0:
            k += 1
        return k

    @property
    def threshold(self) -> int:
        return int(self.reconstruction_threshold)


@dataclass
class _Round:
    """One run of the protocol (Flower's ``WorkflowState``, without the legacy strategy)."""

    server_round: int
    sent: dict[int, Message]  # node -> the strategy's train message
    num_shares: int
    threshold: int
    neighbours: dict[int, set[int]]
    active: set[int]
    failures: list[Message] = field(default_factory=list)
    public_keys: dict[int, list[bytes]] = field(default_factory=dict)
    forward: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)
    masked_sum: list[np.ndarray] = field(default_factory=list)
    trained: list[Message] = field(default_factory=list)  # stage-2 replies, arrays emptied
    weight_key: str = protocol.NUM_EXAMPLES

    @property
    def sampled(self) -> set[int]:
        return set(self.sent)


class SecureAggregationHalted(RuntimeError):
    """Too few nodes are left for the protocol to go on (or to unmask)."""


def ring_neighbours(nodes: list[int], num_shares: int) -> dict[int, set[int]]:
    """SecAgg+'s sparse graph: each node and the ``num_shares // 2`` nodes on each side
    of it on a randomly shuffled ring (itself included, as in Flower)."""
    order = list(nodes)
    secrets.SystemRandom().shuffle(order)
    half, n = num_shares // 2, len(order)
    return {
        nid: {order[(i + offset) % n] for offset in range(-half, half + 1)}
        for i, nid in enumerate(order)
    }


def is_secure_aggregate(msg: Message) -> bool:
    """True for the reply :class:`SecureAggregationGrid` makes of a round's unmasked sum."""
    return not msg.has_error() and SECURE_AGGREGATE in msg.content.config_records


class SecureAggregationGrid(Grid):
    """A grid whose ``train`` exchanges are SecAgg+ rounds (see the module doc).

    Everything else goes to the wrapped grid unchanged.
    """

    def __init__(self, grid: Grid, settings: SecAggSettings) -> None:
        self._grid = grid
        self.settings = settings

    # ------------------------------------------------------------- delegation
    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if messages and all(m.metadata.message_type == MessageType.TRAIN for m in messages):
            return secure_train_exchange(self._grid, messages, self.settings, timeout)
        return self._grid.send_and_receive(messages, timeout=timeout)


def secure_train_exchange(
    grid: Grid, messages: list[Message], settings: SecAggSettings, timeout: float | None
) -> list[Message]:
    """The replies of a SecAgg+ round over ``messages`` (one train message per node):
    the nodes' replies (see :func:`node_replies`) and the errors of dropped nodes."""
    sent = {m.metadata.dst_node_id: m for m in messages}
    server_round = int(
        cast(Any, messages[0].content[protocol.CONFIG]).get(protocol.SERVER_ROUND, 0)
    )
    num_shares = settings.shares_for(len(sent))
    state = _Round(
        server_round=server_round,
        sent=sent,
        num_shares=num_shares,
        threshold=settings.threshold,
        neighbours=ring_neighbours(sorted(sent), num_shares),
        active=set(sent),
        weight_key=settings.weight_key,
    )
    try:
        if len(sent) < 2:
            raise SecureAggregationHalted(
                f"only {len(sent)} node in the round; a sum over one node is its update"
            )
        _check_threshold(state, "setup")
        _setup(grid, state, settings, timeout)
        _share_keys(grid, state, timeout)
    except SecureAggregationHalted as err:
        return _halted_before_training(state, str(err))
    try:
        _collect_masked_vectors(grid, state, timeout)
        mean_update = _unmask(grid, state, settings, timeout)
    except SecureAggregationHalted as err:
        reason = f"secure aggregation could not unmask round {server_round}: {err}"
        _logger.warning("round %3d | %s; the global model stays", server_round, reason)
        return [*node_replies(state, None, rejected=reason), *state.failures]
    return [*node_replies(state, mean_update), *state.failures]


# ----------------------------------------------------------------- the stages
def _stage_message(state: _Round, nid: int, records: dict[str, Any]) -> Message:
    return Message(
        RecordDict(records),
        dst_node_id=nid,
        message_type=MessageType.TRAIN,
        group_id=str(state.server_round),
    )


def _exchange(
    grid: Grid,
    state: _Round,
    stage: str,
    records: dict[int, dict[str, Any]],
    timeout: float | None,
    messages: list[Message] | None = None,
) -> list[Message]:
    """Send each active node its stage message (``records``, or ready ``messages``); the
    good replies (errors are recorded, and their nodes leave the active set)."""
    msgs = messages or [_stage_message(state, nid, records[nid]) for nid in sorted(state.active)]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    # An error the SuperLink makes up for a node that went away names no node: match
    # replies to nodes through the message they answer (the grid set its id on push).
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}

    def sender(r: Message) -> int:
        answered = r.metadata.reply_to_message_id
        return node_of.get(answered, r.metadata.src_node_id) if answered else r.metadata.src_node_id

    good = [r for r in replies if not r.has_error() and sender(r) in state.active]
    answered = {sender(r) for r in good}
    for nid in sorted(state.active - answered):
        bad = [r for r in replies if r.has_error() and sender(r) == nid]
        why = bad[0].error.reason if bad else "no reply"
        state.failures.append(
            bad[0] if bad else Message(Error(code=HALTED, reason=why), reply_to=state.sent[nid])
        )
        _logger.warning(
            "round %3d | secure aggregation: node %d dropped at stage '%s' (%s)",
            state.server_round,
            nid,
            stage,
            " ".join(str(why).split())[:200],
        )
    state.active &= answered
    _check_threshold(state, stage)
    return good


def _check_threshold(state: _Round, stage: str) -> None:
    """Every sampled node still needs ``threshold`` live neighbours (Flower's check)."""
    for nid in sorted(state.sampled):
        live = len(state.neighbours[nid] & state.active)
        if live < state.threshold:
            raise SecureAggregationHalted(
                f"after stage '{stage}' node {nid} has {live} live neighbour(s) of "
                f"{len(state.neighbours[nid])}, and {state.threshold} are needed "
                f"(privacy.secagg-reconstruction-threshold; {len(state.active)} of "
                f"{len(state.sampled)} nodes left)"
            )


def _setup(grid: Grid, state: _Round, settings: SecAggSettings, timeout: float | None) -> None:
    """Stage 0: send the protocol's parameters; collect each node's two public keys."""
    config: dict[str, Any] = dict(
        {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: len(state.sent),
            Key.SHARE_NUMBER: state.num_shares,
            Key.THRESHOLD: state.threshold,
            Key.CLIPPING_RANGE: float(settings.clipping_range),
            Key.TARGET_RANGE: int(settings.quantization_range),
            Key.MOD_RANGE: int(settings.modulus_range),
            Key.MAX_WEIGHT: float(settings.max_weight),
            WEIGHT_KEY: settings.weight_key,  # ours: read by pollinate.client.secagg
        }
    )
    # One record per node: Flower's mod takes the stage out of the record it is given.
    records = {nid: {RECORD_KEY_CONFIGS: ConfigRecord(cast(Any, config))} for nid in state.active}
    for reply in _exchange(grid, state, Stage.SETUP, records, timeout):
        keys = reply.content.config_records[RECORD_KEY_CONFIGS]
        pk1, pk2 = cast(bytes, keys[Key.PUBLIC_KEY_1]), cast(bytes, keys[Key.PUBLIC_KEY_2])
        state.public_keys[reply.metadata.src_node_id] = [pk1, pk2]


def _share_keys(grid: Grid, state: _Round, timeout: float | None) -> None:
    """Stage 1: give each node its live neighbours' public keys; collect the encrypted
    shares of its secrets, to forward to their owners' neighbours next stage."""
    records = {}
    for nid in state.active:
        keys: dict[str, Any] = {
            str(n): state.public_keys[n] for n in state.neighbours[nid] & state.active
        }
        keys[Key.STAGE] = Stage.SHARE_KEYS
        records[nid] = {RECORD_KEY_CONFIGS: ConfigRecord(keys)}
    replies = _exchange(grid, state, Stage.SHARE_KEYS, records, timeout)
    forward: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in state.active}
    for reply in replies:
        res = reply.content.config_records[RECORD_KEY_CONFIGS]
        dsts = cast(list[int], res[Key.DESTINATION_LIST])
        ciphertexts = cast(list[bytes], res[Key.CIPHERTEXT_LIST])
        for dst, ciphertext in zip(dsts, ciphertexts, strict=True):
            if dst in forward:
                forward[dst][0].append(reply.metadata.src_node_id)
                forward[dst][1].append(ciphertext)
    state.forward = forward


def _collect_masked_vectors(grid: Grid, state: _Round, timeout: float | None) -> None:
    """Stage 2: the real train message plus the shares for this node; each node trains
    and replies its masked, quantized weighted update (and its users' plain metrics)."""
    messages = []
    for nid in sorted(state.active):
        srcs, ciphertexts = state.forward[nid]
        config = ConfigRecord(
            {
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                Key.CIPHERTEXT_LIST: ciphertexts,
                Key.SOURCE_LIST: srcs,
            }
        )
        # The strategy's own message goes, with the shares: its reply then answers it,
        # and the strategy matches replies to nodes by the messages it sent.
        msg = state.sent[nid]
        msg.content[RECORD_KEY_CONFIGS] = config
        messages.append(msg)
    replies = _exchange(grid, state, Stage.COLLECT_MASKED_VECTORS, {}, timeout, messages)
    state.forward = {}
    total: list[np.ndarray] | None = None
    for reply in replies:
        res = reply.content.config_records[RECORD_KEY_CONFIGS]
        masked = [bytes_to_ndarray(b) for b in cast(list[bytes], res[Key.MASKED_PARAMETERS])]
        total = masked if total is None else parameters_addition(total, masked)
        state.trained.append(reply)
    state.masked_sum = parameters_mod(total or [], MODULUS)


def _unmask(
    grid: Grid, state: _Round, settings: SecAggSettings, timeout: float | None
) -> np.ndarray | None:
    """Stage 3: collect the shares that remove the masks; the weighted mean update
    (None if no node had a training example)."""
    contributed = set(state.active)  # the nodes whose masked vectors are in the sum
    dead = state.sampled - contributed
    records = {}
    for nid in state.active:
        around = state.neighbours[nid]
        config = ConfigRecord(
            {
                Key.STAGE: Stage.UNMASK,
                Key.ACTIVE_NODE_ID_LIST: sorted(around & contributed),
                Key.DEAD_NODE_ID_LIST: sorted(around & dead),
            }
        )
        records[nid] = {RECORD_KEY_CONFIGS: config}
    replies = _exchange(grid, state, Stage.UNMASK, records, timeout)
    shares: dict[int, list[bytes]] = {nid: [] for nid in state.sampled}
    for reply in replies:
        res = reply.content.config_records[RECORD_KEY_CONFIGS]
        owners = cast(list[int], res[Key.NODE_ID_LIST])
        for owner, share in zip(owners, cast(list[bytes], res[Key.SHARE_LIST]), strict=True):
            shares[owner].append(share)
    vector = state.masked_sum
    shapes = [a.shape for a in vector]
    for nid, got in sorted(shares.items()):
        if len(got) < state.threshold:
            raise SecureAggregationHalted(
                f"{len(got)} share(s) of node {nid}'s secret arrived, {state.threshold} needed"
            )
        secret = combine_shares(got)
        if nid in contributed:  # the private mask's seed of a node that sent its vector
            vector = parameters_subtraction(
                vector, pseudo_rand_gen(secret, settings.modulus_range, shapes)
            )
            continue
        # A dropped node's first secret key: rebuild its pairwise mask with each neighbour.
        for other in sorted(state.neighbours[nid] - {nid}):
            shared = generate_shared_key(
                bytes_to_private_key(secret), bytes_to_public_key(state.public_keys[other][0])
            )
            mask = pseudo_rand_gen(shared, settings.modulus_range, shapes)
            if nid > other:
                vector = parameters_addition(vector, mask)
            else:
                vector = parameters_subtraction(vector, mask)
    vector = parameters_mod(vector, settings.modulus_range)
    return _dequantized_mean(state, settings, vector, len(contributed))


def _dequantized_mean(
    state: _Round, settings: SecAggSettings, vector: list[np.ndarray], num_summed: int
) -> np.ndarray | None:
    """sum_i q(r_i x_i) back to sum_i r_i x_i / sum_i r_i, with r_i = examples_i / max-weight.

    Each node quantized (clip(r x) + c) * Q / 2c, so the dequantized sum carries
    (n - 1) x c too much; the weights' own quantized sum comes first in the vector.
    """
    q_total, rest = factor_extract(vector)
    expected = sum(
        round(
            _node_weight(r, settings.weight_key) / settings.max_weight * settings.quantization_range
        )
        for r in state.trained
    )
    if int(q_total) != expected % settings.modulus_range:
        raise SecureAggregationHalted(
            f"the unmasked sum of weights ({int(q_total)}) is not the nodes' ({expected}): "
            "it overflowed; raise privacy.secagg-max-weight or lower "
            "privacy.secagg-quantization-range"
        )
    if expected == 0:
        return None
    (summed,) = dequantize(rest, settings.clipping_range, settings.quantization_range)
    summed = summed - (num_summed - 1) * settings.clipping_range
    return cast(np.ndarray, summed * (settings.quantization_range / expected))


def _node_weight(reply: Message, key: str) -> float:
    metrics = reply.content.metric_records.get(protocol.METRICS)
    return float(cast(Any, metrics)[key]) if metrics is not None else 0.0


# ------------------------------------------------------------------- replies
def node_replies(
    state: _Round, mean_update: np.ndarray | None, *, rejected: str = ""
) -> list[Message]:
    """The nodes' train replies in Pollinate's layout (:mod:`pollinate.protocol`), without
    their (emptied) arrays and the protocol's records: each user's metrics, the carried
    evaluation. The first node with users carries the round's aggregate as its cohort
    mean: ``arrays`` = global + mean update, ``metrics`` = every node's, weighted (the one
    update the strategy aggregates; marked :data:`SECURE_AGGREGATE`). With ``rejected``
    there is no aggregate and every user is named rejected for it."""
    combined = _weighted_metrics(state.trained, state.weight_key)
    replies = []
    carrier: Message | None = None
    for got in sorted(state.trained, key=lambda r: r.metadata.src_node_id):
        kept = {
            name: record
            for name, record in got.content.items()
            if not (name.startswith("fitres.") or name == RECORD_KEY_CONFIGS)
            and not (isinstance(record, ArrayRecord) and len(record) == 0)  # cleared by the mod
        }
        reply = Message(RecordDict(kept), reply_to=state.sent[got.metadata.src_node_id])
        replies.append(reply)
        c = reply.content
        users = [str(u) for u in cast(Any, c[protocol.USERS])[protocol.IDS]]
        if rejected and users:
            refused = dict(c.config_records.get(protocol.REJECTED, {}))
            refused.update({u: rejected for u in users})
            c[protocol.REJECTED] = ConfigRecord(cast(Any, refused))
        if carrier is None and users:
            carrier = reply
    if carrier is not None and mean_update is not None and not rejected:
        first = next(iter(state.sent.values())).content.array_records[protocol.ARRAYS]
        global_flat = first.to_torch_state_dict()[protocol.WEIGHTS]
        update = torch.from_numpy(np.asarray(mean_update, dtype=np.float64).reshape(-1))
        weights = (global_flat.double() + update).to(global_flat.dtype)
        carrier.content[protocol.ARRAYS] = ArrayRecord({protocol.WEIGHTS: weights})
        carrier.content[protocol.METRICS] = MetricRecord(cast(Any, combined))
        carrier.content[SECURE_AGGREGATE] = ConfigRecord(
            {"nodes": len(state.trained), "dropped": len(state.sampled) - len(state.trained)}
        )
    return replies


# Metrics that count (examples, users): summed over the nodes, not averaged.
COUNTS = (protocol.NUM_EXAMPLES, protocol.DP_USERS)


def _weighted_metrics(replies: list[Message], weight_key: str) -> dict[str, float | int]:
    """The nodes' ``metrics`` averaged by ``weight_key``, counts summed, as FedAvg does."""
    rows = [
        cast(Any, r.content[protocol.METRICS]) for r in replies if _node_weight(r, weight_key) > 0
    ]
    total = sum(float(m[weight_key]) for m in rows)
    out: dict[str, float | int] = {}
    for key in rows[0].keys() if rows else []:
        if key in COUNTS or key == weight_key:
            out[key] = sum(m[key] for m in rows)
        else:
            out[key] = sum(float(m[key]) * float(m[weight_key]) for m in rows) / total
    return out


def _halted_before_training(state: _Round, reason: str) -> list[Message]:
    """Nobody trained: an error reply for every node that has not failed already."""
    why = f"secure aggregation halted in round {state.server_round}: {reason}"
    _logger.warning("round %3d | %s", state.server_round, why)
    errors = [
        Message(Error(code=HALTED, reason=why), reply_to=msg)
        for nid, msg in sorted(state.sent.items())
        if nid in state.active  # the others' failures are in state.failures
    ]
    return [*state.failures, *errors]


def secure_grid(grid: Grid, privacy: PrivacyOptions) -> Grid:
    """``grid`` with SecAgg+ train exchanges if ``privacy.secure-aggregation`` is on."""
    if not privacy.secure_aggregation:
        return grid
    return SecureAggregationGrid(grid, SecAggSettings.from_config(privacy))
