"""penalty-milter against a real in-process penaltyd (memory store).

The test plays Postfix's side of the milter protocol by hand (`Mta`, plain `struct`
packing, deliberately not the module under test) over real TCP sockets on 127.0.0.1,
with what Postfix 3.x sends: a version 6 offer with every action and protocol bit, the
RCPT macros before each RCPT, `{rcpt_mailer}` = `error` for the recipients it rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.aio import AsyncPenaltyClient
from penaltyclient.milter import (
    MilterOptions,
    PenaltyMilter,
    classify_rejection,
    main,
    parser,
    tempfail_reply,
)
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import eventually
from tests.harness.inprocess import Served, ServeFactory
from tests.harness.milter import POSTFIX_ACTIONS, POSTFIX_PROTOCOL, Mta
from tests.harness.ports import free_port

# mfdef.h values, written out here so the test does not trust the module's own table.
# (SMFIP_RCPT_REJ is bit 11; 0x10000000 is SMFIP_MDS_256K, a libmilter buffer-size flag.)
SMFIP_NOCONNECT, SMFIP_NOHELO, SMFIP_NOMAIL, SMFIP_NORCPT = 0x1, 0x2, 0x4, 0x8
SMFIP_NOBODY, SMFIP_NOHDRS, SMFIP_NOEOH, SMFIP_NOUNKNOWN, SMFIP_NODATA = (
    0x10,
    0x20,
    0x40,
    0x100,
    0x200,
)
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_MASK = 0x80 | 0xFF000  # NR_HDR, NR_CONN .. NR_BODY
SMFIF_SETSYMLIST = 0x100
SMFIM_ENVRCPT = 3
# What Postfix >= 2.6 offers (milter8.c): all actions, MILTER8_V6_PROTO_MASK.

OURS = b"450 4.7.1 too many SMTP errors from 203.0.113.7; try again in 287 seconds"
UNKNOWN_USER = "Recipient address rejected: User unknown in local recipient table"
UNKNOWN = pb.OUTCOME_UNKNOWN_RECIPIENT
ACCEPTED = pb.OUTCOME_ACCEPTED


MilterFactory = Callable[..., Awaitable[PenaltyMilter]]


@pytest.fixture
async def milters() -> AsyncIterator[MilterFactory]:
    """Milters on free ports; at the end closed without a drain, and nothing may have
    reached the loop's exception handler (a connection task must never end in an
    unhandled exception or cancelled: 3.11's start_server logs both with a traceback)."""
    started: list[tuple[PenaltyMilter, AsyncPenaltyClient]] = []
    unhandled: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "client_connected_cb" in context.get("message", "") or "StreamReaderProtocol" in repr(
            context.get("handle")
        ):
            unhandled.append(context)
        else:  # not ours (grpc's poller on an earlier test's loop, say)
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

    async def factory(
        penaltyd: str,
        *,
        live_replica: bool = False,
        start_reporter: bool = True,
        max_queue: int = 50_000,
        **options: Any,
    ) -> PenaltyMilter:
        client = AsyncPenaltyClient(penaltyd, deadline=0.2, live_replica=live_replica)
        client.start()
        reporter = client.reporter(max_queue=max_queue, interval=0.005)
        if start_reporter:
            reporter.start()
        opts = MilterOptions(**options)
        milter = PenaltyMilter(reporter, client if opts.tempfail_at_rcpt else None, opts)
        await milter.start("127.0.0.1:0")
        started.append((milter, client))
        return milter

    yield factory
    for milter, client in started:
        await milter.close(drain=0)
        await milter.reporter.close(within=0.1)
        await client.close()
    loop.set_exception_handler(None)
    assert not unhandled, [c.get("message") for c in unhandled]


def dead_penaltyd() -> str:
    return f"127.0.0.1:{free_port()}"


async def window(pd: Served, client: pb.Client) -> dict[int, int]:
    ex = await pd.admin.Explain(pb.ExplainRequest(client=client))
    return {t.outcome: t.n for t in ex.window}


# --- negotiation


