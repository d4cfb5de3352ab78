"""The Sendmail milter protocol (version 6), the part Postfix speaks: bytes in, bytes out.

There is no RFC; the reference is Sendmail's `libmilter/mfdef.h` and, for what Postfix
actually sends, Postfix's `src/milter/milter8.c` and `src/smtpd/smtpd_milter.c`. This
module is pure (parsing and encoding, no sockets) apart from `read_frame`, which reads
one packet from an asyncio stream, so the framing rules live in one place.

Framing: every packet, in both directions, is a 4-byte big-endian length, then that many
bytes: a one-byte command and its data. Strings inside the data are NUL-terminated.

Hostile input: the peer may not be an MTA at all, so nothing here trusts a length.
`read_frame` refuses a packet longer than its command's limit (`frame_limit`) before
reading it, and reads what it accepts once, into one `bytes`; the parsers walk the data
by offsets, never copy a whole packet again, and `parse_macros` keeps only the macros
asked for, each value cut at `MAX_MACRO_VALUE`. Every malformed input is a
`ProtocolError`, never another exception.

Conversation, one milter connection per SMTP session (Postfix opens a new socket for
each client, as libmilter expects)::

    MTA                                   milter
    O  version, actions, protocol    ->
                                     <-   O  version, actions, protocol [, macro lists]
    D  stage + name/value pairs      ->   (no reply: macros for the next command)
    C  hostname, family, port, addr  ->
                                     <-   c continue | a accept | t tempfail | y "4xx ..."
    H / M / R / T / U / L / N / B / E     (each answered like C, unless negotiated away)
    A  abort (RSET, end of message)  ->   (no reply)
    Q  quit / K quit, new connection ->   (no reply)

Negotiation is by bit masks: the MTA offers the SMFIP_* protocol steps it can leave out
(and the SMFIF_* actions it allows), the milter answers the subset it wants. Answering a
bit the MTA did not offer is a protocol error for some MTAs, so `negotiate` only ever
answers a subset of the offer.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

SMFI_VERSION = 6  # the protocol version we speak (Postfix >= 2.6 default)

# Commands, MTA -> milter (mfdef.h SMFIC_*).
SMFIC_ABORT = b"A"  # abort the current message; connection state stays
SMFIC_BODY = b"B"  # body chunk
SMFIC_CONNECT = b"C"  # connection information
SMFIC_MACRO = b"D"  # macros for the next command
SMFIC_BODYEOB = b"E"  # end of message (final body chunk)
SMFIC_HELO = b"H"  # HELO/EHLO name
SMFIC_QUIT_NC = b"K"  # quit, but a new connection follows on this socket
SMFIC_HEADER = b"L"  # one header
SMFIC_MAIL = b"M"  # MAIL FROM arguments
SMFIC_EOH = b"N"  # end of headers
SMFIC_OPTNEG = b"O"  # option negotiation
SMFIC_QUIT = b"Q"  # quit: the MTA closes the connection
SMFIC_RCPT = b"R"  # RCPT TO arguments
SMFIC_DATA = b"T"  # DATA
SMFIC_UNKNOWN = b"U"  # an SMTP command the MTA did not recognise

COMMAND_NAMES: dict[bytes, str] = {
    SMFIC_ABORT: "abort",
    SMFIC_BODY: "body",
    SMFIC_CONNECT: "connect",
    SMFIC_MACRO: "macro",
    SMFIC_BODYEOB: "eom",
    SMFIC_HELO: "helo",
    SMFIC_QUIT_NC: "quit_nc",
    SMFIC_HEADER: "header",
    SMFIC_MAIL: "mail",
    SMFIC_EOH: "eoh",
    SMFIC_OPTNEG: "optneg",
    SMFIC_QUIT: "quit",
    SMFIC_RCPT: "rcpt",
    SMFIC_DATA: "data",
    SMFIC_UNKNOWN: "unknown",
}
# Commands that get no reply: the MTA sends the next one straight away.
NO_REPLY = frozenset({SMFIC_MACRO, SMFIC_ABORT, SMFIC_QUIT, SMFIC_QUIT_NC})

# Packet size limits: the value of the length prefix (command byte + data). Postfix
# (milter8.c) sends body content in chunks of MILTER_CHUNK_SIZE data bytes and each
# header whole, up to its `header_size_limit` (102400 by default); everything else it
# sends (macros, CONNECT, HELO, MAIL, RCPT, UNKNOWN, ...) is well under a few KiB.
# libmilter itself refuses more than MILTER_MAX_DATA_SIZE (65535) data bytes in any
# command, so MAX_FRAME is what every milter already accepts.
MILTER_CHUNK_SIZE = 65535  # body chunk data (Postfix milter8.c, Sendmail mfdef.h)
MAX_FRAME = 1 + 65535  # 64 KiB: every command but a header
MAX_HEADER_FRAME = 128 * 1024  # one header: name, value, NULs (header_size_limit + room)
MAX_BODY_FRAME = 1 + MILTER_CHUNK_SIZE  # 64 KiB: one body chunk
FRAME_LIMITS: Mapping[bytes, int] = {SMFIC_HEADER: MAX_HEADER_FRAME, SMFIC_BODY: MAX_BODY_FRAME}
# Macros kept from one packet: at most MAX_MACROS of them (when the caller does not name
# the ones it wants), each value cut at MAX_MACRO_VALUE bytes. The longest Postfix sends,
# `{rcpt_addr}` of a rejected recipient, is one SMTP reply text (at most 512 octets).
MAX_MACROS = 64
MAX_MACRO_NAME = 64  # longer names are never kept (`{rcpt_mailer}`, `{daemon_name}`: short)
MAX_MACRO_VALUE = 1024

# Replies, milter -> MTA (mfdef.h SMFIR_*); only the ones this package sends or tests.
SMFIR_ACCEPT = b"a"  # accept: no more events for this connection (at CONNECT) or message
SMFIR_CONTINUE = b"c"  # carry on
SMFIR_REJECT = b"r"  # 5xx (never sent by penalty-milter)
SMFIR_TEMPFAIL = b"t"  # generic 451 4.7.1
SMFIR_REPLYCODE = b"y"  # our own "4xx x.y.z text"

# Address families in SMFIC_CONNECT (mfdef.h SMFIA_*).
SMFIA_UNKNOWN = "U"
SMFIA_UNIX = "L"
SMFIA_INET = "4"
SMFIA_INET6 = "6"

# Macro stages in the optional macro lists of the negotiation reply (mfdef.h SMFIM_*).
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6


class Proto(enum.IntFlag):
    """SMFIP_*: protocol steps the milter does not want (NO*), replies it will not send
    (NR_*), and extensions. Values from mfdef.h (Sendmail 8.14) and Postfix milter8.c."""

    NOCONNECT = 0x01
    NOHELO = 0x02
    NOMAIL = 0x04
    NORCPT = 0x08
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800  # also send the recipients the MTA itself rejected
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000
    MDS_256K = 0x10000000
    MDS_1M = 0x20000000


class Action(enum.IntFlag):
    """SMFIF_*: what the milter may ask the MTA to do. SETSYMLIST lets the milter say
    which macros it wants at each stage (the optional lists after the OPTNEG reply)."""

    ADDHDRS = 0x01
    CHGBODY = 0x02
    ADDRCPT = 0x04
    DELRCPT = 0x08
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


class ProtocolError(ValueError):
    """The peer broke the protocol: the connection cannot be trusted to be in step."""


class FrameTooLarge(ProtocolError):
    """A length prefix beyond the limit: garbage, or something that is not an MTA."""

    def __init__(self, length: int, limit: int, cmd: bytes | None = None) -> None:
        what = f" for {COMMAND_NAMES.get(cmd, repr(cmd))}" if cmd is not None else ""
        super().__init__(f"packet length {length} exceeds the limit of {limit}{what}")
        self.length = length
        self.limit = limit
        self.cmd = cmd


class FrameTimeout(ProtocolError):
    """A packet whose length arrived but whose bytes did not follow in time (an MTA
    writes a packet at once; a trickle is not an MTA)."""


class Frame(NamedTuple):
    cmd: bytes  # one byte
    data: bytes


def frame_limit(cmd: bytes, max_len: int = MAX_FRAME) -> int:
    """The largest packet accepted for `cmd`: `max_len`, or more for a header or a body
    chunk (their own limits in FRAME_LIMITS)."""
    return max(max_len, FRAME_LIMITS.get(cmd, 0))


async def read_frame(
    reader: asyncio.StreamReader,
    max_len: int = MAX_FRAME,
    *,
    idle_timeout: float | None = None,
    packet_timeout: float | None = None,
) -> Frame | None:
    """One packet, or None on a clean end of stream between packets.

    A stream that ends inside a packet, a zero length, a length above the command's
    limit (`frame_limit(cmd, max_len)`) or a packet not complete within `packet_timeout`
    seconds of its length prefix is a `ProtocolError`: after any of them the byte stream
    is out of step for good. No length prefix within `idle_timeout` seconds is a
    `TimeoutError` (a silent peer, not a broken one). A length is checked before
    anything is read for it (above every limit: at once; above its command's: as soon as
    the command byte is in), and the data is read once, into one `bytes`: memory per
    packet is the limit, not the length the peer claims.
    """
    started = False  # the length prefix is in: the packet timeout runs
    got = 0  # packet bytes read so far (for the error message)
    try:
        async with asyncio.timeout(idle_timeout) as deadline:  # one timer per packet
            try:
                header = await reader.readexactly(4)
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    return None
                raise ProtocolError(
                    f"stream ended inside a length prefix ({exc.partial!r})"
                ) from exc
            length = int.from_bytes(header, "big")
            if length < 1:
                raise ProtocolError("zero-length packet (no command byte)")
            largest = max(max_len, *FRAME_LIMITS.values())
            if length > largest:
                raise FrameTooLarge(length, largest)
            started = True
            if packet_timeout is not None:
                deadline.reschedule(asyncio.get_running_loop().time() + packet_timeout)
            cmd = await reader.readexactly(1)
            got = 1
            limit = frame_limit(cmd, max_len)
            if length > limit:
                raise FrameTooLarge(length, limit, cmd)
            data = await reader.readexactly(length - 1) if length > 1 else b""
    except asyncio.IncompleteReadError as exc:
        got += len(exc.partial)
        raise ProtocolError(f"stream ended after {got} of {length} packet bytes") from exc
    except TimeoutError:
        if not started:
            raise
        raise FrameTimeout(
            f"packet of {length} bytes not complete within {packet_timeout} s"
        ) from None
    return Frame(cmd, data)


def encode(cmd: bytes, data: bytes = b"") -> bytes:
    """One packet: length, command byte, data."""
    if len(cmd) != 1:
        raise ValueError(f"a command is one byte, not {cmd!r}")
    return (1 + len(data)).to_bytes(4, "big") + cmd + data


CONTINUE = encode(SMFIR_CONTINUE)
ACCEPT = encode(SMFIR_ACCEPT)
TEMPFAIL = encode(SMFIR_TEMPFAIL)

# --- data parsing


def _text(raw: bytes) -> str:
    """Envelope data is mostly ASCII; 8-bit bytes are replaced, never fatal (they end up
    in protobuf strings, which must be valid UTF-8)."""
    return raw.decode("utf-8", errors="replace")


def cstring_spans(data: bytes, start: int = 0) -> Iterator[tuple[int, int]]:
    """(start, end) offsets of the NUL-terminated strings filling `data[start:]` exactly
    (nothing there is no strings): a walk over the packet, no copy of it."""
    size = len(data)
    if start >= size:
        return
    if data[size - 1] != 0:
        raise ProtocolError("string data without its NUL terminator")
    pos = start
    while pos < size:
        nul = data.find(b"\0", pos)  # found: the last byte is a NUL
        yield pos, nul
        pos = nul + 1


def cstrings(data: bytes) -> list[str]:
    """NUL-terminated strings filling `data` exactly (an empty `data` is no strings)."""
    return [_text(data[a:b]) for a, b in cstring_spans(data)]


def _one_string(data: bytes, start: int, what: str) -> str:
    """The only NUL-terminated string in `data[start:]`; else a ProtocolError."""
    spans = cstring_spans(data, start)
    first = next(spans, None)
    if first is None or next(spans, None) is not None:
        raise ProtocolError(f"{what} packet without exactly one string")
    return _text(data[first[0] : first[1]])


def macro_name(name: str) -> str:
    """`{rcpt_mailer}` and `rcpt_mailer` are the same macro; single letters stay as is."""
    if name.startswith("{") and name.endswith("}"):
        return name[1:-1]
    return name


@dataclass(frozen=True)
class OptNeg:
    """An SMFIC_OPTNEG packet (either direction), without the macro lists."""

    version: int
    actions: Action
    protocol: Proto


def parse_optneg(data: bytes) -> OptNeg:
    """The MTA's offer. Extra bytes after the three words are ignored (future use)."""
    if len(data) < 12:
        raise ProtocolError(f"option negotiation needs 12 bytes, got {len(data)}")
    version = int.from_bytes(data[0:4], "big")
    actions = Action(int.from_bytes(data[4:8], "big"))
    protocol = Proto(int.from_bytes(data[8:12], "big"))
    return OptNeg(version, actions, protocol)


