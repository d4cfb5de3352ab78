"""relaycheck's customer store on every topology penaltyd runs on: one node, Sentinel,
a 6-node Cluster (started once per session, tests/integration/conftest.py), and
relaycheck itself serving from a Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis

from relaycheck.store.base import CustomerStore
from relaycheck.store.redis import RedisStore
from relaycheck.v1 import relaycheck_pb2 as pb
from tests.contracts.customer_store import CustomerStoreContract
from tests.harness.inprocess import relaycheck_serving
from tests.harness.redis import RedisClusterServers, RedisSentinelServers


class _OnRedis(CustomerStoreContract):
    url = ""

    @pytest.fixture(autouse=True)
    async def _cleanup(self) -> AsyncIterator[None]:
        self.stores: list[RedisStore] = []
        yield
        for store in self.stores:
            await store.close()

    async def make(self, ttl_ms: int = 400 * 86_400_000) -> CustomerStore:
        store = RedisStore(self.url, key_prefix="rct", ttl_ms=ttl_ms)
        self.stores.append(store)
        return store


class TestSingleNode(_OnRedis):
    @pytest.fixture(autouse=True)
    def _url(self, redis_url: str) -> None:
        self.url = redis_url


class TestSentinel(_OnRedis):
    @pytest.fixture(autouse=True)
    def _url(self, sentinel: RedisSentinelServers) -> None:
        redis.Redis(port=sentinel.master.port).flushall()
        self.url = sentinel.url


class TestCluster(_OnRedis):
    @pytest.fixture(autouse=True)
    def _url(self, cluster: RedisClusterServers) -> None:
        for node in cluster.nodes:
            r = redis.Redis(port=node.port)
            if r.info("replication")["role"] == "master":
                r.flushall()
            r.close()
        self.url = cluster.url


async def test_relaycheck_serves_from_a_cluster(cluster: RedisClusterServers) -> None:
    async with relaycheck_serving(redis_url=cluster.url, key_prefix="rcs") as rc:
        await rc.stub.UpsertCustomer(
            pb.Customer(id="acme", relay_networks=["198.51.100.8/29"], domains=["acme.example"])
        )
        got = await rc.stub.GetCustomer(pb.GetCustomerRequest(ip="198.51.100.9"))
        assert got.id == "acme"
        spam = (
            b"Received: from spam.example.net (unknown [203.0.113.66])\r\n"
            b"\tby mail.acme.example (Postfix) with ESMTP id 1 for <v@example.org>; date\r\n"
            b"From: ceo@acme.example\r\n\r\n"
        )
        verdict = await rc.stub.Classify(
            pb.ClassifyRequest(client_ip="198.51.100.9", headers=spam, no_report=True)
        )
        assert verdict.verdict == pb.VERDICT_RELAYED_THIRD_PARTY
        assert verdict.origin_ip == "203.0.113.66"
