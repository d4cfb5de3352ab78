"""Fixtures every test directory shares: real servers, never mocks.

- `redis_server`: one real redis-server per test session on a free loopback port
  (`tests.harness.redis.RedisServer`); `redis_url` hands each test a flushed database.
- `serve`: a factory that starts an in-process penaltyd (bound to port 0) on a given
  store and cleans up after the test (`tests.harness.inprocess.penaltyd_factory`).

Tests are grouped by component (`tests/unit/<component>/`,
`tests/integration/<component>/`, `tests/e2e/`), each directory with its own conftest
for its own fixtures; helpers are imported from `tests.harness`, never from a conftest.
Markers follow the layer directory: unit, integration, e2e.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import hypothesis
import pytest
import redis

from tests.harness.inprocess import ServeFactory, penaltyd_factory
from tests.harness.redis import RedisServer

# One Hypothesis profile for the whole suite: examples are bounded by count, never by
# wall-clock time, so a busy machine (CI sharing two cores) makes tests slower, not red.
# Each test's own @settings still chooses its number of examples.
hypothesis.settings.register_profile(
    "penaltyd",
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
    print_blob=True,
)
hypothesis.settings.load_profile("penaltyd")

_TESTS = Path(__file__).resolve().parent
_LAYERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(_TESTS).parts
        if parts and parts[0] in _LAYERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis.Redis(port=redis_server.port).flushall()
    return redis_server.url


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    async with penaltyd_factory() as factory:
        yield factory
