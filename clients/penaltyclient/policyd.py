"""`penalty-policyd`: the Postfix policy delegation server (`check_policy_service`).

Postfix sends `name=value` lines ending with an empty line and reuses the connection
for later requests; we answer `action=<4xx reply with the exact seconds left>` when the
client is penalized at the configured stage (RCPT by default) and `action=DUNNO`
otherwise. Anything wrong (garbage, an unknown client address, penaltyd slow or down)
is `DUNNO` plus a log line: the sidecar never fails closed and never delays mail past
its own deadline, well inside Postfix's `timeout=1s`.

Postfix never tells a policy server about its own rejections; what a policy request
does reveal is a recipient that passed the restrictions before it, so at RCPT each
`DUNNO` is reported as an accepted recipient (the denominator of the error ratio) over
a batched Session stream. Exim's `readsocket` works too: it half-closes after its
request, we answer, see end-of-file and close.

How a connection is served (an `asyncio.Protocol`, no task per connection):

- Whole requests per read: the received bytes are split on the empty line
  (``b"\\n\\n"``) and only the attributes we use are looked up (`parse_request`); with
  the live replica a check is a dict lookup, so a request is answered inside the read
  callback, its answer written at once (`DUNNO` is one precomputed bytes object).
- Bounded: a request is at most `MAX_REQUEST` bytes and `MAX_LINES` lines; beyond
  that it is answered `DUNNO` once, logged, and the connection closed (the stream is
  out of step). At most `--max-connections` connections; more are accepted and closed
  (Postfix then applies `default_action=DUNNO`), with a rate-limited log line.
- Fair: at most one request per connection per turn of the event loop. A client that
  pipelines (writes many requests without waiting) gets the next one answered on the
  next turn, and its socket is not read while its requests wait; one that does not read
  its answers stops being read once `WRITE_HIGH_WATER` bytes of answers are waiting.
- Wake-ups coalesced: while requests come faster than one per `--coalesce-us` (10,000/s
  at 100 µs), after a loop iteration that answered fewer than `COALESCE_BELOW` the loop
  thread sleeps `--coalesce-us`, so requests arriving one by one are read a few at a
  time (a wake-up costs more than answering on a small VM); slower, it never pauses.
- One idle clock: a periodic sweep closes connections idle for `idle_timeout` (those
  whose answers are not being read included), instead of a timer per read.
- Only when the live replica cannot answer (off, or not synced yet) is a check an RPC:
  then that connection waits for it (answers stay in order) while others go on. A check
  penaltyd refuses (`INVALID_ARGUMENT`, e.g. an older penaltyd and a crafted HELO) is
  asked again with the client address alone: a crafted field must not let a penalized
  address through.
- Reports in batches: accepted recipients are counted per (address, HELO, sender) and
  handed to the `SessionReporter` every `--report-interval-ms` (50 ms), one report with
  its count each (a message's RCPTs, a busy client's messages, become one report), at
  most `--report-batch` (32) to a Session message, so that a penaltyd on the same host
  works on them in short bursts rather than one long one that our answers wait out; an
  error report queued in this process (the milter's) first flushes them, so penaltyd
  never judges an error against a denominator still waiting here. On SIGTERM the
  open connections are closed (Postfix keeps them open between sessions), the reports
  get `--flush-seconds` to reach penaltyd, and `policyd_stopped` counts those that did
  not (`reports_pending_dropped`, after a `policyd_reports_dropped_at_exit` warning).
- Logs a client cannot flood: lines a client causes (garbage, unknown addresses,
  refused checks, connections over the cap) are rate-limited with a count of what was
  suppressed, `policy_tempfail` is logged once per penalty; `policyd_stats` counts all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import cast

import structlog

from penalty.identity import MAX_COUNT, InvalidAddress, address_and_identity, bound_client
from penalty.v1 import penalty_pb2 as pb
from penaltyclient.aio import AsyncPenaltyClient, PenaltydError, SessionReporter, client_msg
from penaltyclient.milter import MilterOptions, PenaltyMilter, flush_at_exit
from penaltyclient.stdlog import route_stdlib_logs
from serving.cli import add_log_address_arguments, log_address_options, run_program, tune_gc
from serving.logs import RateLimitedLog

log = structlog.get_logger("penalty.policyd")

MAX_REQUEST = 64 * 1024  # bytes of one request; Postfix sends ~1-2 KB
MAX_LINES = 200  # attribute lines of one request; Postfix sends ~30
WRITE_HIGH_WATER = 64 * 1024  # answers waiting for a client that does not read: stop reading
DEFAULT_MAX_CONNECTIONS = 4096  # Postfix holds one per smtpd process (default limit 100)
FD_RESERVE = 64  # descriptors kept for the listener, gRPC channels, logs
COALESCE_DEFAULT_US = 100  # after a wake-up that answered few requests, let arrivals gather
COALESCE_BELOW = 8  # ... only when fewer than this many were answered (busier loops batch)
COALESCE_RATE_WINDOW = 0.01  # seconds over which the request rate that enables it is read
REPORT_EVERY_MS = 50  # accepted recipients are counted up this long, then handed over
#: Reports per Session message. Small, for a penaltyd on the same host: the time it spends
#: on one message is a burst that delays our answers (policyd's p99 at a fixed 18.6k
#: requests/s: 3.6 ms with 200, 1.7-2.1 ms with 32, docs/performance.md); a remote one
#: may take more per message for a little less CPU (`--report-batch`).
REPORT_BATCH = 32
REPORT_KEYS_MAX = 10_000  # distinct (address, HELO, sender) waiting; more flushes at once
LINGER_SECONDS = 2.0  # after an overflow: our DUNNO and FIN are sent, input discarded
LINGER_BYTES = 1 << 20  # ... for at most this long and this much, then the socket is reset
STATES = ("CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN")
DUNNO = b"action=DUNNO\n\n"

#: What `parse_request` returns: (protocol_state upper-cased, client_address, helo_name,
#: sender); a plain tuple because it is built once per request on the hot path.
Request = tuple[str, str, str, str]

_STATE_NAMES = {s.encode(): s for s in STATES}
_KNOWN_STATES = frozenset(STATES)
_ONE_ACCEPTED = [pb.OutcomeCount(outcome=pb.OUTCOME_ACCEPTED, n=1)]  # copied into each report
_LOGGED_PENALTIES_MAX = 10_000  # identities whose tempfail was logged, before forgetting


class BadRequest(ValueError):
    """The bytes were not a policy request; answered DUNNO and logged."""


class Overflow(BadRequest):
    """A request over `MAX_REQUEST` bytes or `MAX_LINES` lines: the connection is closed."""


#: The attributes we use, each at the start of a line after the first (the first line is
#: looked at on its own: Postfix sends `request=` there).
_ATTRS = re.compile(rb"\n(request|protocol_state|client_address|helo_name|sender)=([^\n]*)")


def _text(raw: bytes) -> str:
    if raw.isascii():
        return raw.decode("ascii")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # Postfix passes 8-bit envelope data through


def parse_request(buf: bytes, start: int = 0, end: int | None = None) -> Request:
    """One request: the lines buf[start:end] (each ending with b"\\n", without the empty
    line that ends the request) -> (state, client_address, helo_name, sender).

    Raises `BadRequest` (`Overflow` past the bounds). Only the attributes used are
    looked up, in one pass (a repeated attribute: the last one counts, as Postfix's own
    attribute readers do); `request=smtpd_access_policy` must be there. A missing
    attribute is ""."""
    if end is None:
        end = len(buf)
    if end <= start:
        raise BadRequest("empty request")
    if end - start > MAX_REQUEST:
        raise Overflow(f"request longer than {MAX_REQUEST} bytes")
    if buf.count(b"\n", start, end) > MAX_LINES:
        raise Overflow(f"more than {MAX_LINES} attribute lines")
    if buf[end - 1] != 0x0A:
        raise BadRequest("the last line does not end with a newline")
    if buf.startswith(b"request=", start):
        first = buf.index(b"\n", start, end)
        found = dict(_ATTRS.findall(buf, first, end))
        kind = found.get(b"request", buf[start + 8 : first])
    else:  # another first line: look at it like the others
        found = dict(_ATTRS.findall(b"\n" + buf[start:end]))
        kind = found.get(b"request", b"")
    if kind != b"smtpd_access_policy":
        raise BadRequest(f"request={kind[:64].decode('latin-1')!r} is not smtpd_access_policy")
    raw = found.get(b"protocol_state", b"")
    state = _STATE_NAMES.get(raw)
    if state is None:
        state = raw[:32].decode("latin-1").upper()
    return (
        state,
        found.get(b"client_address", b"").decode("latin-1"),
        _text(found.get(b"helo_name", b"")),
        _text(found.get(b"sender", b"")),
    )


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit: (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft, hard
    return soft, target, hard


def _limit(n: int) -> int | str:
    return "unlimited" if n == resource.RLIM_INFINITY else n


def default_max_connections(fd_soft_limit: int) -> int:
    """`DEFAULT_MAX_CONNECTIONS`, kept `FD_RESERVE` descriptors below the fd limit."""
    return max(1, min(DEFAULT_MAX_CONNECTIONS, fd_soft_limit - FD_RESERVE))


@dataclass
class Stats:
    requests: int = 0
    tempfails: int = 0
    dunno: int = 0
    garbage: int = 0
    overflows: int = 0  # requests past MAX_REQUEST / MAX_LINES (connection closed)
    degraded: int = 0
    accepted: int = 0  # recipients reported as accepted (in reports of n each)
    refused_checks: int = 0  # checks penaltyd refused, asked again with the address alone
    errors: int = 0  # bugs answered DUNNO
    connections: int = 0
    open_connections: int = 0
    refused_connections: int = 0  # over --max-connections: accepted and closed
    idle_closed: int = 0
    write_paused: int = 0  # times a client stopped reading its answers
    coalesced: int = 0  # wake-ups followed by a --coalesce-us pause
    by_state: dict[str, int] = field(default_factory=dict)


class PolicyConnection(asyncio.Protocol):
    """One Postfix (or Exim) connection: many requests, answered in order."""

    __slots__ = (
        "buf",
        "busy",
        "closed",
        "eof",
        "last",
        "lingering",
        "pos",
        "read_paused",
        "registered",
        "server",
        "transport",
        "write_blocked",
    )

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""  # received bytes; buf[pos:] not answered yet
        self.pos = 0
        self.last = server.now  # last activity, on the server's coarse clock
        self.busy = False  # a check RPC in flight, or the next request scheduled
        self.eof = False
        self.lingering = -1  # bytes discarded after an overflow; -1: not lingering
        self.closed = False
        self.read_paused = False
        self.write_blocked = False
        self.registered = False

    # --- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        if not self.server.admit(self):
            self.closed = True
            t.abort()
            return
        self.registered = True
        t.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        server = self.server
        self.last = server.now
        if server.coalesce and not server.coalesce_armed:
            server.arm_coalesce()
        n = len(data)
        if (  # the common case: one whole request, nothing waiting (what Postfix sends)
            n > 2
            and data.find(b"\n\n") == n - 2
            and not self.buf
            and data[0] != 0x0A
            and not (self.busy or self.write_blocked or self.lingering >= 0)
            and b"\r" not in data
        ):
            answer = server.answer(data, 0, n - 1, self)
            if answer is not None:
                assert self.transport is not None
                self.transport.write(answer)
            else:  # a check RPC is under way (it writes and steps on), or closed
                self._pause_reading()
            return
        if self.lingering >= 0:
            self._discard(data)
            return
        if self.pos < len(self.buf):
            data = self.buf[self.pos :] + data
        self.pos = 0
        if b"\r" in data:  # CRLF lines (a hand-written Exim or Haraka client)
            data = data.replace(b"\r\n", b"\n")
        self.buf = data
        if self.busy or self.write_blocked:
            self._hold()
            return
        self._step()

    def eof_received(self) -> bool:
        if self.lingering >= 0:
            return False  # the client has read our answer and closed: close
        self.eof = True  # Exim's readsocket: answer what is there, then close
        if not (self.busy or self.write_blocked):
            self._step()
        return True  # keep the socket open for the answer; _step closes it

    def pause_writing(self) -> None:
        self.write_blocked = True
        self.server.stats.write_paused += 1
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self.last = self.server.now
        if not self.busy:
            self._step()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.buf = b""
        if self.registered:
            self.registered = False
            self.server.release(self)

    # --- serving

    def _pause_reading(self) -> None:
        if self.read_paused or self.closed or self.lingering >= 0:
            return
        if self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _hold(self) -> None:
        """Requests are waiting (an RPC, the next turn, a full write buffer): read no
        more until they are answered, and never hold more than a read's worth."""
        self._pause_reading()
        if len(self.buf) - self.pos > 4 * MAX_REQUEST and self.buf.find(b"\n\n", self.pos) < 0:
            self._overflow(Overflow(f"request longer than {MAX_REQUEST} bytes"))

    def _next_turn(self) -> None:
        self.busy = False
        if not (self.closed or self.write_blocked):
            self._step()

    def _step(self) -> None:
        """Answer the first complete request in the buffer (at most one), then let the
        other connections run before the next one."""
        if self.closed or self.lingering >= 0:
            return
        buf, pos = self.buf, self.pos
        t = self.transport
        assert t is not None
        if pos >= len(buf):
            self.buf, self.pos = b"", 0
            if self.eof:
                t.close()
            elif self.read_paused and not self.write_blocked:
                self.read_paused = False
                t.resume_reading()
            return
        answer: bytes | None
        if buf[pos] == 0x0A:  # an empty line alone: an empty request
            self.pos = pos + 1
            answer = self.server.garbage(BadRequest("empty request"))
        else:
            end = buf.find(b"\n\n", pos, pos + MAX_REQUEST + 1)
            if end < 0:
                self._incomplete(buf, pos)
                return
            self.pos = end + 2
            answer = self.server.answer(buf, pos, end + 1, self)
        if answer is None:  # a check RPC is under way (it writes and steps on), or closed
            self._pause_reading()
            return
        t.write(answer)
        if self.pos < len(buf) or self.eof:
            self.busy = True
            self._pause_reading()
            self.server.loop.call_soon(self._next_turn)
        else:
            self.buf, self.pos = b"", 0
            if self.read_paused and not self.write_blocked:
                self.read_paused = False
                t.resume_reading()

    def _incomplete(self, buf: bytes, pos: int) -> None:
        """No empty line yet: wait for more, unless over the bounds or at end-of-file."""
        pending = len(buf) - pos
        t = self.transport
        assert t is not None
        if pending > MAX_REQUEST:
            self._overflow(Overflow(f"request longer than {MAX_REQUEST} bytes"))
        elif buf.count(b"\n", pos) > MAX_LINES:
            self._overflow(Overflow(f"more than {MAX_LINES} attribute lines"))
        elif self.eof:  # a last request without its empty line (Exim), then close
            self.buf, self.pos = b"", 0
            rest = buf[pos:].rstrip(b"\n")
            if rest.strip():
                answer = self.server.answer(rest + b"\n", 0, len(rest) + 1, self, last=True)
                if answer is None:
                    return  # the RPC's callback writes and closes
                t.write(answer)
            t.close()
        elif self.read_paused and not self.write_blocked:
            if pos:
                self.buf, self.pos = buf[pos:], 0
            self.read_paused = False
            t.resume_reading()

    def _overflow(self, exc: Overflow) -> None:
        """Answer DUNNO once and close: the stream is out of step (Postfix reconnects).

        A lingering close: our DUNNO and FIN go out first and what the client still
        sends is discarded (`LINGER_SECONDS`, `LINGER_BYTES`), because closing a socket
        with unread input resets it and the reset can overtake the answer."""
        stats = self.server.stats
        stats.requests += 1
        stats.overflows += 1
        stats.dunno += 1
        self.server.garbage_log.warning("policy_garbage", error=str(exc), closed=True)
        self.buf, self.pos = b"", 0
        self.lingering = 0
        self.last = self.server.now
        t = self.transport
        assert t is not None
        t.write(DUNNO)
        if self.eof:  # nothing more will come: no reset to fear
            self.closed = True
            t.close()
            return
        if t.can_write_eof():
            t.write_eof()
        if self.read_paused:
            self.read_paused = False
            t.resume_reading()

    def _discard(self, data: bytes) -> None:
        self.lingering += len(data)
        if self.lingering > LINGER_BYTES and self.transport is not None:
            self.shut(abort=True)

    def answered_later(self, answer: bytes, last: bool) -> None:
        """The answer of a request that needed an RPC."""
        if self.closed or self.lingering >= 0:
            return
        t = self.transport
        assert t is not None
        self.last = self.server.now
        t.write(answer)
        if last:
            t.close()
            return
        self.busy = False
        if not self.write_blocked:
            self._step()

    def idle(self, now: float, timeout: float) -> bool:
        if self.lingering >= 0:
            timeout = min(timeout, LINGER_SECONDS)
        return not self.closed and now - self.last >= timeout

    def shut(self, abort: bool = False) -> None:
        """Close now; abort when answers are stuck in a client that does not read."""
        if self.closed or self.transport is None:
            return
        self.closed = True
        if abort or self.lingering >= 0 or self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()


