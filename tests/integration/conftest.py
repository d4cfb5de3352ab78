"""Integration fixtures: a Redis Cluster and a Sentinel set, started once per session and
shared by every component's topology tests (each flushes what it uses)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.redis import RedisClusterServers, RedisSentinelServers


@pytest.fixture(scope="session")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


@pytest.fixture(scope="session")
def sentinel() -> Iterator[RedisSentinelServers]:
    with RedisSentinelServers() as servers:
        yield servers
