"""Fair, explainable penalties on the embedded store: shared addresses, allowlist,
adaptive threshold, escalation, lifts."""

from __future__ import annotations

import grpc
import pytest

from penalty.v1 import penalty_pb2 as pb
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import ACCEPTED, UNKNOWN, Clock, check, eventually
from tests.harness.inprocess import Served, ServeFactory

Kind = pb.PenaltyEvent.Kind


def user(ip: str, i: int) -> pb.Client:
    return pb.Client(ip=ip, helo=f"pc{i}.home.example", mail_from=f"someone@d{i}.example")


SPAMMER = {"helo": "bulk-mailer", "mail_from": "offers@spam.example"}


def rep(c: pb.Client, outcome: int, n: int = 1) -> pb.ReportRequest:
    return pb.ReportRequest(client=c, counts=[pb.OutcomeCount(outcome=outcome, n=n)])  # type: ignore[arg-type]  # enum int


async def neighbourhood(pd: Served, ip: str, users: int) -> pb.Client:
    """`users` legitimate clients behind `ip` (a little noise each), then one spammer."""
    for i in range(users):
        await pd.service.Report(rep(user(ip, i), ACCEPTED, 5))
        if i % 10 == 0:
            await pd.service.Report(rep(user(ip, i), UNKNOWN))  # a typo now and then
    spammer = pb.Client(ip=ip, **SPAMMER)
    for _ in range(40):
        await pd.service.Report(rep(spammer, UNKNOWN))
    return spammer


