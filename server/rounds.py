"""One federated round, end to end: Flower strategies over *users*, one exchange per round.

Flower's strategies sample, configure and aggregate *nodes*. Pollinate's unit is the user:
in simulation a node hosts a cohort of users (one node per user is the special case), on
a deployment a device is a node with one user. :class:`UserCohorts` is a mixin placed in
front of any ``flwr.serverapp.strategy`` class (``class CohortFedAvg(UserCohorts,
FedAvg)``), configured once in its constructor. :meth:`UserCohorts.run` is the whole run,
and replaces Flower's ``Strategy.start``; each round r is

1. **who**: ask new nodes which users they host (:class:`UserDirectory`), then sample
   round r-1's evaluation users and round r's training users from the strategy's own
   ``random.Random`` (:func:`sample_users`: Flower's FedAvg rule over users);
2. **one exchange**: one message per node (:mod:`pollinate.protocol`), carrying the
   global model, the node's users to train in round r and, folded into it, those to
   evaluate for round r-1 — both halves use the same global model, so a round costs a
   deployment one exchange, not two. The node evaluates, then trains, and replies both;
3. **round r-1 ends**: the evaluation half is aggregated and ``end_of_round(r-1, ...)``
   runs (central evaluation, the metrics row, the checkpoint: :mod:`pollinate.server.app`);
4. **round r's aggregate**: each node's reply is expanded into one message per user, the
   updates are checked (:mod:`pollinate.server.validation`) and the Flower strategy's own
   ``aggregate_train`` gives the new global model: FedAvg weights every user by its
   examples, robust aggregators (median, trimmed mean, Krum) see every user's update.

After the last round one more exchange evaluates the final model. The users sampled, the
updates and the results are those of separate train and evaluate exchanges (sampling
draws from one stream in the same order: train 1, evaluate 1, train 2, ...).

A refused update is left out of its round and recorded; a round with nothing left keeps
its global model; an aggregate that is not finite stops the run
(:class:`~pollinate.models.checks.NonFiniteModelError`) before it is sent anywhere. With an
``[attack]`` config the nodes are told which of their sampled users play attacker.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from pollinate import protocol
from pollinate.config import AttackSection, RunConfig, ValidationSection
from pollinate.models.attacks import malicious_users
from pollinate.models.checks import ensure_finite_model
from pollinate.server.failures import check_exchange, error_reason
from pollinate.server.metrics import MetricsRecorder
from pollinate.server.validation import Candidate, global_vector, screen_updates

# Flower's own logger (the one Flower's own ``log`` writes to), for what Flower would say.
log = logging.getLogger("flwr").log

# What a user should see goes to Pollinate's own logger (the CLI prints it).
_logger = logging.getLogger("pollinate")

USERS_RETRY = 1.0  # s between asking nodes that could not say which users they host

# Called as each round ends: (round, its global model, the sampler state to resume from).
EndOfRound = Callable[[int, ArrayRecord, Any], None]


class NodeWaitTimeout(RuntimeError):
    """Too few nodes connected within the configured time."""


@dataclass(frozen=True)
class CohortSettings:
    """How users are sampled and nodes waited for; fixed for the run."""

    seed: int | None = None  # the sampler's; None: a fresh, unseeded one
    min_nodes: int = 1
    node_wait_timeout: float = 120.0
    query_timeout: float = 600.0
    min_train_users: int = 1
    min_evaluate_users: int = 1
    round_timeout: float | None = None
    validation: ValidationSection = field(default_factory=ValidationSection)
    attack: AttackSection = field(default_factory=AttackSection)
    # privacy.secure-aggregation: each train exchange is a SecAgg+ round (server/secagg.py,
    # which wraps the grid); nodes then always send their cohort's mean.
    secure_aggregation: bool = False

    @classmethod
    def from_config(cls, cfg: RunConfig) -> CohortSettings:
        s = cfg.strategy
        return cls(
            seed=cfg.run.seed,
            min_nodes=s.min_nodes,
            node_wait_timeout=cfg.server.node_wait_timeout,
            # Asking every node which users it hosts is an exchange with all of them at
            # once: at 1,000 devices on 2 cores it outlasted 600 s, and the first round then
            # trained only the nodes that had answered. It waits at least as long as the run
            # waits for its nodes.
            query_timeout=max(cls.query_timeout, cfg.server.node_wait_timeout),
            min_train_users=s.min_train_users,
            min_evaluate_users=s.min_evaluate_users,
            round_timeout=cfg.server.round_timeout,
            validation=cfg.validation,
            attack=cfg.attack,
            secure_aggregation=cfg.privacy.secure_aggregation,
        )


@dataclass(frozen=True)
class Sample:
    """The users one half of an exchange is for: ``round``'s training or evaluation."""

    round: int
    users: list[str]


