"""The round protocol lives in protocol.py: its builders and readers agree, and no other
module spells one of its names."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from pollinate import protocol

ROOT = Path(protocol.__file__).resolve().parent
# Not the product: tests build messages by hand on purpose, benchmarks/flower_default.py is
# a stock Flower app (Flower's own names), docs/ holds scripts about the docs.
SKIPPED = {"tests", "benchmarks", "docs", ".venv", "build", "runs"}

# Names that mean nothing else anywhere in the package: never spelled outside protocol.py.
DISTINCT = {
    protocol.SERVER_ROUND,
    protocol.MODEL_SPEC,
    protocol.RUN_KEY,
    protocol.EVALUATE_USERS,
    protocol.EVALUATE_ROUND,
    protocol.NODE_MEAN,
    protocol.ATTACK_USERS,
    *protocol.TRAIN_METRICS,
    *protocol.EVALUATE_METRICS,
    protocol.DATA_FILE,
    protocol.USER_ID,
    protocol.MODEL_DIR,
    protocol.PARTITION_ID,
    protocol.NUM_PARTITIONS,
}
PREFIXES = (protocol.USER_ARRAYS, protocol.EVALUATION)
# Common words ("config" is also a checkpoint field, "users" a folder): protocol names
# only where a Flower-layer module (one importing flwr) uses them as a key.
GENERIC = {
    protocol.ARRAYS,
    protocol.CONFIG,
    protocol.METRICS,
    protocol.USERS,
    protocol.IDS,
    protocol.REJECTED,
    protocol.WEIGHTS,
    # Also config option names (strategy.proximal-mu, data.user-column, ...), which the
    # registries spell as their options: protocol names only as a Flower-layer key.
    protocol.PROXIMAL_MU,
    protocol.USER_COLUMN,
    protocol.LABEL_COLUMN,
}


def _sources() -> list[Path]:
    return [
        p
        for p in sorted(ROOT.rglob("*.py"))
        if p.name != "protocol.py" and not SKIPPED & set(p.relative_to(ROOT).parts[:-1])
    ]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose, not code)."""
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                out.add(id(value))
    return out


def _imports_flwr(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flwr":
            return True
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "flwr" for a in node.names):
            return True
    return False


def _key_positions(tree: ast.AST) -> set[int]:
    """ids of constants used as a key: ``x["k"]``, ``x.get("k")``, ``"k" in x``, ``{"k": v}``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            out.add(id(node.slice))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("get", "pop", "setdefault") and node.args:
                out.add(id(node.args[0]))
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In | ast.NotIn):
            out.add(id(node.left))
        elif isinstance(node, ast.Dict):
            out.update(id(k) for k in node.keys if k is not None)
    return out


def protocol_literals(path: Path) -> list[str]:
    """``file:line: 'literal'`` for each protocol name spelled in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docs = _docstrings(tree)
    keys = _key_positions(tree) if _imports_flwr(tree) else set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values:
            head = node.values[0]
            docs.update(id(part) for part in node.values)  # judged here, as one string
            if isinstance(head, ast.Constant) and str(head.value).startswith(PREFIXES):
                found.append((node.lineno, f"f'{head.value!s}...'"))
            continue
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        if id(node) in docs:
            continue
        s = node.value
        if s in DISTINCT or s.startswith(PREFIXES) or (s in GENERIC and id(node) in keys):
            found.append((node.lineno, repr(s)))
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return [f"{rel}:{line}: {text}" for line, text in sorted(found)]


def test_no_protocol_string_outside_protocol_py() -> None:
    found = [hit for p in _sources() for hit in protocol_literals(p)]
    assert not found, "use pollinate.protocol's names instead:\n" + "\n".join(found)


