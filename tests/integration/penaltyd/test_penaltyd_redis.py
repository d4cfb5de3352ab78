"""penaltyd on a real redis-server: the penalty loop, two replicas, failing open, draining."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from penalty.v1 import penalty_pb2 as pb
from penalty.v1 import penalty_pb2_grpc as pbg
from penaltyd.store.redis import RedisStore
from tests.harness.builders import ACCEPTED, UNKNOWN, check, eventually, report
from tests.harness.inprocess import ServeFactory
from tests.harness.processes import PenaltydProcess
from tests.harness.redis import RedisServer


async def dictionary_attack(stub: pbg.PenaltyServiceStub, ip: str) -> pb.Verdict:
    await stub.Report(report(ip, ACCEPTED, 2))
    v = pb.Verdict()
    for _ in range(40):
        v = await stub.Report(report(ip, UNKNOWN))
    return v


async def test_penalty_loop_on_redis(serve: ServeFactory, redis_url: str) -> None:
    pd = await serve(RedisStore(redis_url))
    assert (await dictionary_attack(pd.service, "203.0.113.7")).tempfail
    v = await pd.service.Check(check("203.0.113.7"))
    assert v.tempfail
    assert 296 <= v.seconds_left <= 300
    assert v.smtp_reply.startswith("450 4.7.1 ")
    assert str(v.seconds_left) in v.smtp_reply
    await asyncio.sleep(3)  # the behaviour under test is time passing
    later = await pd.service.Check(check("203.0.113.7"))
    assert later.seconds_left == v.seconds_left - 3
    for i in range(200):
        r = await pd.service.Report(
            report("198.51.100.20", UNKNOWN if i in (10, 110) else ACCEPTED)
        )
        assert not r.tempfail
    assert not (await pd.service.Check(check("198.51.100.20"))).tempfail


@pytest.fixture
def two_replicas(redis_url: str) -> Iterator[tuple[PenaltydProcess, PenaltydProcess]]:
    with (
        PenaltydProcess("--redis-url", redis_url) as a,
        PenaltydProcess("--redis-url", redis_url) as b,
    ):
        yield a, b


async def wait_store_healthy(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        async def status() -> int:
            req = health_pb2.HealthCheckRequest(service="penaltyd.store")
            return int((await health.Check(req)).status)

        await eventually(status, lambda s: s == health_pb2.HealthCheckResponse.SERVING)


async def test_two_replicas_give_identical_answers(
    two_replicas: tuple[PenaltydProcess, PenaltydProcess],
) -> None:
    a, b = two_replicas
    await wait_store_healthy(a.address)
    await wait_store_healthy(b.address)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        sa, sb = pbg.PenaltyServiceStub(ca), pbg.PenaltyServiceStub(cb)
        # Evidence split across replicas adds up in the shared window.
        for i in range(40):
            await (sa if i % 2 else sb).Report(report("203.0.113.7", UNKNOWN))
        va = await sa.Check(check("203.0.113.7"))
        vb = await sb.Check(check("203.0.113.7"))
        assert va.tempfail
        assert vb.tempfail
        assert 296 <= vb.seconds_left <= 300
        assert abs(va.seconds_left - vb.seconds_left) <= 1
        assert va.expires_at_unix_ms == vb.expires_at_unix_ms
        assert vb.smtp_reply.startswith("450 4.7.1 ")
        # Report on one, check on the other: the triggering report answers on A, B agrees.
        trigger = await dictionary_attack(sa, "203.0.113.99")
        assert trigger.tempfail
        other = await sb.Check(check("203.0.113.99"))
        assert other.tempfail
        assert other.expires_at_unix_ms == trigger.expires_at_unix_ms
        # Lift on B ends it on A.
        admin_b = pbg.PenaltyAdminStub(cb)
        assert (
            await admin_b.Lift(pb.LiftRequest(client=pb.Client(ip="203.0.113.99"), actor="t"))
        ).lifted

        async def on_a() -> bool:
            return bool((await sa.Check(check("203.0.113.99"))).tempfail)

        await eventually(on_a, lambda t: not t, within=1.0)
        assert not (await sa.Check(check("198.51.100.3"))).tempfail
        assert (await pbg.PenaltyAdminStub(ca).Stats(pb.StatsRequest())).active_penalties == 1


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


async def test_fail_open_when_redis_dies_and_recover(own_redis: RedisServer) -> None:
    with PenaltydProcess("--redis-url", own_redis.url) as pd:
        await wait_store_healthy(pd.address)
        async with grpc.aio.insecure_channel(pd.address) as ch:
            stub = pbg.PenaltyServiceStub(ch)
            assert (await dictionary_attack(stub, "203.0.113.7")).tempfail

            own_redis.kill()
            for i in range(30):
                t0 = time.perf_counter()
                v = await stub.Check(check("203.0.113.7"), timeout=2)
                elapsed = time.perf_counter() - t0
                if v.degraded:
                    break
                assert i < 29, "never noticed that Redis died"
                await asyncio.sleep(0.05)
            # Fail open: no penalty, flagged degraded, within the deadline.
            for ip in ("203.0.113.7", "198.51.100.4"):
                t0 = time.perf_counter()
                v = await stub.Check(check(ip), timeout=2)
                elapsed = time.perf_counter() - t0
                assert v.degraded
                assert not v.tempfail
                assert elapsed < 0.5, elapsed
            r = await stub.Report(report("198.51.100.9", UNKNOWN, 5), timeout=2)
            assert r.degraded
            assert not r.tempfail
            assert pd.proc is not None
            assert pd.proc.poll() is None  # still up

            restarted = RedisServer(port=own_redis.port).start()  # same port, empty
            try:

                async def healthy_check() -> pb.Verdict:
                    verdict: pb.Verdict = await stub.Check(check("198.51.100.4"), timeout=2)
                    return verdict

                await eventually(healthy_check, lambda v: not v.degraded, within=10)
                # The penalty loop works again without a restart.
                assert (await dictionary_attack(stub, "203.0.113.8")).tempfail
                assert (await stub.Check(check("203.0.113.8"))).tempfail
                await wait_store_healthy(pd.address)
                # The report made during the outage was buffered and replayed: nothing lost.
                admin = pbg.PenaltyAdminStub(ch)

                async def events() -> int:
                    ex = await admin.Explain(pb.ExplainRequest(client=pb.Client(ip="198.51.100.9")))
                    return int(ex.events)

                await eventually(events, lambda n: n == 5, within=5)
            finally:
                restarted.stop()
        assert '"store_unavailable_fail_open"' in pd.output()
        assert '"buffered_reports_replayed"' in pd.output()


async def test_hung_redis_fails_open_within_deadline(
    serve: ServeFactory, own_redis: RedisServer
) -> None:
    pd = await serve(RedisStore(own_redis.url), report_timeout_ms=50, check_timeout_ms=20)
    await pd.service.Report(report("198.51.100.5", ACCEPTED))
    own_redis.pause()
    try:
        t0 = time.perf_counter()
        r = await pd.service.Report(report("198.51.100.5", UNKNOWN, 3))
        assert r.degraded
        assert time.perf_counter() - t0 < 0.3
        # Not buffered: the paused Redis holds the command and applies it on resume, so a
        # replay would count it twice.
        assert pd.engine.buffered == 0
    finally:
        own_redis.resume()

    async def events() -> int:
        ex = await pd.admin.Explain(pb.ExplainRequest(client=pb.Client(ip="198.51.100.5")))
        return int(ex.events)

    await eventually(events, lambda n: n == 4)  # applied exactly once: 1 + 3


async def test_sigterm_drains_in_flight_calls(redis_url: str) -> None:
    pd = PenaltydProcess("--redis-url", redis_url).start()
    try:
        async with grpc.aio.insecure_channel(pd.address) as ch:
            stub = pbg.PenaltyServiceStub(ch)
            call = stub.Session()
            await call.write(pb.SessionRequest(id=1, checks=[check("198.51.100.6")]))
            assert (await call.read()).id == 1
            assert pd.proc is not None
            pd.proc.send_signal(signal.SIGTERM)
            # The open stream is still served during the grace period...
            await call.write(pb.SessionRequest(id=2, reports=[report("198.51.100.6", ACCEPTED)]))
            resp = await call.read()
            assert resp.id == 2
            assert len(resp.reports) == 1
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
        # ...and the process exits cleanly once it is done.
        assert await asyncio.to_thread(pd.proc.wait, 10) == 0
        assert '"penaltyd_stopped"' in pd.output()
    finally:
        pd.stop()
