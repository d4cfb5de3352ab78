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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field

import structlog

from penalty.identity import IdentityRules, InvalidAddress, parse_ip
from penalty.v1 import penalty_pb2 as pb
from penaltyclient.aio import AsyncPenaltyClient, PenaltydError, SessionReporter

log = structlog.get_logger("penalty.policyd")

MAX_LINE = 4096  # Postfix attribute lines are short; longer is garbage
MAX_ATTRIBUTES = 100
STATES = ("CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN")
DUNNO = b"action=DUNNO\n\n"


class BadRequest(ValueError):
    """The bytes were not a policy request; answered DUNNO and logged."""


def parse_request(lines: list[bytes]) -> dict[str, str]:
    """`name=value` lines (without the final empty line) -> attributes."""
    if not lines:
        raise BadRequest("empty request")
    if len(lines) > MAX_ATTRIBUTES:
        raise BadRequest(f"more than {MAX_ATTRIBUTES} attributes")
    attrs: dict[str, str] = {}
    for raw in lines:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("latin-1")  # Postfix passes 8-bit envelope data through
        name, sep, value = line.partition("=")
        if not sep or not name or not name.replace("_", "").isalnum():
            raise BadRequest(f"not a name=value line: {line[:80]!r}")
        attrs[name] = value
    if attrs.get("request") != "smtpd_access_policy":
        raise BadRequest(f"request={attrs.get('request', '')!r} is not smtpd_access_policy")
    return attrs


@dataclass
class Stats:
    requests: int = 0
    tempfails: int = 0
    dunno: int = 0
    garbage: int = 0
    degraded: int = 0
    connections: int = 0
    open_connections: int = 0
    by_state: dict[str, int] = field(default_factory=dict)


class PolicyServer:
    def __init__(
        self,
        client: AsyncPenaltyClient,
        *,
        stages: tuple[str, ...] = ("RCPT",),
        report_accepted: bool = True,
        idle_timeout: float = 300.0,
        rules: IdentityRules | None = None,
    ) -> None:
        self.client = client
        self.stages = stages
        self.report_accepted = report_accepted
        self.idle_timeout = idle_timeout
        self.reporter: SessionReporter = client.reporter()
        self.stats = Stats()
        self._rules = rules or IdentityRules()

    async def decide(self, attrs: dict[str, str]) -> bytes:
        """The action for one request (bytes to send, including the empty line)."""
        state = attrs.get("protocol_state", "").upper()
        self.stats.by_state[state] = self.stats.by_state.get(state, 0) + 1
        if state not in self.stages:
            return DUNNO
        ip = attrs.get("client_address", "")
        try:
            parse_ip(ip)
        except InvalidAddress:
            log.info("policy_unknown_client", client_address=ip[:64], state=state)
            return DUNNO
        helo, sender = attrs.get("helo_name", ""), attrs.get("sender", "")
        try:
            verdict = await self.client.check(ip, helo, sender)
        except PenaltydError as exc:  # penaltyd refused the input: still never fail closed
            log.warning("policy_check_refused", client_address=ip, error=str(exc))
            return DUNNO
        if verdict.degraded:
            self.stats.degraded += 1
        if verdict.tempfail and verdict.smtp_reply[:1] == "4":
            self.stats.tempfails += 1
            log.info(
                "policy_tempfail",
                client_address=ip,
                identity=verdict.identity,
                seconds=verdict.seconds_left,
            )
            return f"action={verdict.smtp_reply}\n\n".encode()
        if state == "RCPT" and self.report_accepted:
            self.reporter.report(ip, {pb.OUTCOME_ACCEPTED: 1}, helo, sender)
        return DUNNO

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One Postfix connection: many requests, one after the other."""
        self.stats.connections += 1
        self.stats.open_connections += 1
        lines: list[bytes] = []
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        raw = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip() or lines:  # a last request without its empty line
                        lines += [exc.partial.rstrip(b"\r\n")] if exc.partial.strip() else []
                        writer.write(await self._answer(lines))
                        await writer.drain()
                    return
                except asyncio.LimitOverrunError:
                    self.stats.garbage += 1
                    log.warning("policy_garbage", error=f"line longer than {MAX_LINE} bytes")
                    writer.write(DUNNO)
                    await writer.drain()
                    return  # the stream is out of step: close, Postfix reconnects
                line = raw.rstrip(b"\r\n")
                if line:
                    lines.append(line)
                    continue
                writer.write(await self._answer(lines))
                await writer.drain()
                lines = []
        except (TimeoutError, ConnectionError):
            return
        finally:
            self.stats.open_connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, lines: list[bytes]) -> bytes:
        self.stats.requests += 1
        try:
            attrs = parse_request(lines)
        except BadRequest as exc:
            self.stats.garbage += 1
            log.warning("policy_garbage", error=str(exc))
            return DUNNO
        action = await self.decide(attrs)
        if action is DUNNO:
            self.stats.dunno += 1
        return action


async def serve(args: argparse.Namespace) -> None:
    client = AsyncPenaltyClient(
        args.penaltyd, deadline=args.deadline, live_replica=not args.no_live_replica
    )
    client.start()
    stages = tuple(s.strip().upper() for s in args.stage.split(",") if s.strip())
    policy = PolicyServer(client, stages=stages, report_accepted=not args.no_report_accepted)
    policy.reporter.start()
    if args.listen.startswith(("/", "unix:")):
        path = args.listen.removeprefix("unix:")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await asyncio.start_unix_server(policy.handle, path, limit=MAX_LINE)
        os.chmod(path, 0o666)
    else:
        host, _, port = args.listen.rpartition(":")
        server = await asyncio.start_server(
            policy.handle, host.strip("[]") or None, int(port), limit=MAX_LINE
        )
    where = ", ".join(str(s.getsockname()) for s in server.sockets)
    log.info("policyd_started", listen=where, penaltyd=args.penaltyd, stages=list(stages))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stats_task = asyncio.create_task(_log_stats(policy, args.stats_interval))
    try:
        await stop.wait()
    finally:
        stats_task.cancel()
        server.close()
        await server.wait_closed()
        await policy.reporter.close()
        await client.close()
        log.info("policyd_stopped", **_stats_fields(policy))


def _stats_fields(policy: PolicyServer) -> dict[str, object]:
    s, r = policy.stats, policy.reporter
    return {
        "requests": s.requests,
        "tempfails": s.tempfails,
        "dunno": s.dunno,
        "garbage": s.garbage,
        "degraded": s.degraded,
        "connections": s.connections,
        "open_connections": s.open_connections,
        "reports_sent": r.acked,
        "reports_dropped": r.dropped,
        "live_replica": bool(policy.client.replica and policy.client.replica.synced),
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
        "--stats-interval", type=float, default=60.0, help="seconds between stats log lines"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log threshold",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from penalty import logs

    logs.configure(args.log_level)
    stages = {s.strip().upper() for s in args.stage.split(",") if s.strip()}
    if not stages or not stages <= set(STATES):
        print(f"penalty-policyd: --stage must be among {', '.join(STATES)}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.run(serve(args))
    except (OSError, ValueError) as exc:
        print(f"penalty-policyd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
