"""penaltyd over gRPC on the embedded store: the penalty loop, Session, admin, health."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from penalty.v1 import penalty_pb2 as pb
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import ACCEPTED, UNKNOWN, Clock, check, client, report
from tests.harness.inprocess import Served, ServeFactory


@pytest.fixture
async def pd(serve: ServeFactory, clock: Clock) -> Served:
    return await serve(MemoryStore(clock=clock))


async def dictionary_attack(pd: Served, ip: str = "203.0.113.7") -> pb.Verdict:
    await pd.service.Report(report(ip, ACCEPTED, 2))
    verdict = pb.Verdict()
    for _ in range(40):
        verdict = await pd.service.Report(report(ip, UNKNOWN))
    return verdict


async def test_dictionary_attack_is_deferred_with_exact_time_left(pd: Served, clock: Clock) -> None:
    last = await dictionary_attack(pd)
    assert last.tempfail  # the report that triggers (or follows) the penalty already says so
    v = await pd.service.Check(check("203.0.113.7"))
    assert v.tempfail
    assert 296 <= v.seconds_left <= 300
    assert v.smtp_reply.startswith("450 4.7.1 ")
    assert f" {v.seconds_left} seconds" in v.smtp_reply
    assert "203.0.113.7" in v.smtp_reply
    assert v.identity == "203.0.113.7"
    assert "unknown_recipient" in v.reason
    assert not v.degraded
    clock.now += 3000
    later = await pd.service.Check(check("203.0.113.7"))
    assert later.seconds_left == v.seconds_left - 3
    assert later.expires_at_unix_ms == v.expires_at_unix_ms
    clock.now = v.expires_at_unix_ms
    assert not (await pd.service.Check(check("203.0.113.7"))).tempfail


async def test_normal_error_ratio_is_never_penalized(pd: Served) -> None:
    for i in range(200):
        outcome = UNKNOWN if i in (50, 150) else ACCEPTED
        v = await pd.service.Report(report("198.51.100.20", outcome))
        assert not v.tempfail
    assert not (await pd.service.Check(check("198.51.100.20"))).tempfail
    ex = await pd.admin.Explain(pb.ExplainRequest(client=client("198.51.100.20")))
    assert ex.events == 200
    assert not ex.would_fire


async def test_neighbours_are_not_penalized(pd: Served) -> None:
    await dictionary_attack(pd, "203.0.113.7")
    assert not (await pd.service.Check(check("203.0.113.8"))).tempfail


async def test_ipv6_addresses_in_one_64_share_a_penalty(pd: Served) -> None:
    for i in range(30):
        await pd.service.Report(report(f"2001:db8:5:6::{i + 1:x}", UNKNOWN))
    v = await pd.service.Check(check("2001:db8:5:6:ffff::1"))
    assert v.tempfail
    assert v.identity == "2001:db8:5:6::/64"
    assert not (await pd.service.Check(check("2001:db8:5:7::1"))).tempfail


async def test_session_reports_then_checks_in_one_message(pd: Served) -> None:
    reports = [report("203.0.113.9", UNKNOWN, 1) for _ in range(30)] + [
        report("198.51.100.1", ACCEPTED)
    ]
    checks = [check("203.0.113.9"), check("198.51.100.1")]
    call = pd.service.Session()
    await call.write(pb.SessionRequest(id=7, reports=reports, checks=checks))
    resp = await call.read()
    assert resp.id == 7
    assert not resp.HasField("error")
    assert len(resp.reports) == 31
    assert resp.reports[-2].tempfail
    assert [v.tempfail for v in resp.checks] == [True, False]
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF


async def test_session_rejects_a_bad_message_whole_and_keeps_the_stream(pd: Served) -> None:
    call = pd.service.Session()
    bad = pb.SessionRequest(
        id=1, reports=[report("198.51.100.2", UNKNOWN, 5), report("not-an-ip", UNKNOWN)]
    )
    await call.write(bad)
    resp = await call.read()
    assert resp.id == 1
    assert resp.error.field == "reports[1].client.ip"
    assert not resp.reports
    ex = await pd.admin.Explain(pb.ExplainRequest(client=client("198.51.100.2")))
    assert ex.events == 0  # nothing from the rejected message was stored
    await call.write(pb.SessionRequest(id=2, checks=[check("198.51.100.2")]))
    resp = await call.read()
    assert resp.id == 2
    assert len(resp.checks) == 1
    await call.done_writing()


async def test_a_bad_report_deep_in_a_large_message_is_named_by_its_index(pd: Served) -> None:
    """A message larger than `bulk_slice` (100) is validated slice by slice; the bad
    report is still named by its index in the whole message, and nothing is stored."""
    call = pd.service.Session()
    good = [report(f"198.51.100.{i % 200 + 1}", UNKNOWN) for i in range(250)]
    good[237] = report("not-an-ip", UNKNOWN)
    await call.write(pb.SessionRequest(id=3, reports=good))
    resp = await call.read()
    assert resp.id == 3
    assert resp.error.field == "reports[237].client.ip"
    assert not resp.reports
    ex = await pd.admin.Explain(pb.ExplainRequest(client=client("198.51.100.1")))
    assert ex.events == 0
    await call.done_writing()


async def test_session_garbage_bytes_get_an_error_and_the_stream_goes_on(pd: Served) -> None:
    stream = pd.channel.stream_stream(
        "/penalty.v1.PenaltyService/Session",
        response_deserializer=pb.SessionResponse.FromString,
    )
    call = stream()
    await call.write(b"\x0a\xff\xff\xff\xff\x0f garbage")
    resp = await call.read()
    assert resp.error.field == "message"
    assert resp.error.message.startswith("not a valid Session")
    # Invalid UTF-8 in a HELO (crafted by an API caller): answered with the message's id.
    good = pb.SessionRequest(id=7, reports=[report("198.51.100.9", pb.OUTCOME_ACCEPTED)])
    bad = bytearray(good.SerializeToString())
    bad += pb.SessionRequest(
        reports=[pb.ReportRequest(client=client("198.51.100.9", helo="HELO"))]
    ).SerializeToString()
    bad[bad.index(b"HELO")] = 0xFF
    await call.write(bytes(bad))
    resp = await call.read()
    assert (resp.id, resp.error.field) == (7, "message")
    await call.write(
        pb.SessionRequest(
            id=8, reports=[report("198.51.100.9", pb.OUTCOME_ACCEPTED)]
        ).SerializeToString()
    )
    resp = await call.read()
    assert resp.id == 8
    assert not resp.HasField("error")
    assert len(resp.reports) == 1
    await call.done_writing()
    ex = await pd.admin.Explain(pb.ExplainRequest(client=client("198.51.100.9")))
    assert ex.events == 1  # only the good message was stored


async def test_lift_list_stats(pd: Served) -> None:
    await dictionary_attack(pd, "203.0.113.7")
    await dictionary_attack(pd, "203.0.113.8")
    stats = await pd.admin.Stats(pb.StatsRequest())
    assert stats.active_penalties == 2
    assert stats.store == "memory"
    page = await pd.admin.ListPenalties(pb.ListPenaltiesRequest(page_size=1))
    assert len(page.penalties) == 1
    assert page.next_page_token
    rest = await pd.admin.ListPenalties(
        pb.ListPenaltiesRequest(page_size=1, page_token=page.next_page_token)
    )
    assert {page.penalties[0].identity, rest.penalties[0].identity} == {
        "203.0.113.7",
        "203.0.113.8",
    }
    assert not rest.next_page_token
    lifted = await pd.admin.Lift(
        pb.LiftRequest(client=client("203.0.113.7"), actor="abuse-desk", note="customer called")
    )
    assert lifted.lifted
    assert not (await pd.service.Check(check("203.0.113.7"))).tempfail
    assert not (await pd.admin.Lift(pb.LiftRequest(client=client("203.0.113.7")))).lifted
    assert (await pd.admin.Stats(pb.StatsRequest())).active_penalties == 1


async def test_explain_shows_the_numbers(pd: Served) -> None:
    for _ in range(10):
        await pd.service.Report(report("203.0.113.30", UNKNOWN))
    await pd.service.Report(report("203.0.113.30", ACCEPTED, 3))
    ex = await pd.admin.Explain(pb.ExplainRequest(client=client("203.0.113.30")))
    assert ex.events == 13
    assert {(t.outcome, t.n) for t in ex.window} == {(UNKNOWN, 10), (ACCEPTED, 3)}
    assert ex.weighted_errors == 10
    assert ex.error_ratio == pytest.approx(10 / 13)
    assert 0 < ex.wilson_lower_bound < ex.error_ratio
    assert ex.threshold == 0.5
    assert not ex.would_fire  # 13 events < n_min
    assert not ex.verdict.tempfail


async def test_health_and_reflection(pd: Served) -> None:
    health = health_pb2_grpc.HealthStub(pd.channel)
    for service in ("", "penalty.v1.PenaltyService", "penalty.v1.PenaltyAdmin"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(pd.channel)

    async def one() -> object:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for resp in stub.ServerReflectionInfo(one()):
        names |= {s.name for s in resp.list_services_response.service}
    assert {
        "penalty.v1.PenaltyService",
        "penalty.v1.PenaltyAdmin",
        "grpc.health.v1.Health",
    } <= names
