"""Reputation (issue 15): the longer memory as evidence, and how it is shown.

The engine runs on the embedded store with an injected clock (as the simulator drives
it): reports, then the stats flush that carries neighbourhood sums, then decisions.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.aio import AsyncPenaltyClient
from penaltyclient.sync import PenaltyClient
from penaltyd.engine import Answer
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import ACCEPTED, UNKNOWN, report
from tests.harness.clocked import engine, ref, send
from tests.harness.inprocess import ServeFactory
from tests.unit.clients.test_ctl import ctl


async def test_a_moderate_spammer_is_deferred_on_its_history() -> None:
    e, clock, v = engine()
    for i in range(30):  # a clean fleet: the typical address errs 1 % of the time or less
        await send(e, ref(v, f"198.51.100.{i}"), [ACCEPTED] * 6)
    await e.refresh_stats()
    spammer = ref(v, "203.0.113.9")
    answers: list[Answer] = []
    for _minute in range(12):  # ~10 RCPT/min at 40 % unknown recipients
        clock.ms += 60_000
        answers += await send(e, spammer, [UNKNOWN, ACCEPTED, ACCEPTED, UNKNOWN, ACCEPTED] * 2)
        await e.refresh_stats()
        if any(a.penalty for a in answers):
            break
    fired = next(a for a in answers if a.penalty)
    assert fired.penalty is not None
    assert fired.penalty.reason.startswith("reputation;")
    # ...while the 10-minute window alone stays under the fixed 0.5 floor.
    ex = await e.explain(spammer)
    assert ex.standing is not None
    assert ex.standing.history == "bad"
    assert ex.standing.threshold == pytest.approx(0.2)


async def test_a_misbehaving_neighbourhood_defers_on_little_evidence_each() -> None:
    e, _clock, v = engine()
    for i in range(30):
        await send(e, ref(v, f"198.51.100.{i}"), [ACCEPTED] * 6)
    for i in range(1, 31):  # a botnet across one /24: 3 attempts each, 90 % errors
        await send(e, ref(v, f"192.0.2.{i}"), [UNKNOWN, UNKNOWN, UNKNOWN])
    await e.refresh_stats()
    bot = await send(e, ref(v, "192.0.2.77"), [UNKNOWN, ACCEPTED, UNKNOWN, UNKNOWN])
    assert bot[-1].penalty is not None
    assert bot[-1].penalty.reason.startswith("neighbourhood;")
    # The same from a quiet network is far from enough; a neighbour erring once is fine.
    elsewhere = await send(e, ref(v, "203.0.113.77"), [UNKNOWN, ACCEPTED, UNKNOWN, UNKNOWN])
    assert elsewhere[-1].penalty is None
    neighbour = await send(e, ref(v, "192.0.2.200"), [ACCEPTED, UNKNOWN, ACCEPTED, ACCEPTED])
    assert neighbour[-1].penalty is None


async def test_a_long_clean_history_needs_more_evidence() -> None:
    e, clock, v = engine()
    big = ref(v, "198.51.100.50")
    for _ in range(6):
        clock.ms += 120_000  # the window forgets, the reputation does not
        await send(e, big, [ACCEPTED] * 100)
    ex = await e.explain(big)
    assert ex.standing is not None
    assert ex.standing.history == "clean"
    assert ex.decision.n_min == 40
    assert ex.decision.burst == 200


async def test_explain_reputation_rpcs_and_penaltyctl(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore(), stats_flush_seconds=0.1)
    for i in range(1, 21):
        await pd.service.Report(report(f"192.0.2.{i}", UNKNOWN, 3))
    await pd.service.Report(report("198.51.100.7", ACCEPTED, 5))
    await pd.engine.refresh_stats()
    ex = await pd.admin.Explain(pb.ExplainRequest(client=pb.Client(ip="192.0.2.1")))
    assert ex.neighbourhood == "192.0.2.0/24"
    assert ex.reputation.events == pytest.approx(3, rel=1e-3)
    assert ex.neighbourhood_reputation.events == pytest.approx(60, rel=1e-3)
    assert ex.reputation_threshold > 0
    assert ex.n_min == 20
    assert "neighbourhood" in ex.reputation_effect
    one = await pd.admin.Reputation(pb.ReputationRequest(client=pb.Client(ip="192.0.2.5")))
    assert (one.identity, one.network) == ("192.0.2.5", "192.0.2.0/24")
    assert one.bad_neighbourhood
    net = await pd.admin.Reputation(pb.ReputationRequest(network="192.0.2.0/24"))
    assert not net.HasField("reputation")
    assert net.neighbourhood.weighted_errors == pytest.approx(60, rel=1e-3)
    worst = await pd.admin.WorstNeighbourhoods(pb.WorstNeighbourhoodsRequest(limit=5))
    assert [n.network for n in worst.neighbourhoods] == ["192.0.2.0/24"]
    for bad in (pb.ReputationRequest(network="192.0.0.0/16"), pb.ReputationRequest()):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pd.admin.Reputation(bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    shown = await ctl(pd.address, "reputation", "192.0.2.5")
    assert shown.exit_code == 0, shown.output
    assert "misbehaving" in shown.stdout
    listed = await ctl(pd.address, "--json", "worst", "--limit", "3")
    assert listed.exit_code == 0, listed.output
    assert "192.0.2.0/24" in listed.stdout


@pytest.mark.parametrize(
    ("network", "says"),
    [
        ("203.0.0.0/16", "a neighbourhood is an IPv4 /24"),
        ("2001:db8::/64", "a neighbourhood is an IPv6 /48"),
        ("1" * 1_000_000, ""),  # a megabyte of digits from an API caller: refused, linear
        ("not a network", ""),
    ],
)
async def test_a_reputation_query_for_anything_but_a_neighbourhood_is_refused(
    serve: ServeFactory, network: str, says: str
) -> None:
    pd = await serve(MemoryStore())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await pd.admin.Reputation(pb.ReputationRequest(network=network))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert details.startswith("network")
    assert says in details
    assert len(details) < 400  # the error never echoes the megabyte


async def test_the_client_libraries_ask_for_reputation(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore(), stats_flush_seconds=0.1)
    for i in range(1, 21):
        await pd.service.Report(report(f"192.0.2.{i}", UNKNOWN, 3))
    await pd.engine.refresh_stats()
    async with AsyncPenaltyClient(pd.address) as aio:
        one = await aio.reputation("192.0.2.5", actor="desk", note="T-2")
        assert (one.identity, one.network) == ("192.0.2.5", "192.0.2.0/24")
        net = await aio.reputation(network="192.0.2.0/24")
        assert net.neighbourhood.weighted_errors == pytest.approx(60, rel=1e-3)
        worst = await aio.worst_neighbourhoods(5)
        assert [n.network for n in worst.neighbourhoods] == ["192.0.2.0/24"]

    def sync_calls() -> tuple[pb.ReputationAnswer, pb.WorstNeighbourhoodsResponse]:
        with PenaltyClient(pd.address) as client:
            return client.reputation("192.0.2.5"), client.worst_neighbourhoods(5)

    one, worst = await asyncio.to_thread(sync_calls)
    assert one.network == "192.0.2.0/24"
    assert [n.network for n in worst.neighbourhoods] == ["192.0.2.0/24"]
