"""The attack suite on a real redis-server: what only Redis can show."""

from __future__ import annotations

import asyncio
import base64

import grpc
import pytest
import redis as redis_sync
from grpc_health.v1 import health_pb2, health_pb2_grpc

from penalty.v1 import penalty_pb2 as pb
from penaltyd.server import STORE_HEALTH
from penaltyd.store.base import StoreError
from penaltyd.store.redis import RedisStore
from tests.harness.builders import ACCEPTED, UNKNOWN, check, eventually, report
from tests.harness.inprocess import ServeFactory
from tests.harness.redis import RedisServer

Kind = pb.PenaltyEvent.Kind


async def test_health_is_not_serving_while_redis_refuses_writes(serve: ServeFactory) -> None:
    """maxmemory + noeviction: PING answers, every write is refused (OOM)."""
    with RedisServer(extra=["--maxmemory-policy", "noeviction"]) as r:
        pd = await serve(RedisStore(r.url))
        health = health_pb2_grpc.HealthStub(pd.channel)

        async def store_status() -> int:
            resp = await health.Check(health_pb2.HealthCheckRequest(service=STORE_HEALTH))
            return int(resp.status)

        await eventually(store_status, lambda s: s == health_pb2.HealthCheckResponse.SERVING)
        filler = redis_sync.Redis(port=r.port)
        for i in range(400):  # 4 MB of data, then a limit well below it
            filler.set(f"filler:{i}", b"x" * 10_000)
        filler.config_set("maxmemory", "1mb")
        with pytest.raises(redis_sync.exceptions.OutOfMemoryError):
            filler.set("one-more", b"x")
        assert filler.ping()
        with pytest.raises(StoreError):
            await pd.engine.store.ping()
        await eventually(store_status, lambda s: s == health_pb2.HealthCheckResponse.NOT_SERVING)
        # Reports fail open (buffered), checks answer; then Redis has room again.
        v = await pd.service.Report(report("203.0.113.7", UNKNOWN))
        assert v.degraded
        filler.config_set("maxmemory", "0")
        await eventually(store_status, lambda s: s == health_pb2.HealthCheckResponse.SERVING)


async def test_a_stalled_stats_flush_is_not_degraded_and_loses_no_identity(
    serve: ServeFactory, redis_server: RedisServer, redis_url: str
) -> None:
    # The reports' own deadline is not the subject (a loaded machine once took longer
    # than the default for the 1000, which marked the replica degraded before the pause).
    pd = await serve(
        RedisStore(redis_url),
        admin_timeout_ms=300,
        stats_flush_seconds=300,
        report_timeout_ms=10_000,
    )
    call = pd.service.Session()
    reports = [report(f"10.1.{i // 250}.{i % 250}", ACCEPTED) for i in range(1000)]
    await call.write(pb.SessionRequest(id=1, reports=reports))
    answered = await call.read()
    assert len(answered.reports) == 1000
    assert not any(v.degraded for v in answered.reports)
    await call.done_writing()
    assert not pd.engine.degraded
    admin = redis_sync.Redis(port=redis_server.port)
    admin.client_pause(1500)
    try:
        assert not await pd.engine.refresh_stats()  # timed out: nothing marked degraded
        assert not pd.engine.degraded
        assert len(pd.engine.stats.pending.identities) == 1000  # kept for the next flush
    finally:
        admin.client_unpause()
    assert await pd.engine.refresh_stats()
    stats = await pd.admin.Stats(pb.StatsRequest())
    assert 990 <= stats.tracked_identities <= 1010  # HyperLogLog: ~1 % error
    assert stats.degraded_replicas == 0


async def test_crafted_page_token_on_redis(serve: ServeFactory, redis_url: str) -> None:
    pd = await serve(RedisStore(redis_url))
    token = base64.urlsafe_b64encode(b"99\n1\nx").decode()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pd.admin.ListPenalties(pb.ListPenaltiesRequest(page_token=token))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_snapshot_chunks_from_the_redis_view(
    serve: ServeFactory, redis_url: str
) -> None:
    pd = await serve(RedisStore(redis_url), report_timeout_ms=10_000)  # not about deadlines
    await eventually(lambda: _synced(pd.engine.store), bool)
    call = pd.service.Session()
    for part in range(2):
        reports = [report(f"10.{part + 2}.{i // 250}.{i % 250}", UNKNOWN, 40) for i in range(750)]
        await call.write(pb.SessionRequest(id=part, reports=reports))
        resp = await call.read()
        assert len(resp.reports) == 750
        assert all(v.tempfail for v in resp.reports)
    await call.done_writing()
    got = 0
    async for event in pd.service.WatchPenalties(pb.WatchRequest(chunked_snapshot=True)):
        if event.kind == Kind.KIND_SNAPSHOT_DONE:
            break
        got += len(event.penalties)
    assert got == 1500
    assert not (await pd.service.Check(check("10.9.9.9"))).tempfail


async def _synced(store: RedisStore) -> bool:
    await asyncio.sleep(0)
    return store.feed_exact