async def test_negotiation_asks_for_rejected_recipients_and_no_content(
    milters: MilterFactory,
) -> None:
    milter = await milters(dead_penaltyd())
    mta = await Mta.open(milter.port)
    version, actions, protocol, rest = await mta.optneg()
    assert version == 6
    assert protocol & SMFIP_RCPT_REJ
    wanted_off = SMFIP_NOBODY | SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NODATA
    assert protocol & wanted_off == wanted_off
    kept = SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOUNKNOWN
    assert protocol & kept == 0  # CONNECT, HELO, MAIL, RCPT and UNKNOWN still come
    assert protocol & SMFIP_NR_MASK == 0  # every command keeps its reply
    assert protocol & ~POSTFIX_PROTOCOL == 0  # nothing the MTA did not offer
    assert actions == SMFIF_SETSYMLIST  # only to name the macros we need
    stage, names = struct.unpack(">I", rest[:4])[0], rest[4:]
    assert stage == SMFIM_ENVRCPT
    assert names == b"{rcpt_mailer} {rcpt_host} {rcpt_addr}\0"
    await mta.close()


async def test_older_mta_gets_an_older_answer_and_a_warning(milters: MilterFactory) -> None:
    milter = await milters(dead_penaltyd())
    mta = await Mta.open(milter.port)
    with capture_logs() as logs:
        version, actions, protocol, rest = await mta.optneg(version=2, actions=0x3F, protocol=0x7F)
    assert (version, actions, rest) == (2, 0, b"")  # no macro lists without SETSYMLIST
    assert protocol == SMFIP_NOBODY | SMFIP_NOHDRS | SMFIP_NOEOH  # a subset of the offer
    assert [e["event"] for e in logs] == ["milter_no_rejected_recipients"]
    assert await mta.connect("203.0.113.5") == b"c"  # and it still works
    await mta.close()


# --- classification of Postfix's rejections


@pytest.mark.parametrize(
    ("status", "text", "outcome"),
    [
        ("5.1.1", UNKNOWN_USER, UNKNOWN),
        ("5.1.1", "Recipient address rejected: User unknown in virtual mailbox table", UNKNOWN),
        ("5.1.1", "Recipient address rejected: undeliverable address: host said 550", UNKNOWN),
        ("4.1.1", "Recipient address rejected: User unknown in local recipient table", UNKNOWN),
        ("5.7.1", "Relay access denied", pb.OUTCOME_RELAY_DENIED),
        ("4.7.1", "Relay access denied", pb.OUTCOME_RELAY_DENIED),  # defer_unauth_destination
        ("5.5.2", "Helo command rejected: Invalid name", pb.OUTCOME_BAD_HELO),
        ("5.5.2", "Helo command rejected: need fully-qualified hostname", pb.OUTCOME_BAD_HELO),
        ("4.7.1", "Helo command rejected: Host not found", pb.OUTCOME_BAD_HELO),
        ("4.1.8", "Sender address rejected: Domain not found", pb.OUTCOME_SENDER_REJECTED),
        ("5.7.23", "Recipient address rejected: SPF fail", pb.OUTCOME_SENDER_REJECTED),
        (
            "5.7.1",
            "unavailable; Client host [203.0.113.9] blocked using zen.spamhaus.org",
            pb.OUTCOME_DNSBL_LISTED,
        ),
        ("5.7.25", "Client host rejected: cannot find your hostname", pb.OUTCOME_DNSBL_LISTED),
        ("5.5.2", "Recipient address rejected: need fully-qualified address", 5),
        ("5.7.1", "Recipient address rejected: Access denied", UNKNOWN),  # the default
        ("", "", UNKNOWN),  # no macros at all: still a rejection
        # Temporary and not recognisably the client's fault: not counted.
        ("4.2.0", "Recipient address rejected: Greylisted", None),
        ("4.1.1", "Recipient address rejected: unverified address: verification in progress", None),
        # penaltyd's own penalty, answered by penalty-policyd: must not feed itself.
        (
            "4.7.1",
            "Recipient address rejected: too many SMTP errors from 203.0.113.7; "
            "try again in 287 seconds",
            None,
        ),
    ],
)
def test_classification(status: str, text: str, outcome: int | None) -> None:
    assert classify_rejection(status, text) == outcome


def test_default_outcome_is_configurable() -> None:
    text = "Recipient address rejected: Access denied"
    assert classify_rejection("5.7.1", text, pb.OUTCOME_CONTENT_REJECTED) == 8


