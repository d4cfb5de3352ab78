"""Fixtures: real servers, never mocks.

- `redis_server`: one real redis-server per test session on a free loopback port
  (`penalty.testing.RedisServer`); `redis_url` hands each test a flushed database.
- `serve`: a factory that starts an in-process penaltyd (bound to port 0) on a given
  store and cleans up after the test, in the style of httpx's and redis-py's conftests.

Markers follow the directory: tests/unit -> unit, tests/integration -> integration,
tests/e2e -> e2e.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import hypothesis
import pytest
import redis

from penalty.testing import RedisServer
from penalty.v1 import penalty_pb2_grpc
from penaltyd.server import Running, start_server
from penaltyd.settings import Settings
from penaltyd.store.base import Store

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(str(item.fspath)).parent.name
        if kind in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis.Redis(port=redis_server.port).flushall()
    return redis_server.url


class Served:
    """A running in-process penaltyd and stubs bound to it."""

    def __init__(self, running: Running, channel: grpc.aio.Channel) -> None:
        self.running = running
        self.channel = channel
        self.address = f"127.0.0.1:{running.port}"
        self.service = penalty_pb2_grpc.PenaltyServiceStub(channel)
        self.admin = penalty_pb2_grpc.PenaltyAdminStub(channel)

    @property
    def engine(self) -> Any:
        return self.running.engine


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    started: list[Served] = []

    async def factory(store: Store | None = None, **overrides: Any) -> Served:
        settings = Settings(**{"listen": "127.0.0.1:0", **overrides})
        running = await start_server(settings, store=store)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        served = Served(running, channel)
        started.append(served)
        return served

    yield factory
    for s in started:
        await s.channel.close()
        await s.running.stop(grace=0)
