"""The milter wire protocol against hostile bytes: limits, copies, and a fuzz test.

Whoever reaches a milter port can send anything; the decoder (`read_frame` and the
`parse_*` functions, and penalty-milter's `MilterSession.handle` on top) must answer
every input with a value or a `ProtocolError`, never read or keep more than the packet
limits, and give back exactly what a valid packet carried. Packets are built here with
`struct`, not with the module under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from milterkit.protocol import (
    FRAME_LIMITS,
    MAX_BODY_FRAME,
    MAX_FRAME,
    MAX_HEADER_FRAME,
    MAX_MACRO_NAME,
    MAX_MACRO_VALUE,
    MAX_MACROS,
    Frame,
    FrameTimeout,
    FrameTooLarge,
    ProtocolError,
    cstrings,
    frame_limit,
    macro_name,
    negotiate,
    parse_address,
    parse_args,
    parse_connect,
    parse_helo,
    parse_macros,
    parse_optneg,
    parse_unknown,
    read_frame,
)
from penaltyclient.aio import SessionReporter
from penaltyclient.milter import MilterSession, PenaltyMilter

T = TypeVar("T")
LARGEST = max(MAX_FRAME, *FRAME_LIMITS.values())
COMMANDS = b"ABCDEHKLMNOQRTU"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """One example, on its own loop (Hypothesis tests are synchronous)."""
    with asyncio.Runner() as runner:
        return runner.run(coro)


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def nul(*strings: str | bytes) -> bytes:
    return b"".join((s.encode() if isinstance(s, str) else s) + b"\0" for s in strings)


class RecordingReader(asyncio.StreamReader):
    """A StreamReader that remembers how much each read asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    async def readexactly(self, n: int) -> bytes:
        self.asked.append(n)
        return await super().readexactly(n)


def reader_with(raw: bytes, eof: bool = True) -> RecordingReader:
    reader = RecordingReader()
    reader.feed_data(raw)
    if eof:
        reader.feed_eof()
    return reader


# --- the decoder the fuzz tests drive


def _macros_wanted(data: bytes) -> object:
    return parse_macros(data, ("rcpt_addr", "auth_authen"))


PARSERS: dict[bytes, list[Callable[[bytes], object]]] = {
    b"O": [lambda d: negotiate(parse_optneg(d), parse_optneg(d).protocol, {3: ("{x}",)})],
    b"D": [parse_macros, _macros_wanted],
    b"C": [parse_connect],
    b"H": [parse_helo],
    b"M": [parse_args, parse_address],
    b"R": [parse_args, parse_address],
    b"L": [cstrings],
    b"U": [parse_unknown],
}


def session() -> MilterSession:
    """A penalty-milter conversation whose reports go to an unstarted reporter."""
    milter = PenaltyMilter(SessionReporter(cast(Any, None)))
    return milter.session("fuzz")


async def decode_stream(raw: bytes, max_len: int = MAX_FRAME) -> list[Frame]:
    """Every frame in `raw` through every parser and a session; only ProtocolError may
    come out of any of them. Returns the frames read."""
    with capture_logs():  # a session logs what it skips; not the point here
        return await _decode_stream(raw, max_len)


async def _decode_stream(raw: bytes, max_len: int) -> list[Frame]:
    reader = reader_with(raw)
    conversation = session()
    frames: list[Frame] = []
    for _ in range(len(raw) // 5 + 1):  # a packet is at least 5 bytes: bounded
        try:
            frame = await read_frame(reader, max_len)
        except ProtocolError:
            break
        if frame is None:
            break
        frames.append(frame)
        assert 1 + len(frame.data) <= frame_limit(frame.cmd, max_len)
        for parse in PARSERS.get(frame.cmd, []):
            with contextlib.suppress(ProtocolError):
                parse(frame.data)
        if not conversation.done:
            with contextlib.suppress(ProtocolError):
                await conversation.handle(frame)
    # Nothing was ever read beyond the largest limit, whatever the lengths claimed.
    assert max(reader.asked, default=0) <= max(max_len, LARGEST)
    return frames


def valid_conversation() -> bytes:
    """What Postfix sends for one SMTP session with a rejected and an accepted RCPT."""
    return b"".join(
        [
            packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)),
            packet(b"D", b"C" + nul("j", "mx.example", "{daemon_name}", "mx")),
            packet(b"C", nul("client.example") + b"4" + struct.pack(">H", 4000) + nul("192.0.2.9")),
            packet(b"H", nul("client.example")),
            packet(b"M", nul("<a@client.example>", "SIZE=100")),
            packet(b"D", b"R" + nul("{rcpt_mailer}", "error", "{rcpt_host}", "5.1.1")),
            packet(b"R", nul("<nobody@mx.example>")),
            packet(b"D", b"R" + nul("{rcpt_mailer}", "local", "{rcpt_addr}", "x@mx.example")),
            packet(b"R", nul("<x@mx.example>")),
            packet(b"L", nul("Subject", "hi")),
            packet(b"B", b"body\r\n"),
            packet(b"E"),
            packet(b"U", nul("XYZZY")),
            packet(b"A"),
            packet(b"K"),
            packet(b"Q"),
        ]
    )