@pytest.mark.parametrize(
    ("smtp_reply", "expected"),
    [
        ("450 4.7.1 too many SMTP errors from 203.0.113.7; try again in 287 seconds", OURS),
        ("451 Slow down: 287 seconds at 100%", b"451 Slow down: 287 seconds at 100%%"),
        # Never a 5xx, never 421 (it closes the connection), never garbage: ours instead.
        ("554 5.7.1 go away", OURS),
        ("421 4.7.0 bye", OURS),
        ("450 5.7.1 mixed", OURS),  # Postfix refuses a 4xx with a 5.x.x status
        ("450 two\r\nlines", b"450 4.7.1 try again in 287 seconds"),
    ],
)
def test_tempfail_reply_is_always_a_one_line_4xx(smtp_reply: str, expected: bytes) -> None:
    verdict = pb.Verdict(tempfail=True, seconds_left=287, smtp_reply=smtp_reply)
    packet = tempfail_reply(verdict, "203.0.113.7")
    assert packet[4:5] == b"y"
    assert packet[5:] == expected + b"\0"
    assert struct.unpack(">I", packet[:4])[0] == len(packet) - 4


# --- the penalty loop through penaltyd


async def test_rejected_recipients_start_a_penalty_then_tempfail_at_rcpt(
    serve: ServeFactory, milters: MilterFactory
) -> None:
    pd = await serve(MemoryStore())
    milter = await milters(pd.address, tempfail_at_rcpt=True)
    mta = await Mta.open(milter.port)
    await mta.session("203.0.113.21", "bot21.example", "offers@spam21.example")
    for i in range(30):
        cmd, _ = await mta.rcpt(f"user{i}@test.example", rejected=UNKNOWN_USER)
        assert cmd == b"c"
    client = pb.Client(ip="203.0.113.21", helo="bot21.example", mail_from="offers@spam21.example")
    await eventually(
        lambda: pd.service.Check(pb.CheckRequest(client=client)), lambda v: v.tempfail, within=5
    )
    cmd, data = await mta.rcpt("postmaster@test.example")  # Postfix accepted it; we do not
    assert cmd == b"y"
    reply = data.rstrip(b"\0").decode()
    m = re.fullmatch(r"450 4\.7\.1 .*203\.0\.113\.21.* (\d+) seconds", reply)
    assert m, reply
    assert 0 < int(m[1]) <= 300
    # The connection stays open and in step: the next command is answered as usual.
    assert (await mta.rcpt("x@test.example", rejected=UNKNOWN_USER))[0] == b"c"
    assert dict(milter.stats.rcpt_rejected) == {"unknown_recipient": 31}
    assert (milter.stats.rcpt_tempfailed, milter.stats.rcpt_accepted) == (1, 0)
    ex = await pd.admin.Explain(pb.ExplainRequest(client=client))
    assert ex.verdict.tempfail
    assert "unknown_recipient=" in ex.verdict.reason
    await mta.close()


async def test_live_replica_answers_the_rcpt_check_in_process(
    serve: ServeFactory, milters: MilterFactory
) -> None:
    pd = await serve(MemoryStore())
    milter = await milters(pd.address, tempfail_at_rcpt=True, live_replica=True)
    assert milter.checker is not None
    assert await milter.checker.wait_synced()
    mta = await Mta.open(milter.port)
    await mta.session("203.0.113.22", "relay-probe.example", "a@probe.example")
    for _ in range(25):
        assert (await mta.rcpt("v@elsewhere.example", rejected="Relay access denied"))[0] == b"c"

    async def probe() -> bytes:
        return (await mta.rcpt("postmaster@test.example"))[0]

    assert await eventually(probe, lambda cmd: cmd == b"y", within=5) == b"y"
    assert milter.checker.replica is not None
    assert len(milter.checker.replica) == 1  # the penalty is held in-process
    await mta.close()