def sample_users(rng: random.Random, users: list[str], fraction: float, minimum: int) -> list[str]:
    """Flower's FedAvg sampling rule over users: ``int(n * fraction)`` of the n users, at
    least ``minimum`` (at most n), drawn by ``random.sample``; none if ``fraction`` is 0.

    The same draws as Flower's ``sample_nodes`` on the module ``random`` seeded alike
    (tests/server/test_server_strategy.py checks it), from the strategy's own stream.
    """
    if fraction == 0 or not users:
        return []
    n = len(users)
    size = max(int(n * fraction), min(max(minimum, 1), n))
    return [users[i] for i in rng.sample(range(n), size)]


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


class UserDirectory:
    """Which node hosts which user, learned by asking each new node (a ``query``)."""

    def __init__(self, settings: CohortSettings) -> None:
        self.settings = settings
        self._users_of_node: dict[int, list[str]] = {}
        self._node_of_user: dict[str, int] = {}
        self.users: list[str] = []  # every known user id, sorted

    def refresh(self, grid: Grid, config: ConfigRecord) -> None:
        """Learn which users new nodes host; forget nodes that left.

        A node that could not answer (it restarted just then, say) is asked again next
        time; while no connected node has answered, this keeps asking, up to
        ``server.node-wait-timeout``.
        """
        timeout = self.settings.node_wait_timeout
        deadline = time.monotonic() + timeout
        while True:
            failures = self._learn(grid, config, deadline)
            if self.users:
                return
            if time.monotonic() >= deadline:
                why = f" ({failures[0]})" if failures else ""
                raise NodeWaitTimeout(
                    f"the connected nodes host no users{why} after {timeout:g} s "
                    "(server.node-wait-timeout): check their data files and logs"
                )
            time.sleep(USERS_RETRY)

    def _learn(self, grid: Grid, config: ConfigRecord, deadline: float) -> list[str]:
        """One pass of :meth:`refresh`; the nodes that failed to answer, with why."""
        s = self.settings
        live = set(wait_for_nodes(grid, s.min_nodes, s.node_wait_timeout, deadline=deadline))
        for node in [n for n in self._users_of_node if n not in live]:
            log(WARNING, "Node %d left; its users are no longer sampled", node)
            del self._users_of_node[node]
        new = sorted(n for n in live if n not in self._users_of_node)
        failures: list[str] = []
        if new:
            queries = [
                Message(
                    protocol.query_content(config), dst_node_id=n, message_type=MessageType.QUERY
                )
                for n in new
            ]
            answered: dict[int, list[str]] = {}
            for reply in grid.send_and_receive(queries, timeout=s.query_timeout):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    reason = error_reason(reply.error.reason or "")
                    failures.append(f"node {node}: {reason}")
                    log(WARNING, "Node %d could not list its users: %s", node, reason)
                    continue
                answered[node] = ids = protocol.read_users(reply.content)
                log(INFO, "Node %d hosts %d user(s)", node, len(ids))
            for node in sorted(answered):  # in a fixed order: replies come in any order
                self._users_of_node[node] = answered[node]
        # A user id claimed by a newer node (a restarted device that is a new node, while
        # the old one is not yet known to be gone) moves to it: nodes in the order learned.
        self._node_of_user = {u: n for n, users in self._users_of_node.items() for u in users}
        self.users = sorted(self._node_of_user)
        return failures

    def by_node(self, users: Iterable[str]) -> dict[int, list[str]]:
        """``users``, sorted, by the node that hosts them."""
        out: dict[int, list[str]] = {}
        for user in users:
            out.setdefault(self._node_of_user[user], []).append(user)
        return {node: sorted(us) for node, us in out.items()}


