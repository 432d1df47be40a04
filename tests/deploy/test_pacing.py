"""The server's advice to idle devices: when to poll again (deploy/pacing.py), and the
devices that follow it (the SuperNode launcher's clock, the emulator's TUNED policy)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from pollinate.deploy import supernode
from pollinate.deploy.emulator import STOCK, TUNED, Emulator
from pollinate.deploy.pacing import PollAdvisor
from pollinate.flower_compat import fleet


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _replies(advisor: PollAdvisor, clock: FakeClock, n: int, every: float) -> None:
    for _ in range(n):
        clock.now += every
        advisor.replied()


def test_no_advice_without_recent_replies_or_outstanding_work() -> None:
    clock = FakeClock()
    advisor = PollAdvisor(min_crowd=0, clock=clock)
    assert advisor.advice(1000) == 0  # nothing to go by yet
    _replies(advisor, clock, 7, 0.1)
    assert advisor.advice(1000) == 0  # fewer than min_replies
    _replies(advisor, clock, 1, 0.1)
    assert advisor.reply_rate() == pytest.approx(10.0)
    assert advisor.advice(0) == 0  # nothing outstanding: between rounds
    clock.now += 61  # the replies are older than the horizon
    assert advisor.reply_rate() is None and advisor.advice(1000) == 0


def test_advice_is_a_share_of_the_expected_wait_in_whole_seconds_and_capped() -> None:
    clock = FakeClock()
    advisor = PollAdvisor(share=0.6, longest=120, min_crowd=0, clock=clock)
    _replies(advisor, clock, 20, 0.1)  # 10 replies/s
    assert advisor.advice(100) == 6  # 0.6 x 10 s
    assert advisor.advice(10) == 0  # 0.6 s rounds down: no advice, the device paces itself
    assert advisor.advice(100_000) == 120
    with pytest.raises(ValueError, match="share"):
        PollAdvisor(share=1.0)


@pytest.mark.parametrize("outstanding", [50, 500, 5000])
def test_an_advised_device_polls_a_few_times_per_wait_and_is_not_late(outstanding: int) -> None:
    # A device that has replied waits for `outstanding` others, served at 8 replies/s
    # (a busy SuperLink). It polls when advised, and 0.25 s apart when not.
    clock, rate = FakeClock(), 8.0
    advisor = PollAdvisor(min_crowd=0, clock=clock)
    _replies(advisor, clock, 64, 1 / rate)
    start = next_reply = clock.now
    due = start + outstanding / rate  # when the last reply, and so its message, comes
    polls = 0
    while True:
        polls += 1
        if clock.now >= due:
            break
        left = math.ceil((due - clock.now) * rate)
        wake = clock.now + (advisor.advice(left) or 0.25)
        while next_reply + 1 / rate <= min(wake, due):  # the others' replies meanwhile
            next_reply += 1 / rate
            clock.now = next_reply
            advisor.replied()
        clock.now = wake
    late = clock.now - due
    # Unadvised, 0.25 s apart, the 625 s wait would cost 2,500 polls.
    assert polls <= 16, polls
    assert late <= 0.25 + 1e-9, late


def test_the_supernode_clock_follows_the_advice_else_paces_itself() -> None:
    clock = supernode.Clock()
    clock.advise(7)
    assert clock.idle_wait() == 7
    clock.advise(10_000)
    assert clock.idle_wait() == supernode.ADVICE_MAX
    clock.advise(0)
    assert supernode.POLL_MIN <= clock.idle_wait() <= supernode.POLL_MAX


class _Client:
    """A Fleet client whose PullMessages finds no message and carries ``advice``."""

    def __init__(self, advice: int) -> None:
        self.advice = advice

    def PullMessages(self, request: Any) -> Any:
        response = fleet.PullMessagesResponse()
        if self.advice:
            response.reconnect.reconnect = self.advice
        return response


def _due_after_an_empty_pull(policy: Any, advice: int) -> float:
    emulator = Emulator.__new__(Emulator)  # only the pacing: no connections
    emulator.policy = policy
    device: Any = type("D", (), {})()
    device.node, device.client = fleet.Node(node_id=1), _Client(advice)
    device.idle_since = device.last_wait = 0.0
    device.advised = 0
    device.next_heartbeat = float("inf")
    return Emulator._step(emulator, device) - time.monotonic()


def test_tuned_devices_follow_the_advice_and_stock_ones_ignore_it() -> None:
    assert _due_after_an_empty_pull(TUNED, 40) == pytest.approx(40, abs=0.5)
    assert _due_after_an_empty_pull(TUNED, 0) < 5  # no advice: its own pacing
    assert _due_after_an_empty_pull(STOCK, 40) == pytest.approx(3, abs=0.5)
    # The advised wait counts as the rhythm of its heartbeats.
    assert TUNED.heartbeat_interval(40) > TUNED.heartbeat_interval(0)


def test_between_exchanges_the_advice_is_what_is_left_of_a_gap_like_the_last() -> None:
    clock = FakeClock()
    advisor = PollAdvisor(gap_share=0.5, min_crowd=0, clock=clock)
    assert advisor.advice(0) == 0  # devices joining, before any exchange: nothing to go by
    clock.now += 100
    advisor.delivered()  # the first exchange (40 s); the wait before it is no gap
    _replies(advisor, clock, 20, 2.0)
    assert advisor.advice(0) == 10  # the first gap: GAP_PRIOR of the 40 s exchange, halved
    clock.now += 30
    assert advisor.advice(0) == 0  # past the estimate: the device paces itself
    advisor.delivered()  # the next exchange: that gap lasted 30 s
    clock.now += 40
    assert advisor.advice(0) == 15  # a new gap: half of the 30 s expected
    clock.now += 12
    assert advisor.advice(0) == 9  # half of the 18 s left
    advisor.delivered()
    _replies(advisor, clock, 10, 0.5)
    assert advisor.advice(10) == 4  # replies outstanding: the exchange's own estimate


def test_a_few_devices_get_no_advice_as_a_crowd_does() -> None:
    # Three devices, one of them dead mid-round: its reply never comes, and an estimate
    # from the other two would only make their next round start late.
    clock = FakeClock()
    few = PollAdvisor(min_crowd=32, clock=clock)
    for _ in range(3):
        few.delivered()
    _replies(few, clock, 20, 0.5)
    assert few.advice(1) == 0 and few.advice(0) == 0
    crowd = PollAdvisor(min_crowd=32, clock=clock)
    for _ in range(200):
        crowd.delivered()
    _replies(crowd, clock, 20, 0.5)
    assert crowd.advice(100) == 42  # 0.85 x 100 replies at 2 a second


def test_a_small_federation_stays_without_advice_round_after_round() -> None:
    # 3 devices for 50 rounds: each exchange is counted on its own, never summed.
    clock = FakeClock()
    advisor = PollAdvisor(min_crowd=32, clock=clock)
    for _ in range(50):
        for _ in range(3):
            advisor.delivered()
        _replies(advisor, clock, 3, 0.5)
        assert advisor.advice(1) == 0
        assert advisor.advice(0) == 0  # the gap after the exchange
        clock.now += 2
