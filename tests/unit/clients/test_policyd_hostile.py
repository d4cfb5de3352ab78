"""penalty-policyd against hostile clients (docs/reliability.md, "penalty-policyd").

Whoever connects to the policy socket chooses every byte (on an MX, a local user or a
compromised process can; Postfix itself passes the SMTP client's HELO and sender
through), how fast it writes and whether it ever reads. policyd must

1. bound a request (bytes and lines): past the bounds, DUNNO once, one log line, and
   the connection closed, instead of buffering lines for ever;
2. bound its connections below the open-files limit (raised to the hard limit at
   start): the ones over the cap are accepted and closed, with a rate-limited log line;
3. stay fair: a client that pipelines requests, or never reads its answers, must not
   hold up the others nor make policyd buffer without bound (and the idle timeout
   still applies to it);
4. never let a penalized address through because penaltyd refused a crafted field: the
   check is asked again with the client address alone;
7. turn arbitrary bytes into requests or DUNNO, never an exception, in bounded memory
   (property-based, bounded and fast).

Waits await events (an answer, end-of-file, a reset) under a deadline, so a regression
fails instead of hanging; the few conditions with no event are polled (`eventually`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from penalty.identity import MAX_HELO, MAX_MAIL_FROM
from penalty.v1 import penalty_pb2 as pb
from penalty.v1 import penalty_pb2_grpc as pbg
from penaltyclient.aio import AsyncPenaltyClient
from penaltyclient.policyd import (
    DUNNO,
    FD_RESERVE,
    MAX_LINES,
    MAX_REQUEST,
    WRITE_HIGH_WATER,
    BadRequest,
    PolicyConnection,
    PolicyServer,
    default_max_connections,
    parse_request,
)
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import eventually
from tests.harness.inprocess import ServeFactory
from tests.harness.policy import (
    Policy,
    next_event,
    penalize,
    policyd_cli,
    request,
    start_policy,
)
from tests.harness.ports import free_port

PENALIZED = "203.0.113.7"


async def stat(p: Policy, name: str) -> int:
    value: int = getattr(p.policy.stats, name)
    return value


async def flood(writer: asyncio.StreamWriter, chunk: bytes, times: int) -> None:
    """Write `chunk` `times` times, waiting for the kernel (never reading answers)."""
    for _ in range(times):
        writer.write(chunk)
        await writer.drain()


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await task


async def read_to_eof(reader: asyncio.StreamReader, within: float = 10.0) -> bytes:
    """What the server sent before closing (a reset after its answer counts as closed)."""
    got = b""
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                got += chunk
    return got


# --- 1. a request is bounded: bytes and lines


async def test_lines_without_an_empty_line_are_answered_once_and_closed(policy: Policy) -> None:
    """The report: 40k lines of 4 KB and no empty line grew policyd by 150 MB."""
    reader, writer = await policy.connect()
    line = b"x_attribute=" + b"y" * 4084 + b"\n"
    with capture_logs() as logs:
        flooding = asyncio.create_task(flood(writer, line, 2_000))  # 8 MB at most
        try:
            assert await read_to_eof(reader) == DUNNO
        finally:
            await stopped(flooding)
    garbage = [e for e in logs if e["event"] == "policy_garbage"]
    assert len(garbage) == 1
    assert garbage[0]["closed"] is True
    assert policy.policy.stats.overflows == 1
    other = await policy.connect()  # only that connection is gone
    assert await policy.ask(other, request()) == DUNNO.decode()


@pytest.mark.parametrize(
    "raw",
    [
        b"request=smtpd_access_policy\n" + b"a=b\n" * MAX_LINES + b"\n",  # whole, too many lines
        b"request=smtpd_access_policy\n" + b"a=b\n" * MAX_LINES,  # and never ended
        b"request=smtpd_access_policy\nx=" + b"y" * MAX_REQUEST,  # one line past the size
    ],
    ids=["lines", "lines-unended", "bytes-unended"],
)
async def test_a_request_past_the_bounds_is_dunno_once_and_closed(
    policy: Policy, raw: bytes
) -> None:
    reader, writer = await policy.connect()
    with capture_logs() as logs:
        writer.write(raw)
        assert await read_to_eof(reader) == DUNNO
    assert [e["event"] for e in logs].count("policy_garbage") == 1


async def test_a_request_at_the_bounds_is_still_answered(policy: Policy) -> None:
    await penalize(policy.policy.client)
    conn = await policy.connect()
    await eventually(lambda: policy.ask(conn, request()), lambda a: a != "action=DUNNO\n\n")
    padding = {f"x{i}": "v" for i in range(MAX_LINES - 9)}  # request() has 8 lines + 1 more
    padding["y"] = "z" * (MAX_REQUEST - len(request(**padding)) - 3)
    raw = request(**padding)
    assert raw.count(b"\n") == MAX_LINES + 1  # with the empty line
    assert len(raw) == MAX_REQUEST
    assert (await policy.ask(conn, raw)).startswith("action=450 ")
    assert (await policy.ask(conn, request())).startswith("action=450 ")  # still open


# --- 2. connections are bounded below the open-files limit


async def test_connections_over_the_cap_are_accepted_and_closed(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    async for p in start_policy(pd.address, live=True, max_connections=2):
        a, b = await p.connect(), await p.connect()
        assert await p.ask(a, request()) == "action=DUNNO\n\n"
        assert await p.ask(b, request()) == "action=DUNNO\n\n"
        with capture_logs() as logs:
            for _ in range(3):
                reader, writer = await p.connect()
                writer.write(request())
                assert await read_to_eof(reader) == b""  # Postfix: default_action=DUNNO
        refused = [e for e in logs if e["event"] == "policy_connection_refused"]
        assert len(refused) == 1  # rate-limited; the count is in the stats
        assert refused[0]["max_connections"] == 2
        assert p.policy.stats.refused_connections == 3
        assert await p.ask(a, request()) == "action=DUNNO\n\n"  # the admitted ones work
        b[1].close()

        await eventually(functools.partial(stat, p, "open_connections"), lambda n: n == 1)
        c = await p.connect()  # a freed place is given to the next one
        assert await p.ask(c, request()) == "action=DUNNO\n\n"


def test_default_cap_stays_below_the_fd_limit() -> None:
    assert default_max_connections(1024) == 1024 - FD_RESERVE
    assert default_max_connections(1_048_576) == 4096
    assert default_max_connections(10) == 1


def _nofile(soft: int, hard: int | None = None) -> Any:
    def preexec() -> None:
        resource.setrlimit(
            resource.RLIMIT_NOFILE,
            (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard is None else hard),
        )

    return preexec


async def test_cli_raises_the_fd_limit_and_logs_both() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip("needs a finite hard limit above 512")
    port = free_port()
    events: list[Any] = []
    args = ("--listen", f"127.0.0.1:{port}", "--penaltyd", "127.0.0.1:1")
    async with policyd_cli(*args, preexec_fn=_nofile(256)) as proc:
        limits = await next_event(proc, "policyd_fd_limit", events)
        await next_event(proc, "policyd_started", events)
        proc.send_signal(signal.SIGTERM)
        await next_event(proc, "policyd_stopped", events)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    assert (limits["soft_before"], limits["soft"], limits["hard"]) == (256, hard, hard)
    assert limits["max_connections"] == default_max_connections(hard)


async def test_cli_lowers_a_cap_above_the_fd_limit() -> None:
    port = free_port()
    events: list[Any] = []
    args = ("--listen", f"127.0.0.1:{port}", "--penaltyd", "127.0.0.1:1")
    lowered_cap = ("--max-connections", "1000")
    async with policyd_cli(*args, *lowered_cap, preexec_fn=_nofile(200, 200)) as proc:
        lowered = await next_event(proc, "policyd_max_connections_lowered", events)
        limits = await next_event(proc, "policyd_fd_limit", events)
        await next_event(proc, "policyd_started", events)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    assert lowered["asked"] == 1000
    assert lowered["max_connections"] == 200 - FD_RESERVE
    assert limits["max_connections"] == 200 - FD_RESERVE


# --- 3. fairness: pipelining clients and clients that never read


async def test_a_pipelining_client_does_not_hold_up_the_others(policy: Policy) -> None:
    """One request per connection per turn of the loop: the well-behaved client is
    answered while the pipeliner's 2,000 requests (one read holds ~1,200) wait."""
    n = 2_000
    pipeliner = await policy.connect()
    good = await policy.connect()
    assert await policy.ask(good, request(ip="198.51.100.5")) == "action=DUNNO\n\n"
    pipeliner[1].write(request(ip="198.51.100.6") * n)  # not reading its answers yet
    before = policy.policy.stats.requests
    assert await policy.ask(good, request(ip="198.51.100.5")) == "action=DUNNO\n\n"
    served_meanwhile = policy.policy.stats.requests - before - 1
    assert served_meanwhile < 100
    assert await policy.answers(pipeliner, n) == ["action=DUNNO\n\n"] * n  # all, in order