async def test_accepted_recipients_and_unknown_commands_are_reported(
    serve: ServeFactory, milters: MilterFactory
) -> None:
    pd = await serve(MemoryStore())
    both = await milters(pd.address)
    errors_only = await milters(pd.address, report_accepted=False)
    for milter, ip in ((both, "198.51.100.61"), (errors_only, "198.51.100.62")):
        mta = await Mta.open(milter.port)
        await mta.session(ip, "mail.example.org", "alice@example.org")
        for i in range(5):
            assert (await mta.rcpt(f"user{i}@test.example"))[0] == b"c"
        assert (await mta.ask(b"U", b"GET / HTTP/1.0\0"))[0] == b"c"
        assert milter.stats.rcpt_accepted == 5
        assert milter.stats.unknown_commands == 1
        await mta.close()
    both_kinds = {ACCEPTED: 5, pb.OUTCOME_PROTOCOL_VIOLATION: 1}
    await eventually(lambda: window(pd, pb.Client(ip="198.51.100.61")), both_kinds.__eq__)
    errors = {pb.OUTCOME_PROTOCOL_VIOLATION: 1}  # --no-accepted
    # Accepted RCPTs, had they been reported, would have been queued before the UNKNOWN.
    await eventually(lambda: window(pd, pb.Client(ip="198.51.100.62")), errors.__eq__)


async def test_helo_and_sender_tell_clients_behind_a_shared_address_apart(
    serve: ServeFactory, milters: MilterFactory
) -> None:
    pd = await serve(MemoryStore(), shared_cidrs=["100.64.0.0/10"])
    milter = await milters(pd.address)
    a = await Mta.open(milter.port)
    await a.session("100.64.1.1", "spam.example", "x@spam.example")
    for _ in range(3):
        await a.rcpt("nobody@test.example", rejected=UNKNOWN_USER)
    b = await Mta.open(milter.port)
    await b.session("100.64.1.1", "mail.example.org", "bob@example.org")
    for _ in range(2):
        await b.rcpt("alice@test.example")
    spammer = pb.Client(ip="100.64.1.1", helo="spam.example", mail_from="x@spam.example")
    neighbour = pb.Client(ip="100.64.1.1", helo="mail.example.org", mail_from="bob@example.org")

    async def sub_window(client: pb.Client) -> dict[int, int]:
        ex = await pd.admin.Explain(pb.ExplainRequest(client=client))
        return {t.outcome: t.n for t in ex.sub.window}

    await eventually(lambda: sub_window(spammer), {UNKNOWN: 3}.__eq__)
    await eventually(lambda: sub_window(neighbour), {ACCEPTED: 2}.__eq__)
    await a.close()
    await b.close()


async def test_abort_keeps_the_client_and_quit_nc_starts_a_new_one(
    serve: ServeFactory, milters: MilterFactory
) -> None:
    pd = await serve(MemoryStore())
    milter = await milters(pd.address)
    mta = await Mta.open(milter.port)
    await mta.session("203.0.113.31", "one.example", "a@one.example")
    await mta.rcpt("n1@test.example", rejected=UNKNOWN_USER)
    mta.send(b"A")  # RSET: no reply, the message is gone, the client is not
    assert (await mta.ask(b"M", b"<b@one.example>\0"))[0] == b"c"
    await mta.rcpt("n2@test.example", rejected=UNKNOWN_USER)
    mta.send(b"K")  # QUIT_NC: the next SMTP session on this socket
    assert await mta.connect("203.0.113.32") == b"c"
    assert (await mta.ask(b"M", b"<c@two.example>\0"))[0] == b"c"
    for _ in range(3):
        await mta.rcpt("n3@test.example", rejected="Relay access denied", status="5.7.1")
    mta.send(b"Q")
    assert await mta.closed()
    first, second = pb.Client(ip="203.0.113.31"), pb.Client(ip="203.0.113.32")
    await eventually(lambda: window(pd, second), {pb.OUTCOME_RELAY_DENIED: 3}.__eq__)
    assert await window(pd, first) == {UNKNOWN: 2}  # queued before the second client's


