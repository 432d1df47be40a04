from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest

from pollinate.data import DataError

Expect = Callable[..., AbstractContextManager[None]]


@pytest.fixture
def data_error() -> Expect:
    """``with data_error("needle", ...):`` expects a one-line DataError naming every needle."""

    @contextmanager
    def expect(*needles: str) -> Iterator[None]:
        with pytest.raises(DataError) as info:
            yield
        message = str(info.value)
        assert "\n" not in message, f"multi-line message: {message!r}"
        for needle in needles:
            assert needle in message, f"{needle!r} not in {message!r}"

    return expect
