"""An empty pull answered with when to poll again (``PullMessagesResponse.reconnect``).

Why: Flower 1.42's Fleet API has no long poll, so an idle device polls on its own guess.
With hundreds of devices on one SuperLink a round lasts minutes, and the empty polls (each
often a new TLS handshake) become a large part of the SuperLink's CPU per device-round:
at 1,000 emulated devices, 18.8 pulls per device-round where 2 carry a message. The
SuperLink knows how long the wait is likely to be (:class:`pollinate.deploy.pacing.
PollAdvisor`: the replies the run still waits for, at the rate they have been arriving).

Flower's protocol already has a field for it: ``PullMessagesResponse.reconnect``
(``Reconnect.reconnect``, seconds), which the stock SuperLink leaves unset on pulls and
stock SuperNodes ignore. So:

- :func:`poll_advice_given` (SuperLink) wraps the Fleet handlers
  ``pull_messages(request, state, store)`` and ``push_messages(request, state)`` of
  ``flwr.superlink.servicer.fleet.fleet_handlers`` (the Fleet router calls them through the
  module): a stored reply is counted, and a pull that finds no message gets the advice;
- :func:`poll_advice_taken` (SuperNode) wraps ``FleetHttpClient.PullMessages(self,
  request)`` to hand each empty pull's advice (0: none) to Pollinate's idle clock.

A stock device against Pollinate's SuperLink, or Pollinate's device against a stock one,
sees no difference. Stock: no advice, devices pace themselves; correct, only more requests.
A changed signature falls back to that with a one-line warning.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pollinate.flower_compat._core import mark_engaged, swapped, swapped_together
from pollinate.flower_compat._names import flower_module

HANDLERS = "flwr.superlink.servicer.fleet.fleet_handlers"
PULL = f"{HANDLERS}.pull_messages"
PUSH = f"{HANDLERS}.push_messages"
PULL_EXPECT = ("request", "state", "store")
PUSH_EXPECT = ("request", "state")
CLIENT = "flwr.supernode.fleet_http_client"
CLIENT_PULL = f"{CLIENT}.FleetHttpClient.PullMessages"
CLIENT_PULL_EXPECT = ("self", "request")
RECOUNT = 0.2  # s: the SQL LinkState counts with a query; a count this old is good enough
WHY = "idle devices poll on their own guess and each empty poll costs the SuperLink a request"


def outstanding_replies(state: Any) -> int:
    """Messages stored for devices and not replied to yet, in Flower's LinkState.

    Both counts include what the ServerApp has not pulled and deleted yet, and a stored
    reply keeps its message until then: the difference is the replies still due.
    """
    return max(0, int(state.num_message_ins()) - int(state.num_message_res()))


@contextmanager
def poll_advice_given(
    advice: Callable[[int], int],
    replied: Callable[[], None],
    delivered: Callable[[], None] = lambda: None,
) -> Iterator[bool]:
    """Inside the block the SuperLink calls ``replied()`` for each reply it stores and
    ``delivered()`` for each pull that hands out a message, and answers a pull that finds
    no message with ``advice(outstanding)`` seconds (0: none). Yields whether both
    handlers are wrapped (False: stock, after a one-line warning)."""
    handlers = flower_module(HANDLERS)
    pull, push = handlers.pull_messages, handlers.push_messages
    counted = [-RECOUNT, 0]  # when, outstanding

    def outstanding(state: Any) -> int:
        now = time.monotonic()
        if now - counted[0] >= RECOUNT:
            counted[:] = [now, outstanding_replies(state)]
        return int(counted[1])

    @functools.wraps(pull)
    def pull_advised(request: Any, state: Any, store: Any) -> Any:
        response = pull(request, state, store)
        if response.messages_list:
            delivered()
        else:
            mark_engaged(PULL)
            seconds = advice(outstanding(state))
            if seconds > 0:
                response.reconnect.reconnect = seconds
        return response

    @functools.wraps(push)
    def push_counted(request: Any, state: Any) -> Any:
        response = push(request, state)  # raises for a reply it refuses: not counted
        mark_engaged(PUSH)
        replied()
        return response

    with swapped_together(
        handlers,
        [
            ("push_messages", push_counted, PUSH_EXPECT),
            ("pull_messages", pull_advised, PULL_EXPECT),
        ],
        why=WHY,
    ) as on:
        yield on


def advice_of(response: Any) -> int:
    """The seconds a PullMessages response advises to wait (0: none, or a message came)."""
    if response.messages_list or not response.HasField("reconnect"):
        return 0
    return int(response.reconnect.reconnect)


@contextmanager
def poll_advice_taken(on_advice: Callable[[int], None]) -> Iterator[bool]:
    """Inside the block each PullMessages of Flower's SuperNode calls ``on_advice(s)``
    with the response's advice (0: none). Yields whether it does (False: stock)."""
    client = flower_module(CLIENT).FleetHttpClient
    pull = client.PullMessages

    @functools.wraps(pull)
    def pull_and_listen(self: Any, request: Any) -> Any:
        mark_engaged(CLIENT_PULL)
        response = pull(self, request)
        on_advice(advice_of(response))
        return response

    with swapped(
        client,
        "PullMessages",
        pull_and_listen,
        why=WHY,
        expect=CLIENT_PULL_EXPECT,
        stock_fallback=True,
    ) as on:
        yield on


__all__ = ["advice_of", "outstanding_replies", "poll_advice_given", "poll_advice_taken"]