class PolicyServer:
    def __init__(
        self,
        client: AsyncPenaltyClient,
        *,
        stages: tuple[str, ...] = ("RCPT",),
        report_accepted: bool = True,
        idle_timeout: float = 300.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        coalesce: float = COALESCE_DEFAULT_US / 1e6,
        report_every: float = REPORT_EVERY_MS / 1000,
        report_batch: int = REPORT_BATCH,
    ) -> None:
        self.client = client
        self.coalesce = coalesce  # seconds; 0 answers each wake-up's requests and sleeps
        self.coalesce_armed = False
        self._coalesce_mark = 0
        self._rate_since, self._rate_mark, self._busy = 0.0, 0, False
        self.stages = frozenset(stages)
        self.report_accepted = report_accepted
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.report_every = report_every
        self.reporter: SessionReporter = client.reporter(
            max_batch=report_batch, interval=report_every
        )
        self.reporter.before_error = self.flush_reports
        self.stats = Stats()
        self.connections: set[PolicyConnection] = set()
        self.garbage_log = RateLimitedLog(log, interval=1.0)
        self.refused_log = RateLimitedLog(log, interval=5.0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._logged_penalties: dict[str, int] = {}
        # (address, HELO, sender) -> its report, built at the first RCPT, counted up after
        self._accepted: dict[tuple[str, str, str], pb.ReportRequest] = {}
        self._waiting_recipients = 0
        self._report_timer: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.now = 0.0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # --- listening and connections

    async def listen(self, address: str) -> asyncio.Server:
        """Listen on HOST:PORT (port 0 picks one) or a unix socket path (`unix:/path`
        or `/path`); starts the idle sweep. Call `close()` to stop."""
        loop = self.loop
        self.now = loop.time()
        if address.startswith(("/", "unix:")):
            path = address.removeprefix("unix:")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            server = await loop.create_unix_server(lambda: PolicyConnection(self), path)
            os.chmod(path, 0o666)
        else:
            host, _, port = address.rpartition(":")
            server = await loop.create_server(
                lambda: PolicyConnection(self), host.strip("[]") or None, int(port)
            )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="policyd-idle-sweep")
        return server

    def admit(self, conn: PolicyConnection) -> bool:
        if len(self.connections) >= self.max_connections:
            self.stats.refused_connections += 1
            self.refused_log.warning(
                "policy_connection_refused",
                open_connections=len(self.connections),
                max_connections=self.max_connections,
                refused_total=self.stats.refused_connections,
            )
            return False
        self.connections.add(conn)
        self.stats.connections += 1
        self.stats.open_connections = len(self.connections)
        return True

    def release(self, conn: PolicyConnection) -> None:
        self.connections.discard(conn)
        self.stats.open_connections = len(self.connections)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    # --- wake-up coalescing

    def arm_coalesce(self) -> None:
        """Called at the first read of a loop iteration: the pause runs once that
        iteration's reads are answered (a callback queued now runs after them)."""
        self.coalesce_armed = True
        self.loop.call_soon(self._coalesce_wakeups)

    def _coalesce_wakeups(self) -> None:
        """Interrupt moderation in user space. At a moderate, steady rate Postfix's
        requests arrive one at a time, so each costs a whole wake-up (epoll, a context
        switch in and out, cold caches): on a 2-core VM that is most of a request's CPU.
        After a wake-up that answered only a few requests, the loop thread sleeps
        `coalesce` seconds before polling again, so what arrives meanwhile is read in one
        wake-up. Every answer is already written before the pause; a request arriving
        during it waits at most `coalesce` (100 µs by default, far below Postfix's 1 s
        policy timeout). A busy loop (COALESCE_BELOW or more answers a wake-up) already
        batches and never pauses, so throughput at saturation is unchanged. Nor does a
        quiet one: below one request per `coalesce` (read over the last
        COALESCE_RATE_WINDOW) a pause would gather nothing and only delay the next step
        of a client's conversation (its milter exchange, its next RCPT)."""
        self.coalesce_armed = False
        stats = self.stats
        requests = stats.requests
        served, self._coalesce_mark = requests - self._coalesce_mark, requests
        now = time.monotonic()
        if now - self._rate_since >= COALESCE_RATE_WINDOW:
            elapsed = now - self._rate_since
            self._busy = (requests - self._rate_mark) * self.coalesce >= elapsed
            self._rate_since, self._rate_mark = now, requests
        if self._busy and served < COALESCE_BELOW:
            stats.coalesced += 1
            time.sleep(self.coalesce)

    def sweep_interval(self) -> float:
        return max(0.01, min(1.0, self.idle_timeout / 4))

    async def _sweep(self) -> None:
        """The one idle clock: every connection's last activity, checked periodically."""
        interval = self.sweep_interval()
        loop = self.loop
        while True:
            await asyncio.sleep(interval)
            self.now = now = loop.time()
            timeout = self.idle_timeout
            for conn in [c for c in self.connections if c.idle(now, timeout)]:
                self.stats.idle_closed += 1
                conn.shut()

    async def close(self, grace: float = 1.0) -> None:
        """Stop accepting, let checks in flight answer, close every connection."""
        for server in self._servers:
            server.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.client.deadline + grace)
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.shut()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._all_closed.wait()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self.flush_reports()  # into the reporter's queue: its close() sends them

    # --- answering

    def garbage(self, exc: BadRequest) -> bytes:
        self.stats.requests += 1
        self.stats.garbage += 1
        self.stats.dunno += 1
        self.garbage_log.warning("policy_garbage", error=str(exc))
        return DUNNO

    def answer(
        self, buf: bytes, start: int, end: int, conn: PolicyConnection, last: bool = False
    ) -> bytes | None:
        """The answer to the request in buf[start:end], or None when a check RPC was
        started (it calls `conn.answered_later`)."""
        try:
            state, ip, helo, sender = parse_request(buf, start, end)
        except Overflow as exc:
            conn._overflow(exc)
            return None
        except BadRequest as exc:
            return self.garbage(exc)
        stats = self.stats
        stats.requests += 1
        if state in _KNOWN_STATES:
            stats.by_state[state] = stats.by_state.get(state, 0) + 1
        if state not in self.stages:
            stats.dunno += 1
            return DUNNO
        replica = self.client.replica
        try:  # the replica validates the address too: None when it is not one
            verdict = replica.check(ip, helo, sender) if replica is not None else None
            if verdict is not None:
                return self._action(verdict, state, ip, helo, sender)
        except Exception as exc:  # a bug must not fail closed nor drop the connection
            stats.errors += 1
            stats.dunno += 1
            log.exception("policy_error", error=repr(exc))
            return DUNNO
        try:
            address_and_identity(ip)
        except InvalidAddress:
            stats.dunno += 1
            self.garbage_log.warning("policy_unknown_client", client_address=ip[:64], state=state)
            return DUNNO
        conn.busy = True
        task = self.loop.create_task(self._remote(conn, state, ip, helo, sender, last))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    async def _remote(
        self, conn: PolicyConnection, state: str, ip: str, helo: str, sender: str, last: bool
    ) -> None:
        try:
            verdict = await self._check(ip, helo, sender)
            answer = self._action(verdict, state, ip, helo, sender) if verdict else DUNNO
        except Exception as exc:
            self.stats.errors += 1
            self.stats.dunno += 1
            log.exception("policy_error", error=repr(exc))
            answer = DUNNO
        conn.answered_later(answer, last)

    async def _check(self, ip: str, helo: str, sender: str) -> pb.Verdict | None:
        """`client.check` over RPC; refused for a field, asked again with the address
        alone (a crafted HELO or sender must not let a penalized address through)."""
        try:
            return await self.client.check(ip, helo, sender)
        except PenaltydError as exc:
            self.stats.refused_checks += 1
            first = str(exc)
        try:
            verdict = await self.client.check(ip)
        except PenaltydError as exc:
            self.stats.dunno += 1
            self.garbage_log.warning(
                "policy_check_refused", client_address=ip[:64], error=first, retry_error=str(exc)
            )
            return None
        self.garbage_log.warning(
            "policy_check_refused",
            client_address=ip[:64],
            error=first,
            retried="client_address only",
            tempfail=verdict.tempfail,
        )
        return verdict

    def _action(self, verdict: pb.Verdict, state: str, ip: str, helo: str, sender: str) -> bytes:
        stats = self.stats
        if verdict.degraded:
            stats.degraded += 1
        if verdict.tempfail:
            reply = verdict.smtp_reply
            if reply[:1] == "4":
                stats.tempfails += 1
                if self._logged_penalties.get(verdict.identity) != verdict.expires_at_unix_ms:
                    # Logged once the answer is written: the first 450 of a penalty is the
                    # one that must not wait for a JSON line (~50 µs, more on a busy box).
                    self.loop.call_soon(self._log_tempfail, verdict, ip)
                if "\n" in reply:  # one line, or the stream would be out of step
                    reply = reply.replace("\r", " ").replace("\n", " ")
                return f"action={reply}\n\n".encode()
        stats.dunno += 1
        if state == "RCPT" and self.report_accepted:
            # Keyed by what the report will carry: a 60 KB HELO is not held whole while
            # it waits (10,000 keys of those would be 600 MB).
            helo, sender, _ = bound_client(helo, sender)
            key = (ip[:64], helo, sender)
            waiting = self._accepted
            report = waiting.get(key)
            if report is not None:
                count = report.counts[0]
                if count.n < MAX_COUNT:
                    count.n += 1
            else:
                if not waiting:
                    self._report_timer = self.loop.call_later(self.report_every, self.flush_reports)
                elif len(waiting) >= REPORT_KEYS_MAX:
                    self.flush_reports()
                    waiting = self._accepted
                    self._report_timer = self.loop.call_later(self.report_every, self.flush_reports)
                # Built here, at the key's first RCPT, not all together in the flush: a
                # flush that built a few hundred reports at once held every connection's
                # answer for 1-5 ms, a hundred times a second (issue 11).
                waiting[key] = pb.ReportRequest(
                    client=client_msg(ip, helo, sender), counts=_ONE_ACCEPTED
                )
            self._waiting_recipients += 1
        return DUNNO

    def flush_reports(self) -> None:
        """Hand the accepted recipients counted since the last flush to the reporter:
        one report per (address, HELO, sender) with its count, so a message's RCPTs
        are one report and the reporter's Session messages are full batches."""
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        waiting, self._accepted = self._accepted, {}
        self.stats.accepted += self._waiting_recipients
        self._waiting_recipients = 0
        if waiting:
            self.reporter.enqueue_accepted(list(waiting.values()))

    async def flush(self, within: float = 5.0) -> bool:
        """Every accepted recipient so far reported and acknowledged (for tests, shutdown)."""
        self.flush_reports()
        return await self.reporter.flush(within)

    def _log_tempfail(self, verdict: pb.Verdict, ip: str) -> None:
        """One line per penalty and identity (its first 4xx), not one per request: a
        penalized client asks again at every RCPT. `policyd_stats` counts them all."""
        seen = self._logged_penalties
        if seen.get(verdict.identity) == verdict.expires_at_unix_ms:
            return
        if len(seen) >= _LOGGED_PENALTIES_MAX:
            seen.clear()
        seen[verdict.identity] = verdict.expires_at_unix_ms
        log.info(
            "policy_tempfail",
            client_address=ip,
            identity=verdict.identity,
            seconds=verdict.seconds_left,
        )


