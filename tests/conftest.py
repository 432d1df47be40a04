"""Fixtures for every test folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Flower stamps new Messages with the running task's identity; give tests one."""
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 1
    yield


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port with its own folder; stopped afterwards.

    Yields its URL (``redis://127.0.0.1:PORT/0``). No persistence: each test gets an empty
    broker. ``.ci/run`` installs redis-server (Debian's package) where it is missing.
    """
    from redisserver import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url
