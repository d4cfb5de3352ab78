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

import pytest
import redis

from tests.harness import hypothesis_profile
from tests.harness.inprocess import ServeFactory, penaltyd_factory
from tests.harness.redis import RedisServer

# One Hypothesis profile for the whole suite: examples are bounded by count, never by
# wall-clock time, so a busy machine (CI sharing two cores) makes tests slower, not red.
# Each test's own @settings still chooses its number of examples. Loaded before any test
# module is imported, so every @settings inherits it.
hypothesis_profile.load()

_TESTS = Path(__file__).resolve().parent
_LAYERS = ("unit", "integration", "e2e")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A Hypothesis test whose own settings bring back a wall-clock limit (a deadline, or
    the too_slow health check by replacing the profile's suppress list) fails here, with
    the reason, instead of failing some day on a busy machine."""
    limits = hypothesis_profile.wall_clock_limits(getattr(item, "obj", None))
    if limits:
        pytest.fail(
            f"{item.nodeid}: Hypothesis settings depend on the machine's speed: "
            f"{', '.join(limits)} (see tests/harness/hypothesis_profile.py)"
        )


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