def test_the_scan_catches_each_kind_of_literal(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text(
        "from flwr.app import RecordDict\n"
        "def f(content: RecordDict, user: str) -> object:\n"
        "    '''A docstring may say node-mean and arrays/<user>.'''\n"
        "    a = content['arrays']\n"
        "    b = content.config_records['config'].get('node-mean')\n"
        "    return a, b, content[f'arrays/{user}'], {'num-examples': 1}\n"
    )
    hits = protocol_literals(bad)
    assert sorted(h.split(": ", 1)[1] for h in hits) == [
        "'arrays'",
        "'config'",
        "'node-mean'",
        "'num-examples'",
        "f'arrays/...'",
    ]


# ----------------------------------------------------------- builders and readers


def test_an_instruction_reads_back_as_built() -> None:
    config = protocol.run_config_record({"train.lr": 0.1}, '{"name": "mlp"}', "k1")
    config[protocol.SERVER_ROUND] = 4
    arrays = protocol.weights_record(torch.arange(3.0))
    content = protocol.instruction_content(
        arrays,
        config,
        users=["b", "a"],
        evaluation=protocol.CarriedEvaluation(3, ["c"]),
        node_mean=True,
        attack_users=["a"],
    )
    assert protocol.SAMPLED_USERS not in config  # the round's config is not changed
    ask = protocol.read_instruction(content)
    assert ask == protocol.Instruction(
        server_round=4,
        model_spec='{"name": "mlp"}',
        run_key="k1",
        users=["b", "a"],
        evaluation=protocol.CarriedEvaluation(3, ["c"]),
        node_mean=True,
        attack_users=frozenset({"a"}),
    )
    assert protocol.message_config(content)["train.lr"] == 0.1
    assert torch.equal(protocol.read_weights(protocol.global_arrays(content)), torch.arange(3.0))
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    assert protocol.describe_instruction(msg) == "round 3 evaluate + round 4 train"


def test_a_train_reply_reads_back_as_built() -> None:
    update = protocol.weights_record(torch.ones(2))
    reply = protocol.TrainReply(
        metrics={
            "a": protocol.metric_record(protocol.train_metrics(5, 0.5)),
            "b": protocol.metric_record(protocol.train_metrics(0, 0.0)),
        },
        updates={"a": update},
        rejected={"b": "num-examples 0"},
        evaluation=protocol.EvaluateReply(
            {"c": protocol.metric_record(protocol.evaluate_metrics(4, 0.1, 0.9, 0.2, 0.8))}
        ),
    )
    got = protocol.read_train_reply(protocol.train_content(reply))
    assert list(got.metrics) == ["a", "b"] and list(got.updates) == ["a"]
    assert protocol.metric_values(got.metrics["a"]) == {"num-examples": 5.0, "train-loss": 0.5}
    assert got.mean is None and got.rejected == {"b": "num-examples 0"}
    assert got.evaluation is not None
    c = protocol.metric_values(got.evaluation.metrics["c"])
    assert c[protocol.PERSONAL_ACCURACY] == 0.8 and set(c) == set(protocol.EVALUATE_METRICS)


def test_a_cohort_mean_reply_and_a_query_reply() -> None:
    reply = protocol.TrainReply(
        metrics={"a": protocol.metric_record(protocol.train_metrics(5, 0.5))},
        mean=protocol.weights_record(torch.zeros(2)),
        mean_metrics=protocol.metric_record(protocol.train_metrics(5, 0.5)),
    )
    content = protocol.train_content(reply)
    # What Flower's aggregate reads: exactly one arrays and one metrics record by its keys.
    assert isinstance(content[protocol.ARRAYS], ArrayRecord)
    got = protocol.read_train_reply(content)
    assert got.mean is not None and got.updates == {}
    assert protocol.read_users(protocol.users_content(["x", "y"])) == ["x", "y"]
    query = protocol.query_content(ConfigRecord({"run.seed": 1}))
    assert isinstance(query, RecordDict) and protocol.message_config(query)["run.seed"] == 1


def test_node_configs_read_back() -> None:
    device = protocol.device_node_config("/d.csv", "/m", user_id="u1")
    assert protocol.read_node_config(device) == protocol.NodeConfig(
        data_file="/d.csv", user_id="u1", model_dir="/m"
    )
    sim = protocol.read_node_config(protocol.simulated_node_config(2, 5))
    assert (sim.partition_id, sim.num_partitions, sim.data_file) == (2, 5, "")


def _objects(content: RecordDict) -> int:
    """Objects a reply is on the wire: the message, its records, their arrays."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return len(get_all_nested_objects(Message(content, dst_node_id=1, message_type="train")))


def test_a_cohorts_metrics_travel_as_one_record() -> None:
    # One user with a carried evaluation: message, record dict, users, and its update's
    # ArrayRecord, Array and ArrayChunk; a record per user and half would make it 10.
    one = protocol.TrainReply(
        metrics={"u": protocol.metric_record(protocol.train_metrics(5, 0.5))},
        updates={"u": protocol.weights_record(torch.ones(2))},
        evaluation=protocol.EvaluateReply(
            {"u": protocol.metric_record(protocol.evaluate_metrics(4, 0.1, 0.9, 0.2, 0.8))}
        ),
    )
    assert _objects(protocol.train_content(one)) == 6
    many = protocol.EvaluateReply(
        {
            f"user/{i}": protocol.metric_record(protocol.evaluate_metrics(i, 0.1, 0.9, 0.2, i))
            for i in range(50)
        }
    )
    content = protocol.evaluate_content(many)
    assert _objects(content) == 3  # message, record dict, users: however many users
    got = protocol.read_evaluate_reply(content)
    assert list(got.metrics) == list(many.metrics)  # order kept, "/" in an id is fine
    for user, record in many.metrics.items():
        assert dict(got.metrics[user]) == dict(record)
        assert type(got.metrics[user][protocol.NUM_EXAMPLES]) is int  # ints stay ints


def test_a_listed_user_without_metrics_is_a_key_error() -> None:
    import pytest

    content = protocol.evaluate_content(protocol.EvaluateReply({}))
    users = content.config_records[protocol.USERS]
    users[protocol.IDS] = ["ghost"]
    with pytest.raises(KeyError, match="ghost"):
        protocol.read_evaluate_reply(content)
    users["3/num-examples"] = 1
    with pytest.raises(KeyError, match="no user 3"):
        protocol.read_evaluate_reply(content)