async def test_a_client_that_never_reads_is_not_buffered_without_bound(
    serve: ServeFactory,
) -> None:
    pd = await serve(MemoryStore())
    async for p in start_policy(pd.address, live=True, idle_timeout=1.0):
        reader, writer = await p.connect()
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert await p.ask((reader, writer), request()) == "action=DUNNO\n\n"
        conn = next(iter(p.policy.connections))
        assert conn.transport is not None  # small kernel buffers: the test stays fast
        conn.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        chunk = request(ip="198.51.100.8") * 200

        flooding = asyncio.create_task(flood(writer, chunk, 5_000))  # 200 MB at most
        try:
            await eventually(functools.partial(stat, p, "write_paused"), lambda n: n >= 1, 20)
            waiting = conn.transport.get_write_buffer_size()
            assert waiting <= WRITE_HIGH_WATER + len(DUNNO)
            assert len(conn.buf) - conn.pos <= 4 * MAX_REQUEST + 256 * 1024  # one read
            # ... and the idle timeout still applies: the sweep resets the connection
            with pytest.raises(ConnectionError):
                async with asyncio.timeout(10):
                    await flooding
        finally:
            await stopped(flooding)
        assert p.policy.stats.idle_closed == 1
        assert p.policy.stats.open_connections == 0


