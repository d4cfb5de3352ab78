"""penalty-policyd and penalty-milter in one process (`--milter-listen`): one client, one
live replica, one report stream. The report whose verdict starts a penalty updates the
replica at once, so the very next RCPT of that client on this MX meets the 450; the feed
round trip is not waited for."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from penaltyclient.aio import AsyncPenaltyClient
from penaltyclient.milter import PenaltyMilter
from penaltyclient.policyd import PolicyServer, _milter, _stats_fields, parser
from penaltyd.store.memory import MemoryStore
from tests.harness.inprocess import ServeFactory
from tests.harness.milter import Mta
from tests.harness.policy import request

SPAMMER = "203.0.113.99"


@dataclass
class Sidecar:
    client: AsyncPenaltyClient
    policy: PolicyServer
    milter: PenaltyMilter
    policy_port: int
    milter_port: int


@pytest.fixture
async def sidecar(serve: ServeFactory) -> AsyncIterator[Sidecar]:
    pd = await serve(MemoryStore())
    args = parser().parse_args(
        ["--penaltyd", pd.address, "--no-report-accepted", "--milter-listen", "127.0.0.1:0"]
    )
    client = AsyncPenaltyClient(pd.address, deadline=0.3, live_replica=True)
    client.start()
    policy = PolicyServer(client, report_accepted=False)
    policy.reporter.start()
    milter = _milter(args, policy.reporter)
    server = await policy.listen("127.0.0.1:0")
    milter_address = await milter.start("127.0.0.1:0")
    assert await client.wait_synced()
    try:
        yield Sidecar(
            client,
            policy,
            milter,
            server.sockets[0].getsockname()[1],
            int(milter_address.rpartition(":")[2]),
        )
    finally:
        await milter.close(drain=0)
        await policy.close()
        await policy.reporter.close(0.5)
        await client.close()


async def test_the_rcpt_after_the_triggering_report_meets_the_450(sidecar: Sidecar) -> None:
    """A dictionary attack on one connection: each RCPT asks the policy (DUNNO), Postfix
    rejects it (550 unknown user) and tells the milter. Once the report that starts the
    penalty has its answer, the policy's next answer is the 450: no RCPT in between."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.policy_port)
    mta = await Mta.open(sidecar.milter_port)
    await mta.session(SPAMMER, "bulk.example", "x@bulk.example")
    reporter = sidecar.policy.reporter
    first_tempfail_report = first_450 = -1
    for i in range(60):
        writer.write(request(ip=SPAMMER, helo_name="bulk.example", sender="x@bulk.example"))
        await writer.drain()
        async with asyncio.timeout(5):
            answer = (await reader.readuntil(b"\n\n")).decode()
        if answer.startswith("action=450"):
            first_450 = i
            assert "try again in" in answer
            break
        await mta.rcpt(f"user{i}@test.example", rejected=f"user{i}@test.example")
        assert await reporter.flush(within=5)  # this report has its answer now
        if reporter.tempfails and first_tempfail_report < 0:
            first_tempfail_report = i
    assert first_tempfail_report >= 0, "no report started a penalty"
    assert first_450 == first_tempfail_report + 1
    assert sidecar.client.replica is not None
    assert sidecar.client.replica.learned >= 1
    assert sidecar.milter.stats.rcpt_rejected["unknown_recipient"] == first_450
    await mta.close()
    writer.close()


def test_milter_listen_is_documented() -> None:
    text = parser().format_help()
    assert "--milter-listen" in text
    args = parser().parse_args(["--milter-listen", "127.0.0.1:10041"])
    assert isinstance(args, argparse.Namespace)
    assert args.milter_listen == "127.0.0.1:10041"


async def test_an_idle_synced_replica_is_reported_live(sidecar: Sidecar) -> None:
    """A replica holding no penalty is empty (len 0, falsy) but synced: the stats line
    must say `live_replica: true` (it said false whenever the MX was idle)."""
    replica = sidecar.client.replica
    assert replica is not None
    assert len(replica) == 0
    assert replica.synced
    assert _stats_fields(sidecar.policy)["live_replica"] is True
