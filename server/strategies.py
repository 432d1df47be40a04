"""The strategy registry: every ``strategy.name``, its options and how it is built.

A new strategy is one function here (or in your own module, imported before the config
is resolved)::

    @register_strategy(
        "fedfoo",
        help="FedFoo (Doe et al., 2025): ...",
        options={"foo-rate": Option(0.1, "how much foo", Range(0, 1))},
    )
    def fedfoo(common: dict[str, Any], options: Options, cfg: RunConfig) -> UserCohorts:
        return CohortFedFoo(**common, rate=options.number("foo-rate"))

``strategy.name = "fedfoo"`` and ``strategy.foo-rate`` are then valid config keys with that
default, range and help; ``common`` holds the sampling fractions, the cohort settings and
the recorder, which every strategy passes on to its constructor unchanged. The strategy
is a Flower strategy with :class:`~pollinate.server.rounds.UserCohorts` in front.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pollinate.config import ConfigError, RunConfig
from pollinate.registry import Option, Options, Range, Registry, UnknownNameError
from pollinate.server.metrics import MetricsRecorder
from pollinate.server.privacy import with_privacy
from pollinate.server.rounds import CohortSettings
from pollinate.server.strategy import (
    CohortBulyan,
    CohortFedAdam,
    CohortFedAvg,
    CohortFedMedian,
    CohortFedProx,
    CohortFedTrimmedAvg,
    CohortFedYogi,
    CohortKrum,
    CohortMultiKrum,
    UserCohorts,
)

__all__ = ["STRATEGIES", "StrategyEntry", "build_strategy", "register_strategy"]

#: ``build(common, options, cfg)``: the strategy, configured once by its constructor.
StrategyBuilder = Callable[[dict[str, Any], Options, RunConfig], UserCohorts]
#: ``check(options, sampled, num_users)``: why this round size cannot work, or None.
RoundCheck = Callable[[Options, int, int], str | None]


def _any_round(options: Options, sampled: int, num_users: int) -> str | None:
    return None


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy: its builder, options and help (the README's table)."""

    name: str
    help: str
    build: StrategyBuilder
    options: Mapping[str, Option] = field(default_factory=dict)
    check: RoundCheck = _any_round

    def check_round(self, options: Options, *, sampled: int, num_users: int) -> str | None:
        """Why a round of ``sampled`` of ``num_users`` users cannot work, or None."""
        return self.check(options, sampled, num_users)


#: Every strategy, by name: the choices of ``strategy.name``.
STRATEGIES: Registry[StrategyEntry] = Registry("strategy.name")


def register_strategy(
    name: str,
    *,
    help: str,
    options: Mapping[str, Option] | None = None,
    check: RoundCheck = _any_round,
) -> Callable[[StrategyBuilder], StrategyBuilder]:
    """Decorator: ``build(common, options, cfg) -> UserCohorts`` becomes ``strategy.name``.

    Parameters
    ----------
    name
        The value of ``strategy.name``.
    help
        One line for the README's table (cite the paper).
    options
        Its own config keys (``strategy.<key>``); an option two strategies share is the
        same :class:`~pollinate.registry.Option` object.
    check
        Refuses a round size the strategy cannot aggregate, once the data is known.
    """

    def decorator(build: StrategyBuilder) -> StrategyBuilder:
        STRATEGIES.add(StrategyEntry(name, help, build, dict(options or {}), check))
        return build

    return decorator


# ------------------------------------------------------------------- the strategies

PROXIMAL_MU = Option(
    0.01, "FedProx: clients add (mu/2)||w - w_global||^2 to their loss", Range(0, 1_000)
)
# FedAdam / FedYogi server optimizer (Reddi et al. 2021).
FEDOPT = {
    "server-lr": Option(0.01, "FedAdam/FedYogi: server step size", Range(0, 10, open_lo=True)),
    "beta-1": Option(0.9, "FedAdam/FedYogi: first-moment decay", Range(0, 1, open_hi=True)),
    "beta-2": Option(0.99, "FedAdam/FedYogi: second-moment decay", Range(0, 1, open_hi=True)),
    "tau": Option(1e-3, "FedAdam/FedYogi: adaptivity (epsilon)", Range(0, 10, open_lo=True)),
}
# It trims this fraction at each end: 0.5 would trim every user.
TRIM_BETA = Option(0.2, "fraction trimmed at each end", Range(0, 0.5, open_lo=True, open_hi=True))
KRUM_BYZANTINE = Option(
    0, "Krum, Multi-Krum, Bulyan: the number f of malicious users assumed", Range(0, 100_000)
)
MULTIKRUM_SELECT = Option(
    0, "Multi-Krum: how many best-scored updates are averaged; 0 = n - f", Range(0, 100_000)
)


@register_strategy("fedavg", help="FedAvg (McMahan et al., 2017): the example-weighted mean")
def _fedavg(common: dict[str, Any], o: Options, cfg: RunConfig) -> UserCohorts:
    return CohortFedAvg(**common)