@dataclass(frozen=True)
class Negotiation:
    """Our answer to the MTA's offer, and what we wanted but did not get."""

    version: int
    actions: Action
    protocol: Proto
    symlists: Mapping[int, str]  # stage -> space-separated macro names
    missing: Proto  # wanted protocol bits the MTA did not offer

    def encode(self) -> bytes:
        data = (
            self.version.to_bytes(4, "big")
            + int(self.actions).to_bytes(4, "big")
            + int(self.protocol).to_bytes(4, "big")
        )
        for stage, names in sorted(self.symlists.items()):
            data += stage.to_bytes(4, "big") + names.encode("ascii") + b"\0"
        return encode(SMFIC_OPTNEG, data)


def negotiate(
    offer: OptNeg,
    protocol: Proto,
    symlists: Mapping[int, Sequence[str]] | None = None,
) -> Negotiation:
    """Answer an offer with the subset of `protocol` it allows.

    - version: ours or the MTA's, whichever is lower (Postfix refuses a higher one);
    - actions: only SETSYMLIST, and only when offered and there are macro lists to send
      (the lists make the MTA send exactly the macros we need, whatever main.cf says);
    - protocol: `protocol & offer.protocol`; `missing` says what the MTA could not do.
    """
    if offer.version < 2:
        raise ProtocolError(f"milter protocol version {offer.version} is too old")
    version = min(SMFI_VERSION, offer.version)
    granted = protocol & offer.protocol
    lists: dict[int, str] = {}
    actions = Action(0)
    if symlists and version >= 6 and Action.SETSYMLIST in offer.actions:
        actions = Action.SETSYMLIST
        lists = {stage: " ".join(names) for stage, names in symlists.items()}
    return Negotiation(version, actions, granted, lists, protocol & ~offer.protocol)


