"""Flower strategies over *users*, where one Flower node may host many users.

Flower's strategies sample, configure and aggregate *nodes*. Pollinate's unit is the user:
in simulation a node hosts a cohort of users (one node per user is the special case), on
a deployment a device is a node with one user. :class:`UserCohorts` is a mixin placed
in front of any ``flwr.serverapp.strategy`` class. It

1. asks each new node which users it hosts (a ``query`` message), and waits — with a
   timeout — for ``min_nodes`` nodes;
2. lets the Flower strategy's own ``configure_train`` / ``configure_evaluate`` sample
   from a view in which every *user* is a node, so Flower's sampling, FedProx's
   ``proximal-mu`` and FedOpt's bookkeeping all run unchanged;
3. routes the per-user messages to the nodes hosting those users (one message per node);
4. expands each node's reply back into one message per user before calling the Flower
   strategy's ``aggregate_*``: FedAvg weights every user by its examples, and robust
   aggregators (median, trimmed mean, Krum) see every user's individual update;
5. folds round r+1's training into round r's evaluation: both carry the same global
   model, so each node gets one ``train`` message with config ``evaluate-users`` /
   ``evaluate-round`` as well as ``users``, evaluates, then trains, and replies both
   (``evaluate/users`` and ``evaluate/metrics/<user>`` besides the training records).
   Flower's ``start()`` runs unchanged: the replies of the folded exchange are split,
   and round r+1's ``configure_train`` sends nothing and its ``aggregate_train`` takes the
   training half. The users, updates and results are the same as with two exchanges
   (sampling draws from the same stream in the same order); a deployed round costs one
   exchange instead of two.

Before Flower's ``aggregate_train`` sees the per-user messages, each is checked
(:mod:`pollinate.server.validation`): a refused update is left out of the round and
recorded; a round with nothing left keeps its global model; an aggregate that is not
finite stops the run (:class:`~pollinate.models.checks.NonFiniteModelError`) before it is
sent anywhere. With an ``[attack]`` config it also names, per node, the sampled users that
play attacker (config ``attack-users``).

It also feeds the run's :class:`~pollinate.server.metrics.MetricsRecorder`.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from flwr.supercore import log

from pollinate.config import AttackSection, ConfigError, RunConfig, ValidationSection
from pollinate.models.attacks import malicious_users
from pollinate.models.checks import ensure_finite_model
from pollinate.registry import UnknownNameError
from pollinate.server.failures import check_exchange, error_reason
from pollinate.server.metrics import MetricsRecorder
from pollinate.server.validation import Candidate, global_vector, screen_updates

# What a user should see goes to Pollinate's own logger (the CLI prints it).
_logger = logging.getLogger("pollinate")

USERS_RETRY = 1.0  # s between asking nodes that could not say which users they host


class NodeWaitTimeout(RuntimeError):
    """Too few nodes connected within the configured time."""


def wait_for_nodes(
    grid: Grid, minimum: int, timeout: float, *, deadline: float | None = None
) -> list[int]:
    """Node ids once at least ``minimum`` are connected; NodeWaitTimeout after ``timeout`` s
    (or at ``deadline``, a ``time.monotonic()`` instant, if given)."""
    deadline = time.monotonic() + timeout if deadline is None else deadline
    next_log = 0.0
    while len(ids := list(grid.get_node_ids())) < minimum:
        now = time.monotonic()
        if now >= deadline:
            raise NodeWaitTimeout(
                f"only {len(ids)} of the {minimum} nodes required (strategy.min-nodes) "
                f"connected within {timeout:g} s (server.node-wait-timeout); "
                "start more nodes or lower strategy.min-nodes"
            )
        if now >= next_log:
            log(INFO, "Waiting for nodes: %d connected, %d required", len(ids), minimum)
            next_log = now + 10
        time.sleep(0.2)
    return ids


class _UsersAsNodes:
    """Stands in for the Grid inside Flower's sampling: each user index is a 'node'."""

    def __init__(self, num_users: int) -> None:
        self._ids = list(range(num_users))

    def get_node_ids(self) -> list[int]:
        return self._ids


def _node_reply(records: dict[str, Any], reply: Message, message_type: str) -> Message:
    """A reply from ``reply``'s node carrying one user's records (or its cohort's mean)."""
    return Message(
        RecordDict(records), dst_node_id=reply.metadata.src_node_id, message_type=message_type
    )


