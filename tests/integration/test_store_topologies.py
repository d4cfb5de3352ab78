"""The store contract on Redis Sentinel and on a 6-node Redis Cluster, started here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from penalty.testing import RedisClusterServers, RedisSentinelServers
from tests.integration.test_store_redis import RedisContract


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


@pytest.fixture(scope="module")
def sentinel() -> Iterator[RedisSentinelServers]:
    with RedisSentinelServers() as servers:
        yield servers


def cluster_masters(cluster: RedisClusterServers) -> list[int]:
    ports = []
    for node in cluster.nodes:
        r = redis.Redis(port=node.port)
        role: list[bytes] = r.execute_command("ROLE")  # type: ignore[no-untyped-call]  # redis-py
        if role[0] == b"master":
            ports.append(node.port)
        r.close()
    return ports


class TestClusterStore(RedisContract):
    @pytest.fixture(autouse=True)
    async def _store(self, cluster: RedisClusterServers) -> AsyncIterator[None]:
        self.masters = cluster_masters(cluster)
        assert len(self.masters) == 3
        for port in self.masters:
            redis.Redis(port=port).flushall()
        async for _ in self.serve_store(cluster.url):
            yield


class TestSentinelStore(RedisContract):
    @pytest.fixture(autouse=True)
    async def _store(self, sentinel: RedisSentinelServers) -> AsyncIterator[None]:
        self.masters = [sentinel.master.port]
        redis.Redis(port=sentinel.master.port).flushall()
        async for _ in self.serve_store(sentinel.url):
            yield
