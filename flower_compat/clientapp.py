"""The exception a simulation backend raises for a ClientApp that failed.

Why: Flower's engine turns a backend's ``ClientAppException`` into an error reply with
``ErrorCode.CLIENT_APP_RAISED_EXCEPTION`` (any other exception: ``UNKNOWN``); the class
lives in the non-public ``flwr.clientapp.client_app``. Stock Flower: only its Ray backend
raises it. Nothing is patched.
"""

from __future__ import annotations

from flwr.clientapp.client_app import ClientAppException

__all__ = ["ClientAppException"]
