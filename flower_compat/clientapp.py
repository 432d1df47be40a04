"""The exception a simulation backend raises for a ClientApp that failed.

Why: Flower's engine turns a backend's ``ClientAppException`` into an error reply with
``ErrorCode.CLIENT_APP_RAISED_EXCEPTION`` (any other exception: ``UNKNOWN``); the class
lives in the non-public ``flwr.clientapp.client_app``. Stock Flower: only its Ray backend
raises it. Nothing is patched.
"""

from __future__ import annotations

from flwr.app import Error, Message
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import ErrorCode

__all__ = ["ClientAppException", "error_reply"]


def error_reply(message: Message, reason: str) -> Message:
    """The error reply Flower's engine makes of a ``ClientAppException``, without the
    traceback it logs: for a message a backend could not finish because the run stops."""
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
    )