async def test_one_spammer_behind_a_shared_address(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    spammer = await neighbourhood(pd, "100.64.7.7", users=50)
    v = await pd.service.Check(pb.CheckRequest(client=spammer))
    assert v.tempfail
    assert v.identity.startswith("100.64.7.7#")
    assert "100.64.7.7" in v.smtp_reply
    for i in range(50):
        assert not (await pd.service.Check(pb.CheckRequest(client=user("100.64.7.7", i)))).tempfail
    assert not (await pd.service.Check(check("100.64.7.7"))).tempfail  # no fingerprint: the address
    ex = await pd.admin.Explain(pb.ExplainRequest(client=spammer))
    assert ex.shared
    assert ex.shared_reason.startswith("detected: more than 20 distinct clients")
    assert ex.distinct_sub_identities >= 51
    assert ex.sub.verdict.tempfail
    assert ex.sub_identity == v.identity
    assert not ex.verdict.tempfail  # the whole address is not penalized


async def test_early_spammer_is_not_blamed_on_few_neighbours(serve: ServeFactory) -> None:
    """Before detection has seen K clients, the decision still tells them apart."""
    pd = await serve(MemoryStore())
    spammer = await neighbourhood(pd, "198.51.100.77", users=3)
    assert (await pd.service.Check(pb.CheckRequest(client=spammer))).tempfail
    for i in range(3):
        assert not (
            await pd.service.Check(pb.CheckRequest(client=user("198.51.100.77", i)))
        ).tempfail
    ex = await pd.admin.Explain(pb.ExplainRequest(client=user("198.51.100.77", 0)))
    assert not ex.shared
    assert "not shared yet" in ex.shared_reason


async def test_configured_shared_cidr(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore(), shared_cidrs=["100.64.0.0/10"])
    await pd.service.Report(rep(user("100.64.1.1", 1), ACCEPTED))
    ex = await pd.admin.Explain(pb.ExplainRequest(client=user("100.64.1.1", 1)))
    assert ex.shared
    assert ex.shared_reason == "configured: 100.64.0.0/10 is in shared_cidrs"


async def test_fingerprint_rotating_spammer_still_defers_the_address(serve: ServeFactory) -> None:
    """Rotating HELO and sender per attempt does not dilute the evidence to nothing."""
    pd = await serve(MemoryStore())
    last = pb.Verdict()
    for i in range(60):
        c = pb.Client(ip="203.0.113.90", helo=f"h{i}.example", mail_from=f"x@r{i}.example")
        last = await pd.service.Report(rep(c, UNKNOWN))
        if last.tempfail:
            break
    assert last.tempfail
    assert (await pd.service.Check(check("203.0.113.90"))).tempfail


async def test_allowlisted_clients_are_never_penalized(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    entry = await pd.admin.Allow(
        pb.AllowRequest(cidr="203.0.113.0/24", ttl_seconds=3600, note="partner", actor="desk")
    )
    assert entry.cidr == "203.0.113.0/24"
    assert entry.expires_at_unix_ms - entry.created_at_unix_ms == 3_600_000
    for _ in range(60):
        v = await pd.service.Report(rep(pb.Client(ip="203.0.113.7"), UNKNOWN))
        assert not v.tempfail
        assert v.allowlisted
    assert (await pd.service.Check(check("203.0.113.7"))).allowlisted
    ex = await pd.admin.Explain(pb.ExplainRequest(client=pb.Client(ip="203.0.113.7")))
    assert ex.events == 0  # nothing of an allowlisted client is stored
    assert ex.allow.note == "partner"
    listed = await pd.admin.ListAllowlist(pb.ListAllowlistRequest())
    assert [e.cidr for e in listed.entries] == ["203.0.113.0/24"]
    assert (await pd.admin.RemoveAllow(pb.RemoveAllowRequest(cidr="203.0.113.0/24"))).removed
    assert not (await pd.service.Check(check("203.0.113.7"))).allowlisted


@pytest.mark.parametrize(
    ("request_", "field", "text"),
    [
        (pb.AllowRequest(cidr="nonsense"), "cidr", "not a CIDR"),
        (pb.AllowRequest(cidr="203.0.113.7/24"), "cidr", "host bits"),
        (pb.AllowRequest(cidr="10.0.0.0/8"), "cidr", "broader than the allowed /16"),
        (pb.AllowRequest(cidr="2001::/16"), "cidr", "broader than the allowed /32"),
        (pb.AllowRequest(cidr="192.0.2.0/24", ttl_seconds=-5), "ttl_seconds", "negative"),
        (pb.AllowRequest(cidr="192.0.2.0/24", ttl_seconds=10**10), "ttl_seconds", "at most"),
        (pb.AllowRequest(cidr="192.0.2.0/24", note="n" * 2000), "note", "longer than"),
    ],
)
async def test_bad_allow_requests(
    serve: ServeFactory, request_: pb.AllowRequest, field: str, text: str
) -> None:
    pd = await serve(MemoryStore())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pd.admin.Allow(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: ")
    assert text in info.value.details()
    assert not (await pd.admin.ListAllowlist(pb.ListAllowlistRequest())).entries


async def test_noisy_fleet_raises_the_threshold(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore(), stats_flush_seconds=0.1, baseline_min_events=100)
    # The whole internet is noisy: 40% errors from many clients.
    for i in range(100):
        await pd.service.Report(
            pb.ReportRequest(
                client=pb.Client(ip=f"198.51.100.{i}"),
                counts=[
                    pb.OutcomeCount(outcome=ACCEPTED, n=3),
                    pb.OutcomeCount(outcome=UNKNOWN, n=2),
                ],
            )
        )

    async def baseline() -> float:
        return float(pd.engine.baseline.ratio)

    assert await eventually(baseline, lambda b: b > 0.3, within=5) == pytest.approx(0.4)
    # 80% errors would fire against the floor (0.5) but not against 3 x 0.4.
    c = pb.Client(ip="203.0.113.55")
    counts = [pb.OutcomeCount(outcome=ACCEPTED, n=10), pb.OutcomeCount(outcome=UNKNOWN, n=40)]
    await pd.service.Report(pb.ReportRequest(client=c, counts=counts))
    ex = await pd.admin.Explain(pb.ExplainRequest(client=c))
    assert ex.threshold == pytest.approx(0.8)  # raised, but never above threshold_max
    assert ex.baseline == pytest.approx(0.4)
    assert ex.wilson_lower_bound > 0.5
    assert not ex.verdict.tempfail

    async def tracked() -> int:
        return int((await pd.admin.Stats(pb.StatsRequest())).tracked_identities)

    await eventually(tracked, lambda n: n == 101, within=5)  # aggregated every flush


async def test_escalation_for_repeat_offenders(serve: ServeFactory) -> None:
    clock = Clock()
    pd = await serve(
        MemoryStore(clock=clock), escalation_multiplier=2.0, escalation_cap_seconds=900
    )
    seconds = []
    for _ in range(3):
        for _ in range(20):
            v = await pd.service.Report(rep(pb.Client(ip="203.0.113.66"), UNKNOWN))
        seconds.append(v.seconds_left)
        clock.now = v.expires_at_unix_ms + 61_000  # after the penalty, in a new bucket
    assert seconds == [300, 600, 900]  # 1200 capped at 900


async def test_lift_is_recorded(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    for _ in range(25):
        await pd.service.Report(rep(pb.Client(ip="203.0.113.8"), UNKNOWN))
    lifted = await pd.admin.Lift(
        pb.LiftRequest(client=pb.Client(ip="203.0.113.8"), actor="alice", note="ticket 42")
    )
    assert lifted.lifted
    ex = await pd.admin.Explain(pb.ExplainRequest(client=pb.Client(ip="203.0.113.8")))
    assert (ex.last_lift.actor, ex.last_lift.note) == ("alice", "ticket 42")
    assert not ex.verdict.tempfail