VALID = valid_conversation()


# --- fuzz: arbitrary bytes, mutated valid packets, round trips


@settings(max_examples=300)
@given(raw=st.binary(max_size=512), max_len=st.sampled_from([MAX_FRAME, 64, 8]))
@example(raw=b"\xff\xff\xff\xffO", max_len=MAX_FRAME)
@example(raw=packet(b"D", b"R" + b"a\0" * 3), max_len=MAX_FRAME)
@example(raw=packet(b"C", b"x\0" + b"4"), max_len=MAX_FRAME)
@example(raw=packet(b"C", b"x\0" + b"6\0\0" + b"::1\0::2\0"), max_len=MAX_FRAME)
def test_arbitrary_bytes_only_ever_raise_protocol_error(raw: bytes, max_len: int) -> None:
    run(decode_stream(raw, max_len))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """The valid conversation with a few bytes flipped, inserted, deleted, or cut."""
    raw = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "length"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] = draw(st.integers(0, 255))
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and raw:
            del raw[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del raw[at:]
        elif op == "length":  # a plausible but wrong length prefix somewhere
            raw[at:at] = struct.pack(">I", draw(st.sampled_from([0, 1, 2, 13, 65536, 65537])))
    return bytes(raw)


@settings(max_examples=300)
@given(raw=mutated())
def test_mutated_valid_packets_only_ever_raise_protocol_error(raw: bytes) -> None:
    run(decode_stream(raw))


def test_the_valid_conversation_decodes_whole() -> None:
    frames = run(decode_stream(VALID))
    assert b"".join(f.cmd for f in frames) == b"ODCHMDRDRLBEUAKQ"


text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=40)


@settings(max_examples=100)
@given(
    version=st.integers(0, 2**32 - 1),
    actions=st.integers(0, 2**32 - 1),
    protocol=st.integers(0, 2**32 - 1),
)
def test_optneg_round_trips(version: int, actions: int, protocol: int) -> None:
    frames = run(decode_stream(packet(b"O", struct.pack(">III", version, actions, protocol))))
    offer = parse_optneg(frames[0].data)
    assert (offer.version, int(offer.actions), int(offer.protocol)) == (version, actions, protocol)


@settings(max_examples=100)
@given(
    stage=st.sampled_from(list(COMMANDS)),
    pairs=st.lists(st.tuples(text, text), max_size=MAX_MACROS),
    braces=st.booleans(),
)
@example(stage=ord("R"), pairs=[("\x80" * 40, "v"), ("rcpt_addr", "x")], braces=True)
def test_macros_round_trip(stage: int, pairs: list[tuple[str, str]], braces: bool) -> None:
    names = [f"{{{n}}}" if braces else n for n, _ in pairs]
    data = bytes([stage]) + nul(
        *(s for n, (_, v) in zip(names, pairs, strict=True) for s in (n, v))
    )
    frame = run(decode_stream(packet(b"D", data)))[0]
    expected = {  # a name longer than any macro's is not kept
        macro_name(n): v
        for n, (_, v) in zip(names, pairs, strict=True)
        if len(n.encode()) <= MAX_MACRO_NAME
    }
    assert parse_macros(frame.data) == (bytes([stage]), expected)
    wanted = {k for k in expected if len(k) % 2}
    assert parse_macros(frame.data, wanted)[1] == {k: expected[k] for k in wanted}


@settings(max_examples=100)
@given(
    hostname=text,
    family=st.sampled_from("46LU"),
    port=st.integers(0, 65535),
    address=text,
    helo=text,
    args=st.lists(text, min_size=1, max_size=5),
    header=st.tuples(text, text),
    line=text,
    body=st.binary(max_size=2048),
)
def test_envelope_packets_round_trip(
    hostname: str,
    family: str,
    port: int,
    address: str,
    helo: str,
    args: list[str],
    header: tuple[str, str],
    line: str,
    body: bytes,
) -> None:
    tail = b"" if family == "U" else struct.pack(">H", port) + nul(address)
    raw = b"".join(
        [
            packet(b"C", nul(hostname) + family.encode() + tail),
            packet(b"H", nul(helo)),
            packet(b"M", nul(*args)),
            packet(b"L", nul(*header)),
            packet(b"U", nul(line)),
            packet(b"B", body),
        ]
    )
    connect, hello, mail, head, unknown, chunk = run(decode_stream(raw))
    conn = parse_connect(connect.data)
    if family == "U":
        assert (conn.hostname, conn.family, conn.port, conn.address) == (hostname, "U", 0, "")
    else:
        assert (conn.hostname, conn.family, conn.port, conn.address) == (
            hostname,
            family,
            port,
            address,
        )
    assert parse_helo(hello.data) == helo
    assert parse_args(mail.data) == args
    assert parse_address(mail.data) == args[0]
    assert cstrings(head.data) == list(header)
    assert parse_unknown(unknown.data) == line
    assert chunk == Frame(b"B", body)