async def test_many_concurrent_connections_ipv6_and_local_clients(
    serve: ServeFactory, milters: MilterFactory
) -> None:
    pd = await serve(MemoryStore())
    milter = await milters(pd.address)

    async def one(i: int) -> None:
        mta = await Mta.open(milter.port)
        await mta.optneg()
        assert await mta.connect(f"2001:db8:{i}::25", family=b"6") == b"c"
        assert (await mta.ask(b"M", f"<s{i}@example.net>\0".encode()))[0] == b"c"
        for _ in range(2):
            assert (await mta.rcpt("x@test.example", rejected=UNKNOWN_USER))[0] == b"c"
        mta.send(b"Q")
        assert await mta.closed()

    await asyncio.gather(*(one(i) for i in range(1, 41)))
    assert milter.stats.connections == 40
    assert dict(milter.stats.rcpt_rejected) == {"unknown_recipient": 80}
    await eventually(lambda: window(pd, pb.Client(ip="2001:db8:7::1")), {UNKNOWN: 2}.__eq__)
    ex = await pd.admin.Explain(pb.ExplainRequest(client=pb.Client(ip="2001:db8:7::1")))
    assert ex.identity == "2001:db8:7::/64"
    # A client on a local socket has no address to report: Postfix is told to stop asking.
    local = await Mta.open(milter.port)
    await local.optneg()
    assert await local.connect("/var/run/socket", family=b"L") == b"a"
    await local.close()
    loopback = await Mta.open((await milters(pd.address, ignore_loopback=True)).port)
    await loopback.optneg()
    assert await loopback.connect("127.0.0.1") == b"a"  # --ignore-loopback
    await loopback.close()
    assert await eventually(_async(lambda: milter.stats.active), lambda n: n == 0) == 0


def _async(fn: Callable[[], int]) -> Callable[[], Awaitable[int]]:
    async def probe() -> int:
        return fn()

    return probe


# --- robustness and failing open


async def test_garbage_closes_only_that_connection(milters: MilterFactory) -> None:
    milter = await milters(dead_penaltyd())
    good = await Mta.open(milter.port)
    await good.session("203.0.113.40", "ok.example", "ok@example.org")
    garbage: list[bytes] = [
        b"\xff\xff\xff\xffO",  # a 4 GiB length: never read, never allocated
        struct.pack(">I", (1 << 20) + 1) + b"O",  # 1 MiB: over every limit
        b"GET / HTTP/1.1\r\nHost: milter\r\n\r\n",  # HTTP: "GET " is a huge length
        b"\x00\x00\x00\x00",  # zero length: no command byte
        struct.pack(">I", 1) + b"Z",  # unknown command
        struct.pack(">I", 4) + b"O" + b"\x00" * 3,  # negotiation too short
        struct.pack(">I", 10) + b"Cno-nul-at",  # CONNECT without its NUL
        struct.pack(">I", 7) + b"DRname\0",  # macro name without a value
    ]
    with capture_logs() as logs:
        for raw in garbage:
            bad = await Mta.open(milter.port)
            bad.writer.write(raw)
            await bad.writer.drain()
            assert await bad.closed(), raw
            await bad.close()
        truncated = await Mta.open(milter.port)  # the MTA dies mid-packet
        truncated.writer.write(struct.pack(">I", 100) + b"R<half")
        await truncated.writer.drain()
        await truncated.close()
        await eventually(
            _async(lambda: milter.stats.protocol_errors), lambda n: n == len(garbage) + 1
        )
    errors = [e for e in logs if e["event"] == "milter_protocol_error"]
    assert len(errors) == len(garbage) + 1
    assert any("exceeds the limit" in e["error"] for e in errors)
    # The well-behaved connection never noticed.
    assert (await good.rcpt("a@test.example", rejected=UNKNOWN_USER))[0] == b"c"
    assert (await good.rcpt("b@test.example"))[0] == b"c"
    await good.close()


async def test_penaltyd_down_every_command_answered_promptly(milters: MilterFactory) -> None:
    milter = await milters(dead_penaltyd(), tempfail_at_rcpt=True)
    t0 = time.perf_counter()
    mta = await Mta.open(milter.port)
    await mta.session("203.0.113.50", "bot.example", "x@bot.example")
    for i in range(30):
        assert (await mta.rcpt(f"u{i}@test.example", rejected=UNKNOWN_USER, within=1))[0] == b"c"
    assert (await mta.rcpt("postmaster@test.example", within=1))[0] == b"c"  # check fails open
    for cmd, data in [
        (b"T", b""),
        (b"L", b"Subject\0hello\0"),
        (b"N", b""),
        (b"B", b"body\r\n"),
        (b"E", b""),
        (b"U", b"XYZZY\0"),
    ]:
        assert (await mta.ask(cmd, data, within=1))[0] == b"c"
    mta.send(b"A")
    mta.send(b"Q")
    assert await mta.closed(within=1)
    assert time.perf_counter() - t0 < 3
    assert milter.stats.checks_degraded == 1
    assert milter.stats.reports_queued == 32  # waiting for penaltyd, not lost