def parse_macros(data: bytes, names: Collection[str] | None = None) -> tuple[bytes, dict[str, str]]:
    """An SMFIC_MACRO packet: the command the macros belong to, and name -> value.

    Only the macros in `names` (bare names, `rcpt_addr` for `{rcpt_addr}`) are decoded
    and kept; without `names`, the first MAX_MACROS. Each value is cut at MAX_MACRO_VALUE
    bytes. The whole packet is still checked (name/value pairs, NUL-terminated)."""
    if not data:
        raise ProtocolError("macro packet without its command byte")
    macros: dict[str, str] = {}
    spans = cstring_spans(data, 1)
    for name_start, name_end in spans:
        value = next(spans, None)
        if value is None:
            raise ProtocolError("macro packet with a name and no value")
        if names is None and len(macros) >= MAX_MACROS:
            continue
        if name_end - name_start > MAX_MACRO_NAME:
            continue
        name = macro_name(_text(data[name_start:name_end]))
        if names is None or name in names:
            start, end = value
            macros[name] = _text(data[start : min(end, start + MAX_MACRO_VALUE)])
    return data[:1], macros


@dataclass(frozen=True)
class Connect:
    """SMFIC_CONNECT: what the MTA knows about the SMTP client."""

    hostname: str  # "[203.0.113.7]" when the name is unknown (Postfix, like Sendmail)
    family: str  # SMFIA_*: "4", "6", "L" (unix socket) or "U" (unknown)
    port: int
    address: str  # "" for family "U"


