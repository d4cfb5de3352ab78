"""penalty-policyd speaking the Postfix policy protocol to a real in-process penaltyd.

What it does for well-behaved clients: answers in order on one connection (pipelined or
one at a time, whole or split across reads), the 450 with the seconds left, accepted
recipients reported, garbage answered DUNNO, Exim's half-close, the idle timeout, unix
sockets, failing open, and a clean SIGTERM. Hostile clients: test_policyd_hostile.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from penalty.v1 import penalty_pb2 as pb
from penaltyclient import policyd as policyd_module
from penaltyclient.aio import AsyncPenaltyClient
from penaltyclient.policyd import MAX_REQUEST, PolicyConnection
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import eventually
from tests.harness.inprocess import ServeFactory
from tests.harness.policy import (
    DUNNO,
    Policy,
    next_event,
    penalize,
    policyd_cli,
    request,
    start_policy,
)
from tests.harness.ports import free_port


async def test_tempfail_with_seconds_on_the_same_connection(policy: Policy) -> None:
    conn = await policy.connect()
    assert await policy.ask(conn, request()) == DUNNO
    await penalize(policy.policy.client)

    async def answer() -> str:
        return await policy.ask(conn, request())

    action = await eventually(answer, lambda a: a != DUNNO, within=2)
    assert action.startswith(
        "action=450 4.7.1 too many SMTP errors from 203.0.113.7; try again in "
    )
    seconds = int(action.split("try again in ")[1].split()[0])
    assert 295 <= seconds <= 300
    # other stages and other clients are untouched
    assert await policy.ask(conn, request("MAIL")) == DUNNO
    assert await policy.ask(conn, request(ip="198.51.100.1")) == DUNNO
    conn[1].close()


async def test_accepted_recipients_are_reported(policy: Policy) -> None:
    conn = await policy.connect()
    for _ in range(5):
        assert await policy.ask(conn, request(ip="198.51.100.33")) == DUNNO
    assert await policy.policy.flush(5)
    ex = await policy.policy.client.explain("198.51.100.33")
    assert [(t.outcome, t.n) for t in ex.window] == [(pb.OUTCOME_ACCEPTED, 5)]
    assert policy.policy.stats.accepted == 5


async def test_one_report_per_client_and_flush_with_its_count(policy: Policy) -> None:
    """A client's RCPTs between two flushes are one report counted up (built at the first
    RCPT); another HELO is another client of the address, so another report."""
    conn = await policy.connect()
    for _ in range(3):
        assert await policy.ask(conn, request(ip="198.51.100.34", helo_name="a.example")) == DUNNO
    assert await policy.ask(conn, request(ip="198.51.100.34", helo_name="b.example")) == DUNNO
    waiting = policy.policy._accepted  # since the last flush (--report-interval-ms): counted up
    assert sum(r.counts[0].n for r in waiting.values()) == policy.policy._waiting_recipients
    assert len(waiting) <= 2
    assert await policy.policy.flush(5)
    assert policy.policy.stats.accepted == 4
    assert not policy.policy._accepted
    ex = await policy.policy.client.explain("198.51.100.34")
    assert sum(t.n for t in ex.window if t.outcome == pb.OUTCOME_ACCEPTED) == 4


async def test_pipelined_requests_in_one_write_are_answered_in_order(policy: Policy) -> None:
    await penalize(policy.policy.client)
    conn = await policy.connect()
    await eventually(lambda: policy.ask(conn, request()), lambda a: a != DUNNO, within=2)
    batch = [request(ip="198.51.100.2"), request(), request("MAIL"), request()]
    conn[1].write(b"".join(batch))
    got = await policy.answers(conn, len(batch))
    assert [a.startswith("action=450 ") for a in got] == [False, True, False, True]


async def test_a_request_split_across_reads_byte_by_byte(policy: Policy) -> None:
    reader, writer = await policy.connect()
    for i in range(0, len(raw := request() * 2), 7):
        writer.write(raw[i : i + 7])
        await writer.drain()  # each piece goes out on its own
    assert await policy.answers((reader, writer), 2) == [DUNNO, DUNNO]
    assert policy.policy.stats.requests == 2


async def test_crlf_lines_are_understood(policy: Policy) -> None:
    await penalize(policy.policy.client)
    conn = await policy.connect()
    crlf = request().replace(b"\n", b"\r\n")
    action = await eventually(lambda: policy.ask(conn, crlf), lambda a: a != DUNNO, within=2)
    assert action.startswith("action=450 ")


@pytest.mark.parametrize(
    "garbage",
    [
        b"hello world\n\n",
        b"request=something_else\nclient_address=1.2.3.4\n\n",
        b"=novalue\n\n",
        b"\n",  # an empty line alone is an empty request
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=not-an-ip\n\n",
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=unknown\n\n",
    ],
)
async def test_garbage_gets_dunno_and_a_log_line(policy: Policy, garbage: bytes) -> None:
    conn = await policy.connect()
    with capture_logs() as logs:
        assert await policy.ask(conn, garbage) == DUNNO
    assert any(e["event"] in ("policy_garbage", "policy_unknown_client") for e in logs)
    assert await policy.ask(conn, request()) == DUNNO  # the connection still works
    conn[1].close()


async def test_overlong_request_closes_the_connection_only(policy: Policy) -> None:
    conn = await policy.connect()
    conn[1].write(b"request=" + b"x" * (MAX_REQUEST * 2) + b"\n\n")
    async with asyncio.timeout(5):
        assert (await conn[0].read()) == DUNNO.encode()  # answered, then closed
    other = await policy.connect()
    assert await policy.ask(other, request()) == DUNNO


async def test_exim_readsocket_style_half_close(policy: Policy) -> None:
    reader, writer = await policy.connect()
    writer.write(request().rstrip(b"\n") + b"\n")  # no final empty line, then EOF
    writer.write_eof()
    async with asyncio.timeout(5):
        assert await reader.read() == DUNNO.encode()


async def test_exim_half_close_after_a_whole_request(policy: Policy) -> None:
    await penalize(policy.policy.client)
    probe = await policy.connect()
    await eventually(lambda: policy.ask(probe, request()), lambda a: a != DUNNO, within=2)
    reader, writer = await policy.connect()
    writer.write(request())
    writer.write_eof()
    async with asyncio.timeout(5):
        answer = await reader.read()
    assert answer.startswith(b"action=450 ")
    assert answer.endswith(b"seconds\n\n")


async def test_many_concurrent_connections(policy: Policy) -> None:
    async def one(i: int) -> list[str]:
        conn = await policy.connect()
        answers = [await policy.ask(conn, request(ip=f"198.51.100.{i}")) for _ in range(10)]
        conn[1].close()
        return answers

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert all(a == DUNNO for r in results for a in r)
    assert policy.policy.stats.requests == 500


async def test_tempfails_are_logged_once_per_penalty_and_all_counted(policy: Policy) -> None:
    await penalize(policy.policy.client)
    conn = await policy.connect()
    await eventually(lambda: policy.ask(conn, request()), lambda a: a != DUNNO, within=2)
    before = policy.policy.stats.tempfails
    with capture_logs() as logs:
        for _ in range(20):
            assert (await policy.ask(conn, request())).startswith("action=450 ")
    assert [e["event"] for e in logs if e["event"] == "policy_tempfail"] == []  # logged before
    assert policy.policy.stats.tempfails == before + 20


async def test_a_penaltys_first_450_is_logged_after_its_answer(policy: Policy) -> None:
    """The log line waits for the answer, never the answer for the line: `answer()`
    returns the 450 with nothing logged yet, and the line follows on the next turn."""
    await penalize(policy.policy.client)
    conn = await policy.connect()
    await eventually(lambda: policy.ask(conn, request()), lambda a: a != DUNNO, within=2)
    server = policy.policy
    server._logged_penalties.clear()  # as if a new penalty: its first 450 again
    line = request()
    with capture_logs() as logs:
        answer = server.answer(line, 0, len(line) - 1, cast(PolicyConnection, None))
        assert answer is not None
        assert answer.startswith(b"action=450 ")
        assert not [e for e in logs if e["event"] == "policy_tempfail"]

        async def logged() -> list[MutableMapping[str, Any]]:
            return [e for e in logs if e["event"] == "policy_tempfail"]

        lines = await eventually(logged, lambda found: len(found) == 1, within=2)
        assert lines[0]["client_address"] == "203.0.113.7"
        assert lines[0]["seconds"] > 0
        again = server.answer(line, 0, len(line) - 1, cast(PolicyConnection, None))
        assert again is not None
        assert again.startswith(b"action=450 ")
    assert len([e for e in logs if e["event"] == "policy_tempfail"]) == 1  # once per penalty


async def test_idle_connections_are_closed_by_the_sweep(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    async for p in start_policy(pd.address, live=True, idle_timeout=0.2):
        idle = await p.connect()
        async with asyncio.timeout(5):
            assert await idle[0].read() == b""  # closed by the server
        assert p.policy.stats.idle_closed == 1
        assert p.policy.stats.open_connections == 0


async def test_listens_on_a_unix_socket(serve: ServeFactory, tmp_path: Path) -> None:
    pd = await serve(MemoryStore())
    path = str(tmp_path / "policy.sock")
    async for p in start_policy(pd.address, live=True, listen=f"unix:{path}"):
        assert os.stat(path).st_mode & 0o777 == 0o666
        reader, writer = await asyncio.open_unix_connection(path)
        assert await p.ask((reader, writer), request()) == DUNNO
        writer.write(request())  # Exim over a unix socket: half-close works there too
        writer.write_eof()
        async with asyncio.timeout(5):
            assert await reader.read() == DUNNO.encode()


async def test_checks_are_rpcs_without_the_live_replica_and_answers_keep_order(
    serve: ServeFactory,
) -> None:
    pd = await serve(MemoryStore())
    async for p in start_policy(pd.address, live=False):
        await penalize(p.policy.client)
        conn = await p.connect()
        batch = [request(), request(ip="198.51.100.9"), request("MAIL"), request()]
        conn[1].write(b"".join(batch))
        got = await p.answers(conn, len(batch))
        assert [a.startswith("action=450 ") for a in got] == [True, False, False, True]
        assert p.policy.stats.requests == 4


async def test_penaltyd_down_is_dunno_within_the_deadline() -> None:
    async for p in start_policy(f"127.0.0.1:{free_port()}"):
        conn = await p.connect()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await p.ask(conn, request()) == DUNNO
        assert loop.time() - t0 < 0.6
        assert p.policy.stats.degraded == 1
        conn[1].close()


# --- the CLI: SIGTERM with idle connections, reports flushed, one JSON object per line


async def test_sigterm_closes_idle_connections_quietly_and_flushes_reports(
    serve: ServeFactory,
) -> None:
    pd = await serve(MemoryStore())
    port = free_port()
    listen = f"127.0.0.1:{port}"
    events: list[Any] = []
    async with policyd_cli("--listen", listen, "--penaltyd", pd.address) as proc:
        await next_event(proc, "policyd_started", events)
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        busy = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(5):
            busy[1].write(request(ip="198.51.100.77"))
            async with asyncio.timeout(5):
                assert await busy[0].readuntil(b"\n\n") == DUNNO.encode()
        proc.send_signal(signal.SIGTERM)
        stopped = await next_event(proc, "policyd_stopped", events)
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            rest = await proc.stdout.read()
            assert await proc.wait() == 0
        for reader, _ in [*idle, busy]:  # every connection was closed by the server
            async with asyncio.timeout(5):
                assert await reader.read() == b""
    assert [json.loads(line) for line in rest.splitlines()] == []  # nothing after the stop
    assert (stopped["requests"], stopped["accepted_reported"]) == (5, 5)
    assert (stopped["reports_dropped"], stopped["open_connections"]) == (0, 0)
    async with AsyncPenaltyClient(pd.address) as client:
        ex = await client.explain("198.51.100.77")
    assert [(t.outcome, t.n) for t in ex.window] == [(pb.OUTCOME_ACCEPTED, 5)]


async def test_wakeups_are_coalesced_only_while_requests_come_fast_and_few_at_a_time(
    policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wake-up coalescing (`--coalesce-us`): the loop thread sleeps `coalesce` after an
    iteration that answered fewer than COALESCE_BELOW requests, but only while requests
    come faster than one per `coalesce`; a quiet policyd (one conversation) never waits,
    nor does a loop busy enough to batch by itself."""
    slept: list[float] = []
    monkeypatch.setattr("penaltyclient.policyd.time.sleep", slept.append)
    server = policy.policy
    assert server.coalesce == policyd_module.COALESCE_DEFAULT_US / 1e6
    conn = await policy.connect()
    for _ in range(3):  # one client, one request at a time: far below 10,000/s
        assert await policy.ask(conn, request(ip="198.51.100.40")) == DUNNO
    assert slept == []
    assert server.stats.coalesced == 0

    def wake_up(served: int, over: float, *, recent: int) -> None:
        """One loop iteration that answered `served` requests, `recent` of them and the
        ones before over the last `over` seconds."""
        server._rate_since = time.monotonic() - over
        server._rate_mark = server.stats.requests
        server.stats.requests += recent
        server._coalesce_mark = server.stats.requests - served
        server.coalesce_armed = True
        server._coalesce_wakeups()
        assert not server.coalesce_armed

    wake_up(1, 0.02, recent=1000)  # 50,000/s, one request this wake-up: pause
    assert slept == [server.coalesce]
    assert server.stats.coalesced == 1
    wake_up(policyd_module.COALESCE_BELOW, 0.02, recent=1000)  # a batch already: no pause
    assert slept == [server.coalesce]
    wake_up(1, 0.02, recent=10)  # 500/s: a pause would gather nothing
    assert slept == [server.coalesce]
    conn[1].close()