async def serve(args: argparse.Namespace) -> None:
    route_stdlib_logs(args.log_level)  # the client library's warnings as JSON lines too
    soft_before, soft, hard = raise_fd_limit()
    budget = soft if soft != resource.RLIM_INFINITY else 1 << 20
    max_connections = args.max_connections or default_max_connections(budget)
    if max_connections > budget - FD_RESERVE:
        lowered = max(1, budget - FD_RESERVE)
        log.warning(
            "policyd_max_connections_lowered",
            asked=max_connections,
            max_connections=lowered,
            fd_limit=budget,
        )
        max_connections = lowered
    log.info(
        "policyd_fd_limit",
        soft_before=_limit(soft_before),
        soft=_limit(soft),
        hard=_limit(hard),
        max_connections=max_connections,
    )
    client = AsyncPenaltyClient(
        args.penaltyd, deadline=args.deadline, live_replica=not args.no_live_replica
    )
    client.start()
    stages = tuple(s.strip().upper() for s in args.stage.split(",") if s.strip())
    policy = PolicyServer(
        client,
        stages=stages,
        report_accepted=not args.no_report_accepted,
        idle_timeout=args.idle_timeout,
        max_connections=max_connections,
        coalesce=args.coalesce_us / 1e6,
        report_every=args.report_interval_ms / 1000,
        report_batch=args.report_batch,
    )
    policy.reporter.start()
    milter = _milter(args, policy.reporter) if args.milter_listen else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stats_task: asyncio.Task[None] | None = None
    try:
        server = await policy.listen(args.listen)
        where = ", ".join(str(s.getsockname()) for s in server.sockets)
        log.info("policyd_started", listen=where, penaltyd=args.penaltyd, stages=list(stages))
        if milter is not None:
            address = await milter.start(args.milter_listen)
            log.info("milter_started", listen=address, shared_with="penalty-policyd")
        tune_gc()  # after start-up, so what start-up built is frozen too
        stats_task = asyncio.create_task(_log_stats(policy, args.stats_interval))
        await stop.wait()
    finally:
        if stats_task is not None:
            stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats_task
        if milter is not None:
            await milter.close(drain=2.0)
        await policy.close()
        dropped = await flush_at_exit(policy.reporter, args.flush_seconds, "policyd")
        await client.close()
        log.info("policyd_stopped", **_stats_fields(policy), reports_pending_dropped=dropped)


