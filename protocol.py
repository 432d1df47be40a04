"""The round protocol: every name the ServerApp and the ClientApps exchange, in one place.

A round is messages between the server (:mod:`pollinate.server.rounds`) and the nodes
(:mod:`pollinate.client.app`); each holds a Flower ``RecordDict``. The layouts:

Server -> node (one message per node)

- ``query``:    ``config`` (the run config)  ->  reply ``users`` {``ids``: hosted users}
- ``train``:    ``arrays`` {``weights``: the global model as one flat vector} and
  ``config``: the run config, ``model-spec``, ``run-key``, ``server-round`` and, from the
  Flower strategy, e.g. FedProx's ``proximal-mu``; then Pollinate's own:
  ``users`` (the node's sampled users), ``node-mean`` (reply the cohort's mean, not each
  update), ``attack-users`` (simulated attackers), and, when the message also carries the
  previous round's evaluation, ``evaluate-users`` and ``evaluate-round``.
- ``evaluate``: the same ``arrays`` and ``config``; ``users`` are the users to evaluate.

Node -> server

- train reply: ``users``, one ConfigRecord for the whole cohort: ``ids`` (the users that
  trained) and each user's metrics ({``num-examples``, ``train-loss``}) under
  ``<i>/<metric>``, ``i`` the user's place in ``ids``; per user ``arrays/<user>`` (its
  update), or with ``node-mean`` one ``arrays`` + ``metrics`` (the example-weighted mean of
  the cohort) and ``rejected`` {user: why its update was left out}; a carried evaluation
  adds ``evaluate/ids`` and ``evaluate/<i>/<metric>`` to ``users``.
- evaluate reply: ``users`` {``ids``, ``<i>/<metric>``} ({``num-examples``,
  ``global-loss``, ``global-accuracy``, ``personal-loss``, ``personal-accuracy``}).

Why one record for every user's metrics (not a MetricRecord per user): each record is an
object of its own on the wire, one signed request each way in a deployment; a one-user
train reply with a carried evaluation is 6 objects instead of 10 (message, record dict,
``users``, and the update's ArrayRecord, Array and ArrayChunk). ConfigRecord values hold
ints and floats as MetricRecord's do, so the readers give back the same MetricRecords.

Node config (set where a node starts): a device's ``data-file``, ``user-id``,
``model-dir``, ``user-column``, ``label-column``, ``device`` (``pollinate node start``); a simulated
node's ``partition-id`` / ``num-partitions`` (Flower's names).

Some names are Flower's, not ours, and must stay as Flower spells them: ``arrays``,
``config`` and ``num-examples`` are the default record keys and weight key of
``flwr.serverapp.strategy.FedAvg``; ``server-round`` and ``proximal-mu`` are what
FedAvg and FedProx write into a round's config; ``partition-id`` / ``num-partitions`` the
simulation's node config. Nothing outside this module spells any of these strings
(tests/test_protocol.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

# The names above are imported where a builder runs, not here: the metrics readers
# (server/metrics.py, behind `pollinate metrics`) use this module's metric names, and
# importing Flower's records costs them ~10x their start-up (0.3 s -> 3.4 s measured on a
# loaded 2-core machine).

# ----------------------------------------------------------------- record keys
ARRAYS = "arrays"  # Flower's FedAvg arrayrecord_key: the global model, or a cohort mean
CONFIG = "config"  # Flower's FedAvg configrecord_key
METRICS = "metrics"  # the record Flower's aggregate reads beside ARRAYS
USERS = "users"  # ConfigRecord {IDS: [...], "<i>/<metric>": ...} in every reply
IDS = "ids"
REJECTED = "rejected"  # ConfigRecord {user: reason}: updates a node left out of its mean
WEIGHTS = "weights"  # the one array of a model record: the flat vector of models/flat.py
USER_ARRAYS = "arrays/"  # + user id: that user's update
EVALUATION = "evaluate/"  # prefix of the evaluation half of a reply that carries one

# ----------------------------------------------------------------- config keys
SERVER_ROUND = "server-round"  # written by Flower's FedAvg.configure_train/_evaluate
PROXIMAL_MU = "proximal-mu"  # written by Flower's FedProx.configure_train
MODEL_SPEC = "model-spec"  # JSON of models.ModelSpec.to_dict()
RUN_KEY = "run-key"  # names this run's per-user state (client/store.py)
SAMPLED_USERS = "users"  # the node's users this message is for
EVALUATE_USERS = "evaluate-users"
EVALUATE_ROUND = "evaluate-round"
NODE_MEAN = "node-mean"
ATTACK_USERS = "attack-users"

# ---------------------------------------------------------------- metric names
NUM_EXAMPLES = "num-examples"  # Flower's weighted_by_key: every reply's weight
# Privacy (pollinate.client.privacy / server.privacy): a reply's users in a uniform
# per-user mean (user-level DP's weight), its users past their ε budget, and Flower's own
# DP keys (flwr's KEY_CLIPPING_NORM / KEY_NORM_BIT, spelled as Flower spells them).
DP_USERS = "dp-users"
PRIVACY_STOPPED = "privacy-stopped"
CLIPPING_NORM = "clipping_norm"
NORM_BIT = "norm_bit"
TRAIN_LOSS = "train-loss"
GLOBAL_LOSS = "global-loss"
GLOBAL_ACCURACY = "global-accuracy"
PERSONAL_LOSS = "personal-loss"
PERSONAL_ACCURACY = "personal-accuracy"
TRAIN_METRICS = (NUM_EXAMPLES, TRAIN_LOSS)
EVALUATE_METRICS = (NUM_EXAMPLES, GLOBAL_LOSS, GLOBAL_ACCURACY, PERSONAL_LOSS, PERSONAL_ACCURACY)

# ----------------------------------------------------------------- node config
DATA_FILE = "data-file"
USER_ID = "user-id"
MODEL_DIR = "model-dir"
USER_COLUMN = "user-column"
LABEL_COLUMN = "label-column"
DEVICE = "device"  # a node's torch device (auto | cpu | cuda): overrides simulation.device
PARTITION_ID = "partition-id"  # Flower's simulation node config
NUM_PARTITIONS = "num-partitions"


# --------------------------------------------------------------------- metrics
def train_metrics(num_examples: int, loss: float) -> dict[str, float]:
    """A user's training metrics (in a train reply's ``users`` record)."""
    return {NUM_EXAMPLES: num_examples, TRAIN_LOSS: loss}


def evaluate_metrics(
    num_examples: int,
    global_loss: float,
    global_accuracy: float,
    personal_loss: float,
    personal_accuracy: float,
) -> dict[str, float]:
    """A user's evaluation metrics: both models on its own test split."""
    return {
        NUM_EXAMPLES: num_examples,
        GLOBAL_LOSS: global_loss,
        GLOBAL_ACCURACY: global_accuracy,
        PERSONAL_LOSS: personal_loss,
        PERSONAL_ACCURACY: personal_accuracy,
    }


