"""relaycheck on a real redis-server, reporting to a real penaltyd (also on Redis).

- the customer store on Redis: one owner per relay network, longest-prefix lookup in one
  round trip, replace and delete release networks, and every key expires;
- a relayed verdict makes penaltyd record the origin address as relay_denied (Explain);
- penaltyd down never delays a verdict; Redis down makes Classify UNDETERMINED, degraded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from penalty import outcomes
from penalty.v1 import penalty_pb2 as ppb
from penaltyd.store.redis import RedisStore as PenaltyRedisStore
from relaycheck.customers import build_customer
from relaycheck.report import PenaltyReporter
from relaycheck.store.base import NetworkConflict
from relaycheck.store.redis import RedisStore
from relaycheck.v1 import relaycheck_pb2 as pb
from tests.harness.builders import eventually
from tests.harness.inprocess import ServeFactory, relaycheck_serving
from tests.harness.ports import free_port
from tests.harness.redis import RedisServer

ACME = pb.Customer(
    id="acme", relay_networks=["198.51.100.8/29", "2001:db8:ac::/48"], domains=["acme.example"]
)


def spam(origin: str, n: int) -> bytes:
    return (
        f"Received: from spam{n}.example.net (unknown [{origin}])\r\n"
        f"\tby mail.acme.example (Postfix) with ESMTP id {n}; Tue, 16 Jul 2024\r\n"
        "From: ceo@acme.example\r\nMessage-ID: <x@acme.example>\r\n\r\n"
    ).encode()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_url, key_prefix="rct")
    yield s
    await s.close()


async def test_customer_store_on_redis(store: RedisStore, redis_url: str) -> None:
    acme = build_customer("acme", ["198.51.100.8/29", "2001:db8:ac::/48"], [], ["acme.example"])
    stored = await store.upsert(acme)
    assert stored.expires_at_ms - stored.updated_at_ms == store.ttl_ms
    assert (await store.get("acme")) == stored
    found = await store.find_by_ip(ipaddress.ip_address("2001:db8:ac:5::1"))
    assert found is not None
    assert found.id == "acme"
    tenant = await store.upsert(build_customer("tenant", ["198.51.100.12/32"]))
    assert (await store.find_by_ip(ipaddress.ip_address("198.51.100.12"))) == tenant
    assert (await store.find_by_ip(ipaddress.ip_address("198.51.100.13"))) == stored
    with pytest.raises(NetworkConflict) as info:
        await store.upsert(build_customer("thief", ["192.0.2.0/24", "198.51.100.8/29"]))
    assert (info.value.index, info.value.owner) == (1, "acme")
    assert await store.get("thief") is None
    # Replacing releases the old networks; deleting releases the rest.
    await store.upsert(build_customer("acme", ["192.0.2.8/29"]))
    assert await store.find_by_ip(ipaddress.ip_address("198.51.100.9")) is None
    assert await store.delete("acme")
    assert not await store.delete("acme")
    assert await store.find_by_ip(ipaddress.ip_address("192.0.2.9")) is None
    r = aioredis.Redis.from_url(redis_url)
    try:
        keys = await r.keys("rct:*")
        assert sorted(keys) == [b"rct:{cust}:rec", b"rct:{cust}:relay"]
        for key in keys:  # every key expires (DESIGN.md), renewed by upserts
            assert 0 < await r.pttl(key) <= store.ttl_ms
        assert await r.hgetall("rct:{cust}:relay") == {b"198.51.100.12/32": b"tenant"}
    finally:
        await r.aclose()


async def test_records_expire_and_free_their_networks(redis_url: str) -> None:
    short = RedisStore(redis_url, key_prefix="rce", ttl_ms=300)
    try:
        await short.upsert(build_customer("acme", ["198.51.100.8/29"]))
        await asyncio.sleep(0.4)  # the behaviour under test is time passing
        assert await short.get("acme") is None
        assert await short.find_by_ip(ipaddress.ip_address("198.51.100.9")) is None
        await short.upsert(build_customer("next", ["198.51.100.8/29"]))
    finally:
        await short.close()


async def test_relayed_origin_is_recorded_by_penaltyd(serve: ServeFactory, redis_url: str) -> None:
    pd = await serve(PenaltyRedisStore(redis_url))
    reporter = PenaltyReporter(pd.address, outcomes.number("relay_denied"))
    async with relaycheck_serving(RedisStore(redis_url), reporter=reporter) as rc:
        await rc.stub.UpsertCustomer(ACME)
        for n in range(3):
            answer = await rc.stub.Classify(
                pb.ClassifyRequest(
                    client_ip="198.51.100.10",
                    headers=spam("203.0.113.66", n),
                    mail_from="ceo@acme.example",
                    rcpt_to=["a@example.org", "b@example.net"],
                )
            )
            assert answer.verdict == pb.VERDICT_RELAYED_THIRD_PARTY
            assert answer.origin_ip == "203.0.113.66"
            assert answer.reported
        # The abuse desk's dry run is never reported.
        dry = await rc.stub.Classify(
            pb.ClassifyRequest(
                client_ip="198.51.100.10",
                headers=spam("203.0.113.67", 9),
                rcpt_to=["a@example.org"],
                no_report=True,
            )
        )
        assert dry.verdict == pb.VERDICT_RELAYED_THIRD_PARTY
        assert not dry.reported
        assert await reporter.flush(within=5.0)
    explained = await pd.admin.Explain(ppb.ExplainRequest(client=ppb.Client(ip="203.0.113.66")))
    counts = {ppb.Outcome.Name(t.outcome): t.n for t in explained.window}
    assert counts == {"OUTCOME_RELAY_DENIED": 3}
    other = await pd.admin.Explain(ppb.ExplainRequest(client=ppb.Client(ip="203.0.113.67")))
    assert list(other.window) == []


async def test_penaltyd_down_never_delays_a_verdict(redis_url: str) -> None:
    reporter = PenaltyReporter(
        f"127.0.0.1:{free_port()}", outcomes.number("relay_denied"), close_within=0.05
    )
    async with relaycheck_serving(RedisStore(redis_url), reporter=reporter) as rc:
        await rc.stub.UpsertCustomer(ACME)
        for n in range(20):
            t0 = time.perf_counter()
            answer = await rc.stub.Classify(
                pb.ClassifyRequest(
                    client_ip="198.51.100.10",
                    headers=spam("203.0.113.70", n),
                    rcpt_to=["a@example.org"],
                )
            )
            assert time.perf_counter() - t0 < 0.2
            assert answer.verdict == pb.VERDICT_RELAYED_THIRD_PARTY
        # Nothing lost and nothing claimed delivered: `pending` counts queued and in-flight
        # reports alike (`sent` is the in-flight part of it, so it is not added).
        stats = reporter.stats
        assert (stats["pending"], stats["acked"], stats["dropped"]) == (20, 0, 0)


async def test_redis_down_fails_open() -> None:
    with RedisServer() as server:
        async with relaycheck_serving(
            RedisStore(server.url, key_prefix="rcd"), store_timeout_ms=200
        ) as rc:
            await rc.stub.UpsertCustomer(ACME)
            health = health_pb2_grpc.HealthStub(rc.channel)

            async def store_health() -> int:
                got = await health.Check(health_pb2.HealthCheckRequest(service="relaycheck.store"))
                return int(got.status)

            await eventually(store_health, lambda s: s == health_pb2.HealthCheckResponse.SERVING)
            ok = await rc.stub.Classify(
                pb.ClassifyRequest(client_ip="198.51.100.10", headers=spam("203.0.113.1", 1))
            )
            assert ok.customer_id == "acme"
            server.kill()
            t0 = time.perf_counter()
            answer = await rc.stub.Classify(
                pb.ClassifyRequest(client_ip="198.51.100.10", headers=spam("203.0.113.1", 2))
            )
            assert time.perf_counter() - t0 < 1.0
            assert answer.verdict == pb.VERDICT_UNDETERMINED
            assert answer.degraded
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rc.stub.GetCustomer(pb.GetCustomerRequest(id="acme"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await eventually(
                store_health, lambda s: s == health_pb2.HealthCheckResponse.NOT_SERVING
            )
