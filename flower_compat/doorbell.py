"""A wake-up for Flower's in-memory poll loops: look now, there is something to see.

Why: in a simulation the ServerApp's grid and the engine's scan each find new work by
polling the in-memory link state (every few ms, :mod:`pollinate.simulation.apps`), so
every exchange of every round waits on average half a poll twice: for the scan to see the
round's instructions, and for the grid to see the last reply. Measured on the 1,000-user
benchmark job (2 nodes, 200 rounds): 1.2 ms and 2.7 ms of a 41 ms round. A
:class:`Doorbell` is rung by whoever stores the work (the grid's push, the engine's reply
injector) and ends the waiting loop's sleep at once; the poll stays as the fallback, so a
ring that never comes (another Flower) costs what polling did, never a hang.
"""

from __future__ import annotations

import threading

from pollinate.flower_compat._core import mark_engaged


class Doorbell:
    """Ends one polling loop's sleep early. ``ring()`` after storing the work;
    the loop looks for work, then ``wait(poll)``.

    A ring while the loop is looking is kept for its next ``wait``, which then returns at
    once; a ring between a ``wait`` and the look that follows it is cleared, but that look
    sees the work (it was stored before the ring). One loop per doorbell.
    """

    def __init__(self, name: str) -> None:
        self.name = name  # counted in ``engaged`` each time a ring ends a wait early
        self._event = threading.Event()

    def ring(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` s, less if rung; True if a ring ended (or preceded) it."""
        rung = self._event.wait(max(0.0, timeout))
        self._event.clear()
        if rung:
            mark_engaged(self.name)
        return rung


__all__ = ["Doorbell"]
