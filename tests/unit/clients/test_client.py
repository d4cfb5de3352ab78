"""The client library against in-process penaltyd servers (memory store)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from penalty.v1 import penalty_pb2 as pb
from penaltyclient import AsyncPenaltyClient, PenaltyClient, PenaltydError
from penaltyclient.channel import grpc_target
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import eventually
from tests.harness.inprocess import ServeFactory
from tests.harness.ports import free_port

UNKNOWN = pb.OUTCOME_UNKNOWN_RECIPIENT
ACCEPTED = pb.OUTCOME_ACCEPTED


async def test_fail_open_when_nothing_listens() -> None:
    async with AsyncPenaltyClient(f"127.0.0.1:{free_port()}", deadline=0.2) as client:
        t0 = time.perf_counter()
        v = await client.check("203.0.113.7")
        assert time.perf_counter() - t0 < 0.5
        assert v.degraded
        assert not v.tempfail
        r = await client.report("203.0.113.7", {UNKNOWN: 1})
        assert r.degraded
        assert client.degraded_answers == 2
        with pytest.raises(PenaltydError) as info:
            await client.stats()  # admin calls raise
        assert info.value.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


async def test_check_report_and_bad_input(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    async with AsyncPenaltyClient(pd.address) as client:
        for _ in range(25):
            v = await client.report("203.0.113.7", {UNKNOWN: 1})
        assert v.tempfail
        assert (await client.check("203.0.113.7")).tempfail
        with pytest.raises(PenaltydError) as info:
            await client.check("not-an-ip")
        assert info.value.details.startswith("client.ip")
        ex = await client.explain("203.0.113.7")
        assert ex.verdict.tempfail
        assert (await client.lift("203.0.113.7", actor="t")).lifted
        assert (await client.stats()).active_penalties == 0


async def test_live_replica_answers_in_process_with_exact_time(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    async with AsyncPenaltyClient(pd.address, live_replica=True) as client:
        assert await client.wait_synced()
        assert client.replica is not None
        for _ in range(25):
            await client.report("203.0.113.7", {UNKNOWN: 1})

        def local() -> pb.Verdict | None:
            assert client.replica is not None
            return client.replica.check("203.0.113.7")

        async def probe() -> pb.Verdict | None:
            return local()

        v = await eventually(probe, lambda v: v is not None and v.tempfail, within=2)
        assert v is not None
        server = await pd.service.Check(pb.CheckRequest(client=pb.Client(ip="203.0.113.7")))
        assert v.expires_at_unix_ms == server.expires_at_unix_ms
        assert abs(v.seconds_left - server.seconds_left) <= 1
        assert v.smtp_reply == server.smtp_reply.replace(
            str(server.seconds_left), str(v.seconds_left)
        )
        assert not (await client.check("203.0.113.8")).tempfail
        # A client behind a shared address: its own sub-identity penalty.
        for i in range(3):
            await client.report(
                "100.64.3.3", {ACCEPTED: 3}, helo=f"pc{i}", mail_from=f"u@d{i}.example"
            )
        for _ in range(25):
            await client.report("100.64.3.3", {UNKNOWN: 1}, helo="bot", mail_from="x@spam.example")

        async def sub() -> pb.Verdict:
            return await client.check("100.64.3.3", helo="bot", mail_from="y@spam.example")

        assert (await eventually(sub, lambda v: v.tempfail, within=2)).identity.startswith(
            "100.64.3.3#"
        )
        assert not (await client.check("100.64.3.3", helo="pc1", mail_from="u@d1.example")).tempfail
        # The allowlist reaches the replica too.
        await client.allow("198.51.100.0/24", note="partner")

        async def allowed() -> pb.Verdict:
            return await client.check("198.51.100.5")

        assert (await eventually(allowed, lambda v: v.allowlisted, within=2)).allowlisted


async def test_replica_falls_back_to_rpcs_when_the_stream_ends(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    client = AsyncPenaltyClient(pd.address, live_replica=True, deadline=0.3)
    client.start()
    try:
        assert await client.wait_synced()
        await pd.running.stop(grace=0)

        async def unsynced() -> bool:
            assert client.replica is not None
            return client.replica.synced

        await eventually(unsynced, lambda s: not s, within=3)
        v = await client.check("203.0.113.7")
        assert v.degraded  # no replica, no server: fail open
    finally:
        await client.close()


async def test_session_reporter_batches(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    async with AsyncPenaltyClient(pd.address) as client:
        reporter = client.reporter(max_batch=50)
        reporter.start()
        for i in range(500):
            reporter.report(f"198.51.100.{i % 100}", {ACCEPTED: 1})
        for _ in range(30):
            reporter.report("203.0.113.9", {UNKNOWN: 1})
        assert await reporter.flush(5)
        assert reporter.acked == 530
        assert reporter.dropped == 0
        assert any(v.identity == "203.0.113.9" for v in reporter.tempfails)
        assert (await client.check("203.0.113.9")).tempfail
        await reporter.close()


async def test_accepted_reports_queued_in_bulk_are_delivered_and_bounded(
    serve: ServeFactory,
) -> None:
    """`enqueue_accepted` (penalty-policyd's flush): every report delivered, those past
    `max_queue` dropped and counted, a full batch sent without waiting for the interval."""
    pd = await serve(MemoryStore())
    async with AsyncPenaltyClient(pd.address) as client:
        reporter = client.reporter(max_batch=50, interval=30.0, max_queue=120)
        reporter.start()
        one = [pb.OutcomeCount(outcome=ACCEPTED, n=2)]
        bulk = [
            pb.ReportRequest(client=pb.Client(ip=f"198.51.100.{i}"), counts=one)
            for i in range(1, 151)
        ]
        assert reporter.enqueue_accepted(bulk) == 120
        assert reporter.dropped == 30

        async def acked() -> int:
            return reporter.acked

        await eventually(acked, lambda n: n >= 100, within=2.0)  # full batches: no interval
        assert await reporter.flush(5)
        assert reporter.acked == 120
        ex = await client.explain("198.51.100.7")
        assert [(t.outcome, t.n) for t in ex.window] == [(ACCEPTED, 2)]
        await reporter.close()


async def test_an_error_report_leaves_at_once_accepted_ones_wait_for_the_interval(
    serve: ServeFactory,
) -> None:
    """An error may start a penalty: it must not wait for the batching interval (the
    milter's rejections reach penaltyd, and the verdict the replica, a round trip after
    the rejection); accepted recipients still leave in batches."""
    pd = await serve(MemoryStore())
    async with AsyncPenaltyClient(pd.address) as client:
        reporter = client.reporter(interval=30.0)
        reporter.start()

        async def acked() -> int:
            return reporter.acked

        await asyncio.sleep(0.05)  # the writer waits for its interval
        reporter.report("198.51.100.1", {ACCEPTED: 1})
        await asyncio.sleep(0.2)
        assert reporter.acked == 0  # accepted: waits for the interval (or a full batch)
        reporter.report("203.0.113.9", {UNKNOWN: 1})
        await eventually(acked, lambda n: n == 2, within=2.0)
        for _ in range(40):  # a burst: single flight, everything still delivered
            reporter.report("203.0.113.9", {UNKNOWN: 1})
        await eventually(acked, lambda n: n == 42, within=2.0)
        assert any(v.identity == "203.0.113.9" for v in reporter.tempfails)
        await reporter.close()


async def test_round_robin_over_replicas(serve: ServeFactory) -> None:
    a = await serve(MemoryStore())
    b = await serve(MemoryStore())
    async with AsyncPenaltyClient(f"{a.address},{b.address}") as client:
        for _ in range(40):
            await client.check("198.51.100.1")
    served = [int(s.engine.metrics.check_pass._value.get()) for s in (a, b)]
    assert sum(served) == 40
    assert min(served) >= 10  # both replicas took a share


def test_targets() -> None:
    assert grpc_target("127.0.0.1:1") == "127.0.0.1:1"
    assert grpc_target("127.0.0.1:1,127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert grpc_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    assert grpc_target("dns:///penaltyd:50051") == "dns:///penaltyd:50051"
    with pytest.raises(ValueError, match="IP literals"):
        grpc_target("a:1,b:2")


def test_sync_client(serve: ServeFactory) -> None:
    del serve  # the blocking client needs the server on a loop of its own, in a thread
    loop = asyncio.new_event_loop()
    from penaltyd.server import start_server
    from penaltyd.settings import Settings

    running = loop.run_until_complete(
        start_server(Settings(listen="127.0.0.1:0"), store=MemoryStore())
    )
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with PenaltyClient(f"127.0.0.1:{running.port}", live_replica=True) as client:
            assert client.wait_synced()
            for _ in range(25):
                assert not client.report("203.0.113.7", {UNKNOWN: 1}).degraded
            end = time.monotonic() + 2  # the replica's thread applies the watch event
            while not client.check("203.0.113.7").tempfail and time.monotonic() < end:
                time.sleep(0.01)
            assert client.check("203.0.113.7").tempfail
            assert [p.identity for p in client.penalties()] == ["203.0.113.7"]
            assert client.allow("192.0.2.0/24").cidr == "192.0.2.0/24"
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(grace=0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    with PenaltyClient(f"127.0.0.1:{free_port()}") as down:
        assert down.check("203.0.113.7").degraded


async def test_the_live_replica_keeps_answering_while_connections_are_recycled(
    serve: ServeFactory,
) -> None:
    """penaltyd recycles connections (max_connection_age) so clients rebalance; the watch
    stream ends each time. The replica keeps answering from its state while it takes the
    next snapshot (before: it dropped for ~70 ms every 5.5 minutes, seen as an idle
    `live_replica: false`)."""
    pd = await serve(MemoryStore(), max_connection_age_seconds=0.5, connection_age_grace_seconds=0)
    async with AsyncPenaltyClient(pd.address, live_replica=True) as c:
        assert await c.wait_synced()
        assert c.replica is not None
        unsynced = 0
        end = time.monotonic() + 3.0
        while time.monotonic() < end:  # sampling the state the test is about, not waiting
            unsynced += not c.replica.synced
            await asyncio.sleep(0.002)
        assert c.replica.restarts >= 2  # the stream did end, more than once
        assert unsynced == 0


async def test_reports_older_than_max_age_are_dropped_not_sent(serve: ServeFactory) -> None:
    # A report queued while penaltyd was away for longer than its window would be counted
    # as fresh evidence (and keep a client's address on the MX longer than penaltyd keeps
    # it): it is dropped and counted, and what is younger is delivered.
    now = [1000.0]
    pd = await serve(MemoryStore())
    async with AsyncPenaltyClient(pd.address) as client:
        reporter = client.reporter(max_age=600.0, clock=lambda: now[0])
        for _ in range(3):
            reporter.report("203.0.113.9", {UNKNOWN: 1})
        now[0] += 601
        for _ in range(2):
            reporter.report("198.51.100.1", {ACCEPTED: 1})
        reporter.start()
        assert await reporter.flush(5)
        assert (reporter.acked, reporter.expired, reporter.dropped) == (2, 3, 0)
        await reporter.close()
        assert (await client.explain("203.0.113.9")).events == 0


async def until(condition: Callable[[], bool]) -> None:
    # The reporter's reconnect loop has no event to await from outside.
    async def probe() -> bool:
        return condition()

    await eventually(probe, bool)


async def test_reports_expire_while_penaltyd_stays_unreachable() -> None:
    now = [0.0]
    async with AsyncPenaltyClient(f"127.0.0.1:{free_port()}", deadline=0.2) as client:
        reporter = client.reporter(max_age=600.0, clock=lambda: now[0])
        reporter.start()
        for _ in range(5):
            reporter.report("203.0.113.9", {UNKNOWN: 1})
        await until(lambda: reporter.reconnects >= 1)
        assert reporter.pending == 5  # kept while they may still count
        now[0] += 601
        reporter.report("198.51.100.1", {ACCEPTED: 1})
        await until(lambda: reporter.expired == 5)
        assert reporter.pending == 1
        await reporter.close(within=0)


async def test_a_report_kept_across_a_restart_keeps_its_age(serve: ServeFactory) -> None:
    # penalty-logwatch's spool: the time on disk counts, so a restart never makes a
    # report young again.
    pd = await serve(MemoryStore())
    async with AsyncPenaltyClient(pd.address) as client:
        reporter = client.reporter(max_age=600.0)
        reporter.enqueue(pb.ReportRequest(client=pb.Client(ip="203.0.113.9"),
                                          counts=[pb.OutcomeCount(outcome=UNKNOWN, n=1)]),
                         age=601)  # fmt: skip
        reporter.enqueue(pb.ReportRequest(client=pb.Client(ip="198.51.100.1"),
                                          counts=[pb.OutcomeCount(outcome=ACCEPTED, n=1)]),
                         age=30)  # fmt: skip
        reporter.start()
        assert await reporter.flush(5)
        assert (reporter.acked, reporter.expired) == (1, 1)
        await reporter.close()