def parse_connect(data: bytes) -> Connect:
    """hostname NUL, family byte, then (unless "U") port (16 bits) and address NUL."""
    nul = data.find(b"\0")
    if nul < 0:
        raise ProtocolError("connect packet without a NUL-terminated hostname")
    hostname = _text(data[:nul])
    if len(data) < nul + 2:
        raise ProtocolError("connect packet without an address family")
    family = chr(data[nul + 1])
    if family == SMFIA_UNKNOWN:
        return Connect(hostname, family, 0, "")
    if len(data) < nul + 4:
        raise ProtocolError("connect packet without a port")
    port = int.from_bytes(data[nul + 2 : nul + 4], "big")
    return Connect(hostname, family, port, _one_string(data, nul + 4, "connect address"))


def parse_helo(data: bytes) -> str:
    return _one_string(data, 0, "helo")


def parse_args(data: bytes) -> list[str]:
    """MAIL and RCPT: the address (with its angle brackets), then ESMTP parameters."""
    args = cstrings(data)
    if not args:
        raise ProtocolError("envelope packet without an address")
    return args


def parse_address(data: bytes) -> str:
    """MAIL and RCPT: the address only (with its angle brackets); the ESMTP parameters
    after it are checked but not decoded."""
    first = next(cstring_spans(data), None)
    if first is None:
        raise ProtocolError("envelope packet without an address")
    return _text(data[first[0] : first[1]])


def parse_unknown(data: bytes) -> str:
    """SMFIC_UNKNOWN: the command line the MTA did not recognise (one string)."""
    first = next(cstring_spans(data), None)
    return "" if first is None else _text(data[first[0] : first[1]])


def strip_brackets(address: str) -> str:
    """`<user@example.com>` -> `user@example.com`; `<>` -> `` (the null sender)."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


_REPLY = re.compile(r"[45]\d\d[ -]")


def reply_code(text: str) -> bytes:
    """SMFIR_REPLYCODE with our own SMTP reply, e.g. "450 4.7.1 ... 287 seconds".

    The MTA takes it as is, so it must be a well-formed 4xx/5xx line (Postfix checks the
    first digits and treats anything else as a milter error). Sendmail uses the text as a
    format string, so a '%' is doubled (Postfix undoes that).
    """
    if not _REPLY.match(text) or any(c in text for c in "\r\n\0"):
        raise ValueError(f"not a one-line 4xx/5xx SMTP reply: {text[:80]!r}")
    return encode(SMFIR_REPLYCODE, text.replace("%", "%%").encode("utf-8") + b"\0")
