"""The RFC 2505 relay battery: does a host accept mail for domains it has no business with?

Each test is one envelope (MAIL FROM, RCPT TO) built to slip past a naive relay check:
the address forms RFC 2505 section 2 asks a relay to refuse (`%`-hack, `!`-paths,
source routes, quoted local parts, double `@`, IP-literal domains) and the senders
spammers forge (null, local, unqualified, IP literal). A test *relayed* when the host
answered RCPT with 2xx; the battery never sends DATA, so nothing is ever delivered: each
envelope is dropped with RSET and the session ends with QUIT.

Bounded: every command has its own timeout (`step_timeout`), the whole battery a budget;
tests the budget does not reach are reported SKIPPED. A timeout, a 421 or a broken
connection leaves the SMTP dialogue out of step, so the next test starts on a fresh
connection (at most `max_connections` in all).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from relaycheck.headers import parse_address


class Result(enum.IntEnum):
    """Mirrors relaycheck.v1.ProbeTest.Result (same numbers)."""

    UNSPECIFIED = 0
    REFUSED = 1
    ACCEPTED = 2
    TIMEOUT = 3
    ERROR = 4
    SKIPPED = 5


@dataclass(frozen=True, slots=True)
class RelayTest:
    name: str
    mail_from: str  # templates: {F} foreign domain, {L} local domain, {IP} target literal
    rcpt_to: str
    why: str


# RFC 2505 section 2 and the classic relay-test batteries. "victim" at the foreign
# domain is where relayed mail would go; `.invalid` (RFC 2606) can never be delivered.
TESTS: tuple[RelayTest, ...] = (
    RelayTest("plain", "relaytest@{F}", "victim@{F}", "foreign sender, foreign recipient"),
    RelayTest("null_sender", "", "victim@{F}", "null sender <> (bounces are often let through)"),
    RelayTest("local_sender", "postmaster@{L}", "victim@{F}", "forged local sender"),
    RelayTest("unqualified_sender", "postmaster", "victim@{F}", "sender without a domain"),
    RelayTest("ip_literal_sender", "postmaster@{IP}", "victim@{F}", "sender at the host's IP"),
    RelayTest("percent_hack", "relaytest@{F}", "victim%{F}@{L}", "%-hack via the local domain"),
    RelayTest("percent_hack_ip", "relaytest@{F}", "victim%{F}@{IP}", "%-hack via the IP literal"),
    RelayTest("quoted_local_part", "relaytest@{F}", '"victim@{F}"', "quoted foreign address"),
    RelayTest("quoted_at_local", "relaytest@{F}", '"victim@{F}"@{L}', "quoted address @local"),
    RelayTest("quoted_percent", "relaytest@{F}", '"victim%{F}"@{L}', "quoted %-hack @local"),
    RelayTest("source_route", "relaytest@{F}", "@{L}:victim@{F}", "source route via local"),
    RelayTest("source_route_ip", "relaytest@{F}", "@{IP}:victim@{F}", "source route via IP"),
    RelayTest("double_at", "relaytest@{F}", "victim@{F}@{L}", "double @"),
    RelayTest("bang_path", "relaytest@{F}", "{F}!victim", "UUCP !-path"),
    RelayTest("bang_path_local", "relaytest@{F}", "{F}!victim@{L}", "!-path @local"),
    RelayTest("bang_path_ip", "relaytest@{F}", "{F}!victim@{IP}", "!-path @IP literal"),
    RelayTest("ip_literal_recipient", "relaytest@{F}", "victim@[192.0.2.1]", "foreign IP literal"),
)
TEST_NAMES = frozenset(t.name for t in TESTS)
MAX_REPLY_LINES = 100  # a multi-line reply longer than this is not SMTP


@dataclass(slots=True)
class TestResult:
    name: str
    mail_from: str
    rcpt_to: str
    result: Result = Result.SKIPPED
    mail_code: int = 0
    rcpt_code: int = 0
    reply: str = ""
    elapsed_ms: int = 0


@dataclass(slots=True)
class ProbeReport:
    host: str
    port: int
    tests: list[TestResult] = field(default_factory=list)
    banner: str = ""
    local_domain: str = ""
    elapsed_ms: int = 0
    budget_exhausted: bool = False
    error: str = ""

    @property
    def relaying(self) -> bool:
        return any(t.result == Result.ACCEPTED for t in self.tests)

    @property
    def relayed_tests(self) -> list[str]:
        return [t.name for t in self.tests if t.result == Result.ACCEPTED]


class _Broken(Exception):
    """The connection cannot carry on (closed, 421, garbage): start a new one."""


class _Session:
    """One SMTP connection with per-command timeouts clipped to the battery's deadline."""

    def __init__(self, step: float, deadline: float) -> None:
        self.step = step
        self.deadline = deadline
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.peer_ip = ""

    def _timeout(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("budget exhausted")
        return min(self.step, left)

    async def open(self, host: str, port: int) -> tuple[int, str]:
        async with asyncio.timeout(self._timeout()):
            self.reader, self.writer = await asyncio.open_connection(host, port, limit=4096)
        peer = self.writer.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) else ""
        return await self.reply()

    async def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and its lines joined."""
        assert self.reader is not None
        lines: list[str] = []
        async with asyncio.timeout(self._timeout()):
            while len(lines) < MAX_REPLY_LINES:
                try:
                    raw = await self.reader.readline()
                except (ValueError, asyncio.LimitOverrunError) as exc:
                    raise _Broken(f"reply line too long: {exc}") from exc
                if not raw:
                    raise _Broken("connection closed by the server")
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if len(line) < 3 or not line[:3].isdigit():
                    raise _Broken(f"not an SMTP reply: {line[:80]!r}")
                lines.append(line)
                if line[3:4] != "-":
                    code = int(line[:3])
                    if code == 421:
                        raise _Broken(line)
                    return code, "\n".join(lines)
        raise _Broken("reply with too many lines")

    async def command(self, line: str) -> tuple[int, str]:
        assert self.writer is not None
        self.writer.write(line.encode("utf-8", errors="replace") + b"\r\n")
        async with asyncio.timeout(self._timeout()):
            await self.writer.drain()
        return await self.reply()

    async def close(self, quit: bool) -> None:
        if self.writer is None:
            return
        if quit:
            with contextlib.suppress(Exception):
                await self.command("QUIT")
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        self.writer = self.reader = None


def _banner_domain(banner: str) -> str:
    """The host name a greeting or EHLO reply announces ("220 mx.example.com ESMTP")."""
    first = banner.split("\n", 1)[0][4:].split()
    name = first[0].strip("[]").rstrip(".") if first else ""
    return name if "." in name and len(name) <= 253 else ""


def _literal(ip: str) -> str:
    addr = parse_address(ip)
    if addr is None:
        return "[127.0.0.1]"
    return f"[IPv6:{addr}]" if addr.version == 6 else f"[{addr}]"


async def run_battery(
    host: str,
    port: int = 25,
    *,
    step_timeout: float = 5.0,
    budget: float = 60.0,
    helo: str = "relaycheck.invalid",
    local_domain: str = "",
    foreign_domain: str = "relay-test.invalid",
    tests: Sequence[str] = (),
    max_connections: int = 5,
) -> ProbeReport:
    """Run the battery against host:port; never raises for anything the server does."""
    start = time.monotonic()
    deadline = start + budget
    selected = [t for t in TESTS if not tests or t.name in tests]
    report = ProbeReport(host, port)
    session: _Session | None = None
    connections = 0
    literal = ""
    local = local_domain

    async def connect() -> _Session:
        nonlocal connections, literal, local
        connections += 1
        s = _Session(step_timeout, deadline)
        try:
            code, banner = await s.open(host, port)
            if not report.banner:
                report.banner = banner.split("\n", 1)[0][:512]
            if code != 220:
                raise _Broken(f"greeting {banner[:200]!r}")
            literal = literal or _literal(s.peer_ip or host)
            code, text = await s.command(f"EHLO {helo}")
            if code >= 500:
                code, text = await s.command(f"HELO {helo}")
            if code != 250:
                raise _Broken(f"EHLO/HELO refused: {text[:200]!r}")
        except BaseException:
            await s.close(quit=False)
            raise
        local = local or _banner_domain(banner) or _banner_domain(text) or literal
        return s

    for test in selected:
        result = TestResult(test.name, "", "")
        report.tests.append(result)
        t0 = time.monotonic()
        if t0 >= deadline:
            report.budget_exhausted = True
            continue
        if report.error:
            continue  # the host cannot be reached: the rest stays SKIPPED
        try:
            if session is None:
                if connections >= max_connections:
                    report.error = f"gave up after {connections} broken connections"
                    raise _Broken(report.error)
                try:
                    session = await connect()
                except TimeoutError:
                    report.error = "the server did not greet or answer EHLO in time"
                    raise
                except (_Broken, OSError) as exc:
                    report.error = str(exc)[:512] or type(exc).__name__
                    raise
            fill = {"F": foreign_domain, "L": local, "IP": literal}
            result.mail_from = test.mail_from.format(**fill)
            result.rcpt_to = test.rcpt_to.format(**fill)
            code, text = await session.command(f"MAIL FROM:<{result.mail_from}>")
            result.mail_code, result.reply = code, text[:512]
            if code // 100 == 2:
                code, text = await session.command(f"RCPT TO:<{result.rcpt_to}>")
                result.rcpt_code, result.reply = code, text[:512]
                result.result = Result.ACCEPTED if code // 100 == 2 else Result.REFUSED
            else:
                result.result = Result.REFUSED
            await session.command("RSET")  # never DATA: drop the envelope
        except TimeoutError:
            if result.result == Result.SKIPPED:
                result.result = Result.TIMEOUT
                result.reply = result.reply or "no answer in time"
            if time.monotonic() >= deadline:
                report.budget_exhausted = True
            if session is not None:
                await session.close(quit=False)
            session = None
        except (_Broken, OSError) as exc:
            if result.result == Result.SKIPPED:
                result.result = Result.ERROR
                result.reply = result.reply or str(exc)[:512]
            if session is not None:
                await session.close(quit=False)
            session = None
        finally:
            result.elapsed_ms = int((time.monotonic() - t0) * 1000)
    if session is not None:
        with contextlib.suppress(TimeoutError):
            await session.close(quit=True)
    report.local_domain = local
    report.elapsed_ms = int((time.monotonic() - start) * 1000)
    return report
