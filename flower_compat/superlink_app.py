"""The SuperLink's web app wrapped in Pollinate's middleware (admin APIs on loopback only).

Why: Flower 1.42 serves its Fleet API (devices), Control API (admin) and Runtime API (the
ServerApp) from one ASGI app built by ``flwr.superlink.main.create_app(config,
superlink_lifespan_class)``, and offers no hook to add middleware. Pollinate wraps the app
it returns so that a device reaching the port cannot also register keys or start runs.

Stock Flower: every API answers every address that reaches the port. That is a security
difference, not a speed one, so a changed signature is an error, never a fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pollinate.flower_compat._core import mark_engaged, swapped
from pollinate.flower_compat._names import flower_attribute, flower_module

MODULE = "flwr.superlink.main"
NAME = f"{MODULE}.create_app"
EXPECT = ("config", "superlink_lifespan_class")


@contextmanager
def wrapped_superlink_app(middleware: Callable[[Any], Any]) -> Iterator[bool]:
    """Inside the block, every SuperLink app Flower builds is ``middleware(app)``."""
    main = flower_module(MODULE)
    create_app = flower_attribute(main, "create_app")

    def create_wrapped_app(*args: Any, **kwargs: Any) -> Any:
        mark_engaged(NAME)
        return middleware(create_app(*args, **kwargs))

    with swapped(
        main, "create_app", create_wrapped_app, why="admin APIs on loopback only", expect=EXPECT
    ) as on:
        yield on