def weights_record(flat: torch.Tensor) -> ArrayRecord:
    """A model (or update) as sent: one flat vector (:mod:`pollinate.models.flat`)."""
    from flwr.app import ArrayRecord

    return ArrayRecord({WEIGHTS: flat})


def read_weights(record: ArrayRecord) -> torch.Tensor:
    """The flat vector of a :func:`weights_record`."""
    return record.to_torch_state_dict()[WEIGHTS]


# -------------------------------------------------------- server -> node
def run_config_record(
    run_config: Mapping[str, bool | int | float | str], model_spec: str, run_key: str
) -> ConfigRecord:
    """What every message of a run carries in ``config``: the run config, the model's
    spec (JSON) and the run key; Flower's strategy adds ``server-round`` per round."""
    from flwr.app import ConfigRecord

    return ConfigRecord({**run_config, MODEL_SPEC: model_spec, RUN_KEY: run_key})


def query_content(config: ConfigRecord) -> RecordDict:
    """A ``query`` message: which users does the node host?"""
    from flwr.app import RecordDict

    return RecordDict({CONFIG: config})


@dataclass(frozen=True)
class CarriedEvaluation:
    """The previous round's evaluation riding on a train message (same global model)."""

    round: int
    users: list[str]


def instruction_content(
    arrays: ArrayRecord,
    config: ConfigRecord,
    *,
    users: list[str],
    evaluation: CarriedEvaluation | None = None,
    node_mean: bool = False,
    attack_users: list[str] | None = None,
) -> RecordDict:
    """A ``train`` or ``evaluate`` message for one node. ``config`` is the round's (the
    Flower strategy's) config; it is copied, not changed."""
    from flwr.app import ConfigRecord, RecordDict

    out = ConfigRecord(dict(config))
    out[SAMPLED_USERS] = users
    if evaluation is not None:
        out[EVALUATE_USERS] = evaluation.users
        out[EVALUATE_ROUND] = evaluation.round
    if node_mean:
        out[NODE_MEAN] = True
    if attack_users is not None:  # an attack is simulated: which users play attacker
        out[ATTACK_USERS] = attack_users
    return RecordDict({ARRAYS: arrays, CONFIG: out})


@dataclass(frozen=True)
class Instruction:
    """A ``train``/``evaluate`` message as a node reads it (besides the run config)."""

    server_round: int
    model_spec: str
    run_key: str
    users: list[str] | None  # None: every user the node hosts
    proximal_mu: float = 0.0
    evaluation: CarriedEvaluation | None = None
    node_mean: bool = False
    attack_users: frozenset[str] = frozenset()


