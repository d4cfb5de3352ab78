"""Every sidecar stops cleanly on SIGTERM (issue 13, item 6).

One test per sidecar runs its real command line as a child process, leaves connections
open and idle the way an MTA does (Postfix keeps policy connections open between
sessions; milter connections sit mid-session), queues reports penaltyd cannot take
(it is down), sends SIGTERM and checks: exit status 0, nothing but JSON lines on stdout,
nothing on stderr, every connection closed by the sidecar, and the documented stop line
saying what became of the reports (`reports_pending_dropped`, with a warning naming
them first).

And the order at start: each sidecar installs its SIGTERM/SIGINT handlers before it
logs that it started, so a supervisor that sends SIGTERM as soon as it sees the start
line gets the graceful drain, not Python's default (killed by the signal, exit -15).
That gap is too short to hit reliably from outside, so the test runs each program's
own start-up in this process and looks at the SIGTERM disposition at the moment the
start line is logged.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import penaltyclient.logwatch as logwatch
import penaltyclient.milter as penalty_milter
import penaltyclient.policyd as policyd
import relaycheckclient.milter as relaycheck_milter
from tests.harness.milter import Mta
from tests.harness.ports import free_port

UNKNOWN_USER = "Recipient address rejected: User unknown in local recipient table"
REJECT = (
    "Dec  1 11:09:12 mx postfix/smtpd[23022]: NOQUEUE: reject: RCPT from "
    "unknown[203.0.113.{n}]: 550 5.1.1 <nobody@test.example>: {text}; "
    "from=<offers@spam.example> to=<nobody@test.example> proto=ESMTP helo=<bot.example>\n"
)


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


class Sidecar:
    """A sidecar's command line as a child process, its stdout read as JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, module: str, *args: str) -> Sidecar:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def event(self, name: str, ok: Callable[[dict[str, Any]], bool] = bool) -> dict[str, Any]:
        """The next event called `name` (for which `ok` holds) on stdout."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(15):
            while True:
                raw = await self.proc.stdout.readline()
                assert raw, f"{name} never came: {self.events[-3:]}"
                event: dict[str, Any] = json.loads(raw)  # a traceback line would not parse
                self.events.append(event)
                if event["event"] == name and ok(event):
                    return event

    async def sigterm(self) -> tuple[list[dict[str, Any]], str]:
        """SIGTERM; exit status 0, then the events after it and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            out, err = await self.proc.communicate()
        lines = out.decode().splitlines()
        assert self.proc.returncode == 0, (self.proc.returncode, lines[-5:], err.decode())
        return [json.loads(line) for line in lines], err.decode()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def clean(err: str, events: list[dict[str, Any]], stop: str) -> dict[str, Any]:
    """stderr empty, no traceback in any event, the stop line last; that line."""
    assert err == "", err
    assert not any("Traceback" in json.dumps(e) for e in events), events
    assert events, "no event after SIGTERM"
    assert events[-1]["event"] == stop, events[-3:]
    return events[-1]


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(5):
        try:
            return await reader.read() == b""
        except ConnectionError:
            return True


def policy_request(ip: str) -> bytes:
    return (
        "request=smtpd_access_policy\nprotocol_state=RCPT\n"
        f"client_address={ip}\nhelo_name=bot.example\nsender=x@bot.example\n\n"
    ).encode()


async def test_policyd_sigterm_with_idle_connections_and_penaltyd_down() -> None:
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--penaltyd", dead_address()]
    sidecar = await Sidecar.start("penaltyclient.policyd", *args, "--flush-seconds", "0.3")
    try:
        await sidecar.event("policyd_started")
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for ip in ("198.51.100.7", "198.51.100.8"):  # DUNNO (penaltyd down), accepted:
            writer.write(policy_request(ip))  # two clients, so two reports however timed
            async with asyncio.timeout(5):
                assert await reader.readuntil(b"\n\n") == b"action=DUNNO\n\n"
        events, err = await sidecar.sigterm()  # Postfix would still hold all four open
    finally:
        await sidecar.kill()
    for r, _ in [*idle, (reader, writer)]:
        assert await closed_by_peer(r)
    stop = clean(err, events, "policyd_stopped")
    assert (stop["connections"], stop["open_connections"]) == (4, 0)
    # The two accepted recipients penaltyd never took: counted, and said to be lost.
    assert (stop["accepted_reported"], stop["reports_sent"]) == (2, 0)
    assert stop["reports_pending_dropped"] == 2
    dropped = [e for e in events if e["event"] == "policyd_reports_dropped_at_exit"]
    assert [e["reports"] for e in dropped] == [2]
    # penaltyd being down was said in JSON too (the client library's warning).
    assert any(e["event"].startswith("penaltyd check failed") for e in events)


async def test_penalty_milter_sigterm_with_idle_connections_and_penaltyd_down() -> None:
    port = free_port()
    sidecar = await Sidecar.start(
        "penaltyclient.milter",
        *("--listen", f"127.0.0.1:{port}", "--penaltyd", dead_address()),
        *("--drain-seconds", "0.2", "--flush-seconds", "0.3"),
    )
    try:
        await sidecar.event("milter_started")
        idle = [await Mta.open(port) for _ in range(3)]
        for i, mta in enumerate(idle):  # mid-session, and they never say QUIT
            await mta.session(f"203.0.113.{80 + i}", "bot.example", "x@bot.example")
        assert (await idle[0].rcpt("u@test.example", rejected=UNKNOWN_USER))[0] == b"c"
        events, err = await sidecar.sigterm()
    finally:
        await sidecar.kill()
    for mta in idle:
        assert await mta.closed()
        await mta.close()
    stop = clean(err, events, "milter_stopped")
    assert [e["closed"] for e in events if e["event"] == "milter_drain_ended"] == [3]
    assert (stop["connections"], stop["active"]) == (3, 0)
    assert (stop["reports_sent"], stop["reports_pending_dropped"]) == (0, 1)
    dropped = [e for e in events if e["event"] == "milter_reports_dropped_at_exit"]
    assert [e["reports"] for e in dropped] == [1]


