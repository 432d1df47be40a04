"""When node failures end a run: a round in which every node failed is a failed run.

Flower's strategies aggregate whatever replies arrive and skip the errors; when *every*
reply of an exchange is an error, or none arrives within ``server.round-timeout``, they
keep the old model and the run goes on, round after round, to end ``finished`` with
nothing learned. Pollinate stops instead, with the reason: every device of a deployment
lost, or every user's ClientApp raising (a bad config, a broken data file), is a failed
run (``status = failed``, exit 1) whose one-line error says which round and why.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Message


class RoundFailed(RuntimeError):
    """Every node sent work in a round failed, so the run cannot go on."""


def error_reason(reason: str) -> str:
    """The message inside a Flower error reply's reason, on one line.

    Flower wraps a ClientApp's exception as ``<class '...ClientAppException'>:<'
    Exception ClientAppException occurred. Message: ...'>``.
    """
    marker = "Message: "
    if marker in reason:
        reason = reason.split(marker, 1)[1].removesuffix("'>")
    return " ".join(reason.split())


def check_exchange(
    server_round: int, work: str, sent: int, replies: Sequence[Message], timeout: float | None
) -> None:
    """Raise :class:`RoundFailed` if ``sent`` nodes got ``work`` and none of them succeeded.

    ``replies`` are the exchange's replies, errors included (a node that never answered
    has none); ``work`` names what the nodes were asked to do (``train``, ``evaluate``).
    """
    if sent == 0 or any(not reply.has_error() for reply in replies):
        return
    reasons = [error_reason(r.error.reason or "") for r in replies if r.has_error()]
    waited = f" within {timeout:g} s (server.round-timeout)" if timeout else ""
    why = reasons[0] if reasons else f"no reply{waited}"
    raise RoundFailed(
        f"round {server_round}: all {sent} node(s) asked to {work} failed "
        f"({len(reasons)} error(s), {sent - len(reasons)} without reply); first: {why}"
    )
