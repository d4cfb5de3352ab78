"""`penalty-milter`: Postfix's own rejections, reported to penaltyd as they happen.

Why a milter: Postfix never tells a policy server (`penalty-policyd`) about the
recipients it rejects itself ("User unknown", "Relay access denied", a HELO or sender
restriction evaluated at RCPT), and those rejections are exactly the errors penaltyd
counts. A milter that negotiates SMFIP_RCPT_REJ is sent every RCPT, the rejected ones
marked with the macro `{rcpt_mailer}` = `error`, `{rcpt_host}` = the enhanced status code
and `{rcpt_addr}` = the reply text (Postfix `smtpd_milter.c`). We classify each one into
an `Outcome` and queue a report on one batched `Session` stream (`SessionReporter`):

- rejected RCPT -> its error kind (`classify_rejection`, table in docs/milter.md);
- accepted RCPT -> OUTCOME_ACCEPTED, the denominator (off with `--no-accepted` when
  penalty-policyd reports accepted recipients instead: one of the two, never both);
- an SMTP command Postfix did not recognise (mp.SMFIC_UNKNOWN) -> OUTCOME_PROTOCOL_VIOLATION.

Each report carries the HELO name and envelope sender, so penaltyd can tell the clients
behind a NAT-shared address apart. With `--tempfail-at-rcpt` the milter also asks
penaltyd (or its live replica) at every accepted RCPT and answers a penalized client
with the verdict's own 4xx reply, exact seconds left included, on the same connection.

Never a cause of lost mail: reporting is a non-blocking append to a bounded queue (drops
are counted), a check has a deadline and fails open, any error inside a command is
logged and answered "continue", and a connection that breaks the protocol is closed
(Postfix then applies `milter_default_action = accept`). One asyncio task per milter
connection; Postfix opens one milter connection per SMTP session.

Hostile input: what the SMTP client chose (HELO, sender) is bounded at the edge with
`penalty.identity.bound_client`, exactly as every other component bounds it, so a long
name maps to the same sub-identity everywhere; a connection keeps no recipient, only the
three RCPT macros of the recipient in progress (each value cut); packet sizes, open
connections and every wait are bounded by `milterkit.server`.

Layout: `milter_protocol` is the wire format (pure); here `classify_rejection` (pure),
`MilterSession` (one connection's state machine), `PenaltyMilter` (the server) and the
command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import ip_address

import structlog

from milterkit import protocol as mp
from milterkit.server import MilterServer, parse_listen
from penalty import outcomes
from penalty.identity import MAX_HELO, InvalidAddress, bound_client, bounded, parse_ip
from penalty.v1 import penalty_pb2 as pb
from penaltyclient.aio import AsyncPenaltyClient, PenaltydError, SessionReporter
from penaltyclient.channel import grpc_target
from penaltyclient.stdlog import route_stdlib_logs
from serving.cli import add_log_address_arguments, log_address_options, run_program

log = structlog.get_logger("penalty.milter")

# What we ask Postfix for: leave out headers, body, end-of-headers and DATA (we never look
# at content), and send the recipients it rejected itself. CONNECT, HELO, MAIL, RCPT and
# UNKNOWN stay on; EOM cannot be switched off. Every command keeps its reply (no NR_*
# flags): our answers are immediate, and a reply per command keeps both sides in step.
WANTED_PROTOCOL = (
    mp.Proto.NOBODY | mp.Proto.NOHDRS | mp.Proto.NOEOH | mp.Proto.NODATA | mp.Proto.RCPT_REJ
)
# The macros we need, requested per stage (SMFIF_SETSYMLIST), so main.cf's milter_*_macros
# do not matter and Postfix sends nothing else. Postfix's default milter_rcpt_macros
# (i {rcpt_addr} {rcpt_host} {rcpt_mailer}) has them too, for MTAs without macro lists.
RCPT_MACROS = ("{rcpt_mailer}", "{rcpt_host}", "{rcpt_addr}")
SYMLISTS = {mp.SMFIM_ENVRCPT: RCPT_MACROS}
# The only macros kept (bare names), and only from a macro packet for RCPT.
RCPT_MACRO_NAMES = frozenset(name.strip("{}") for name in RCPT_MACROS)


# --- classification of rejected recipients (pure)

_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")
_RELAY = re.compile(r"relay(?:ing)? (?:access )?denied")
_SPF = re.compile(r"\bspf\b")


def classify_rejection(
    status: str, text: str, default: int = pb.OUTCOME_UNKNOWN_RECIPIENT
) -> int | None:
    """The error kind of a recipient Postfix rejected, or None when it is not the client's
    error to count.

    `status` is `{rcpt_host}` (the enhanced status code, e.g. "5.1.1"); `text` is
    `{rcpt_addr}` (the reply text after the recipient, e.g. "Recipient address rejected:
    User unknown in local recipient table"). First match wins:

    1. "blocked using" (reject_rbl_client, reject_rhsbl_*)          -> DNSBL_LISTED
    2. "Helo command rejected"                                      -> BAD_HELO
    3. "Sender address rejected", or SPF                            -> SENDER_REJECTED
    4. "Relay access denied"                                        -> RELAY_DENIED
    5. "User unknown", or a permanent x.1.1 (bad mailbox)           -> UNKNOWN_RECIPIENT
    6. any other *temporary* (4.x.x) rejection                      -> None (not counted:
       greylisting, DNS trouble, rate limits, "address verification in progress", and
       penaltyd's own 450 - a penalty must not feed itself)
    7. "Client host rejected" (access maps, unknown reverse name)   -> DNSBL_LISTED
    8. a permanent x.5.x (syntax, e.g. non-FQDN recipient)          -> PROTOCOL_VIOLATION
    9. anything else                                                -> `default`
    """
    low = text.lower()
    match = _STATUS.search(status)
    klass = match.group(1) if match else ""
    if "blocked using" in low:
        return pb.OUTCOME_DNSBL_LISTED
    if "helo command rejected" in low:
        return pb.OUTCOME_BAD_HELO
    if "sender address rejected" in low or _SPF.search(low):
        return pb.OUTCOME_SENDER_REJECTED
    if _RELAY.search(low):
        return pb.OUTCOME_RELAY_DENIED
    if "user unknown" in low or (klass == "5" and match and match.group(2, 3) == ("1", "1")):
        return pb.OUTCOME_UNKNOWN_RECIPIENT
    if klass == "4":
        return None
    if "client host rejected" in low:
        return pb.OUTCOME_DNSBL_LISTED
    if klass == "5" and match and match.group(2) == "5":
        return pb.OUTCOME_PROTOCOL_VIOLATION
    return default


def client_ip(conn: mp.Connect) -> str | None:
    """The client address of a CONNECT, normalised like penaltyd does, or None (unix
    socket, unknown family, or not an address)."""
    if conn.family not in (mp.SMFIA_INET, mp.SMFIA_INET6):
        return None
    text = conn.address
    if text[:5].lower() == "ipv6:":  # Sendmail's form; Postfix sends the bare address
        text = text[5:]
    try:
        return str(parse_ip(text.strip("[]")))
    except InvalidAddress:
        return None


# 4xx but not 421; an enhanced status code, if any, must be 4.x.x too (Postfix checks).
_TEMPFAIL_REPLY = re.compile(r"4(?!21)\d\d (?:4|(?!\d))")


def tempfail_reply(verdict: pb.Verdict, ip: str) -> bytes:
    """SMFIR_REPLYCODE for a penalty: the verdict's own reply when it is a proper 4xx
    (never a 5xx, never 421, which would close the connection), else ours with the same
    exact seconds."""
    text = verdict.smtp_reply
    if not _TEMPFAIL_REPLY.match(text):
        text = (
            f"450 4.7.1 too many SMTP errors from {ip}; "
            f"try again in {max(verdict.seconds_left, 1)} seconds"
        )
    try:
        return mp.reply_code(text)
    except ValueError:  # a CR/LF or NUL inside the server's text
        return mp.reply_code(f"450 4.7.1 try again in {max(verdict.seconds_left, 1)} seconds")


# --- the server


@dataclass(frozen=True)
class MilterOptions:
    tempfail_at_rcpt: bool = False  # answer penalized clients' RCPTs with the 4xx reply
    report_accepted: bool = True  # report accepted RCPTs (the denominator)
    ignore_loopback: bool = False  # 127.0.0.0/8 and ::1: nothing reported or checked
    default_outcome: int = pb.OUTCOME_UNKNOWN_RECIPIENT  # unrecognised permanent rejections
    check_timeout: float = 0.25  # hard cap on one check; then "continue" (fail open)
    idle_timeout: float = 3600.0  # a milter connection silent this long is dead
    packet_timeout: float = 30.0  # a packet must be complete this long after its length
    write_timeout: float = 30.0  # a reply the MTA has not read by then closes the connection
    max_frame: int = mp.MAX_FRAME  # larger packets close the connection (headers, body: more)
    max_connections: int = 1000  # open at once; more are closed at once


@dataclass
class MilterStats:
    connections: int = 0  # milter connections accepted since start
    active: int = 0  # open right now
    connections_refused: int = 0  # closed at once: max_connections were open
    rcpt_accepted: int = 0
    rcpt_rejected: Counter[str] = field(default_factory=Counter)  # by outcome name
    rcpt_ignored: int = 0  # rejected, but not an error to count (temporary, unrecognised)
    rcpt_tempfailed: int = 0  # our own 4xx at RCPT
    unknown_commands: int = 0
    unreported: int = 0  # events without a usable client address
    reports_queued: int = 0
    checks_degraded: int = 0  # checks answered fail-open (penaltyd slow or down)
    protocol_errors: int = 0  # connections closed for breaking the protocol
    handler_errors: int = 0  # unexpected errors inside a command (answered continue)


class MilterSession:
    """One milter connection: the SMTP client it describes and the message in progress.

    `handle` answers one packet (None for the commands that take no reply) and raises
    `mp.ProtocolError` when the packet is malformed; everything else is the server's job.
    """

    def __init__(self, milter: PenaltyMilter, peer: str) -> None:
        self.milter = milter
        self.peer = peer
        self.negotiation: mp.Negotiation | None = None
        self.done = False  # QUIT received
        self._reset_connection()

    def _reset_connection(self) -> None:
        self.ip: str | None = None
        self.hostname = ""
        self.helo = ""
        self._reset_message()

    def _reset_message(self) -> None:
        self.mail_from = ""
        # The macros of the RCPT to come (nothing else is kept): at most three values of
        # at most MAX_MACRO_VALUE bytes, used once.
        self._rcpt_macros: dict[str, str] = {}

    async def handle(self, frame: mp.Frame) -> bytes | None:
        cmd, data = frame
        if cmd == mp.SMFIC_MACRO:
            stage, values = mp.parse_macros(data, RCPT_MACRO_NAMES)
            if stage == mp.SMFIC_RCPT:
                self._rcpt_macros = values
            return None
        if cmd == mp.SMFIC_RCPT:
            return await self._rcpt(mp.parse_address(data))
        if cmd == mp.SMFIC_OPTNEG:
            return self._optneg(data)
        if cmd == mp.SMFIC_CONNECT:
            return self._connect(mp.parse_connect(data))
        if cmd == mp.SMFIC_HELO:
            # Bounded at the edge the way every component bounds it (same sub-identity).
            self.helo, self.mail_from, _ = bound_client(mp.parse_helo(data), self.mail_from)
            return mp.CONTINUE
        if cmd == mp.SMFIC_MAIL:
            sender = mp.strip_brackets(mp.parse_address(data))
            self.helo, self.mail_from, _ = bound_client(self.helo, sender)
            return mp.CONTINUE
        if cmd == mp.SMFIC_UNKNOWN:
            line = mp.parse_unknown(data)
            self.milter.stats.unknown_commands += 1
            log.debug("milter_unknown_command", ip=self.ip, command=line[:80])
            self._report(pb.OUTCOME_PROTOCOL_VIOLATION)
            return mp.CONTINUE
        if cmd == mp.SMFIC_BODYEOB:
            self._reset_message()
            return mp.CONTINUE
        if cmd in (mp.SMFIC_DATA, mp.SMFIC_HEADER, mp.SMFIC_EOH, mp.SMFIC_BODY):
            return mp.CONTINUE  # negotiated away; answered if an MTA sends them anyway
        if cmd == mp.SMFIC_ABORT:
            self._reset_message()
            return None
        if cmd == mp.SMFIC_QUIT_NC:
            self._reset_connection()
            return None
        if cmd == mp.SMFIC_QUIT:
            self.done = True
            return None
        raise mp.ProtocolError(f"unknown milter command {cmd!r}")

    def _optneg(self, data: bytes) -> bytes:
        self.negotiation = mp.negotiate(mp.parse_optneg(data), WANTED_PROTOCOL, SYMLISTS)
        if mp.Proto.RCPT_REJ in self.negotiation.missing:
            self.milter.warn_no_rcpt_rej(self.negotiation)
        return self.negotiation.encode()

    def _connect(self, conn: mp.Connect) -> bytes:
        self._reset_connection()
        self.hostname = bounded(conn.hostname, MAX_HELO)  # a DNS name: at most 253
        self.ip = client_ip(conn)
        if self.ip is None or (
            self.milter.options.ignore_loopback and ip_address(self.ip).is_loopback
        ):
            # Nothing to report or check for this client (a local socket, no address, or
            # ignored): "accept" tells Postfix to send no more events for this connection.
            log.debug("milter_client_skipped", family=conn.family, address=conn.address[:64])
            return mp.ACCEPT
        return mp.CONTINUE

    async def _rcpt(self, rcpt: str) -> bytes:
        macros, self._rcpt_macros = self._rcpt_macros, {}  # never reuse one RCPT's macros
        stats = self.milter.stats
        if macros.get("rcpt_mailer") == "error":
            status, text = macros.get("rcpt_host", ""), macros.get("rcpt_addr", "")
            outcome = classify_rejection(status, text, self.milter.options.default_outcome)
            log.debug(
                "milter_rcpt_rejected",
                ip=self.ip,
                rcpt=rcpt[:128],
                status=status[:32],
                text=text[:200],
                outcome="ignored" if outcome is None else outcomes.NAMES.get(outcome, str(outcome)),
            )
            if outcome is None:
                stats.rcpt_ignored += 1
            else:
                stats.rcpt_rejected[outcomes.NAMES.get(outcome, str(outcome))] += 1
                self._report(outcome)
            return mp.CONTINUE  # Postfix has rejected it already; our answer is not used
        if self.milter.options.tempfail_at_rcpt:
            reply = await self._penalty_reply()
            if reply is not None:
                stats.rcpt_tempfailed += 1
                return reply
        stats.rcpt_accepted += 1
        if self.milter.options.report_accepted:
            self._report(pb.OUTCOME_ACCEPTED)
        return mp.CONTINUE

    async def _penalty_reply(self) -> bytes | None:
        """The 4xx for a penalized client, or None; never waits past `check_timeout`."""
        checker = self.milter.checker
        if checker is None or self.ip is None:
            return None
        try:
            async with asyncio.timeout(self.milter.options.check_timeout):
                verdict = await checker.check(self.ip, self.helo, self.mail_from)
        except TimeoutError:
            self.milter.stats.checks_degraded += 1
            return None
        except PenaltydError as exc:  # penaltyd refused the input: still fail open
            log.warning("milter_check_refused", ip=self.ip, error=str(exc))
            return None
        if verdict.degraded:
            self.milter.stats.checks_degraded += 1
        if not verdict.tempfail:
            return None
        log.info(
            "milter_tempfail",
            ip=self.ip,
            identity=verdict.identity,
            seconds_left=verdict.seconds_left,
            helo=self.helo,
            mail_from=self.mail_from,
        )
        return tempfail_reply(verdict, self.ip)

    def _report(self, outcome: int) -> None:
        stats = self.milter.stats
        if self.ip is None:
            stats.unreported += 1
            return
        if self.milter.reporter.report(
            self.ip, {outcome: 1}, helo=self.helo, mail_from=self.mail_from
        ):
            stats.reports_queued += 1


class PenaltyMilter(MilterServer):
    """The milter server: one task per connection, shared reporter, stats and options."""

    def __init__(
        self,
        reporter: SessionReporter,
        checker: AsyncPenaltyClient | None = None,
        options: MilterOptions | None = None,
    ) -> None:
        super().__init__()
        self.options: MilterOptions = options or MilterOptions()
        if self.options.tempfail_at_rcpt and checker is None:
            raise ValueError("tempfail_at_rcpt needs a client to check with")
        self.reporter = reporter
        self.checker = checker
        self.stats: MilterStats = MilterStats()
        self._warned_rcpt_rej = False

    def session(self, peer: str) -> MilterSession:
        return MilterSession(self, peer)

    def warn_no_rcpt_rej(self, negotiation: mp.Negotiation) -> None:
        if not self._warned_rcpt_rej:
            self._warned_rcpt_rej = True
            log.warning(
                "milter_no_rejected_recipients",
                version=negotiation.version,
                note="the MTA does not offer SMFIP_RCPT_REJ (milter_protocol = 6 needed): "
                "only accepted recipients and unknown commands are reported",
            )

    def stats_fields(self) -> dict[str, object]:
        s, r = self.stats, self.reporter
        replica = self.checker.replica if self.checker is not None else None
        return {
            "connections": s.connections,
            "active": s.active,
            "connections_refused": s.connections_refused,
            "rcpt_accepted": s.rcpt_accepted,
            "rcpt_rejected": dict(s.rcpt_rejected),
            "rcpt_ignored": s.rcpt_ignored,
            "rcpt_tempfailed": s.rcpt_tempfailed,
            "unknown_commands": s.unknown_commands,
            "unreported": s.unreported,
            "checks_degraded": s.checks_degraded,
            "protocol_errors": s.protocol_errors,
            "handler_errors": s.handler_errors,
            "reports_queued": s.reports_queued,
            "reports_sent": r.acked,
            "reports_pending": r.pending,
            "reports_dropped": r.dropped,
            "reports_expired": r.expired,
            "reports_rejected": r.rejected,
            "live_replica": bool(replica is not None and replica.synced),
        }

    async def log_stats_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            log.info("milter_stats", **self.stats_fields())


# --- the command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="penalty-milter",
        description=(
            "Milter for Postfix (smtpd_milters) that reports the recipients Postfix rejects "
            "(SMFIP_RCPT_REJ), accepted recipients and unknown SMTP commands to penaltyd, "
            "and optionally tempfails penalized clients at RCPT. Fails open: penaltyd "
            "being slow or down never delays or loses mail."
        ),
        epilog=(
            "main.cf: `smtpd_milters = inet:127.0.0.1:10041`, `milter_default_action = "
            "accept` (Postfix's default is tempfail), `milter_protocol = 6` (the default). "
            "No macro settings are needed. See docs/milter.md."
        ),
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:10041",
        metavar="HOST:PORT|unix:/path",
        help="where Postfix connects (default 127.0.0.1:10041)",
    )
    p.add_argument(
        "--penaltyd",
        default=os.environ.get("PENALTYD_ADDRESS", "127.0.0.1:50051"),
        metavar="HOST:PORT[,...]",
        help="penaltyd replicas, comma-separated, or dns:///name:port "
        "(env PENALTYD_ADDRESS; default 127.0.0.1:50051)",
    )
    p.add_argument(
        "--tempfail-at-rcpt",
        action="store_true",
        help="check every accepted RCPT and answer a penalized client with penaltyd's "
        "4xx reply (exact seconds left); off: report only",
    )
    p.add_argument(
        "--live-replica",
        action="store_true",
        help="with --tempfail-at-rcpt: keep active penalties in memory (WatchPenalties) "
        "and answer checks in-process",
    )
    p.add_argument(
        "--no-accepted",
        action="store_true",
        help="do not report accepted recipients (use when penalty-policyd reports them; "
        "one of the two must, never both)",
    )
    p.add_argument(
        "--ignore-loopback",
        action="store_true",
        help="report and check nothing for 127.0.0.0/8 and ::1 (local submissions); "
        "default: loopback clients count like any other",
    )
    p.add_argument(
        "--default-outcome",
        default="unknown_recipient",
        choices=sorted(outcomes.ERROR_NAMES),
        metavar="KIND",
        help="error kind for a permanent rejection no rule recognises, one of "
        f"{', '.join(sorted(outcomes.ERROR_NAMES))} (default unknown_recipient)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=0.2,
        metavar="SECONDS",
        help="how long a check may wait for penaltyd before the RCPT is let through (default 0.2)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=50_000,
        metavar="N",
        help="reports buffered while penaltyd is unreachable; more are dropped and "
        "counted (default 50000)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        metavar="N",
        help="milter connections open at once (one per SMTP session); more are closed at "
        "once, so Postfix applies milter_default_action to them (default 1000)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="close a milter connection silent this long (default 3600: an SMTP session "
        "may sit in DATA, where this milter gets no packets, for a long time)",
    )
    p.add_argument(
        "--write-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="close a milter connection whose peer has not read our reply within this "
        "(default 30, Postfix's milter_command_timeout); a packet must also be complete "
        "this long after its length",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM, how long open milter connections may finish (default 5)",
    )
    p.add_argument(
        "--flush-seconds",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="on SIGTERM, after the drain, how long queued reports may take to reach "
        "penaltyd; the rest are logged as dropped (default 2)",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds between milter_stats log lines (default 60)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log threshold (default info; debug logs every rejected recipient)",
    )
    add_log_address_arguments(p, env_prefix="PENALTYD")
    return p


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then drain connections, flush reports and return 0."""
    route_stdlib_logs(args.log_level)  # the client library's warnings as JSON lines too
    client = AsyncPenaltyClient(
        args.penaltyd,
        deadline=args.deadline,
        live_replica=args.live_replica and args.tempfail_at_rcpt,
    )
    client.start()
    reporter = client.reporter(max_queue=args.max_queue)
    reporter.start()
    options = MilterOptions(
        tempfail_at_rcpt=args.tempfail_at_rcpt,
        report_accepted=not args.no_accepted,
        ignore_loopback=args.ignore_loopback,
        default_outcome=outcomes.number(args.default_outcome),
        check_timeout=args.deadline + 0.05,
        idle_timeout=args.idle_timeout,
        packet_timeout=args.write_timeout,
        write_timeout=args.write_timeout,
        max_connections=args.max_connections,
    )
    milter = PenaltyMilter(reporter, client if args.tempfail_at_rcpt else None, options)
    # The handlers first: a SIGTERM from the moment we listen (a supervisor that saw the
    # start line) must get the graceful drain, never Python's default (killed, exit -15).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        address = await milter.start(args.listen)
    except OSError:  # named by the server: run_program prints it as one line, exit 2
        await reporter.close(within=0)
        await client.close()
        raise
    log.info(
        "milter_started",
        listen=address,
        penaltyd=args.penaltyd,
        tempfail_at_rcpt=options.tempfail_at_rcpt,
        report_accepted=options.report_accepted,
    )
    stats_task = asyncio.create_task(milter.log_stats_forever(args.stats_interval))
    try:
        await stop.wait()
        log.info("milter_stopping", drain_seconds=args.drain_seconds, active=milter.stats.active)
    finally:
        stats_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stats_task
        await milter.close(drain=args.drain_seconds)
        await shut_reporter(milter, reporter, args.flush_seconds)
        await client.close()
    return 0


async def shut_reporter(milter: PenaltyMilter, reporter: SessionReporter, within: float) -> None:
    """Stop the reporter (`flush_at_exit`), then the stop line, whose
    `reports_pending_dropped` replaces `reports_pending`."""
    dropped = await flush_at_exit(reporter, within, "milter")
    fields = milter.stats_fields()
    fields.pop("reports_pending")
    log.info("milter_stopped", **fields, reports_pending_dropped=dropped)


async def flush_at_exit(reporter: SessionReporter, within: float, program: str) -> int:
    """Send the queued reports for up to `within` seconds, stop the reporter, and return
    how many penaltyd had not acknowledged: they are lost with the process (one in flight
    may still have been stored). A `<program>_reports_dropped_at_exit` warning names them
    when there are any; the sidecar's stop line counts them (`reports_pending_dropped`).
    One place for penalty-milter and penalty-policyd."""
    await reporter.flush(within=within)
    await reporter.close(within=0)
    dropped = reporter.pending
    if dropped:
        log.warning(
            f"{program}_reports_dropped_at_exit",
            reports=dropped,
            flush_seconds=within,
            note="not acknowledged by penaltyd in time; lost with this process",
        )
    return dropped


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.live_replica and not args.tempfail_at_rcpt:
        print(
            "penalty-milter: --live-replica only matters with --tempfail-at-rcpt; ignored",
            file=sys.stderr,
        )
    try:
        parse_listen(args.listen)
        grpc_target(args.penaltyd)
    except ValueError as exc:
        print(f"penalty-milter: {exc}", file=sys.stderr)
        return 2
    return run_program(
        "penalty-milter", args.log_level, lambda: run(args), **log_address_options(args)
    )


if __name__ == "__main__":
    sys.exit(main())