def _milter(args: argparse.Namespace, reporter: SessionReporter) -> PenaltyMilter:
    """penalty-milter in this process, on the same client: its reports' verdicts reach
    this process's live replica at once, so the RCPT after the one that starts a penalty
    already meets the 450 (no feed round trip), and one Session stream carries both."""
    return PenaltyMilter(reporter, None, MilterOptions(report_accepted=args.no_report_accepted))


def _stats_fields(policy: PolicyServer) -> dict[str, object]:
    s, r = policy.stats, policy.reporter
    return {
        "requests": s.requests,
        "tempfails": s.tempfails,
        "dunno": s.dunno,
        "garbage": s.garbage,
        "overflows": s.overflows,
        "degraded": s.degraded,
        "accepted_reported": s.accepted,
        "refused_checks": s.refused_checks,
        "errors": s.errors,
        "connections": s.connections,
        "open_connections": s.open_connections,
        "refused_connections": s.refused_connections,
        "idle_closed": s.idle_closed,
        "write_paused": s.write_paused,
        "coalesced": s.coalesced,
        "reports_sent": r.acked,
        "reports_dropped": r.dropped,
        "reports_expired": r.expired,
        # `is not None`: a replica holding no penalty has len() 0 and is falsy, which made
        # an idle, synced replica read `live_replica: false` (issue 11).
        "live_replica": policy.client.replica is not None and policy.client.replica.synced,
    }


