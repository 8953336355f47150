"""pytest fixtures that run a real redis-server (see ``tests/redis_server.py``).

Loaded by ``pytest_plugins = ["tests.conftest_redis"]`` in ``tests/conftest.py``
(with ``pythonpath = ["."]`` in the pytest config, so that ``tests`` imports
under the ``pytest`` command too, not only ``python -m pytest``). Tests are
skipped, not faked, where no redis-server is installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis

from tests.redis_server import RedisServer, redis_available


def _require_redis() -> None:
    """Skip where redis-server is missing, except in CI (SLUICE_REQUIRE_REDIS=1), which must run them."""
    if redis_available():
        return
    if os.environ.get("SLUICE_REQUIRE_REDIS") == "1":
        pytest.fail("redis-server is not installed, and SLUICE_REQUIRE_REDIS=1")
    pytest.skip("redis-server is not installed")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server shared by the session; use ``redis_url`` for a clean database."""
    _require_redis()
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, emptied for this test."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Private, started servers a test may stop and restart; all stopped at the end."""
    _require_redis()
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}")
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()