def message_config(content: RecordDict) -> ConfigRecord:
    """The ``config`` record of a message from the server."""
    return content.config_records[CONFIG]


def global_arrays(content: RecordDict) -> ArrayRecord:
    """The global model a ``train``/``evaluate`` message carries."""
    return content.array_records[ARRAYS]


def read_instruction(content: RecordDict) -> Instruction:
    """The round's instruction; KeyError names a missing key."""
    config = message_config(content)
    users = config.get(SAMPLED_USERS)
    evaluation = None
    if EVALUATE_USERS in config:
        evaluation = CarriedEvaluation(
            round=_int(config[EVALUATE_ROUND]), users=_strings(config[EVALUATE_USERS])
        )
    return Instruction(
        server_round=_int(config[SERVER_ROUND]),
        model_spec=str(config[MODEL_SPEC]),
        run_key=str(config.get(RUN_KEY, "")),
        users=None if users is None else _strings(users),
        proximal_mu=float(_number(config.get(PROXIMAL_MU, 0.0))),
        evaluation=evaluation,
        node_mean=bool(config.get(NODE_MEAN, False)),
        attack_users=frozenset(_strings(config.get(ATTACK_USERS, []))),
    )


def describe_instruction(message: Message) -> str:
    """``round 2 train``; ``round 1 evaluate + round 2 train`` for a carried evaluation;
    just the message type if the message is not a round's (for logs)."""
    kind = message.metadata.message_type
    try:
        config = message_config(message.content)
        where = f"round {config[SERVER_ROUND]!s} {kind}"
    except (KeyError, TypeError, ValueError):
        return kind
    if EVALUATE_ROUND in config:
        where = f"round {config[EVALUATE_ROUND]!s} evaluate + {where}"
    return where


# -------------------------------------------------------- node -> server
def users_content(ids: Iterable[str]) -> RecordDict:
    """The reply to a ``query``: the users this node hosts."""
    from flwr.app import RecordDict

    return RecordDict({USERS: _ids(ids)})


def read_users(content: RecordDict, prefix: str = "") -> list[str]:
    """The user ids of a reply (``prefix`` = :data:`EVALUATION`: of its evaluation)."""
    return _strings(content.config_records[USERS][f"{prefix}{IDS}"])


@dataclass
class EvaluateReply:
    """Each evaluated user's metrics (:func:`evaluate_metrics`), in evaluation order."""

    metrics: dict[str, MetricRecord] = field(default_factory=dict)


@dataclass
class TrainReply:
    """A node's answer to ``train``.

    ``metrics`` has every sampled user that trained (a dropped straggler is absent);
    ``updates`` each user's update, unless the node sent ``mean`` (its cohort's
    example-weighted mean, with ``mean_metrics``) instead; ``rejected`` the users whose
    update the node left out of that mean, with why; ``evaluation`` the carried one.
    """

    metrics: dict[str, MetricRecord] = field(default_factory=dict)
    updates: dict[str, ArrayRecord] = field(default_factory=dict)
    mean: ArrayRecord | None = None
    mean_metrics: MetricRecord | None = None
    rejected: dict[str, str] = field(default_factory=dict)
    evaluation: EvaluateReply | None = None


def evaluate_content(reply: EvaluateReply) -> RecordDict:
    """An evaluate reply."""
    from flwr.app import RecordDict

    record = _cohort_record(reply.metrics, "")
    return RecordDict({USERS: record})


def _cohort_record(
    metrics: Mapping[str, MetricRecord], prefix: str, into: ConfigRecord | None = None
) -> ConfigRecord:
    """``metrics`` (user -> record) into one ConfigRecord: ``<prefix>ids`` and
    ``<prefix><i>/<metric>`` for the i-th user (``into``: add to that record)."""
    from flwr.app import ConfigRecord

    record = ConfigRecord() if into is None else into
    record[f"{prefix}{IDS}"] = [str(u) for u in metrics]
    for i, values in enumerate(metrics.values()):
        for name, value in values.items():
            record[f"{prefix}{i}/{name}"] = value
    return record


def _read_cohort(record: ConfigRecord, prefix: str) -> dict[str, MetricRecord]:
    """The user -> metrics of :func:`_cohort_record` (users in ``ids`` order)."""
    from flwr.app import MetricRecord

    users = _strings(record[f"{prefix}{IDS}"])
    per_user: list[dict[str, Any]] = [{} for _ in users]
    for key, value in record.items():
        if prefix and not key.startswith(prefix):
            continue
        head, sep, name = key[len(prefix) :].partition("/")
        if sep and head.isdigit():  # "evaluate/..." has no digits before its "/"
            if int(head) >= len(users):
                raise KeyError(f"{key}: no user {head} in {prefix}{IDS}")
            per_user[int(head)][name] = value
    missing = [u for u, m in zip(users, per_user, strict=True) if not m]
    if missing:
        raise KeyError(f"no metrics for users {missing[:3]}")
    return {u: MetricRecord(m) for u, m in zip(users, per_user, strict=True)}


