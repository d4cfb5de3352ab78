"""Issue 3 on a real redis-server: shared addresses, IPv6 rotation, fleet-wide lift and
watch, admin auth, across two penaltyd processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from penalty.v1 import penalty_pb2 as pb
from penalty.v1 import penalty_pb2_grpc as pbg
from penaltyd.store.redis import RedisStore
from tests.harness.builders import ACCEPTED, UNKNOWN, check, eventually
from tests.harness.inprocess import ServeFactory
from tests.harness.processes import PenaltydProcess

TOKEN = (("authorization", "Bearer t0ken"),)
Kind = pb.PenaltyEvent.Kind


def rep(c: pb.Client, outcome: int, n: int = 1) -> pb.ReportRequest:
    return pb.ReportRequest(client=c, counts=[pb.OutcomeCount(outcome=outcome, n=n)])  # type: ignore[arg-type]  # enum int


def user(ip: str, i: int) -> pb.Client:
    return pb.Client(ip=ip, helo=f"pc{i}.home.example", mail_from=f"someone@d{i}.example")


async def test_shared_address_defers_only_the_spammer(serve: ServeFactory, redis_url: str) -> None:
    pd = await serve(RedisStore(redis_url))
    ip = "100.64.20.20"
    for i in range(50):
        await pd.service.Report(rep(user(ip, i), ACCEPTED, 4))
        if i % 7 == 0:
            await pd.service.Report(rep(user(ip, i), UNKNOWN))
    spammer = pb.Client(ip=ip, helo="ratware", mail_from="win@spam.example")
    verdicts = [await pd.service.Report(rep(spammer, UNKNOWN)) for _ in range(40)]
    assert verdicts[-1].tempfail
    assert (await pd.service.Check(pb.CheckRequest(client=spammer))).tempfail
    for i in range(50):  # every legitimate sub-identity's mail flows
        v = await pd.service.Check(pb.CheckRequest(client=user(ip, i)))
        assert not v.tempfail, i
        r = await pd.service.Report(rep(user(ip, i), ACCEPTED))
        assert not r.tempfail, i
    ex = await pd.admin.Explain(pb.ExplainRequest(client=spammer))
    assert ex.shared
    assert ex.shared_reason.startswith("detected")
    assert ex.sub.verdict.tempfail
    assert {(t.outcome, t.n) for t in ex.sub.window} == set()  # evidence used by the penalty
    assert "unknown_recipient=" in ex.sub.verdict.reason
    assert not ex.verdict.tempfail


async def test_ipv6_rotation_inside_a_64_is_one_identity(
    serve: ServeFactory, redis_url: str
) -> None:
    pd = await serve(RedisStore(redis_url))
    for i in range(25):
        await pd.service.Report(rep(pb.Client(ip=f"2001:db8:77:1:{i:x}::{i + 1:x}"), UNKNOWN))
    v = await pd.service.Check(check("2001:db8:77:1:dead:beef::1"))
    assert v.tempfail
    assert v.identity == "2001:db8:77:1::/64"
    assert not (await pd.service.Check(check("2001:db8:77:2::1"))).tempfail


@pytest.fixture
def replicas(redis_url: str) -> Iterator[tuple[PenaltydProcess, PenaltydProcess]]:
    env = {"PENALTYD_ADMIN_TOKEN": "t0ken"}
    with (
        PenaltydProcess("--redis-url", redis_url, env=env) as a,
        PenaltydProcess("--redis-url", redis_url, env=env) as b,
    ):
        yield a, b


async def test_lift_and_watch_across_replicas(
    replicas: tuple[PenaltydProcess, PenaltydProcess],
) -> None:
    a, b = replicas
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        sa, sb = pbg.PenaltyServiceStub(ca), pbg.PenaltyServiceStub(cb)
        admin_a, admin_b = pbg.PenaltyAdminStub(ca), pbg.PenaltyAdminStub(cb)

        async def watch_ready() -> bool:
            try:
                stream = sb.WatchPenalties(pb.WatchRequest())
                first = await stream.read()
                stream.cancel()
                return bool(first.kind == Kind.KIND_SNAPSHOT_DONE)
            except grpc.aio.AioRpcError:
                return False  # feed not synced yet

        await eventually(watch_ready, bool)
        stream = sb.WatchPenalties(pb.WatchRequest())
        assert (await stream.read()).kind == Kind.KIND_SNAPSHOT_DONE

        for _ in range(25):
            await sa.Report(rep(pb.Client(ip="203.0.113.40"), UNKNOWN))
        started = await asyncio.wait_for(stream.read(), 2)  # B's watchers see A's penalty
        assert (started.kind, started.penalty.identity) == (
            Kind.KIND_PENALTY_STARTED,
            "203.0.113.40",
        )
        assert (await sb.Check(check("203.0.113.40"))).tempfail

        ex = await admin_b.Explain(
            pb.ExplainRequest(client=pb.Client(ip="203.0.113.40")), metadata=TOKEN
        )
        assert ex.verdict.tempfail
        assert "unknown_recipient=20" in ex.verdict.reason  # the numbers that caused it

        t0 = time.monotonic()
        lifted = await admin_a.Lift(
            pb.LiftRequest(
                client=pb.Client(ip="203.0.113.40"), actor="desk", note="false positive"
            ),
            metadata=TOKEN,
        )
        assert lifted.lifted

        async def on_b() -> bool:
            return bool((await sb.Check(check("203.0.113.40"))).tempfail)

        await eventually(on_b, lambda t: not t, within=1.0)
        assert time.monotonic() - t0 < 1.0  # ended on every replica within 1 s
        event = await asyncio.wait_for(stream.read(), 2)
        assert (event.kind, event.penalty.identity) == (Kind.KIND_PENALTY_LIFTED, "203.0.113.40")
        stream.cancel()

        for admin in (admin_a, admin_b):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.Stats(pb.StatsRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ex = await admin_b.Explain(
            pb.ExplainRequest(client=pb.Client(ip="203.0.113.40")), metadata=TOKEN
        )
        assert (ex.last_lift.actor, ex.last_lift.note) == ("desk", "false positive")


async def test_allowlist_reaches_every_replica(
    replicas: tuple[PenaltydProcess, PenaltydProcess],
) -> None:
    a, b = replicas
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        await pbg.PenaltyAdminStub(ca).Allow(
            pb.AllowRequest(cidr="198.51.100.0/24", note="partner"), metadata=TOKEN
        )
        sb = pbg.PenaltyServiceStub(cb)

        async def allowlisted() -> bool:
            return bool((await sb.Check(check("198.51.100.9"))).allowlisted)

        await eventually(allowlisted, bool, within=2)
        for _ in range(40):
            assert not (await sb.Report(rep(pb.Client(ip="198.51.100.9"), UNKNOWN))).tempfail