async def test_bounded_queue_counts_drops(milters: MilterFactory) -> None:
    milter = await milters(dead_penaltyd(), start_reporter=False, max_queue=5)
    mta = await Mta.open(milter.port)
    await mta.session("203.0.113.60", "bot.example", "x@bot.example")
    for _ in range(12):
        assert (await mta.rcpt("u@test.example", rejected=UNKNOWN_USER))[0] == b"c"
    fields = milter.stats_fields()
    assert (fields["reports_pending"], fields["reports_dropped"]) == (5, 7)
    await mta.close()


# --- hostile peers: packet limits, connection limits, timeouts, a peer that never reads


async def test_oversized_packets_close_only_that_connection_with_a_log_line(
    milters: MilterFactory,
) -> None:
    milter = await milters(dead_penaltyd())
    good = await Mta.open(milter.port)
    await good.session("203.0.113.41", "ok.example", "ok@example.org")
    # Sizes Postfix really sends pass: a 100 KiB header (header_size_limit), a full body
    # chunk (MILTER_CHUNK_SIZE), a macro packet at the 64 KiB limit.
    assert (await good.ask(b"L", b"X-Long\0" + b"v" * 102_400 + b"\0"))[0] == b"c"
    assert (await good.ask(b"B", b"b" * 65535))[0] == b"c"
    good.macros(b"R", {"{rcpt_mailer}": "error", "{rcpt_addr}": "x" * 65_500})
    assert (await good.ask(b"R", b"<a@test.example>\0"))[0] == b"c"
    oversized = [
        (b"D", b"H" + b"a\0b\0" * (1 << 18)),  # the report's 1 MiB macro packet
        (b"D", b"R" + b"x" * 65_535 + b"\0"),  # one byte over 64 KiB
        (b"R", b"<" + b"x" * 70_000 + b">\0"),
        (b"B", b"b" * 65_536),  # one byte more than a body chunk
        (b"L", b"X\0" + b"v" * (128 * 1024) + b"\0"),
    ]
    with capture_logs() as logs:
        for cmd, data in oversized:
            bad = await Mta.open(milter.port)
            await bad.optneg()
            bad.send(cmd, data)
            with contextlib.suppress(ConnectionError):
                await bad.writer.drain()
            assert await bad.closed(), (cmd, len(data))
            await bad.close()
    errors = [e for e in logs if e["event"] == "milter_protocol_error"]
    assert len(errors) == len(oversized)
    assert all("exceeds the limit of" in e["error"] for e in errors)
    assert "exceeds the limit of 65536 for macro" in errors[1]["error"]
    assert milter.stats.protocol_errors == len(oversized)
    # The well-behaved connection never noticed.
    assert (await good.rcpt("b@test.example", rejected=UNKNOWN_USER))[0] == b"c"
    assert milter.stats.rcpt_rejected["unknown_recipient"] == 2
    await good.close()


async def test_connections_beyond_the_limit_are_closed_at_once_and_logged_once(
    milters: MilterFactory,
) -> None:
    milter = await milters(dead_penaltyd(), max_connections=2)
    first, second = await Mta.open(milter.port), await Mta.open(milter.port)
    await first.optneg()
    await second.optneg()  # both served: the limit is reached
    with capture_logs() as logs:
        for _ in range(4):
            extra = await Mta.open(milter.port)
            assert await extra.closed()  # at once: Postfix applies milter_default_action
            await extra.close()
    refusals = [e for e in logs if e["event"] == "milter_too_many_connections"]
    assert len(refusals) == 1  # rate-limited: one line for the burst
    assert refusals[0]["limit"] == 2
    assert milter.stats.connections_refused == 4
    assert milter.stats_fields()["connections_refused"] == 4
    assert (await first.ask(b"H", b"still.example\0"))[0] == b"c"  # the open ones are fine
    second.send(b"Q")
    assert await second.closed()
    third = await Mta.open(milter.port)  # a slot is free again
    await third.optneg()
    assert milter.stats.connections == 3
    await first.close()
    await third.close()