# --- 4. a refused check is asked again with the client address alone


class OldPenaltyd(pbg.PenaltyServiceServicer):
    """A penaltyd that refuses some HELO names (as older ones refused long ones) and
    penalizes 203.0.113.7; 203.0.113.99 is refused whatever comes with it."""

    def __init__(self) -> None:
        self.checks: list[pb.Client] = []

    async def Check(self, request: pb.CheckRequest, context: Any) -> pb.Verdict:
        c = request.client
        self.checks.append(c)
        if "crafted" in c.helo or c.ip == "203.0.113.99":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client.helo: refused")
        if c.ip != PENALIZED:
            return pb.Verdict(identity=c.ip)
        reply = f"450 4.7.1 too many SMTP errors from {c.ip}; try again in 120 seconds"
        return pb.Verdict(tempfail=True, seconds_left=120, identity=c.ip, smtp_reply=reply)

    async def Report(self, request: pb.ReportRequest, context: Any) -> pb.Verdict:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")
        raise AssertionError("abort raises")

    async def WatchPenalties(self, request: pb.WatchRequest, context: Any) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")
        yield

    async def Session(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for _ in requests:  # the reporter's stream: nothing is reported here
            pass
        return
        yield


@pytest.fixture
async def old_penaltyd() -> AsyncIterator[tuple[str, OldPenaltyd]]:
    server = grpc.aio.server()
    servicer = OldPenaltyd()
    pbg.add_PenaltyServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


async def test_a_refused_check_is_asked_again_with_the_address_alone(
    old_penaltyd: tuple[str, OldPenaltyd],
) -> None:
    address, servicer = old_penaltyd
    async for p in start_policy(address, live=False, report_accepted=False):
        conn = await p.connect()
        with capture_logs() as logs:
            answer = await p.ask(conn, request(helo_name="crafted.example"))
        assert answer.startswith("action=450 4.7.1 too many SMTP errors from 203.0.113.7")
        assert [(c.helo, c.mail_from) for c in servicer.checks] == [
            ("crafted.example", "a@example.net"),
            ("", ""),
        ]
        refused = [e for e in logs if e["event"] == "policy_check_refused"]
        assert len(refused) == 1
        assert refused[0]["retried"] == "client_address only"
        assert p.policy.stats.refused_checks == 1
        # refused again with the address alone: DUNNO (never fail closed), counted (its
        # log line is rate-limited like every line a client can cause)
        assert await p.ask(conn, request(ip="203.0.113.99")) == "action=DUNNO\n\n"
        assert [c.ip for c in servicer.checks[2:]] == ["203.0.113.99"] * 2
        assert p.policy.stats.refused_checks == 2


async def test_a_crafted_helo_never_hides_a_penalized_address(policy: Policy) -> None:
    await penalize(policy.policy.client)
    conn = await policy.connect()
    await eventually(lambda: policy.ask(conn, request()), lambda a: a != "action=DUNNO\n\n")
    crafted = "\udcff".join(["x" * 300] * 40)  # long, and not UTF-8 once sent as bytes
    raw = request(helo_name="H").replace(b"helo_name=H", b"helo_name=" + b"\xff" * 9000)
    assert (await policy.ask(conn, raw)).startswith("action=450 ")
    assert (await policy.ask(conn, request(helo_name=crafted[:5000].encode(
        "utf-8", "surrogateescape").decode("latin-1")))).startswith("action=450 ")  # fmt: skip


# --- 7. property-based: arbitrary bytes -> a request or DUNNO, bounded memory

ANSWER = re.compile(rb"action=(DUNNO|4\d\d [^\n]*)\n\n")
VALID = [
    request(ip=PENALIZED),
    request(ip="198.51.100.1"),
    request("MAIL", ip=PENALIZED),
    request(ip="2001:db8::1", helo_name="h\u00e9lo.example"),
    request(ip="::ffff:203.0.113.7"),
    request().replace(b"\n", b"\r\n"),
    b"request=smtpd_access_policy\nclient_address=203.0.113.7\nprotocol_state=RCPT\n\n",
]
EDITS = st.lists(
    st.tuples(
        st.integers(0, 1 << 20),
        st.sampled_from(["insert", "delete", "replace"]),
        st.one_of(
            st.binary(max_size=12),
            st.sampled_from([b"\n", b"\n\n", b"=", b"\r", b"\r\n", b"\x00", b"\xff\xfe"]),
            st.sampled_from([b"request=smtpd_access_policy\n", b"protocol_state=rcpt\n"]),
        ),
    ),
    max_size=8,
)
BIG = st.sampled_from(
    [b"", b"x=" + b"y" * (MAX_REQUEST + 10) + b"\n", b"a=b\n" * (MAX_LINES + 5), b"\n" * 40]
)


def mutate(data: bytes, edits: list[tuple[int, str, bytes]]) -> bytes:
    for at, op, piece in edits:
        at %= len(data) + 1
        if op == "insert":
            data = data[:at] + piece + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + len(piece) :]
        else:
            data = data[:at] + piece + data[at + len(piece) :]
    return data