class UserCohorts:
    """Mixin: put it before a Flower strategy class (``class S(UserCohorts, FedAvg)``)."""

    # True where the Flower strategy's aggregate is the example-weighted mean of the
    # updates (FedAvg and the strategies built on that mean): nodes then send their
    # cohort's mean, which is the same result up to float rounding. Robust aggregators
    # (median, trimmed mean, Krum) keep it False and see every user's own update.
    mean_of_updates: bool = False
    # Provided by the Flower strategy this mixin is combined with.
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int

    recorder: MetricsRecorder | None = None
    round_timeout: float | None = None
    num_rounds: int = 0  # 0: unknown, no folding
    min_nodes: int = 1
    node_wait_timeout: float = 120.0
    query_timeout: float = 600.0
    min_train_users: int = 1
    min_evaluate_users: int = 1
    # A resumed run: Flower's `start()` counts its rounds from 1, the run goes on from here.
    round_offset: int = 0
    validation: ValidationSection = ValidationSection()
    attack: AttackSection = AttackSection()

    def bind(
        self,
        *,
        recorder: MetricsRecorder | None,
        min_nodes: int,
        node_wait_timeout: float,
        min_train_users: int,
        min_evaluate_users: int,
        seed: int | None = None,
        num_rounds: int = 0,
        round_timeout: float | None = None,
        validation: ValidationSection | None = None,
        attack: AttackSection | None = None,
    ) -> None:
        self.recorder = recorder
        self.round_timeout = round_timeout
        self.validation = validation or ValidationSection()
        self.attack = attack or AttackSection()
        self._attackers: frozenset[str] = frozenset()
        # The global model each round's training started from (for update norms).
        self._sent_global: dict[int, ArrayRecord] = {}
        self._model_dtype: np.dtype | None = None
        self.num_rounds = num_rounds
        self.min_nodes = min_nodes
        self.node_wait_timeout = node_wait_timeout
        self.min_train_users = min_train_users
        self.min_evaluate_users = min_evaluate_users
        # Flower's samplers draw from the `random` module, and so do other threads of the
        # process (Ray's start-up, racing the ServerApp thread in simulation): sample from
        # this strategy's own stream, so a seed gives the same users on every run.
        self._random_state = random.Random(seed).getstate() if seed is not None else None
        # The sampler as it was when the last round's own sampling was done (before the
        # next round's training was drawn ahead): what a checkpoint of that round keeps.
        self._round_end_random = self._random_state
        self._users_of_node: dict[int, list[str]] = {}
        self._node_of_user: dict[str, int] = {}
        self._user_list: list[str] = []
        self._train_config: ConfigRecord | None = None
        # The folded exchange in flight: (evaluate round, its messages, nodes evaluating,
        # nodes training), and the training half of its replies, for the next round.
        self._folded: tuple[int, list[Message], set[int], set[int]] | None = None
        self._trained_ahead: tuple[int, list[Message]] | None = None
        # Nodes sent each exchange's work, by (message type, round): see check_exchange.
        self._sent: dict[tuple[str, int], int] = {}

    def sampler_state(self) -> Any:
        """The sampler's state at the end of the last configured round (for checkpoints)."""
        return self._round_end_random

    def restore_sampler(self, state: Any) -> None:
        self._random_state = self._round_end_random = state

    # ------------------------------------------------------------ user directory
    @property
    def users(self) -> list[str]:
        """All known user ids, sorted."""
        return list(self._user_list)

    def refresh_users(self, grid: Grid, config: ConfigRecord) -> None:
        """Learn which users new nodes host; forget nodes that left.

        A node that could not answer (it restarted just then, say) is asked again next
        time; while no connected node has answered, this keeps asking, up to
        ``server.node-wait-timeout``.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        while True:
            failures = self._learn_users(grid, config, deadline)
            if self._user_list:
                return
            if time.monotonic() >= deadline:
                why = f" ({failures[0]})" if failures else ""
                raise NodeWaitTimeout(
                    f"the connected nodes host no users{why} after "
                    f"{self.node_wait_timeout:g} s (server.node-wait-timeout): check their "
                    "data files and logs"
                )
            time.sleep(USERS_RETRY)

    def _learn_users(self, grid: Grid, config: ConfigRecord, deadline: float) -> list[str]:
        """One pass of :meth:`refresh_users`; the nodes that failed to answer, with why."""
        live = set(wait_for_nodes(grid, self.min_nodes, self.node_wait_timeout, deadline=deadline))
        for node in [n for n in self._users_of_node if n not in live]:
            log(WARNING, "Node %d left; its users are no longer sampled", node)
            del self._users_of_node[node]
        new = sorted(n for n in live if n not in self._users_of_node)
        failures: list[str] = []
        if new:
            queries = [
                Message(
                    RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY
                )
                for n in new
            ]
            answered: dict[int, list[str]] = {}
            for reply in grid.send_and_receive(queries, timeout=self.query_timeout):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    reason = error_reason(reply.error.reason or "")
                    failures.append(f"node {node}: {reason}")
                    log(WARNING, "Node %d could not list its users: %s", node, reason)
                    continue
                ids = [str(u) for u in reply.content["users"]["ids"]]  # type: ignore[union-attr]
                answered[node] = ids
                log(INFO, "Node %d hosts %d user(s)", node, len(ids))
            for node in sorted(answered):  # in a fixed order: replies come in any order
                self._users_of_node[node] = answered[node]
        # A user id claimed by a newer node (a restarted device that is a new node, while
        # the old one is not yet known to be gone) moves to it: nodes in the order learned.
        self._node_of_user = {u: n for n, users in self._users_of_node.items() for u in users}
        self._user_list = sorted(self._node_of_user)
        self._pick_attackers()
        return failures

    def _pick_attackers(self) -> None:
        """The simulated attackers among the known users (``[attack]``; seeded)."""
        a = self.attack
        if a.kind == "none":
            return
        attackers = frozenset(malicious_users(self._user_list, a.fraction, a.seed))
        if attackers != self._attackers:
            _logger.warning(
                "attack %s: %d of %d users are malicious: %s",
                a.kind,
                len(attackers),
                len(self._user_list),
                ", ".join(sorted(attackers)),
            )
        self._attackers = attackers

    @property
    def sends_cohort_means(self) -> bool:
        """Nodes send their cohort's mean: the aggregate is the mean, and no check needs
        every user's own update (the round's median norm does)."""
        return self.mean_of_updates and self.validation.norm_bound_median_multiple == 0

    # ------------------------------------------------------------------ routing
    def _users_by_node(self, messages: Iterable[Message]) -> dict[int, list[str]]:
        """The sampled users (one 'node' of the users-as-nodes view each), by hosting node."""
        by_node: dict[int, list[str]] = {}
        for msg in messages:
            user = self._user_list[msg.metadata.dst_node_id]
            by_node.setdefault(self._node_of_user[user], []).append(user)
        return {node: sorted(users) for node, users in by_node.items()}

    def _route(
        self,
        messages: list[Message],
        message_type: str,
        server_round: int,
        evaluate: tuple[int, list[Message]] | None = None,
    ) -> list[Message]:
        """One message per node for ``messages`` (Flower's, one per sampled user).

        With ``evaluate`` = (round, its evaluate messages), ``messages`` are the next
        round's training and each node's message carries both (see the module doc).
        """
        evaluated = evaluate[1] if evaluate is not None else []
        if not messages and not evaluated:
            return []
        template = (messages or evaluated)[0].content
        arrays = template["arrays"]
        trainers = self._users_by_node(messages)
        evaluators = self._users_by_node(evaluated)
        routed = []
        for node in sorted(trainers.keys() | evaluators.keys()):
            config = ConfigRecord(dict(template["config"]))  # type: ignore[arg-type]
            config["users"] = trainers.get(node, [])
            if evaluate is not None:
                config["evaluate-users"] = evaluators.get(node, [])
                config["evaluate-round"] = evaluate[0]
            if message_type == MessageType.TRAIN and self.sends_cohort_means:
                config["node-mean"] = True
            if message_type == MessageType.TRAIN and self._attackers:
                config["attack-users"] = [u for u in trainers.get(node, []) if u in self._attackers]
            routed.append(
                Message(
                    RecordDict({"arrays": arrays, "config": config}),
                    dst_node_id=node,
                    message_type=message_type,
                )
            )
        if evaluate is not None:
            self._folded = (evaluate[0], routed, set(evaluators), set(trainers))
            self._sent[("train", server_round + 1)] = len(trainers)
            self._sent[("evaluate", server_round)] = len(evaluators)
        else:
            self._sent[(message_type, server_round)] = len(routed)
        if self.recorder is not None:
            sent = arrays.count_bytes() * len(routed)
            self.recorder.add_bytes(server_round, sent=sent)
        return routed

    @contextmanager
    def _own_random(self) -> Iterator[None]:
        """Run Flower's sampling on this strategy's own `random` stream (if seeded)."""
        state = getattr(self, "_random_state", None)
        if state is None:
            yield
            return
        outer = random.getstate()
        random.setstate(state)
        try:
            yield
        finally:
            self._random_state = random.getstate()
            random.setstate(outer)

    def _sample_view(self, fraction: float, minimum: int) -> tuple[_UsersAsNodes, int]:
        n = len(self._user_list)
        return _UsersAsNodes(n), min(max(minimum, 1), n) if fraction > 0 else 0

    def _sample_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> list[Message]:
        """Flower's ``configure_train`` over the users-as-nodes view: one message per user."""
        view, self.min_train_nodes = self._sample_view(self.fraction_train, self.min_train_users)
        self.min_available_nodes = 1
        self._sent_global[server_round] = arrays
        if self._model_dtype is None:  # the initial model's: what the users' models use
            self._model_dtype = global_vector(arrays).dtype
        with self._own_random():
            return list(super().configure_train(server_round, arrays, config, view))  # type: ignore[misc]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if self.recorder is not None:
            self.recorder.begin_round(server_round)
        self._train_config = config
        if self._trained_ahead is not None and self._trained_ahead[0] == server_round:
            return []  # trained in the previous round's evaluation exchange
        self.refresh_users(grid, config)
        messages = self._sample_train(server_round, arrays, config)
        return self._route(messages, MessageType.TRAIN, server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self.refresh_users(grid, config)
        view, self.min_evaluate_nodes = self._sample_view(
            self.fraction_evaluate, self.min_evaluate_users
        )
        with self._own_random():
            messages = list(super().configure_evaluate(server_round, arrays, config, view))  # type: ignore[misc]
        self._round_end_random = getattr(self, "_random_state", None)
        if server_round >= self.num_rounds or self._train_config is None:
            return self._route(messages, MessageType.EVALUATE, server_round)
        # The next round trains from these same `arrays` (Flower passes them on unchanged).
        ahead = self._sample_train(server_round + 1, arrays, self._train_config)
        if not ahead and not messages:  # nobody to train or evaluate: round r+1 has no work
            self._trained_ahead = (server_round + 1, [])
        return self._route(
            ahead, MessageType.TRAIN, server_round, evaluate=(server_round, messages)
        )

    # -------------------------------------------------------------- aggregation
    def _expand(
        self, replies: Iterable[Message], server_round: int, train: bool, prefix: str = ""
    ) -> list[Message]:
        """One message per user, as if every user were its own node.

        ``prefix`` names the records of a folded reply's evaluation (``evaluate/``).
        """
        return [c.msg for c in self._expand_updates(replies, server_round, train, prefix)]

    def _expand_updates(
        self, replies: Iterable[Message], server_round: int, train: bool, prefix: str = ""
    ) -> list[Candidate]:
        """:meth:`_expand`, each message with the users it stands for (none: an error)."""
        per_user: list[Candidate] = []
        received = failures = 0
        message_type = MessageType.TRAIN if train else MessageType.EVALUATE
        for reply in replies:
            if reply.has_error():
                failures += 1
                if self.recorder is not None:
                    self.recorder.note_failure(error_reason(reply.error.reason or ""))
                per_user.append(Candidate("", (), reply))  # Flower's strategy logs, skips it
                continue
            content = reply.content

            ids = [str(u) for u in content[f"{prefix}users"]["ids"]]  # type: ignore[union-attr]
            node_mean = train and "arrays" in content.array_records
            if node_mean and ids:
                # The node's cohort mean stands for its users, weighted by their examples.
                received += content.array_records["arrays"].count_bytes()
                mean: dict[str, Any] = {
                    "arrays": content.array_records["arrays"],
                    "metrics": content.metric_records["metrics"],
                }
                mean_msg = _node_reply(mean, reply, message_type)
                per_user.append(Candidate(min(ids), tuple(ids), mean_msg))
            for user in ids:
                metrics: MetricRecord = content[f"{prefix}metrics/{user}"]  # type: ignore[assignment]
                # A node that sent its cohort's mean, or a user with nothing to send (no
                # training examples), adds no per-user update.
                has_update = f"arrays/{user}" in content.array_records
                if not node_mean and (has_update or not train):
                    records: dict[str, Any] = {"metrics": metrics}
                    if train:
                        records["arrays"] = content[f"arrays/{user}"]
                        received += records["arrays"].count_bytes()
                    user_msg = _node_reply(records, reply, message_type)
                    per_user.append(Candidate(str(user), (str(user),), user_msg))
                if self.recorder is not None:
                    values = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
                    if train:
                        self.recorder.user_trained(server_round, str(user), values)
                    else:
                        self.recorder.user_evaluated(server_round, str(user), values)
            if train and "rejected" in content.config_records:
                # A node that averages its cohort checked each update first (client/app.py).
                for user, reason in content.config_records["rejected"].items():
                    self._reject(server_round, (str(user),), str(reason))
        if self.recorder is not None:
            self.recorder.add_bytes(server_round, received=received)
            self.recorder.add_failures(server_round, failures)
        # Replies arrive in whatever order the nodes finish; a fixed order makes the
        # floating-point sums, and so the whole run, reproducible.
        per_user.sort(key=lambda c: c.key)
        return per_user

    def _reject(self, server_round: int, users: tuple[str, ...], reason: str) -> None:
        who = users[0] if len(users) == 1 else f"the cohort mean of {', '.join(users)}"
        _logger.warning("round %3d | rejected the update of %s: %s", server_round, who, reason)
        if self.recorder is not None:
            for user in users:
                self.recorder.user_rejected(server_round, user, reason)

    def _screened(self, server_round: int, updates: list[Candidate]) -> list[Candidate]:
        """The updates that pass :func:`~pollinate.server.validation.screen_updates`
        (error replies pass through: Flower counts them as failures)."""
        sent = self._sent_global.pop(server_round, None)
        errors = [c for c in updates if not c.users]
        candidates = [c for c in updates if c.users]
        if sent is None or not candidates:
            return updates
        accepted, rejected = screen_updates(candidates, sent, self.validation)
        for c, reason in rejected.items():
            if reason:
                self._reject(server_round, c.users, reason)
        if not accepted and any(rejected.values()):
            _logger.warning(
                "round %3d | every update was rejected: the global model stays as it was",
                server_round,
            )
        return sorted([*errors, *accepted], key=lambda c: c.key)

    def _aggregate_updates(
        self, server_round: int, updates: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The Flower strategy's own ``aggregate_train`` over the screened updates."""
        return super().aggregate_train(server_round, updates)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        if self._trained_ahead is not None and self._trained_ahead[0] == server_round:
            replies = [*replies, *self._trained_ahead[1]]
            self._trained_ahead = None
        replies = list(replies)
        sent = self._sent.pop(("train", server_round), 0)
        check_exchange(server_round, "train", sent, replies, self.round_timeout)
        updates = self._screened(server_round, self._expand_updates(replies, server_round, True))
        if not any(c.users for c in updates):
            return None, None  # nothing left to aggregate: the global model stays
        arrays, metrics = self._aggregate_updates(server_round, [c.msg for c in updates])
        if arrays is not None:
            # Never send on a broken model (an aggregate that overflowed, a server
            # optimizer that diverged): the run stops here, before anything is written.
            ensure_finite_model(
                global_vector(arrays), f"round {server_round}'s global model", self._model_dtype
            )
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        expected = self._sent.pop(("evaluate", server_round), 0)
        if self._folded is None or self._folded[0] != server_round:
            check_exchange(server_round, "evaluate", expected, replies, self.round_timeout)
            per_user = self._expand(replies, server_round, train=False)
            return super().aggregate_evaluate(server_round, per_user)  # type: ignore[misc]
        _, sent, evaluators, trainers = self._folded
        self._folded = None
        self._trained_ahead = (server_round + 1, _from_nodes(replies, trainers, sent))
        evaluated = _from_nodes(replies, evaluators, sent)
        check_exchange(server_round, "evaluate", expected, evaluated, self.round_timeout)
        per_user = self._expand(evaluated, server_round, train=False, prefix="evaluate/")
        return super().aggregate_evaluate(server_round, per_user)  # type: ignore[misc]


def _from_nodes(replies: list[Message], nodes: set[int], sent: list[Message]) -> list[Message]:
    """The replies (or errors) of a folded exchange from the nodes that had this half.

    An error the SuperLink made up for a node that went away names no node: it is matched
    to the node through the message it answers (the grid set ``message_id`` on push).
    """
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    return [
        r
        for r in replies
        if node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) in nodes
    ]


class CohortFedAvg(UserCohorts, FedAvg):
    """FedAvg (McMahan et al., 2017) over users."""

    mean_of_updates = True


class CohortFedProx(UserCohorts, FedProx):
    """FedProx (Li et al., 2020): clients add (mu/2)||w - w_global||^2."""

    mean_of_updates = True


class CohortFedAdam(UserCohorts, FedAdam):
    """FedAdam (Reddi et al., 2021): Adam on the server over the averaged update."""

    mean_of_updates = True


class CohortFedYogi(UserCohorts, FedYogi):
    """FedYogi (Reddi et al., 2021)."""

    mean_of_updates = True


class CohortFedMedian(UserCohorts, FedMedian):
    """Coordinate-wise median (Yin et al., 2018)."""


class CohortFedTrimmedAvg(UserCohorts, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al., 2018)."""


class CohortKrum(UserCohorts, Krum):
    """Krum (Blanchard et al., 2017)."""


class CohortMultiKrum(UserCohorts, MultiKrum):
    """Multi-Krum (Blanchard et al., 2017): the mean of the ``m`` best Krum scores."""

    select_all_but_byzantine: bool = False  # m = n - f, n the round's updates

    def _aggregate_updates(
        self, server_round: int, updates: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.select_all_but_byzantine:
            n = sum(not m.has_error() for m in updates)
            self.num_nodes_to_select = max(1, n - self.num_malicious_nodes)
        return super()._aggregate_updates(server_round, updates)


class CohortBulyan(UserCohorts, Bulyan):
    """Bulyan (El Mhamdi et al., 2018): Multi-Krum selection, then a trimmed median.

    Needs at least 4f + 3 updates in a round (f = ``strategy.krum-byzantine``); a round
    with fewer keeps the global model (Flower logs why).
    """

    def _aggregate_updates(
        self, server_round: int, updates: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Flower's Bulyan reads each update with to_numpy_ndarrays(keep_input=False), which
        # runs a full gc.collect() per update: 0.6 s each in a process holding torch and a
        # run's data (20 users: most of a round). Frozen, the collector skips what existed
        # before the aggregate, which is all it could not free anyway.
        gc.freeze()
        try:
            return super()._aggregate_updates(server_round, updates)
        finally:
            gc.unfreeze()


def build_strategy(cfg: RunConfig, recorder: MetricsRecorder | None = None) -> UserCohorts:
    """The configured Flower strategy, over users."""
    s = cfg.strategy
    common: dict[str, Any] = {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_train_users,
        "min_evaluate_nodes": s.min_evaluate_users,
        "min_available_nodes": 1,
    }
    # The registry imports this module's Cohort classes: imported here, not at the top.
    from pollinate.server.strategies import STRATEGIES

    try:
        entry = STRATEGIES.get(s.name)
    except UnknownNameError as err:  # config.resolve refuses it first; a hand-built one not
        raise ConfigError(str(err)) from None
    strategy = entry.build(common, s.options, cfg)
    strategy.bind(
        recorder=recorder,
        min_nodes=s.min_nodes,
        node_wait_timeout=cfg.server.node_wait_timeout,
        min_train_users=s.min_train_users,
        min_evaluate_users=s.min_evaluate_users,
        seed=cfg.run.seed,
        num_rounds=cfg.run.num_rounds,
        round_timeout=cfg.server.round_timeout,
        validation=cfg.validation,
        attack=cfg.attack,
    )
    return strategy