async def test_a_silent_connection_and_a_trickled_packet_are_closed(
    milters: MilterFactory,
) -> None:
    idle = await milters(dead_penaltyd(), idle_timeout=0.1)
    slow = await milters(dead_penaltyd(), packet_timeout=0.1)  # idle_timeout: an hour
    with capture_logs() as logs:
        silent = await Mta.open(idle.port)  # connects, then says nothing
        assert await silent.closed()
        trickle = await Mta.open(slow.port)
        await trickle.optneg()
        trickle.writer.write(struct.pack(">I", 100) + b"R<half")  # the rest never comes
        await trickle.writer.drain()
        assert await trickle.closed()
    events = {e["event"]: e for e in logs}
    assert events["milter_idle_timeout"]["seconds"] == 0.1
    assert "not complete within 0.1 s" in events["milter_protocol_error"]["error"]
    await silent.close()
    await trickle.close()


class _StuckTransport:
    def __init__(self) -> None:
        self.buffered = 0
        self.aborted = asyncio.Event()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted.set()


class StuckWriter:
    """A StreamWriter whose peer never reads: `drain` and `wait_closed` never return."""

    def __init__(self) -> None:
        self.transport = _StuckTransport()
        self._never = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.transport.buffered += len(data)

    async def drain(self) -> None:
        await self._never.wait()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 4000) if name == "peername" else default

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        await self._never.wait()


async def test_a_peer_that_never_reads_is_cut_after_the_write_timeout(
    milters: MilterFactory,
) -> None:
    milter = await milters(dead_penaltyd(), write_timeout=0.05)
    reader = asyncio.StreamReader()
    offer = struct.pack(">III", 6, POSTFIX_ACTIONS, POSTFIX_PROTOCOL)
    reader.feed_data((struct.pack(">I", 13) + b"O" + offer) * 100)  # 100 replies to write
    writer = StuckWriter()
    with capture_logs() as logs:
        async with asyncio.timeout(5):  # the old code waited in drain() forever
            await milter._on_connection(reader, cast(Any, writer))
    assert writer.transport.aborted.is_set()  # nothing stays buffered for it
    stuck = [e for e in logs if e["event"] == "milter_write_timeout"]
    assert len(stuck) == 1
    assert stuck[0]["buffered"] < 200  # one reply beyond the high-water mark, not 100
    assert milter.stats.active == 0


async def test_long_helo_and_sender_are_bounded_like_every_other_component(
    serve: ServeFactory, milters: MilterFactory
) -> None:
    """bound_client at the edge: a long HELO keeps a digest of the whole, a long sender
    keeps its domain, so the milter's reports land in the sub-identity that penaltyd (and
    policyd, logwatch) compute for the same client."""
    pd = await serve(MemoryStore(), shared_cidrs=["100.64.0.0/10"])
    milter = await milters(pd.address)
    helo = "h" * 300 + ".bot.example"
    senders = ["x" * 600 + "@spam-a.example", "x" * 600 + "@spam-b.example"]
    a = await Mta.open(milter.port)
    await a.session("100.64.2.1", helo, senders[0])
    for _ in range(3):
        await a.rcpt("nobody@test.example", rejected=UNKNOWN_USER)
    b = await Mta.open(milter.port)
    await b.session("100.64.2.1", helo, senders[1])
    for _ in range(2):
        await b.rcpt("alice@test.example")

    async def sub_window(sender: str) -> dict[int, int]:
        client = pb.Client(ip="100.64.2.1", helo=helo, mail_from=sender)
        ex = await pd.admin.Explain(pb.ExplainRequest(client=client))
        return {t.outcome: t.n for t in ex.sub.window}

    await eventually(lambda: sub_window(senders[0]), {UNKNOWN: 3}.__eq__)
    await eventually(lambda: sub_window(senders[1]), {ACCEPTED: 2}.__eq__)
    await a.close()
    await b.close()


# --- the command line


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--listen", "--penaltyd", "--tempfail-at-rcpt", "--live-replica", "--no-accepted"):
        assert flag in out
    for action in parser()._actions:
        assert action.help, action.option_strings


