"""Failover under load: kill the Redis master serving a penalized identity.

Throughout, checks answer (never an error) and never fail closed (a clean client is
never tempfailed); penalties written before the failover, once replicated (`WAIT`), are
still answered after it; penaltyd recovers without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import redis

from penalty.v1 import penalty_pb2 as pb
from penaltyd.store.redis import RedisStore
from tests.harness.builders import ACCEPTED, UNKNOWN, check, eventually, report
from tests.harness.inprocess import Served, ServeFactory
from tests.harness.redis import RedisClusterServers, RedisSentinelServers, RedisServer

PENALIZED = "203.0.113.7"
CLEAN = "198.51.100.50"


@dataclass
class Load:
    """Checks in a loop while the master dies; records what came back."""

    calls: int = 0
    degraded: int = 0
    errors: list[str] = field(default_factory=list)
    clean_tempfails: int = 0

    async def run(self, pd: Served, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for ip in (PENALIZED, CLEAN):
                try:
                    v = await pd.service.Check(check(ip), timeout=2)
                except Exception as exc:  # any error is a failure of the test
                    self.errors.append(repr(exc))
                    continue
                self.calls += 1
                self.degraded += v.degraded
                if ip == CLEAN and v.tempfail:
                    self.clean_tempfails += 1
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def under_load(pd: Served) -> AsyncIterator[Load]:
    load, stop = Load(), asyncio.Event()
    task = asyncio.create_task(load.run(pd, stop))
    try:
        yield load
    finally:
        stop.set()
        await task


async def penalize(pd: Served) -> pb.Verdict:
    v = pb.Verdict()
    for _ in range(25):
        v = await pd.service.Report(report(PENALIZED, UNKNOWN))
    assert v.tempfail
    return v


async def survives(pd: Served, url: str, master: RedisServer, before: pb.Verdict) -> Load:
    async with under_load(pd) as load:
        await asyncio.sleep(0.3)  # load is running before the kill
        master.kill()

        async def write() -> pb.Verdict:
            # A report for the penalized identity runs in its own slot: answered (not
            # degraded) and still tempfail means the new master has the penalty.
            verdict: pb.Verdict = await pd.service.Report(report(PENALIZED, ACCEPTED), timeout=2)
            return verdict

        after = await eventually(write, lambda v: not v.degraded, within=30)
        assert after.tempfail
        assert abs(after.expires_at_unix_ms - before.expires_at_unix_ms) <= 5  # the same penalty
        check_after = await pd.service.Check(check(PENALIZED), timeout=2)
        assert check_after.tempfail
        assert abs(check_after.expires_at_unix_ms - before.expires_at_unix_ms) <= 5
        await asyncio.sleep(0.3)
    assert not load.errors, load.errors[:3]
    assert load.clean_tempfails == 0
    assert load.calls > 50
    # And a fresh client, with nothing in memory, reads it from Redis.
    direct = RedisStore(url, use_view=False)
    try:
        found = await direct.penalty(PENALIZED)
        assert found is not None
        assert abs(found.expires_at_ms - before.expires_at_unix_ms) <= 5
    finally:
        await direct.close()
    # New penalties work again.
    for _ in range(25):
        v = await pd.service.Report(report("203.0.113.8", UNKNOWN))
    assert v.tempfail
    assert not v.degraded
    return load


@pytest.fixture
def sentinel() -> Iterator[RedisSentinelServers]:
    with RedisSentinelServers() as servers:
        yield servers


async def test_sentinel_failover(serve: ServeFactory, sentinel: RedisSentinelServers) -> None:
    pd = await serve(RedisStore(sentinel.url), check_timeout_ms=50)
    before = await penalize(pd)
    assert redis.Redis(port=sentinel.master.port).wait(1, 2000) == 1  # replicated
    load = await survives(pd, sentinel.url, sentinel.master, before)
    assert load.degraded > 0  # the outage was real, and it was answered fail-open


@pytest.fixture
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


async def test_cluster_failover(serve: ServeFactory, cluster: RedisClusterServers) -> None:
    pd = await serve(RedisStore(cluster.url), check_timeout_ms=50)
    before = await penalize(pd)
    master = cluster.master_for(f"pd:{{{PENALIZED}}}:p")
    assert redis.Redis(port=master.port).wait(1, 2000) == 1  # replicated
    # The feed's channel usually lives on another node: the view stays exact and checks
    # are answered correctly throughout, without even a degraded answer.
    await survives(pd, cluster.url, master, before)
