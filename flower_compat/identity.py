"""What Flower stamps on messages: the running task's identity and a message's id.

Why: a ``Message`` built outside a Flower runtime (Pollinate's in-process grid, tests) needs
``TaskIdentity`` set (Flower 1.42 raises otherwise), and a reply needs a message id, which
only Flower's grids assign (``metadata._message_id``, no public setter). Flower's own
simulation runtime also sets ``TaskIdentity`` for the whole process and never restores it;
:func:`task_identity_kept` undoes that. Stock Flower: only its runtimes build messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

# TaskIdentity's class-level slots (its public properties raise while they are unset).
_SLOTS = ("_run_id", "_task_id", "_node_id")


@contextmanager
def task_identity(run_id: int, task_id: int, node_id: int) -> Iterator[None]:
    """Messages built inside the block carry this task identity; the old one is restored."""
    with ExitStack() as stack:
        for slot, value in zip(_SLOTS, (run_id, task_id, node_id), strict=True):
            stack.enter_context(_kept(slot))
            setattr(TaskIdentity, slot, value)
        yield


@contextmanager
def task_identity_kept() -> Iterator[None]:
    """Whatever sets the task identity inside the block (Flower's runtime), undone after."""
    with ExitStack() as stack:
        for slot in _SLOTS:
            stack.enter_context(_kept(slot))
        yield


@contextmanager
def _kept(slot: str) -> Iterator[None]:
    saved = getattr(TaskIdentity, slot)
    try:
        yield
    finally:
        setattr(TaskIdentity, slot, saved)


def assign_message_id(message: Message, message_id: str) -> None:
    """Give ``message`` the id a Flower grid's push would (``metadata.message_id``)."""
    message.metadata.__dict__["_message_id"] = message_id
