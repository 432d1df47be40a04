"""When an idle device should poll again, as the server sees it.

Flower's Fleet API has no long poll: a device with nothing to do asks the SuperLink for a
message, gets none, sleeps, and asks again. With a thousand devices on one SuperLink a
round lasts minutes (the SuperLink serves its devices' requests one at a time), a device
that has replied waits for all the others, and every empty poll costs the SuperLink a
request, often with a new TLS handshake (idle connections close after 5 s). A device on
its own can only guess how long the wait is.

The server knows: the run still waits for ``outstanding`` replies, and replies have been
arriving at some rate. :class:`PollAdvisor` turns that into an advice, "poll again in N
s", a share of the expected wait, so a device's polls come closer together as its next
message nears (the wait's estimate is refreshed at every poll): a wait of minutes costs a
few polls, not dozens. Between exchanges (nothing outstanding, the ServerApp at work) the
last such gap is the estimate. Where there is nothing to go by (no replies lately, the
first gap) there is no advice, and devices pace themselves.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

GAP_PRIOR = 0.5  # the first gap's estimate, as a share of the exchange before it


class PollAdvisor:
    """``advice(outstanding)``: the seconds an idle device should wait before polling.

    ``share`` of the expected wait (``outstanding`` replies at the rate of the last
    ``window`` replies, those within ``horizon`` s), rounded down to whole seconds (the
    field Flower has for it counts seconds), at most ``longest``; 0 (no advice) below
    ``min_replies`` recent replies, and none in exchanges of fewer than ``min_crowd``
    messages (the current one or the last). With nothing outstanding (between exchanges):
    ``gap_share`` of what is left of a gap as long as the last one (the first:
    :data:`GAP_PRIOR` of the exchange before it; none before any exchange).
    """

    def __init__(
        self,
        *,
        share: float = 0.85,
        gap_share: float = 0.7,
        longest: int = 120,
        window: int = 64,
        horizon: float = 60.0,
        min_replies: int = 8,
        min_crowd: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < share < 1:
            raise ValueError(f"share must be in (0, 1), got {share}")
        self.share = share
        self.gap_share = gap_share
        self._gap_started: float | None = None
        self._last_gap: float | None = None
        self._wave_started: float | None = None
        self._last_wave: float | None = None
        self.longest = longest
        self.horizon = horizon
        self.min_replies = min_replies
        self.min_crowd = min_crowd
        self._wave_size = 0  # messages handed out in this exchange
        self._last_wave_size = 0
        self.clock = clock
        self._replies: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def replied(self) -> None:
        """One reply arrived (the SuperLink stored a device's reply)."""
        with self._lock:
            self._replies.append(self.clock())

    def reply_rate(self) -> float | None:
        """Replies per second lately, or None when too few came within the horizon."""
        now = self.clock()
        with self._lock:
            recent = [t for t in self._replies if now - t <= self.horizon]
        if len(recent) < self.min_replies or recent[-1] <= recent[0]:
            return None
        return (len(recent) - 1) / (recent[-1] - recent[0])

    def advice(self, outstanding: int) -> int:
        """Whole seconds to wait before the next poll; 0: no advice."""
        if outstanding <= 0:
            self._gap_begins()  # kept for every federation: the crowd test reads it
            return self._gap_advice() if self._crowd() else 0
        self._gap_over()
        if not self._crowd():
            return 0
        rate = self.reply_rate()
        if rate is None:
            return 0
        return min(self.longest, int(self.share * outstanding / rate))

    # Between two exchanges nothing is outstanding: the ServerApp is pulling the last
    # replies' objects, aggregating, and pushing the next messages, through the same
    # SuperLink. With many devices that takes a while (10-20 s of a 40 s round at 200
    # devices), and it is about as long each round: the last gap is the estimate, and
    # before one has been seen whole, GAP_PRIOR of the exchange that came before it.
    def _gap_begins(self) -> None:
        now = self.clock()
        with self._lock:
            if self._gap_started is None:
                self._gap_started = now
                if self._wave_started is not None:  # an exchange just ended
                    self._last_wave = now - self._wave_started
                    self._wave_started = None
                    self._last_wave_size, self._wave_size = self._wave_size, 0

    def _gap_advice(self) -> int:
        now = self.clock()
        with self._lock:
            assert self._gap_started is not None  # _gap_begins ran first
            expected = self._last_gap
            if expected is None and self._last_wave is not None:
                expected = GAP_PRIOR * self._last_wave
            if expected is None:
                return 0
            left = expected - (now - self._gap_started)
        return max(0, min(self.longest, int(self.gap_share * left)))

    def delivered(self) -> None:
        """A device got a message: an exchange is under way (a gap, if any, is over)."""
        self._gap_over()
        with self._lock:
            self._wave_size += 1

    # A few devices pace themselves as cheaply, and there one reply that does not come (a
    # device died mid-round) would make the estimate wrong: rounds would only get slower.
    def _crowd(self) -> bool:
        with self._lock:
            return max(self._wave_size, self._last_wave_size) >= self.min_crowd

    def _gap_over(self) -> None:
        now = self.clock()
        with self._lock:
            # The wait before the first exchange (devices joining) is not a gap.
            if self._gap_started is not None and self._last_wave is not None:
                self._last_gap = now - self._gap_started
            self._gap_started = None
            if self._wave_started is None:
                self._wave_started = now


__all__ = ["PollAdvisor"]