def train_content(reply: TrainReply) -> RecordDict:
    """The records of a train reply (layout in the module docstring)."""
    from flwr.app import ConfigRecord, RecordDict

    content = RecordDict()
    for user, update in reply.updates.items():
        content[f"{USER_ARRAYS}{user}"] = update
    if reply.mean is not None and reply.mean_metrics is not None:
        content[ARRAYS] = reply.mean
        content[METRICS] = reply.mean_metrics
    if reply.rejected:
        content[REJECTED] = ConfigRecord(dict(reply.rejected))
    users = _cohort_record(reply.metrics, "")
    if reply.evaluation is not None:
        _cohort_record(reply.evaluation.metrics, EVALUATION, into=users)
    content[USERS] = users
    return content


def read_evaluate_reply(content: RecordDict, prefix: str = "") -> EvaluateReply:
    """An evaluate reply, or (``prefix`` = :data:`EVALUATION`) a train reply's carried one."""
    return EvaluateReply(_read_cohort(content.config_records[USERS], prefix))


def read_train_reply(content: RecordDict) -> TrainReply:
    """A train reply; KeyError if a listed user's metrics (or ``users``) are missing."""
    arrays, metrics = content.array_records, content.metric_records
    users = content.config_records[USERS]
    cohort = _read_cohort(users, "")
    rejected = content.config_records.get(REJECTED)
    return TrainReply(
        metrics=cohort,
        updates={u: arrays[k] for u in cohort if (k := f"{USER_ARRAYS}{u}") in arrays},
        mean=arrays.get(ARRAYS),
        mean_metrics=metrics.get(METRICS),
        rejected={str(u): str(r) for u, r in rejected.items()} if rejected else {},
        evaluation=(
            EvaluateReply(_read_cohort(users, EVALUATION))
            if f"{EVALUATION}{IDS}" in users
            else None
        ),
    )


def metric_record(values: Mapping[str, float]) -> MetricRecord:
    """Plain float metrics as a record (a fresh dict: Flower's value type is invariant)."""
    from flwr.app import MetricRecord

    return MetricRecord({**values})


def metric_values(record: MetricRecord) -> dict[str, float]:
    """A metric record as plain floats."""
    return {k: float(v) for k, v in record.items()}  # type: ignore[arg-type]


# ------------------------------------------------------------------ node config
def device_node_config(
    data_file: str,
    model_dir: str,
    *,
    user_id: str | None = None,
    user_column: str | None = None,
    label_column: str | None = None,
    device: str | None = None,
) -> dict[str, str]:
    """A device's node config (``flower-supernode --node-config``)."""
    items = {DATA_FILE: data_file, MODEL_DIR: model_dir}
    optional = {
        USER_ID: user_id,
        USER_COLUMN: user_column,
        LABEL_COLUMN: label_column,
        DEVICE: device,
    }
    items.update({k: v for k, v in optional.items() if v})
    return items


def simulated_node_config(partition_id: int, num_partitions: int) -> dict[str, int]:
    """A simulated node's config, as Flower's simulation engine gives it."""
    return {PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions}


@dataclass(frozen=True)
class NodeConfig:
    """What a node's config says about its users: a device's file, or a simulation slot."""

    data_file: str = ""
    user_id: str | None = None
    model_dir: str = ""
    user_column: str | None = None
    label_column: str | None = None
    device: str = ""  # empty: the run's simulation.device
    partition_id: int = 0
    num_partitions: int = 1


def read_node_config(node_config: Mapping[str, Any]) -> NodeConfig:
    def text(key: str) -> str | None:
        value = node_config.get(key)
        return str(value) if value not in (None, "") else None

    return NodeConfig(
        data_file=text(DATA_FILE) or "",
        user_id=text(USER_ID),
        model_dir=text(MODEL_DIR) or "",
        user_column=text(USER_COLUMN),
        label_column=text(LABEL_COLUMN),
        device=text(DEVICE) or "",
        partition_id=int(node_config.get(PARTITION_ID, 0)),
        num_partitions=int(node_config.get(NUM_PARTITIONS, 1)),
    )


# ------------------------------------------------------------------- helpers
def _ids(ids: Iterable[str]) -> ConfigRecord:
    from flwr.app import ConfigRecord

    return ConfigRecord({IDS: [str(u) for u in ids]})


def _strings(value: object) -> list[str]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list of user ids, got {type(value).__name__}")
    return [str(v) for v in value]


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a round number, got {value!r}")
    return int(value)