async def test_coalescing_off_never_pauses(
    serve: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr("penaltyclient.policyd.time.sleep", slept.append)
    pd = await serve(MemoryStore())
    async for p in start_policy(pd.address, coalesce=0.0):
        conn = await p.connect()
        for _ in range(3):
            assert await p.ask(conn, request(ip="198.51.100.41")) == DUNNO
        assert slept == []
        assert p.policy.stats.coalesced == 0
        conn[1].close()


async def test_an_error_report_in_process_flushes_the_accepted_ones_first(
    serve: ServeFactory,
) -> None:
    """The milter beside policyd reports an error while policyd still counts the same
    client's accepted recipients (they wait up to --report-interval-ms): they are handed
    over first, so penaltyd never judges the error against a short denominator."""
    pd = await serve(MemoryStore())
    async for p in start_policy(pd.address, report_every=30.0):
        server, reporter = p.policy, p.policy.reporter
        conn = await p.connect()
        for _ in range(3):
            assert await p.ask(conn, request(ip="198.51.100.42")) == DUNNO
        assert len(server._accepted) == 1  # counted up here: the interval is 30 s
        assert reporter.pending == 0
        assert reporter.report("198.51.100.42", {pb.OUTCOME_UNKNOWN_RECIPIENT: 1})
        assert not server._accepted
        # Nothing was awaited since: both wait in the reporter's queue, in this order.
        assert [(r.counts[0].outcome, r.counts[0].n) for r in reporter.pending_requests()] == [
            (pb.OUTCOME_ACCEPTED, 3),
            (pb.OUTCOME_UNKNOWN_RECIPIENT, 1),
        ]
        assert await server.flush(5)
        ex = await server.client.explain("198.51.100.42")
        assert {(t.outcome, t.n) for t in ex.window} == {
            (pb.OUTCOME_ACCEPTED, 3),
            (pb.OUTCOME_UNKNOWN_RECIPIENT, 1),
        }
        conn[1].close()


async def test_reports_leave_in_messages_of_at_most_report_batch(serve: ServeFactory) -> None:
    """`--report-batch`: a penaltyd that takes at most 4 items a message refuses any
    larger one; 10 clients' accepted recipients reach it whole, none refused."""
    pd = await serve(MemoryStore(), max_batch=4)
    async for p in start_policy(pd.address, report_batch=4, report_every=30.0):
        conn = await p.connect()
        for i in range(10):
            assert await p.ask(conn, request(ip=f"198.51.100.{60 + i}")) == DUNNO
        assert await p.policy.flush(5)
        reporter = p.policy.reporter
        assert (reporter.acked, reporter.rejected, reporter.dropped) == (10, 0, 0)
        refused = pd.engine.metrics.registry.get_sample_value("penaltyd_invalid_requests_total")
        assert refused == 0  # no message was too large (a larger one is refused, then split)
        for i in range(10):
            ex = await p.policy.client.explain(f"198.51.100.{60 + i}")
            assert [(t.outcome, t.n) for t in ex.window] == [(pb.OUTCOME_ACCEPTED, 1)]
        conn[1].close()


@pytest.mark.parametrize(
    "argv",
    [
        ["--coalesce-us", "-1"],
        ["--coalesce-us", "5001"],
        ["--report-interval-ms", "0"],
        ["--report-interval-ms", "1001"],
        ["--report-batch", "0"],
        ["--report-batch", "1001"],
    ],
)
def test_out_of_range_timing_options_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert policyd_module.main(argv) == 2
    assert argv[0] in capsys.readouterr().err
