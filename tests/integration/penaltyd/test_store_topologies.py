"""The store contract on Redis Sentinel and on a 6-node Redis Cluster, started here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis

from tests.harness.redis import RedisClusterServers, RedisSentinelServers
from tests.integration.penaltyd.test_store_redis import RedisContract


def cluster_masters(cluster: RedisClusterServers) -> list[int]:
    """The ports of the Cluster's current masters (a failover test may have moved them)."""
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