async def test_relaycheck_milter_sigterm_with_idle_connections() -> None:
    port = free_port()
    sidecar = await Sidecar.start(
        "relaycheckclient.milter",
        *("--listen", f"127.0.0.1:{port}", "--relaycheck", dead_address()),
        *("--drain-seconds", "0.2"),
    )
    try:
        await sidecar.event("milter_started")
        idle = [await Mta.open(port) for _ in range(3)]
        for i, mta in enumerate(idle):  # mid-session: a customer relay sending a message
            await mta.session(f"198.51.100.{8 + i}", "mail.acme.example", "a@acme.example")
        events, err = await sidecar.sigterm()
    finally:
        await sidecar.kill()
    for mta in idle:
        assert await mta.closed()
        await mta.close()
    stop = clean(err, events, "milter_stopped")
    assert [e["closed"] for e in events if e["event"] == "milter_drain_ended"] == [3]
    assert (stop["connections"], stop["active"], stop["handler_errors"]) == (3, 0, 0)


async def test_logwatch_sigterm_following_a_log_with_penaltyd_down(tmp_path: Path) -> None:
    maillog = tmp_path / "mail.log"  # created once the watcher waits for it: read whole
    sidecar = await Sidecar.start(
        "penaltyclient.logwatch",
        *("--penaltyd", dead_address(), "--flush-timeout", "0.3", "--stats-interval", "0.05"),
        *("--poll-interval", "0.05", str(maillog)),
    )
    try:
        await sidecar.event("waiting for the log file")
        lines = REJECT.format(n=21, text=UNKNOWN_USER) + REJECT.format(n=22, text=UNKNOWN_USER)
        maillog.write_text(lines)  # two rejections the watcher reports
        await sidecar.event("logwatch stats", lambda e: e["reports"] == 2)
        events, err = await sidecar.sigterm()  # following the file, idle
    finally:
        await sidecar.kill()
    stop = clean(err, events, "logwatch stopped")
    assert (stop["reports_sent"], stop["reports_spooled"]) == (0, 0)
    assert stop["reports_pending_dropped"] == 2
    warned = [e for e in events if e["event"] == "penaltyd did not take every report before exit"]
    assert [(e["lost"], e["spooled"]) for e in warned] == [(2, 0)]


# --- the handlers are installed before the start line


def _policyd(port: int, dead: str, tmp: Path) -> Awaitable[Any]:
    args = policyd.parser().parse_args(
        ["--listen", f"127.0.0.1:{port}", "--penaltyd", dead, "--flush-seconds", "0"]
    )
    return policyd.serve(args)


def _penalty_milter(port: int, dead: str, tmp: Path) -> Awaitable[Any]:
    args = penalty_milter.parser().parse_args(
        ["--listen", f"127.0.0.1:{port}", "--penaltyd", dead, "--flush-seconds", "0"]
    )
    return penalty_milter.run(args)


def _relaycheck_milter(port: int, dead: str, tmp: Path) -> Awaitable[Any]:
    args = relaycheck_milter.parser().parse_args(
        ["--listen", f"127.0.0.1:{port}", "--relaycheck", dead, "--drain-seconds", "0"]
    )
    return relaycheck_milter.run(args)


def _logwatch(port: int, dead: str, tmp: Path) -> Awaitable[Any]:
    (tmp / "mail.log").write_text("")
    options = logwatch.Options(path=str(tmp / "mail.log"), penaltyd=dead, flush_timeout=0.1)
    return logwatch._main(options)


class StartLineSpy:
    """The module's logger, but at the start line: the SIGTERM disposition is noted, and
    SIGTERM is sent to this process when a handler is there to take it."""

    def __init__(self, real: Any, start_event: str) -> None:
        self.real = real
        self.start_event = start_event
        self.disposition: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def info(self, event: str, *args: Any, **kw: Any) -> Any:
        if event == self.start_event:
            self.disposition = signal.getsignal(signal.SIGTERM)
            if self.disposition is signal.SIG_DFL:  # SIGTERM now would kill this process
                raise AssertionError(f"{event} logged before the SIGTERM handler was installed")
            os.kill(os.getpid(), signal.SIGTERM)
        return self.real.info(event, *args, **kw)


@pytest.mark.parametrize(
    ("module", "start_event", "program"),
    [
        (policyd, "policyd_started", _policyd),
        (penalty_milter, "milter_started", _penalty_milter),
        (relaycheck_milter, "milter_started", _relaycheck_milter),
        (logwatch, "logwatch started", _logwatch),
    ],
    ids=["penalty-policyd", "penalty-milter", "relaycheck-milter", "penalty-logwatch"],
)
async def test_signal_handlers_come_before_the_start_line(
    module: ModuleType,
    start_event: str,
    program: Callable[[int, str, Path], Awaitable[Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # nobody else's handler
    spy = StartLineSpy(module.log, start_event)
    monkeypatch.setattr(module, "log", spy)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(15):  # the SIGTERM sent at the start line stops it
            result = await program(free_port(), dead_address(), tmp_path)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    assert spy.disposition is not None, f"{start_event} was never logged"
    assert result in (None, 0)