def test_bad_flags_exit_2() -> None:
    assert main(["--listen", "nonsense"]) == 2
    assert main(["--penaltyd", "a.example:1,b.example:2"]) == 2


async def spawn_milter(port: int, *args: str) -> asyncio.subprocess.Process:
    """`python -m penaltyclient.milter` on `port`, once it has logged milter_started."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penaltyclient.milter",
        "--listen",
        f"127.0.0.1:{port}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(10):
        started = json.loads(await proc.stdout.readline())
    assert started["event"] == "milter_started"
    assert started["listen"] == f"127.0.0.1:{port}"
    return proc


async def stopped(proc: asyncio.subprocess.Process) -> tuple[list[dict[str, Any]], str]:
    """SIGTERM, then the exit status 0, the JSON lines after it and stderr."""
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    return [json.loads(x) for x in out.decode().splitlines()], err.decode()


async def test_sigterm_drains_and_exits_zero() -> None:
    port = free_port()
    proc = await spawn_milter(port, "--penaltyd", dead_penaltyd(), "--stats-interval", "0.2")
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        mta = await Mta.open(port)
        await mta.session("203.0.113.70", "bot.example", "x@bot.example")
        async with asyncio.timeout(10):  # the periodic stats line
            while json.loads(await proc.stdout.readline())["event"] != "milter_stats":
                pass
        proc.send_signal(signal.SIGTERM)
        # Draining: the open connection is still served until it ends.
        assert (await mta.rcpt("u@test.example", rejected=UNKNOWN_USER))[0] == b"c"
        mta.send(b"Q")
        assert await mta.closed()
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
            rest = (await proc.stdout.read()).decode().splitlines()
            err = (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "Traceback" not in err, err
    events = [json.loads(x) for x in rest]
    assert "milter_stopping" in [e["event"] for e in events]
    stop = events[-1]
    assert stop["event"] == "milter_stopped"
    assert stop["rcpt_rejected"] == {"unknown_recipient": 1}
    assert stop["connections"] == 1
    assert stop["active"] == 0
    # penaltyd is down: the one report is not silently "pending", it is said to be lost.
    assert "reports_pending" not in stop
    assert stop["reports_pending_dropped"] == 1
    dropped = [e for e in events if e["event"] == "milter_reports_dropped_at_exit"]
    assert [e["reports"] for e in dropped] == [1]


async def test_sigterm_with_idle_connections_exits_without_tracebacks() -> None:
    port = free_port()
    proc = await spawn_milter(port, "--penaltyd", dead_penaltyd(), "--drain-seconds", "0.2")
    try:
        idle = [await Mta.open(port) for _ in range(3)]
        for i, mta in enumerate(idle):  # mid-session, and they never say QUIT
            await mta.optneg()
            assert await mta.connect(f"203.0.113.{80 + i}") == b"c"
        events, err = await stopped(proc)
        for mta in idle:
            assert await mta.closed()  # cut after the drain
            await mta.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "Traceback" not in err, err  # was one per connection (a cancelled handler task)
    assert err == ""
    drain = [e for e in events if e["event"] == "milter_drain_ended"]
    assert [e["closed"] for e in drain] == [3]
    assert events[-1]["event"] == "milter_stopped"
    assert events[-1]["reports_pending_dropped"] == 0


async def test_sigterm_flushes_the_queued_reports_to_penaltyd(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    port = free_port()
    proc = await spawn_milter(port, "--penaltyd", pd.address, "--flush-seconds", "5")
    try:
        mta = await Mta.open(port)
        await mta.session("203.0.113.90", "bot.example", "x@bot.example")
        for _ in range(3):
            assert (await mta.rcpt("u@test.example", rejected=UNKNOWN_USER))[0] == b"c"
        mta.send(b"Q")
        assert await mta.closed()
        events, err = await stopped(proc)  # at once: the reports may still be queued
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "Traceback" not in err, err
    stop = events[-1]
    assert stop["event"] == "milter_stopped"
    assert (stop["reports_sent"], stop["reports_pending_dropped"]) == (3, 0)
    assert "milter_reports_dropped_at_exit" not in [e["event"] for e in events]
    assert await window(pd, pb.Client(ip="203.0.113.90")) == {UNKNOWN: 3}