@register_strategy(
    "fedprox",
    help="FedProx (Li et al., 2020): FedAvg with a proximal term on the clients",
    options={"proximal-mu": PROXIMAL_MU},
)
def _fedprox(common: dict[str, Any], o: Options, cfg: RunConfig) -> UserCohorts:
    return CohortFedProx(**common, proximal_mu=o.number("proximal-mu"))


def _fedopt(
    cls: Callable[..., UserCohorts], common: dict[str, Any], o: Options, cfg: RunConfig
) -> UserCohorts:
    return cls(
        **common,
        eta=o.number("server-lr"),
        eta_l=cfg.train.lr,
        beta_1=o.number("beta-1"),
        beta_2=o.number("beta-2"),
        tau=o.number("tau"),
    )


@register_strategy(
    "fedadam", help="FedAdam (Reddi et al., 2021): Adam on the server", options=FEDOPT
)
def _fedadam(common: dict[str, Any], o: Options, cfg: RunConfig) -> UserCohorts:
    return _fedopt(CohortFedAdam, common, o, cfg)


@register_strategy(
    "fedyogi", help="FedYogi (Reddi et al., 2021): Yogi on the server", options=FEDOPT
)
def _fedyogi(common: dict[str, Any], o: Options, cfg: RunConfig) -> UserCohorts:
    return _fedopt(CohortFedYogi, common, o, cfg)


@register_strategy("fedmedian", help="coordinate-wise median (Yin et al., 2018)")
def _fedmedian(common: dict[str, Any], o: Options, cfg: RunConfig) -> UserCohorts:
    return CohortFedMedian(**common)


@register_strategy(
    "fedtrimmedavg",
    help="coordinate-wise trimmed mean (Yin et al., 2018)",
    options={"trim-beta": TRIM_BETA},
)
def _fedtrimmedavg(common: dict[str, Any], o: Options, cfg: RunConfig) -> UserCohorts:
    return CohortFedTrimmedAvg(**common, beta=o.number("trim-beta"))


def _krum_round(o: Options, sampled: int, num_users: int) -> str | None:
    # Krum scores each update by its n - f - 2 nearest neighbours and needs n > 2f + 2
    # (Blanchard et al. 2017); with fewer it cannot tell attackers from the rest.
    f = o.integer("krum-byzantine")
    if f and sampled < 2 * f + 3:
        return (
            f"strategy.krum-byzantine = {f} needs at least {2 * f + 3} users per round "
            f"(n > 2f + 2) but a round trains {sampled} of {num_users}; set it to at most "
            f"{max((sampled - 3) // 2, 0)}"
        )
    return None


@register_strategy(
    "krum",
    help="Krum (Blanchard et al., 2017): the update closest to its n - f - 2 neighbours",
    options={"krum-byzantine": KRUM_BYZANTINE},
    check=_krum_round,
)
def _krum(common: dict[str, Any], o: Options, cfg: RunConfig) -> UserCohorts:
    return CohortKrum(**common, num_malicious_nodes=o.integer("krum-byzantine"))


@register_strategy(
    "multikrum",
    help="Multi-Krum (Blanchard et al., 2017): the mean of the m best Krum scores",
    options={"krum-byzantine": KRUM_BYZANTINE, "multikrum-select": MULTIKRUM_SELECT},
)
def _multikrum(common: dict[str, Any], o: Options, cfg: RunConfig) -> UserCohorts:
    select = o.integer("multikrum-select")
    strategy = CohortMultiKrum(
        **common,
        num_malicious_nodes=o.integer("krum-byzantine"),
        num_nodes_to_select=max(1, select),
    )
    strategy.select_all_but_byzantine = select == 0
    return strategy


@register_strategy(
    "bulyan",
    help="Bulyan (El Mhamdi et al., 2018): Multi-Krum selection, then a trimmed median; "
    "needs 4f + 3 users a round",
    options={"krum-byzantine": KRUM_BYZANTINE},
)
def _bulyan(common: dict[str, Any], o: Options, cfg: RunConfig) -> UserCohorts:
    return CohortBulyan(**common, num_malicious_nodes=o.integer("krum-byzantine"))


def build_strategy(cfg: RunConfig, recorder: MetricsRecorder | None = None) -> UserCohorts:
    """The configured Flower strategy, over users."""
    s = cfg.strategy
    common: dict[str, Any] = {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "cohorts": CohortSettings.from_config(cfg),
        "recorder": recorder,
    }
    try:
        entry = STRATEGIES.get(s.name)
    except UnknownNameError as err:  # config.resolve refuses it first; a hand-built one not
        raise ConfigError(str(err)) from None
    strategy = entry.build(common, s.options, cfg)
    if cfg.privacy.secure_aggregation and not strategy.mean_of_updates:
        # A registered strategy beyond config.py's list of the robust built-ins.
        raise ConfigError(
            f"strategy.name = '{s.name}' does not aggregate by the weighted mean of the "
            "updates, the only aggregate privacy.secure-aggregation can compute; use fedavg "
            "or turn secure aggregation off"
        )
    return with_privacy(strategy, cfg.privacy, seed=cfg.run.seed, num_rounds=cfg.run.num_rounds)
