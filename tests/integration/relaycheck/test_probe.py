"""Probe against real SMTP servers on loopback (aiosmtpd), never mocks.

- an open relay accepting any RCPT: flagged, and the relayed tests are named;
- a closed relay refusing foreign recipients with 554 5.7.1: cleared;
- a tarpit that never greets and a server that stalls at RCPT: the per-step timeouts and
  the budget hold.
Every server records the commands it received: DATA never appears, each envelope ends
with RSET and the session with QUIT.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from structlog.testing import capture_logs

from relaycheck.cli import main as cli_main
from relaycheck.probe import TEST_NAMES, Result, run_battery
from relaycheck.store.memory import MemoryStore
from relaycheck.v1 import relaycheck_pb2 as pb
from tests.harness.inprocess import relaycheck_serving
from tests.harness.ports import free_port


class Recorder:
    """An aiosmtpd handler that remembers every command it saw (thread-safe enough:
    appends from the server thread, read after the probe ended)."""

    def __init__(self, local_domains: frozenset[str] = frozenset()) -> None:
        self.local_domains = local_domains
        self.commands: list[str] = []

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.commands.append("MAIL")
        envelope.mail_from = address
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("RSET")
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("QUIT")
        return "221 Bye"


class OpenRelay(Recorder):
    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.commands.append("RCPT")
        envelope.rcpt_tos.append(address)
        return "250 OK"


class ClosedRelay(Recorder):
    """Accepts plain mailboxes at its own domains, like a sane MX; refuses the rest."""

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.commands.append("RCPT")
        local, _, domain = address.rpartition("@")
        if domain.lower() in self.local_domains and local and not set(local) & set('%!@:"'):
            envelope.rcpt_tos.append(address)
            return "250 OK"
        return f"554 5.7.1 <{address}>: Relay access denied"


class RecordingSMTP(SMTP):
    async def smtp_DATA(self, arg: str) -> None:
        handler: Recorder = self.event_handler
        handler.commands.append("DATA")
        await super().smtp_DATA(arg)


class RecordingController(Controller):
    def factory(self) -> SMTP:
        return RecordingSMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def smtp_servers() -> Iterator[dict[str, tuple[int, Recorder]]]:
    servers: dict[str, tuple[int, Recorder]] = {}
    controllers = []
    for name, handler in (
        ("open", OpenRelay()),
        ("closed", ClosedRelay(frozenset({"closed.example"}))),
    ):
        port = free_port()
        ctl = RecordingController(
            handler, hostname="127.0.0.1", port=port, server_hostname=f"{name}.example"
        )
        ctl.start()
        controllers.append(ctl)
        servers[name] = (port, handler)
    yield servers
    for ctl in controllers:
        ctl.stop()


async def test_open_relay_is_flagged_and_closed_one_cleared(
    smtp_servers: dict[str, tuple[int, Recorder]],
) -> None:
    open_port, open_handler = smtp_servers["open"]
    closed_port, closed_handler = smtp_servers["closed"]
    budget = 10.0
    t0 = time.monotonic()
    opened = await run_battery("127.0.0.1", open_port, step_timeout=2.0, budget=budget)
    closed = await run_battery("127.0.0.1", closed_port, step_timeout=2.0, budget=budget)
    assert time.monotonic() - t0 < 2 * budget
    assert opened.relaying
    assert {"plain", "null_sender", "percent_hack", "source_route"} <= set(opened.relayed_tests)
    assert opened.local_domain == "open.example"
    plain = next(t for t in opened.tests if t.name == "plain")
    assert (plain.mail_code, plain.rcpt_code) == (250, 250)
    assert plain.rcpt_to == "victim@relay-test.invalid"
    assert not closed.relaying
    assert not closed.error
    assert not closed.budget_exhausted
    assert len(closed.tests) == len(TEST_NAMES)
    refused = [t for t in closed.tests if t.result == Result.REFUSED]
    assert len(refused) == len(TEST_NAMES), [(t.name, t.result, t.reply) for t in closed.tests]
    assert any(t.rcpt_code == 554 and "5.7.1" in t.reply for t in closed.tests)
    for handler in (open_handler, closed_handler):
        assert "DATA" not in handler.commands
        assert handler.commands.count("MAIL") == handler.commands.count("RSET")
        assert handler.commands[-1] == "QUIT"


async def test_probe_over_grpc_and_cli(
    smtp_servers: dict[str, tuple[int, Recorder]], capsys: pytest.CaptureFixture[str]
) -> None:
    open_port, _ = smtp_servers["open"]
    closed_port, _ = smtp_servers["closed"]
    with capture_logs() as logs:  # the in-process server's log lines stay off stdout
        await _probe_over_grpc_and_cli(open_port, closed_port, capsys)
    assert [e["result"] for e in logs if e["event"] == "probed"] == ["relaying", "closed"]


async def _probe_over_grpc_and_cli(
    open_port: int, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    async with relaycheck_serving(MemoryStore()) as rc:
        result = await rc.stub.Probe(
            pb.ProbeRequest(
                host="127.0.0.1",
                port=open_port,
                step_timeout_ms=2000,
                budget_ms=10_000,
                tests=["plain", "bang_path"],
            )
        )
        assert result.relaying
        assert [t.name for t in result.tests] == ["plain", "bang_path"]
        assert all(t.result == pb.ProbeTest.RESULT_ACCEPTED for t in result.tests)
        code = await asyncio.to_thread(
            cli_main,
            ["probe", f"127.0.0.1:{closed_port}", "--server", rc.address, "--json"],
        )
    assert code == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert out["relaying"] is False
    assert len(out["tests"]) == len(TEST_NAMES)
    code = await asyncio.to_thread(cli_main, ["probe", f"127.0.0.1:{open_port}", "--test", "plain"])
    assert code == 1
    assert "OPEN RELAY: plain relayed" in capsys.readouterr().out


async def test_probe_targets_can_be_restricted(
    smtp_servers: dict[str, tuple[int, Recorder]],
) -> None:
    port, handler = smtp_servers["open"]
    async with relaycheck_serving(MemoryStore(), probe_allowed_networks=["192.0.2.0/24"]) as rc:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rc.stub.Probe(pb.ProbeRequest(host="127.0.0.1", port=port))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert handler.commands == []


@pytest.fixture
async def stalling_servers() -> AsyncIterator[tuple[int, int]]:
    """A tarpit that accepts and never greets; a server that stalls at RCPT."""

    async def tarpit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    async def staller(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stall.example ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"RCPT"):
                continue  # never answered
            writer.write(b"250 OK\r\n")
            await writer.drain()
        writer.close()

    servers = [
        await asyncio.start_server(tarpit, "127.0.0.1", 0),
        await asyncio.start_server(staller, "127.0.0.1", 0),
    ]
    ports = [int(s.sockets[0].getsockname()[1]) for s in servers]
    yield ports[0], ports[1]
    for s in servers:
        s.close()
    for s in servers:
        await s.wait_closed()


async def test_timeouts_and_budget_hold(stalling_servers: tuple[int, int]) -> None:
    tarpit, staller = stalling_servers
    t0 = time.monotonic()
    report = await run_battery("127.0.0.1", tarpit, step_timeout=0.2, budget=5.0)
    assert time.monotonic() - t0 < 1.0  # one step timeout, then the battery stops
    assert report.error
    assert report.tests[0].result == Result.TIMEOUT
    assert all(t.result == Result.SKIPPED for t in report.tests[1:])
    assert not report.relaying

    t0 = time.monotonic()
    report = await run_battery("127.0.0.1", staller, step_timeout=0.2, budget=0.7)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.7 + 0.3  # the budget, plus closing sockets
    assert report.budget_exhausted
    assert report.tests[0].result == Result.TIMEOUT
    assert report.tests[-1].result == Result.SKIPPED
    assert not report.relaying


async def test_connection_refused_is_an_error_not_a_verdict() -> None:
    report = await run_battery("127.0.0.1", free_port(), step_timeout=0.5, budget=2.0)
    assert report.error
    assert not report.relaying
    assert report.tests[0].result == Result.ERROR
