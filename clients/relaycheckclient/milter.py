"""`relaycheck-milter`: the smart relay asks relaycheck at end of headers.

Classify needs the `Received:` chain, and a Postfix smart relay only has the headers
once DATA has started, so the question is asked from a milter at end of headers
(mp.SMFIC_EOH): the connecting customer relay's address (CONNECT), its HELO, the envelope
(MAIL, RCPT) and the header block go to `RelayCheck.Classify`; a
VERDICT_RELAYED_THIRD_PARTY is answered with the configured reply (451 4.7.1 by default:
a temporary refusal on the customer's behalf, RFC 2505 section 1.6), anything else with
"continue".

Never a cause of lost mail (DESIGN.md section 8): Classify has a deadline and any error
or timeout is "continue"; relaycheck itself fails open (UNDETERMINED) when its store is
down; a milter connection that breaks the protocol is closed, and Postfix applies
`milter_default_action = accept`. `--dry-run` classifies and logs without refusing and
without reporting to penaltyd, for a first week in production.

The wire format is `milterkit.protocol` (one implementation for both milters);
this module is the relaycheck conversation on top of it. Postfix main.cf on the smart
relay::

    smtpd_milters = inet:127.0.0.1:10042
    milter_default_action = accept
    milter_protocol = 6
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from milterkit import protocol as mp
from milterkit.server import MilterServer, parse_listen
from penalty.identity import InvalidAddress, parse_ip
from relaycheck.v1 import relaycheck_pb2 as pb
from relaycheck.v1 import relaycheck_pb2_grpc as pbg
from serving.cli import add_log_address_arguments, log_address_options, run_program

log = structlog.get_logger("relaycheck.milter")

# Headers are what we came for; the body, DATA and unknown commands are not. Headers
# are not answered one by one when the MTA allows it (NR_HDR): fewer round trips.
WANTED_PROTOCOL = mp.Proto.NOBODY | mp.Proto.NODATA | mp.Proto.NOUNKNOWN | mp.Proto.NR_HDR
SYMLISTS = {mp.SMFIM_ENVFROM: ("{auth_authen}",)}  # the SASL login, for --customer-from-auth
DEFAULT_REPLY = (
    "451 4.7.1 Relaying denied for {customer}: this message came from {origin}, "
    "not from {customer}'s users (open relay?)"
)
_REPLY = re.compile(r"(?!421)[45]\d\d \d\.\d{1,3}\.\d{1,3} ")


def check_reply(template: str) -> str:
    """A one-line 4xx/5xx (never 421: it closes the connection) with only {origin} and
    {customer} placeholders; raises ValueError otherwise."""
    if not _REPLY.match(template):
        raise ValueError("must start with a 4xx or 5xx code (not 421) and an enhanced status")
    try:
        mp.reply_code(template.format(origin="192.0.2.1", customer="x"))
    except (KeyError, IndexError) as exc:
        raise ValueError(f"only {{origin}} and {{customer}} may be used: {exc}") from exc
    return template


def connect_ip(conn: mp.Connect) -> str:
    """The client address of a CONNECT, or "" (unix socket, unknown family, garbage)."""
    if conn.family not in (mp.SMFIA_INET, mp.SMFIA_INET6):
        return ""
    text = conn.address
    if text[:5].lower() == "ipv6:":  # Sendmail's form; Postfix sends the bare address
        text = text[5:]
    try:
        return str(parse_ip(text.strip("[]")))
    except InvalidAddress:
        return ""


@dataclass(frozen=True)
class MilterOptions:
    reply: str = DEFAULT_REPLY  # template for relayed mail
    deadline: float = 0.5  # seconds Classify may take; then "continue"
    dry_run: bool = False  # classify and log, never refuse, never report
    customer_from_auth: bool = False  # the SASL login ({auth_authen}) names the customer
    max_header_bytes: int = 256 * 1024  # header bytes sent; the newest come first
    idle_timeout: float = 3600.0  # a silent milter connection is dead
    packet_timeout: float = 30.0  # a packet started must be complete within this
    write_timeout: float = 30.0  # a reply the MTA has not read by then closes the connection
    max_frame: int = mp.MAX_FRAME
    max_connections: int = 1000  # more are closed at once (milter_default_action)


@dataclass
class MilterStats:
    connections: int = 0
    active: int = 0
    connections_refused: int = 0  # closed at once: max_connections were open
    classified: dict[str, int] = field(default_factory=dict)  # by verdict name
    refused: int = 0  # relayed messages answered with the reply
    failed_open: int = 0  # Classify errors and timeouts answered "continue"
    protocol_errors: int = 0
    handler_errors: int = 0


class MilterSession:
    """One milter connection (one SMTP session of the smart relay)."""

    def __init__(self, milter: RelayMilter) -> None:
        self.milter = milter
        self.negotiation: mp.Negotiation | None = None
        self.done = False
        self.header_replies = True
        self._reset_connection()

    def _reset_connection(self) -> None:
        self.ip = ""
        self.helo = ""
        self._reset_message()

    def _reset_message(self) -> None:
        self.mail_from = ""
        self.auth = ""
        self.rcpts: list[str] = []
        self.headers = bytearray()
        self.headers_cut = False
        self._macros: dict[bytes, dict[str, str]] = {}

    async def handle(self, frame: mp.Frame) -> bytes | None:
        cmd, data = frame
        if cmd == mp.SMFIC_MACRO:
            stage, values = mp.parse_macros(data, ("auth_authen",))  # the only one used
            if stage == mp.SMFIC_MAIL:  # the only stage read: others would pile up
                self._macros[stage] = values
            return None
        if cmd == mp.SMFIC_HEADER:
            self._header(data)
            return mp.CONTINUE if self.header_replies else None
        if cmd == mp.SMFIC_EOH:
            return await self._eoh()
        if cmd == mp.SMFIC_RCPT:
            if len(self.rcpts) < 1000:
                self.rcpts.append(mp.strip_brackets(mp.parse_args(data)[0])[:512])
            return mp.CONTINUE
        if cmd == mp.SMFIC_MAIL:
            macros = self._macros.get(mp.SMFIC_MAIL, {})  # sent just before MAIL
            self._reset_message()
            self.mail_from = mp.strip_brackets(mp.parse_args(data)[0])[:512]
            self.auth = macros.get("auth_authen", "")[:128]
            return mp.CONTINUE
        if cmd == mp.SMFIC_OPTNEG:
            self.negotiation = mp.negotiate(mp.parse_optneg(data), WANTED_PROTOCOL, SYMLISTS)
            self.header_replies = mp.Proto.NR_HDR not in self.negotiation.protocol
            return self.negotiation.encode()
        if cmd == mp.SMFIC_CONNECT:
            self._reset_connection()
            self.ip = connect_ip(mp.parse_connect(data))
            return mp.CONTINUE if self.ip else mp.ACCEPT  # no address: nothing to ask about
        if cmd == mp.SMFIC_HELO:
            self.helo = mp.parse_helo(data)[:255]
            return mp.CONTINUE
        if cmd in (mp.SMFIC_BODYEOB, mp.SMFIC_ABORT):
            self._reset_message()
            return mp.CONTINUE if cmd == mp.SMFIC_BODYEOB else None
        if cmd in (mp.SMFIC_DATA, mp.SMFIC_BODY, mp.SMFIC_UNKNOWN):
            return mp.CONTINUE  # negotiated away; answered if an MTA sends them anyway
        if cmd == mp.SMFIC_QUIT_NC:
            self._reset_connection()
            return None
        if cmd == mp.SMFIC_QUIT:
            self.done = True
            return None
        raise mp.ProtocolError(f"unknown milter command {cmd!r}")

    def _header(self, data: bytes) -> None:
        strings = mp.cstrings(data)
        if len(strings) != 2:
            raise mp.ProtocolError("header packet without exactly a name and a value")
        if self.headers_cut:
            return
        name, value = strings
        sep = ":" if value[:1] in (" ", "\t") else ": "
        line = f"{name}{sep}{value}\r\n".encode("utf-8", errors="replace")
        if len(self.headers) + len(line) > self.milter.options.max_header_bytes:
            self.headers_cut = True  # keep the newest: they come first and decide
            return
        self.headers += line

    async def _eoh(self) -> bytes:
        milter, options = self.milter, self.milter.options
        customer = self.auth if options.customer_from_auth else ""
        request = pb.ClassifyRequest(
            customer_id=customer,
            client_ip=self.ip,
            helo=self.helo,
            mail_from=self.mail_from,
            rcpt_to=self.rcpts,
            headers=bytes(self.headers),
            no_report=options.dry_run,
        )
        try:
            answer: pb.Classification = await milter.stub.Classify(
                request, timeout=options.deadline
            )
        except grpc.aio.AioRpcError as exc:
            milter.stats.failed_open += 1
            milter.warn(exc)
            return mp.CONTINUE
        verdict = pb.Verdict.Name(answer.verdict).removeprefix("VERDICT_")
        milter.stats.classified[verdict] = milter.stats.classified.get(verdict, 0) + 1
        relayed = answer.verdict == pb.VERDICT_RELAYED_THIRD_PARTY
        log.info(
            "milter_classified",
            ip=self.ip,
            customer=answer.customer_id or None,
            verdict=verdict,
            origin=answer.origin_ip or None,
            mail_from=self.mail_from,
            rcpts=len(self.rcpts),
            refused=relayed and not options.dry_run,
            degraded=answer.degraded or None,
        )
        if not relayed or options.dry_run:
            return mp.CONTINUE
        milter.stats.refused += 1
        text = options.reply.format(
            origin=answer.origin_ip or "an outside address",
            customer=answer.customer_id or "the customer",
        )
        return mp.reply_code(text)


class RelayMilter(MilterServer):
    """The milter server: one task per connection, one gRPC channel to relaycheck."""

    log: Any = structlog.get_logger("relaycheck.milter")

    def __init__(self, target: str, options: MilterOptions | None = None) -> None:
        super().__init__()
        self.options: MilterOptions = options or MilterOptions()
        check_reply(self.options.reply)
        self.target = target
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pbg.RelayCheckStub(self.channel)
        self.stats: MilterStats = MilterStats()
        self._last_warning = -1e9

    def session(self, peer: str) -> MilterSession:
        return MilterSession(self)

    async def on_close(self) -> None:
        await self.channel.close()

    def warn(self, exc: grpc.aio.AioRpcError) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._last_warning >= 5.0:
            self._last_warning = now
            log.warning(
                "milter_classify_failed",
                code=exc.code().name,
                error=exc.details(),
                failed_open=self.stats.failed_open,
            )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relaycheck-milter",
        description=(
            "Milter for a Postfix smart relay: asks relaycheck at end of headers whose mail "
            "each message is and answers relayed third-party mail with a temporary refusal "
            "on the customer's behalf. Fails open: relaycheck slow or down never stops mail."
        ),
        epilog="main.cf: smtpd_milters = inet:127.0.0.1:10042, milter_default_action = accept",
    )
    p.add_argument("--listen", default="127.0.0.1:10042", metavar="HOST:PORT|unix:/path")
    p.add_argument(
        "--relaycheck",
        default=os.environ.get("RELAYCHECK_ADDRESS", "127.0.0.1:50061"),
        metavar="HOST:PORT",
        help="the relaycheck service (env RELAYCHECK_ADDRESS; default 127.0.0.1:50061)",
    )
    p.add_argument(
        "--reply",
        default=DEFAULT_REPLY,
        help="SMTP reply for relayed mail; {origin} and {customer} are filled in "
        "(default: a 451 4.7.1)",
    )
    p.add_argument(
        "--deadline", type=float, default=0.5, metavar="SECONDS", help="Classify deadline"
    )
    p.add_argument("--dry-run", action="store_true", help="log verdicts, never refuse")
    p.add_argument(
        "--customer-from-auth",
        action="store_true",
        help="the relay's SASL login ({auth_authen}) is the customer id",
    )
    p.add_argument("--max-header-bytes", type=int, default=256 * 1024, metavar="N")
    p.add_argument("--drain-seconds", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_log_address_arguments(p, env_prefix="RELAYCHECK")
    return p


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then drain connections and return 0."""
    options = MilterOptions(
        reply=args.reply,
        deadline=args.deadline,
        dry_run=args.dry_run,
        customer_from_auth=args.customer_from_auth,
        max_header_bytes=args.max_header_bytes,
    )
    milter = RelayMilter(args.relaycheck, options)
    # The handlers first: a SIGTERM from the moment we listen (a supervisor that saw the
    # start line) must get the graceful drain, never Python's default (killed, exit -15).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        address = await milter.start(args.listen)
    except OSError:  # named by the server: run_program prints it as one line, exit 2
        await milter.close(drain=0)
        raise
    log.info("milter_started", listen=address, relaycheck=args.relaycheck, dry_run=args.dry_run)
    await stop.wait()
    log.info("milter_stopping", active=milter.stats.active)
    await milter.close(drain=args.drain_seconds)
    # This milter holds no reports: relaycheck reports relayed origins to penaltyd itself.
    s = milter.stats
    log.info(
        "milter_stopped",
        connections=s.connections,
        active=s.active,
        classified=dict(s.classified),
        refused=s.refused,
        failed_open=s.failed_open,
        protocol_errors=s.protocol_errors,
        handler_errors=s.handler_errors,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        parse_listen(args.listen)
        check_reply(args.reply)
    except ValueError as exc:
        print(f"relaycheck-milter: {exc}", file=sys.stderr)
        return 2
    return run_program(
        "relaycheck-milter", args.log_level, lambda: run(args), **log_address_options(args)
    )


if __name__ == "__main__":
    sys.exit(main())