@dataclass
class Exchange:
    """One round's messages, and which nodes got which half (see :meth:`UserCohorts.send`)."""

    messages: list[Message]
    trainers: set[int]
    evaluators: set[int]

    def replies_of(self, replies: list[Message], nodes: set[int]) -> list[Message]:
        """The replies (or errors) from ``nodes``.

        An error the SuperLink made up for a node that went away names no node: it is
        matched to the node through the message it answers (the grid set ``message_id``
        on push).
        """
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in self.messages}
        return [
            r
            for r in replies
            if node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) in nodes
        ]


class _NoNodes:
    """An empty grid: Flower's ``configure_*`` then samples, and draws, nothing."""

    def get_node_ids(self) -> list[int]:
        return []


def _user_message(records: dict[str, Any], reply: Message, message_type: str) -> Message:
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

    def __init__(
        self,
        *,
        cohorts: CohortSettings | None = None,
        recorder: MetricsRecorder | None = None,
        **flower: Any,
    ) -> None:
        # Flower's strategy samples no nodes: Pollinate samples users (`sample_users`) and
        # shows Flower's configure_* an empty grid for the round's config (`_flower_config`).
        nodes = {"min_train_nodes": 0, "min_evaluate_nodes": 0, "min_available_nodes": 0}
        super().__init__(  # type: ignore[call-arg]
            **flower,
            **nodes,
            arrayrecord_key=protocol.ARRAYS,
            configrecord_key=protocol.CONFIG,
            weighted_by_key=protocol.NUM_EXAMPLES,
        )
        self.settings = cohorts or CohortSettings()
        self.recorder = recorder
        self.directory = UserDirectory(self.settings)
        self.rng = random.Random(self.settings.seed)
        self.attackers: frozenset[str] = frozenset()

    def start(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{type(self).__name__} runs its rounds with .run() (pollinate.server.rounds), "
            "not Flower's Strategy.start(): it samples users, not nodes"
        )

    # ------------------------------------------------------------------ the run
    def run(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        *,
        rounds: range,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        end_of_round: EndOfRound,
        timeout: float | None = None,
    ) -> ArrayRecord:
        """Rounds ``rounds`` from the global model ``arrays`` (that of round
        ``rounds.start - 1``, already ended); returns the final global model."""
        dtype = global_vector(arrays).dtype  # the users' models': each aggregate is checked in it
        due: int | None = None  # the round whose evaluation rides on the next exchange
        for r in rounds:
            # 1. who: round r-1's evaluation and round r's training, from one stream
            self.directory.refresh(grid, train_config)
            evaluation = self.sample_evaluate(due) if due is not None else None
            resume_from = self.rng.getstate()  # round r-1's checkpoint resumes from here
            training = self.sample_train(r)
            if due is None:
                self._begin(r)  # the first round's clock starts with its training
            # 2. one exchange: each node evaluates round r-1's users, then trains round r's
            replies, sent = self.send(grid, arrays, train_config, training, evaluation, timeout)
            # 3. round r-1 ends
            if evaluation is not None:
                self.aggregate_evaluation(evaluation.round, sent, replies, carried=True)
                end_of_round(evaluation.round, arrays, resume_from)
                self._begin(r)  # round r's clock runs until its evaluation is in
            # 4. round r's global model
            new = self.aggregate_training(r, sent, replies, start=arrays, dtype=dtype)
            arrays = arrays if new is None else new
            due = r
        if due is not None:  # the last round's evaluation travels alone
            self.directory.refresh(grid, evaluate_config)
            evaluation = self.sample_evaluate(due)
            resume_from = self.rng.getstate()
            replies, sent = self.send(grid, arrays, evaluate_config, None, evaluation, timeout)
            self.aggregate_evaluation(due, sent, replies, carried=False)
            end_of_round(due, arrays, resume_from)
        return arrays

    def _begin(self, server_round: int) -> None:
        if self.recorder is not None:
            self.recorder.begin_round(server_round)

    # ------------------------------------------------------------------ who
    def sample_train(self, server_round: int) -> Sample:
        users = self.directory.users
        picked = sample_users(self.rng, users, self.fraction_train, self.settings.min_train_users)
        self._pick_attackers()
        return Sample(server_round, picked)

    def sample_evaluate(self, server_round: int) -> Sample:
        users = self.directory.users
        minimum = self.settings.min_evaluate_users
        return Sample(server_round, sample_users(self.rng, users, self.fraction_evaluate, minimum))

    def _pick_attackers(self) -> None:
        """The simulated attackers among the known users (``[attack]``; seeded)."""
        a = self.settings.attack
        if a.kind == "none":
            return
        users = self.directory.users
        attackers = frozenset(malicious_users(users, a.fraction, a.seed))
        if attackers != self.attackers:
            _logger.warning(
                "attack %s: %d of %d users are malicious: %s",
                a.kind,
                len(attackers),
                len(users),
                ", ".join(sorted(attackers)),
            )
        self.attackers = attackers

    @property
    def sends_cohort_means(self) -> bool:
        """Nodes send their cohort's mean: the aggregate is the mean, and no check needs
        every user's own update (the round's median norm does)."""
        if self.settings.secure_aggregation:
            return True  # the masked sum is of the nodes' means
        return self.mean_of_updates and self.settings.validation.norm_bound_median_multiple == 0

    # ------------------------------------------------------------ the exchange
    def _flower_config(
        self, message_type: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> ConfigRecord:
        """The round's config from the Flower strategy's own ``configure_train`` /
        ``configure_evaluate`` (``server-round``; FedProx adds ``proximal-mu``), which also
        does its bookkeeping (FedAdam/FedYogi keep the arrays they sent).

        Shown an empty grid, Flower samples and draws nothing and returns no message;
        Flower 1.42's strategies write what a round adds into ``config`` (a copy here).
        """
        config = ConfigRecord(dict(config))
        flower: Any = super()
        configure = (
            flower.configure_train
            if message_type == MessageType.TRAIN
            else flower.configure_evaluate
        )
        if list(configure(server_round, arrays, config, _NoNodes())):
            raise RuntimeError("Flower's strategy sampled nodes from an empty grid")
        return config

    def send(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        config: ConfigRecord,
        training: Sample | None,
        evaluation: Sample | None,
        timeout: float | None,
    ) -> tuple[list[Message], Exchange]:
        """One message per node: train ``training``'s users, evaluate ``evaluation``'s
        first (a train message carries it), or, with no training, just evaluate."""
        trainers = self.directory.by_node(training.users if training else [])
        evaluators = self.directory.by_node(evaluation.users if evaluation else [])
        if training is not None:
            kind, round_ = MessageType.TRAIN, training.round
        else:
            assert evaluation is not None
            kind, round_ = MessageType.EVALUATE, evaluation.round
        round_config = self._flower_config(kind, round_, arrays, config)
        messages = []
        for node in sorted(trainers.keys() | evaluators.keys()):
            if training is None:
                content = protocol.instruction_content(arrays, round_config, users=evaluators[node])
            else:
                users = trainers.get(node, [])
                carried = None
                if evaluation is not None:
                    carried = protocol.CarriedEvaluation(evaluation.round, evaluators.get(node, []))
                content = protocol.instruction_content(
                    arrays,
                    round_config,
                    users=users,
                    evaluation=carried,
                    node_mean=self.sends_cohort_means,
                    attack_users=[u for u in users if u in self.attackers]
                    if self.attackers
                    else None,
                )
            messages.append(Message(content, dst_node_id=node, message_type=kind))
        if self.recorder is not None:
            # Counted to the earliest round the exchange serves: round r's bytes and time
            # cover its evaluation and round r+1's training (one exchange).
            first = evaluation.round if evaluation is not None else round_
            self.recorder.add_bytes(first, sent=arrays.count_bytes() * len(messages))
        log(
            INFO,
            "round %d: %d user(s) to train, %d to evaluate (round %s), on %d node(s)",
            round_,
            len(training.users) if training else 0,
            len(evaluation.users) if evaluation else 0,
            evaluation.round if evaluation else "-",
            len(messages),
        )
        exchange = Exchange(messages, set(trainers), set(evaluators))
        replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
        return replies, exchange

    # -------------------------------------------------------------- aggregation
    def aggregate_evaluation(
        self, server_round: int, exchange: Exchange, replies: list[Message], *, carried: bool
    ) -> MetricRecord | None:
        """Round ``server_round``'s evaluation half: recorded per user, and the Flower
        strategy's ``aggregate_evaluate`` over one message per user."""
        evaluated = exchange.replies_of(replies, exchange.evaluators)
        sent = len(exchange.evaluators)
        check_exchange(server_round, "evaluate", sent, evaluated, self.settings.round_timeout)
        prefix = protocol.EVALUATION if carried else ""
        per_user: list[Message] = []
        failures = 0
        for reply in evaluated:
            if reply.has_error():
                failures += self._failed(reply)
                per_user.append(reply)  # Flower's strategy logs, skips it
                continue
            for user, metrics in protocol.read_evaluate_reply(
                reply.content, prefix
            ).metrics.items():
                per_user.append(
                    _user_message({protocol.METRICS: metrics}, reply, MessageType.EVALUATE)
                )
                if self.recorder is not None:
                    self.recorder.user_evaluated(
                        server_round, user, protocol.metric_values(metrics)
                    )
        if self.recorder is not None:
            self.recorder.add_failures(server_round, failures)
        return super().aggregate_evaluate(server_round, per_user)  # type: ignore[misc]

    def aggregate_training(
        self,
        server_round: int,
        exchange: Exchange,
        replies: list[Message],
        *,
        start: ArrayRecord,
        dtype: np.dtype | None = None,
    ) -> ArrayRecord | None:
        """Round ``server_round``'s new global model from the training half (None: no
        update was left, the model stays ``start``); it must be finite in ``dtype``."""
        trained = exchange.replies_of(replies, exchange.trainers)
        sent = len(exchange.trainers)
        check_exchange(server_round, "train", sent, trained, self.settings.round_timeout)
        updates = self._screened(server_round, self._updates(server_round, trained), start)
        if not any(c.users for c in updates):
            return None  # nothing left to aggregate: the global model stays
        arrays, _ = self._aggregate_updates(server_round, [c.msg for c in updates])
        if arrays is not None:
            # Never send on a broken model (an aggregate that overflowed, a server
            # optimizer that diverged): the run stops here, before anything is written.
            ensure_finite_model(
                global_vector(arrays), f"round {server_round}'s global model", dtype
            )
        return arrays

    def _failed(self, reply: Message) -> int:
        if self.recorder is not None:
            self.recorder.note_failure(error_reason(reply.error.reason or ""))
        return 1

    def _updates(self, server_round: int, replies: Iterable[Message]) -> list[Candidate]:
        """One update per user (or per cohort mean), as if every user were its own node."""
        per_user: list[Candidate] = []
        received = failures = 0
        train = MessageType.TRAIN
        for reply in replies:
            if reply.has_error():
                failures += self._failed(reply)
                per_user.append(Candidate("", (), reply))  # Flower's strategy logs, skips it
                continue
            got = protocol.read_train_reply(reply.content)
            users = tuple(got.metrics)
            if got.mean is not None and users:
                # The node's cohort mean stands for its users, weighted by their examples.
                received += got.mean.count_bytes()
                mean = {protocol.ARRAYS: got.mean, protocol.METRICS: got.mean_metrics}
                per_user.append(Candidate(min(users), users, _user_message(mean, reply, train)))
            for user, update in got.updates.items():
                # A user with nothing to send (no training examples) has no update.
                received += update.count_bytes()
                records = {protocol.ARRAYS: update, protocol.METRICS: got.metrics[user]}
                per_user.append(Candidate(user, (user,), _user_message(records, reply, train)))
            if self.recorder is not None:
                for user, metrics in got.metrics.items():
                    self.recorder.user_trained(server_round, user, protocol.metric_values(metrics))
            # A node that averages its cohort checked each update first (client/app.py).
            for user, reason in got.rejected.items():
                self._reject(server_round, (user,), reason)
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

    def _screened(
        self, server_round: int, updates: list[Candidate], start: ArrayRecord
    ) -> list[Candidate]:
        """The updates that pass :func:`~pollinate.server.validation.screen_updates`
        (error replies pass through: Flower counts them as failures)."""
        errors = [c for c in updates if not c.users]
        candidates = [c for c in updates if c.users]
        if not candidates:
            return updates
        accepted, rejected = screen_updates(candidates, start, self.settings.validation)
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

    # ------------------------------------------------------------- checkpoints
    def restore_sampler(self, state: Any) -> None:
        """Go on sampling from a checkpoint's sampler state (``end_of_round``'s third)."""
        if state is not None:
            self.rng.setstate(state)
