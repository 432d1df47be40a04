"""The Flower strategies Pollinate runs, each over *users* (:mod:`pollinate.server.rounds`).

Each is a Flower ``flwr.serverapp.strategy`` class behind the :class:`UserCohorts` mixin,
which samples users instead of nodes and runs one exchange per round; one round, end to
end, is :meth:`UserCohorts.run <pollinate.server.rounds.UserCohorts.run>`.
"""

from __future__ import annotations

import gc

from flwr.app import ArrayRecord, Message, MetricRecord
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

from pollinate.server.failures import error_reason
from pollinate.server.rounds import CohortSettings, NodeWaitTimeout, UserCohorts, wait_for_nodes

__all__ = [
    "CohortSettings",
    "NodeWaitTimeout",
    "UserCohorts",
    "error_reason",
    "wait_for_nodes",
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