async def _log_stats(policy: PolicyServer, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        log.info("policyd_stats", **_stats_fields(policy))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="penalty-policyd",
        description="Postfix policy server (check_policy_service) answering penaltyd's tempfails.",
        epilog=(
            "main.cf: smtpd_recipient_restrictions = ..., reject_unauth_destination, "
            "check_policy_service { inet:127.0.0.1:10040, timeout=1s, default_action=DUNNO, "
            "try_limit=1 }, ..."
        ),
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:10040",
        help="HOST:PORT, or a unix socket path (default 127.0.0.1:10040)",
    )
    p.add_argument(
        "--penaltyd",
        default=os.environ.get("PENALTYD_ADDRESS", "127.0.0.1:50051"),
        help="penaltyd HOST:PORT[,HOST:PORT...] or dns:///name:port (env PENALTYD_ADDRESS)",
    )
    p.add_argument(
        "--stage",
        default="RCPT",
        help="protocol states to answer at, comma-separated (default RCPT; others get DUNNO)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=0.25,
        help="seconds to wait for penaltyd before answering DUNNO (default 0.25)",
    )
    p.add_argument(
        "--no-live-replica",
        action="store_true",
        help="ask penaltyd for every check instead of keeping active penalties in memory",
    )
    p.add_argument(
        "--no-report-accepted",
        action="store_true",
        help="do not report recipients that reach the policy check as accepted",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=0,
        help=f"connections served at once; more are accepted and closed, Postfix then "
        f"uses default_action (default {DEFAULT_MAX_CONNECTIONS}, kept {FD_RESERVE} below "
        "the open-files limit, which is raised to its hard limit at start)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        help="seconds before an idle connection is closed (default 300)",
    )
    p.add_argument(
        "--coalesce-us",
        type=int,
        default=COALESCE_DEFAULT_US,
        metavar="MICROSECONDS",
        help="while requests come faster than one per this long, pause this long after a "
        f"wake-up that answered fewer than {COALESCE_BELOW}, so requests arriving meanwhile "
        "are read together: about a fifth less CPU per request at a steady rate, at "
        f"most this much added latency; 0 disables (default {COALESCE_DEFAULT_US}, at "
        "most 5000)",
    )
    p.add_argument(
        "--report-interval-ms",
        type=int,
        default=REPORT_EVERY_MS,
        metavar="MS",
        help="accepted recipients are counted per (client, HELO, sender) this long, then "
        f"sent as one report each; errors never wait for it (default {REPORT_EVERY_MS}, "
        "1-1000)",
    )
    p.add_argument(
        "--report-batch",
        type=int,
        default=REPORT_BATCH,
        metavar="N",
        help="reports per Session message: each is one burst of penaltyd's work, which "
        "delays this host's answers when penaltyd runs beside it; a remote penaltyd may "
        f"take more per message for a little less CPU (default {REPORT_BATCH}, 1-1000)",
    )
    p.add_argument(
        "--milter-listen",
        metavar="HOST:PORT",
        help="also serve penalty-milter here, in this process (recommended: one client, one "
        "live replica, one report stream; the milter then reports each RCPT the policy "
        "check does not, see --no-report-accepted)",
    )
    p.add_argument(
        "--flush-seconds",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="on SIGTERM, after the open connections are closed, how long queued reports "
        "may take to reach penaltyd; the rest are logged as dropped (default 2)",
    )
    p.add_argument(
        "--stats-interval", type=float, default=60.0, help="seconds between stats log lines"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log threshold",
    )
    add_log_address_arguments(p, env_prefix="PENALTYD")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    stages = {s.strip().upper() for s in args.stage.split(",") if s.strip()}
    if not stages or not stages <= set(STATES):
        print(f"penalty-policyd: --stage must be among {', '.join(STATES)}", file=sys.stderr)
        return 2
    for flag, value, lo, hi in (
        ("--report-interval-ms", args.report_interval_ms, 1, 1000),
        ("--report-batch", args.report_batch, 1, 1000),
        ("--coalesce-us", args.coalesce_us, 0, 5000),
    ):
        if not lo <= value <= hi:
            print(f"penalty-policyd: {flag} must be between {lo} and {hi}", file=sys.stderr)
            return 2
    if args.max_connections < 0 or args.idle_timeout <= 0 or args.flush_seconds < 0:
        print("penalty-policyd: --max-connections, --idle-timeout and --flush-seconds must "
              "be positive", file=sys.stderr)  # fmt: skip
        return 2
    return run_program(
        "penalty-policyd", args.log_level, lambda: serve(args), **log_address_options(args)
    )


if __name__ == "__main__":
    sys.exit(main())