# --- limits: refused before anything is read for them


@pytest.mark.parametrize(
    ("cmd", "limit"),
    [
        (b"D", MAX_FRAME),  # macros
        (b"R", MAX_FRAME),
        (b"O", MAX_FRAME),
        (b"B", MAX_BODY_FRAME),  # one body chunk: MILTER_CHUNK_SIZE data bytes
        (b"L", MAX_HEADER_FRAME),  # one header: Postfix's header_size_limit fits
    ],
)
async def test_each_command_has_its_limit(cmd: bytes, limit: int) -> None:
    at_limit = reader_with(struct.pack(">I", limit) + cmd + b"\0" * (limit - 1))
    frame = await read_frame(at_limit)
    assert frame is not None
    assert len(frame.data) == limit - 1
    over = reader_with(struct.pack(">I", limit + 1) + cmd + b"\0" * limit)
    with pytest.raises(FrameTooLarge, match=f"exceeds the limit of {limit}") as info:
        await read_frame(over)
    assert (info.value.length, info.value.limit) == (limit + 1, limit)
    # The length and (unless it is above every limit) the command byte, nothing more.
    assert over.asked == ([4] if limit == LARGEST else [4, 1])


@pytest.mark.parametrize("length", [LARGEST + 1, 1 << 20, 2**32 - 1])
async def test_a_length_above_every_limit_is_refused_at_once(length: int) -> None:
    reader = reader_with(struct.pack(">I", length), eof=False)  # nothing follows
    with pytest.raises(FrameTooLarge):
        await read_frame(reader)
    assert reader.asked == [4]


async def test_a_packet_that_trickles_in_is_cut_after_the_packet_timeout() -> None:
    reader = reader_with(struct.pack(">I", 100) + b"R<half", eof=False)  # the rest never comes
    with pytest.raises(FrameTimeout, match=r"not complete within 0\.05 s"):
        await read_frame(reader, idle_timeout=3600, packet_timeout=0.05)


@pytest.mark.parametrize("raw", [b"", b"\0\0"])  # nothing, or half a length prefix
async def test_silence_before_a_length_is_an_idle_timeout_not_a_protocol_error(
    raw: bytes,
) -> None:
    with pytest.raises(TimeoutError):
        await read_frame(reader_with(raw, eof=False), idle_timeout=0.05, packet_timeout=3600)


# --- memory: one copy per packet, nothing kept that was not asked for


def _peak_during(fn: Callable[[], object]) -> int:
    """Bytes allocated at the peak of `fn()`, beyond what was allocated before it."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


async def test_reading_a_packet_copies_it_once() -> None:
    size = MAX_BODY_FRAME
    reader = reader_with(packet(b"B", b"x" * (size - 1)))
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        frame = await read_frame(reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frame is not None
    assert len(frame.data) == size - 1
    # The data once (the old code held the packet and then a copy of its data).
    assert peak - before < 1.5 * size, peak - before


def test_macros_are_parsed_without_building_big_lists() -> None:
    # A 64 KiB macro packet of distinct tiny pairs: 13 000 macros nobody asked for.
    pairs, i = bytearray(b"R"), 0
    while len(pairs) < MAX_FRAME - 20:
        pairs += b"%x\0v\0" % i
        i += 1
    data = bytes(pairs) + nul("{rcpt_addr}", "x" * 5000)
    result: list[tuple[bytes, dict[str, str]]] = []
    peak = _peak_during(lambda: result.append(parse_macros(data, ("rcpt_addr",))))
    assert result == [(b"R", {"rcpt_addr": "x" * MAX_MACRO_VALUE})]  # the value cut
    assert peak < 16 * 1024, peak  # no list of 26 000 strings (the old code: megabytes)
    _, everything = parse_macros(data)  # nothing asked for: the first MAX_MACROS
    assert len(everything) == MAX_MACROS


async def test_a_session_keeps_nothing_from_macro_packets_but_the_rcpt_macros() -> None:
    """The 40 x 1 MiB report: every macro packet used to be kept whole, per stage byte."""
    conversation = session()
    with capture_logs():
        await conversation.handle(
            Frame(b"C", nul("x") + b"4" + struct.pack(">H", 1) + nul("192.0.2.7"))
        )
    names = bytearray()
    i = 0
    while len(names) < MAX_FRAME - 2000:
        names += b"{m%x}\0%s\0" % (i, b"v" * 400)
        i += 1
    big = nul("{rcpt_addr}", "x" * 4000) + bytes(names)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for stage in range(256):  # every stage byte, each packet at the limit
            assert await conversation.handle(Frame(b"D", bytes([stage]) + big)) is None
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept - before < 8 * 1024, kept - before  # one RCPT's three macros, cut
    assert await conversation.handle(Frame(b"R", nul("<a@b.example>"))) == b"\0\0\0\x01c"
    assert conversation.milter.stats.rcpt_accepted == 1  # the macros were not "error"