STREAMS = st.one_of(
    st.binary(max_size=4096),
    st.builds(
        lambda reqs, edits, big, where: (
            mutate(b"".join(reqs), edits)[:where] + big + mutate(b"".join(reqs), edits)[where:]
        ),
        st.lists(st.sampled_from(VALID), min_size=1, max_size=6),
        EDITS,
        BIG,
        st.integers(0, 4096),
    ),
)


@settings(max_examples=400)
@given(st.binary(max_size=2048), st.integers(0, 64))
@example(b"request=smtpd_access_policy", 0)
@example(b"x", 0)
@example(b"request=smtpd_access_policy\nclient_address=1.2.3.4\n", 1)
def test_the_parser_returns_a_request_or_refuses_it(data: bytes, start: int) -> None:
    start = min(start, len(data))
    try:
        parsed = parse_request(data, start)
    except BadRequest:
        return
    assert len(parsed) == 4
    assert all(isinstance(v, str) for v in parsed)


class Recorder(asyncio.Transport):
    """The transport end of one PolicyConnection: what was written, paused or closed."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.paused = False
        self.closed = False
        self.eof_written = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        assert not self.eof_written, "written after write_eof"
        self.out.append(bytes(data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    out, at, i = [], 0, 0
    while at < len(data):
        out.append(data[at : at + sizes[i % len(sizes)]])
        at += sizes[i % len(sizes)]
        i += 1
    return out


async def drive(chunks: list[bytes]) -> tuple[list[bytes], int, PolicyServer]:
    """Feed `chunks` to a connection as a transport would (never while reading is
    paused), then end-of-file; what it wrote and the most input it held."""
    client = AsyncPenaltyClient("127.0.0.1:1", deadline=0.05, live_replica=True)
    assert client.replica is not None
    now_ms = int(time.time() * 1000)
    started = pb.PenaltyEvent(
        kind=pb.PenaltyEvent.Kind.KIND_PENALTY_STARTED,
        store_now_unix_ms=now_ms,
        penalty=pb.Penalty(identity=PENALIZED, expires_at_unix_ms=now_ms + 300_000),
    )
    client.replica.apply(started)
    client.replica.apply(pb.PenaltyEvent(kind=pb.PenaltyEvent.Kind.KIND_SNAPSHOT_DONE))
    policy = PolicyServer(client)
    conn, t = PolicyConnection(policy), Recorder()
    conn.connection_made(t)
    peak = 0

    async def until(done: Any) -> None:
        for _ in range(20_000):  # a paused connection resumes within a few turns
            if done():
                return
            await asyncio.sleep(0)
        raise AssertionError("the connection never resumed reading nor closed")

    try:
        for chunk in chunks:
            await until(lambda: t.closed or not t.paused)
            if t.closed:
                break
            conn.data_received(chunk)
            peak = max(peak, len(conn.buf) - conn.pos)
        await until(lambda: t.closed or not t.paused)
        if not t.closed and not conn.eof_received():
            t.close()
        await until(lambda: t.closed)
    finally:
        conn.connection_lost(None)
        policy.flush_reports()
        await client.close()
    return t.out, peak, policy


@settings(max_examples=200)
@given(STREAMS, st.lists(st.integers(1, 8192), min_size=1, max_size=20))
@example(VALID[0] * 3, [1])
@example(b"request=smtpd_access_policy\n" + b"a=b\n" * (MAX_LINES + 1), [4096])
def test_any_bytes_get_requests_answered_or_dunno_in_bounded_memory(
    stream: bytes, sizes: list[int]
) -> None:
    chunks = chunked(stream, sizes)
    out, peak, policy = asyncio.run(drive(chunks))
    assert all(ANSWER.fullmatch(a) for a in out), out[:3]
    assert len(out) <= stream.count(b"\n") + 1  # at most one answer per request
    assert peak <= MAX_REQUEST + max(sizes) + 2  # never more than a request and a read
    assert policy.stats.errors == 0
    assert policy.stats.requests == len(out)


async def test_huge_helo_and_sender_held_for_a_report_are_bounded(serve: ServeFactory) -> None:
    """Accepted recipients wait up to --report-interval-ms, keyed by client: a client
    whose HELO and sender fill a request (60 KB) must not have them held whole, 10,000
    keys at a time (600 MB); what waits is bounded as the report itself is."""
    pd = await serve(MemoryStore())
    async for p in start_policy(pd.address, report_every=30.0):
        conn = await p.connect()
        for i in range(3):
            helo, sender = f"{i}" + "h" * 30_000, f"x@{i}" + "d" * 30_000 + ".example"
            assert (
                await p.ask(conn, request(ip="198.51.100.50", helo_name=helo, sender=sender))
                == DUNNO.decode()
            )
        waiting = p.policy._accepted
        assert len(waiting) == 3
        for ip, helo, sender in waiting:
            assert len(ip) <= 64
            assert len(helo) <= MAX_HELO
            assert len(sender) <= MAX_MAIL_FROM
        for r in waiting.values():
            assert len(r.client.helo) <= MAX_HELO
            assert len(r.client.mail_from) <= MAX_MAIL_FROM
        conn[1].close()
