"""WatchPenalties on the embedded store: the snapshot, then every change."""

from __future__ import annotations

import asyncio

from penalty.v1 import penalty_pb2 as pb
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import UNKNOWN, report
from tests.harness.inprocess import ServeFactory

Kind = pb.PenaltyEvent.Kind


async def test_watch_penalties_snapshot_then_changes(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    for _ in range(25):
        await pd.service.Report(report("203.0.113.1", UNKNOWN))
    stream = pd.service.WatchPenalties(pb.WatchRequest())
    first = await stream.read()
    assert first.kind == Kind.KIND_PENALTY_STARTED
    assert first.penalty.identity == "203.0.113.1"
    assert 290 < first.penalty.seconds_left <= 300
    assert (await stream.read()).kind == Kind.KIND_SNAPSHOT_DONE
    for _ in range(25):
        await pd.service.Report(report("203.0.113.2", UNKNOWN))
    started = await asyncio.wait_for(stream.read(), 2)
    assert (started.kind, started.penalty.identity) == (Kind.KIND_PENALTY_STARTED, "203.0.113.2")
    assert started.penalty.expires_at_unix_ms > 0
    await pd.admin.Lift(pb.LiftRequest(client=pb.Client(ip="203.0.113.1")))
    lifted = await asyncio.wait_for(stream.read(), 2)
    assert (lifted.kind, lifted.penalty.identity) == (Kind.KIND_PENALTY_LIFTED, "203.0.113.1")
    await pd.admin.Allow(pb.AllowRequest(cidr="192.0.2.0/24"))
    added = await asyncio.wait_for(stream.read(), 2)
    assert (added.kind, added.allow.cidr) == (Kind.KIND_ALLOW_ADDED, "192.0.2.0/24")
    stream.cancel()
