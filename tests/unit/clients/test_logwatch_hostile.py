"""penalty-logwatch against hostile input: what it reads, how long lines cost, counts, and
what survives a restart.

Whoever sends mail chooses part of every log line (HELO names, addresses, pipelined
input), and whoever can write the log or its directory chooses the rest: a FIFO or a
symlink to /dev/zero where the log should be, a line that never ends. The watcher must
never block its event loop (and with it SIGTERM), keep more than one bounded line in
memory, spend more than linear time on a line, send a count penaltyd refuses, or lose
the reports it could not deliver when it is stopped while penaltyd is down.

Waits await events or poll a condition; subprocesses run under a deadline and are killed
after it, so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from penalty import outcomes
from penalty.identity import MAX_COUNT, bound_client, parse_ip
from penalty.v1 import penalty_pb2 as pb
from penaltyclient.logpatterns import (
    _NAMEADDR,
    ACCEPTED,
    CONTENT_REJECTED,
    MAX_PARSE_CHARS,
    PROTOCOL_VIOLATION,
    RULES,
    UNKNOWN_RECIPIENT,
    Ignored,
    Parsed,
    Tally,
    parse_counters,
    parse_line,
    split_envelope,
)
from penaltyclient.logwatch import (
    MAX_LINE_BYTES,
    POSITION_NAME,
    SPOOL_NAME,
    FileFollower,
    LineSplitter,
    LogWatch,
    LogwatchError,
    LongLines,
    NotRegularFile,
    Options,
    open_regular,
    read_spool,
    spool_records,
    write_spool,
)
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import eventually
from tests.harness.inprocess import ServeFactory
from tests.harness.paths import REPO
from tests.harness.ports import free_port

ROOT = REPO
SAMPLE = ROOT.parent / "shared" / "data" / "postfix-3.7" / "maillog-sample.log"
PREFIX = "Nov 23 05:02:09 mx postfix/{program}[22153]: "
REAL_LINES = SAMPLE.read_text().splitlines()


def line(program: str, message: str) -> str:
    return PREFIX.format(program=program) + message


def pregreet(i: int) -> str:
    return line("postscreen", f"PREGREET 4 after 0 from [203.0.113.{i}]:4000: x\\r\\n")


def append(path: Path, text: str) -> None:
    with path.open("a") as fh:
        fh.write(text)


def session(ip: str, *middle: str, summary: str, pid: int = 500) -> list[str]:
    head = f"Nov 23 05:02:09 mx postfix/smtpd[{pid}]: "
    return [
        head + "connect from localhost[127.0.0.1]",
        *(text if text.startswith("Nov ") else head + text for text in middle),
        head + f"disconnect from unknown[{ip}] {summary}",
    ]


def attack_log(ip: str, n: int) -> str:
    """`n` unknown-recipient rejects and the summary: n + 1 reports."""
    rejects = [
        f"NOQUEUE: reject: RCPT from unknown[{ip}]: 550 5.1.1 <u{i}@t.example>: Recipient "
        f"address rejected: User unknown in local recipient table; from=<x@spam.example> "
        f"to=<u{i}@t.example> proto=ESMTP helo=<bot.example>"
        for i in range(n)
    ]
    lines = session(ip, *rejects, summary=f"ehlo=1 mail=1 rcpt=0/{n} quit=1 commands=3/{n + 3}")
    return "\n".join(lines) + "\n"


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    async def probe() -> bool:
        return condition()

    await eventually(probe, bool, within=within)


async def collect(follower: FileFollower, into: list[str]) -> None:
    async for text in follower.lines():
        into.append(text)


@contextlib.contextmanager
def unblocking(fifo: Path, after: float = 10.0) -> Iterator[None]:
    """If a regression blocks the event loop in open() on `fifo` (waiting for a writer),
    open its write end from a thread after `after` seconds: the test then fails on its
    assertions instead of hanging."""
    done = threading.Event()

    def rescue() -> None:
        if not done.wait(after):
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=rescue, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class Cli:
    """`penalty-logwatch` in a subprocess, its JSON events read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []

    async def next_event(
        self, name: str, ok: Callable[[dict[str, Any]], bool] = lambda e: True, within: float = 10
    ) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(within):
            while True:
                raw = await self.proc.stdout.readline()
                assert raw, f"penalty-logwatch exited before {name!r}: {self.events[-3:]}"
                event: dict[str, Any] = json.loads(raw)
                self.events.append(event)
                if event["event"] == name and ok(event):
                    return event

    async def wait(self, within: float = 10) -> int:
        assert self.proc.stdout is not None
        async with asyncio.timeout(within):
            async for raw in self.proc.stdout:
                self.events.append(json.loads(raw))
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def cli(*args: str, stdin: int | None = None) -> AsyncIterator[Cli]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penaltyclient.logwatch",
        *args,
        stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        yield Cli(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- 1. regular files only: a FIFO never blocks the loop (or SIGTERM)


async def test_cli_refuses_a_fifo_a_device_and_a_directory_with_exit_code_2(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.log"
    zero.symlink_to("/dev/zero")
    cases = [
        (fifo, "FIFO", []),
        (fifo, "FIFO", ["--once"]),
        (zero, "character device", ["--from-start"]),
        (tmp_path, "directory", []),
    ]
    for path, kind, extra in cases:
        # Before: open() on the FIFO waited for a writer forever, SIGTERM included.
        async with cli("--dry-run", *extra, str(path)) as watcher:
            assert await watcher.wait() == 2, (path, extra)
        error = watcher.events[-1]
        assert error["event"] == "refusing to read the log: not a regular file"
        assert (error["path"], error["kind"], error["level"]) == (str(path), kind, "error")


def test_open_regular_refuses_a_fifo_swapped_in_after_the_stat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "mail.log"
    os.mkfifo(fifo)
    regular, real_stat = os.stat(SAMPLE), os.stat

    def stale_stat(path: Any, *args: Any, **kw: Any) -> os.stat_result:
        # What a stat saw an instant before the log was replaced by a FIFO.
        return regular if Path(path) == fifo else real_stat(path, *args, **kw)

    monkeypatch.setattr(os, "stat", stale_stat)
    with unblocking(fifo), pytest.raises(NotRegularFile) as refused:
        open_regular(fifo)  # O_NONBLOCK: returns at once; fstat: a FIFO
    assert refused.value.kind == "FIFO"


async def test_a_followed_path_that_becomes_a_fifo_is_refused_while_the_old_file_is_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mail.log"
    path.write_text("")
    follower = FileFollower(path, poll=0.01)
    got: list[str] = []
    task = asyncio.create_task(collect(follower, got))
    try:
        await follower.opened.wait()
        os.rename(path, tmp_path / "mail.log.1")
        os.mkfifo(path)
        with unblocking(path):
            async with asyncio.timeout(10):
                await follower.refusing.wait()
            append(tmp_path / "mail.log.1", pregreet(1) + "\n")  # the writer's last line
            await until(lambda: got == [pregreet(1)])
            path.unlink()
            path.write_text(pregreet(2) + "\n")  # a regular file again: rotate to it
            await until(lambda: got == [pregreet(1), pregreet(2)])
        assert (follower.rotations, follower.refusing.is_set()) == (1, False)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_missing_path_that_appears_as_a_fifo_is_waited_on(tmp_path: Path) -> None:
    path = tmp_path / "later.log"
    follower = FileFollower(path, poll=0.01)
    got: list[str] = []
    task = asyncio.create_task(collect(follower, got))
    try:
        await follower.waiting.wait()
        os.mkfifo(path)
        with unblocking(path):
            async with asyncio.timeout(10):
                await follower.refusing.wait()
            path.unlink()
            path.write_text(pregreet(3) + "\n")
            await until(lambda: got == [pregreet(3)])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- 2. bounded lines: a line that never ends costs bounded memory


def test_line_splitter_bounds_lines_and_tracks_offsets() -> None:
    long_lines = LongLines("test", limit=8)
    split = LineSplitter(long_lines, max_line=8)
    assert split.feed(b"ab\ncd") == [("ab", 3)]
    assert split.feed(b"e\r\n12345678\n") == [("cde", 8), ("12345678", 17)]
    assert split.feed(b"123456789\nok\n") == [("ok", 30)]  # 9 bytes: skipped, in one chunk
    assert split.feed(b"x" * 5) == []
    assert split.feed(b"x" * 5) == []  # 10 bytes and no newline: dropped, not kept
    assert split.feed(b"x" * 100) == []
    assert split.feed(b"x\nlast") == []
    assert long_lines.count == 2
    assert split.offset == 30 + 112  # after the skipped line's newline
    assert split.finish() == "last"
    assert split.offset == 30 + 112 + 4


async def test_a_100_mb_line_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    huge = tmp_path / "huge.log"
    with huge.open("wb") as fh:
        fh.truncate(100 << 20)  # 100 MB of NUL bytes, no newline (sparse: no disk used)
        fh.seek(0, os.SEEK_END)
        fh.write(b"\n" + pregreet(1).encode() + b"\n")
    endless = tmp_path / "endless.log"  # what a symlink to /dev/zero would give
    with endless.open("wb") as fh:
        fh.truncate(20 << 20)
    for path, expected in ((huge, [pregreet(1)]), (endless, [])):
        follower = FileFollower(path, once=True)
        tracemalloc.start()
        try:
            # Before: buf + data copied the growing line for every 64 KiB read (105 s
            # and 350 MB for this file).
            async with asyncio.timeout(30):
                got = [text async for text in follower.lines()]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert got == expected
        assert follower.long_lines.count == 1
        assert peak < 1 << 20, peak  # a few 64 KiB chunks, never the line


async def test_stdin_skips_an_overlong_line_and_reads_on(tmp_path: Path) -> None:
    data = b"Nov 23 05:02:09 mx postfix/smtpd[1]: " + b"x" * (2 << 20) + b"\n"
    data += (pregreet(4) + "\n").encode()
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as pipe:
            pipe.write(data)

    async with cli("--dry-run", "-", stdin=r) as watcher:
        os.close(r)
        await asyncio.to_thread(feed)  # then EOF
        assert await watcher.wait() == 0
    final = watcher.events[-1]
    assert final["event"] == "logwatch stopped"
    assert (final["lines"], final["lines_too_long"], final["reports"]) == (1, 1, 1)
    assert final["clients"] == {"203.0.113.4": {"protocol_violation": 1}}


# --- 3. linear time: crafted lines against every pattern


R = line(
    "smtpd",
    "NOQUEUE: reject: RCPT from unknown[203.0.113.9]: 550 5.1.1 <a@t.example>: "
    "Recipient address rejected: User unknown",
)
C = line("cleanup", "4F2B1C0A1: reject: header Subject: ")
D = line("smtpd", "disconnect from unknown[203.0.113.9]")


def crafted_lines(n: int) -> dict[str, str]:
    """Lines of about `n` characters shaped to make a backtracking pattern go quadratic."""
    return {
        "envelope to": R + "; to=<" * (n // 6),
        "envelope from": R + "; from=<" * (n // 8),
        "envelope proto": R + "; proto=a helo=<" * (n // 16),
        "envelope to proto": R + "; to=<> proto=a helo=<x" * (n // 23) + ">",
        "content from": C + " from a[1]; from=<" * (n // 18),
        "content to": C + " from a[1]; from=<> to=<" * (n // 24),
        "content full": C + " from a[1]; from=<> to=<> proto=x helo=<" * (n // 40),
        "summary": D + " a=1/2" * (n // 6) + "x",
        "header": "Nov 23 05:02:09 " + "a" * n,
        "tag": "Nov 23 05:02:09 mx " + "a/" * (n // 2),
        "dnsbl": R + " blocked using" * (n // 14),
        "pregreet": line("postscreen", "PREGREET 1 after " + "1" * n),
    }


_TIMING = """
import json, time
import penaltyclient.logpatterns as lp
from tests.unit.clients.test_logwatch_hostile import crafted_lines
out = {}
bound = lp.MAX_PARSE_CHARS
lp.MAX_PARSE_CHARS = 1 << 30  # the patterns themselves, past the line bound
for name, text in crafted_lines(1 << 16).items():
    t = time.perf_counter(); lp.parse_line(text); out[name] = time.perf_counter() - t
lp.MAX_PARSE_CHARS = bound
for name, text in crafted_lines(1 << 20).items():
    t = time.perf_counter(); result = lp.parse_line(text)
    out["1 MB " + name] = time.perf_counter() - t
    assert result == lp.Ignored("too-long"), (name, result)
print(json.dumps(out))
"""


def test_crafted_lines_parse_in_linear_time() -> None:
    # In a subprocess: a regex stuck in backtracking cannot be interrupted from here.
    # Before: 64 KiB of "; to=<" took 4.8 s (1 MB: about 20 minutes, SIGTERM ignored).
    done = subprocess.run(
        [sys.executable, "-c", _TIMING], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seconds: dict[str, float] = json.loads(done.stdout)
    slow = {name: round(s, 3) for name, s in seconds.items() if s > 0.5}
    assert not slow  # a linear 64 KiB line takes a few milliseconds


async def test_a_1_mb_reject_shaped_line_in_the_log_is_skipped_quickly(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    path.write_text(crafted_lines(1 << 20)["envelope to"] + "\n" + pregreet(5) + "\n")
    async with cli("--once", "--dry-run", str(path)) as watcher:
        assert await watcher.wait(within=20) == 0
    final = watcher.events[-1]
    assert (final["lines_too_long"], final["reports"]) == (1, 1)


# The patterns as they were (backtracking, quadratic): the new code must agree with them.
OLD_ENVELOPE = re.compile(
    r"^(?P<text>.*); (?:from=<(?P<from>[^>]*)>,? )?(?:to=<.*?>,? )?proto=\w+"
    r"(?:,? helo=<(?P<helo>[^>]*)>)?$"
)
OLD_CONTENT_REJECT = re.compile(
    rf"^(?P<qid>\w+): reject: (?:header|body|mime-header|nested-header) .* from "
    rf"{_NAMEADDR}; from=<(?P<from>[^>]*)> to=<[^>]*> proto=\w+ helo=<(?P<helo>[^>]*)>: "
    r"5\.\d{1,3}\.\d{1,3}\b"
)
ENVELOPE_TOKENS = [
    *("; ", "from=<", "to=<", ">", ", ", " ", "proto=", "E", "helo=<", "a", ",", ";", "<"),
    *("=", "; to=<", "> proto=E", ">, proto=E", "proto=E helo=<h>"),
    "; from=<a> to=<b> proto=E helo=<c>",
]
CONTENT_TOKENS = [
    *(" from ", "a", "unknown", "[", "]", "1.2.3.4", "; from=<", ">", " to=<", " proto="),
    *("E", " helo=<", ">: 5.7.1", "5.", ".", "1", " ", ":", "x"),
    " from u[1.2.3.4]; from=<a> to=<b> proto=E helo=<h>: 5.7.1 x",
]


@settings(max_examples=1000)
@given(parts=st.lists(st.sampled_from(ENVELOPE_TOKENS), max_size=16))
@example(parts=["x; to=<a>", " proto=E", " helo=<b; proto=F helo=<c", ">"])
@example(parts=["; from=<a> to=<b> proto=E helo=<c>: x", "; from=<s> to=<", "> proto=E"])
def test_the_envelope_is_split_where_the_backtracking_pattern_split_it(parts: list[str]) -> None:
    reply = "".join(parts)
    old = OLD_ENVELOPE.match(reply)
    new = split_envelope(reply)
    assert (None if new is None else (new[0], new[1]["from"], new[1]["helo"])) == (
        None if old is None else (len(old["text"]), old["from"], old["helo"])
    )


@settings(max_examples=1000)
@given(parts=st.lists(st.sampled_from(CONTENT_TOKENS), max_size=16))
def test_content_rejects_find_the_address_the_backtracking_pattern_found(
    parts: list[str],
) -> None:
    msg = "4F2B1C0A1: reject: header " + "".join(parts)
    rule = next(r for r in RULES if r.name == "content-reject")
    old, new = OLD_CONTENT_REJECT.match(msg), rule.match(msg)
    assert (None if new is None else (new["name"], new["ip"], new["from"], new["helo"])) == (
        None if old is None else (old["name"], old["ip"], old["from"], old["helo"])
    )


def test_a_sender_cannot_move_a_content_rejection_to_another_address() -> None:
    sender = '"x from victim[198.51.100.1]; from=<a"@spam.example'
    reject = (
        f"Nov 23 05:02:09 mx postfix/cleanup[600]: 4F2B1C0A1: reject: header Subject: "
        f"pills from unknown[203.0.113.42]; from=<{sender}> to=<r@t.example> proto=ESMTP "
        f"helo=<h.example>: 5.7.1 message content rejected"
    )
    # Without the queue id's client= line, the rightmost address is all there is ...
    assert Tally().feed(reject).ip == "198.51.100.1"  # type: ignore[union-attr]
    # ... with it (smtpd logs it before any content arrives), Postfix's own words win.
    tally = Tally()
    lines = session(
        "203.0.113.42",
        "4F2B1C0A1: client=unknown[203.0.113.42]",
        reject,
        summary="ehlo=1 mail=1 rcpt=1 data=0/1 quit=1 commands=4/5",
    )
    reports = [r for r in map(tally.feed, lines) if r is not None]
    assert [(r.ip, dict(r.counts)) for r in reports] == [
        ("203.0.113.42", {CONTENT_REJECTED: 1}),
        ("203.0.113.42", {ACCEPTED: 4}),  # the failed DATA is explained by the reject
    ]


# --- 4. counts from the log are bounded at the edge


def test_summary_counts_are_clamped_to_what_penaltyd_accepts() -> None:
    lines = session(
        "203.0.113.60", summary="ehlo=1 mail=1 rcpt=0/150001 quit=1 commands=150000/150001"
    )
    reports = [r for r in map(Tally().feed, lines) if r is not None]
    assert [dict(r.counts) for r in reports] == [
        {ACCEPTED: MAX_COUNT, PROTOCOL_VIOLATION: MAX_COUNT}
    ]
    # int() refuses more than 4300 digits: a counter must not crash the parser.
    assert parse_counters("commands=" + "9" * 5000) == {"commands": (10**12, 10**12)}


async def test_a_huge_summary_among_normal_lines_costs_no_other_report(
    serve: ServeFactory, tmp_path: Path
) -> None:
    pd = await serve(MemoryStore())
    path = tmp_path / "mail.log"
    huge = session(
        "203.0.113.61", summary="ehlo=1 mail=1 rcpt=0/150001 quit=1 commands=150000/150001"
    )
    path.write_text(
        attack_log("203.0.113.62", 20) + "\n".join(huge) + "\n" + attack_log("203.0.113.63", 20)
    )
    watch = LogWatch(Options(path=str(path), penaltyd=pd.address, once=True, flush_timeout=5))
    await watch.run()
    stats = watch.stats()
    assert stats["reports"] == 43
    assert (stats["reports_sent"], stats["reports_rejected"], stats["reports_dropped"]) == (
        43,
        0,
        0,
    )
    for ip in ("203.0.113.62", "203.0.113.63"):
        client = pb.Client(ip=ip, helo="bot.example", mail_from="x@spam.example")
        assert (await pd.service.Check(pb.CheckRequest(client=client))).tempfail


async def test_a_report_penaltyd_refuses_is_rejected_not_waited_for(
    serve: ServeFactory, tmp_path: Path
) -> None:
    # penaltyd configured to take at most 10 events per count: the summary's 30 is refused.
    pd = await serve(MemoryStore(), max_count=10)
    path = tmp_path / "mail.log"
    busy = session("203.0.113.65", summary="ehlo=1 mail=1 rcpt=28 data=0 quit=1 commands=30/30")
    path.write_text(attack_log("203.0.113.64", 5) + "\n".join(busy) + "\n")
    watch = LogWatch(Options(path=str(path), penaltyd=pd.address, once=True, flush_timeout=30))
    started = time.monotonic()
    await watch.run()
    # Before: a refused report was never "settled", so exit waited all of --flush-timeout
    # and then counted it as dropped.
    assert time.monotonic() - started < 10
    stats = watch.stats()
    assert (stats["reports"], stats["reports_sent"]) == (7, 6)
    assert (stats["reports_rejected"], stats["reports_dropped"], stats["reports_pending"]) == (
        1,
        0,
        0,
    )


# --- 5. what penaltyd has not taken survives a restart (the spool)


async def test_sigterm_while_penaltyd_is_down_spools_every_report_and_the_next_start_sends_them(
    serve: ServeFactory, tmp_path: Path
) -> None:
    path, state = tmp_path / "mail.log", tmp_path / "state"
    path.write_text(attack_log("203.0.113.70", 499))  # 500 reports
    down = f"127.0.0.1:{free_port()}"
    args = ["--penaltyd", down, "--state-dir", str(state), "--from-start"]
    args += ["--flush-timeout", "0.2", "--stats-interval", "0.05", str(path)]
    async with cli(*args) as watcher:
        await watcher.next_event("logwatch stats", lambda e: e["reports"] == 500)
        watcher.proc.send_signal(signal.SIGTERM)
        final = await watcher.next_event("logwatch stopped")
        assert await watcher.wait() == 0
    # Before: 500 of 500 counted as dropped, and gone.
    assert (final["reports_sent"], final["reports_spooled"], final["reports_dropped"]) == (
        0,
        500,
        0,
    )
    assert (state / SPOOL_NAME).stat().st_mode & 0o777 == 0o600  # envelope metadata
    assert (state / POSITION_NAME).exists()

    pd = await serve(MemoryStore())
    watch = LogWatch(Options(path=str(path), penaltyd=pd.address, state_dir=str(state)))
    run = asyncio.create_task(watch.run())
    try:
        assert watch.follower is not None
        await watch.follower.opened.wait()
        assert not (state / SPOOL_NAME).exists()  # queued again, then removed
        await until(lambda: watch.reporter is not None and watch.reporter.acked == 500)
    finally:
        watch.stop()
        await run
    stats = watch.stats()
    assert (stats["reports_replayed"], stats["reports_sent"], stats["reports_spooled"]) == (
        500,
        500,
        0,
    )
    assert stats["lines"] == 0  # the read position: the file was read to its end already
    assert not (state / SPOOL_NAME).exists()
    client = pb.Client(ip="203.0.113.70", helo="bot.example", mail_from="x@spam.example")
    assert (await pd.service.Check(pb.CheckRequest(client=client))).tempfail


def report(ip: str, n: int = 1) -> pb.ReportRequest:
    return pb.ReportRequest(
        client=pb.Client(ip=ip, helo="h.example", mail_from="a@b.example"),
        counts=[pb.OutcomeCount(outcome=pb.OUTCOME_UNKNOWN_RECIPIENT, n=n)],
    )


def test_a_truncated_or_corrupt_spool_gives_back_every_intact_record(tmp_path: Path) -> None:
    path = tmp_path / SPOOL_NAME
    assert write_spool(path, [report(f"203.0.113.{i}") for i in range(1, 6)], time.time()) == 5
    lines = path.read_bytes().splitlines(keepends=True)
    raw = pb.ReportRequest(client=pb.Client(ip="not an ip"), counts=report("1.2.3.4").counts)
    invalid = raw.SerializeToString()
    flipped = b"B" if lines[2][12:13] != b"B" else b"C"
    lines[2] = lines[2][:12] + flipped + lines[2][13:]  # one byte changed: CRC mismatch
    lines.insert(3, b"garbage\n")
    lines.insert(4, b"%08x %s\n" % (zlib.crc32(invalid), base64.b64encode(invalid)))
    lines.insert(5, b"x" * 20_000 + b"\n")  # longer than any record: skipped unread
    lines.insert(6, spool_records([report("203.0.113.9", n=MAX_COUNT + 1)])[0])
    lines[-1] = lines[-1][:20]  # the last record cut short (a crash while writing)
    path.write_bytes(b"".join(lines))
    found = read_spool(path, limit=100)
    assert [r.client.ip for r in found.requests] == ["203.0.113.1", "203.0.113.3", "203.0.113.4"]
    assert found.bad == 6
    assert found.problem == ""
    path.write_bytes(b"\x00not a spool\n" + lines[1])
    assert read_spool(path, limit=100).problem.startswith("not a penalty-logwatch spool")
    # At most `limit` records are read, whatever the file holds.
    write_spool(path, [report(f"203.0.113.{i}") for i in range(1, 200)], time.time())
    assert len(read_spool(path, limit=10).requests) == 10
    # A symlink is not followed (the state directory is ours; its links are not).
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(NotRegularFile, match="symbolic link"):
        read_spool(tmp_path / "link", limit=10)


async def test_a_spool_older_than_resume_within_is_discarded(tmp_path: Path) -> None:
    path, state = tmp_path / "mail.log", tmp_path / "state"
    path.write_text("")
    state.mkdir()
    write_spool(state / SPOOL_NAME, [report("203.0.113.80")], time.time() - 3600)
    options = Options(
        path=str(path),
        penaltyd=f"127.0.0.1:{free_port()}",
        once=True,
        flush_timeout=0.1,
        state_dir=str(state),
    )
    watch = LogWatch(options)
    await watch.run()
    assert (watch.replayed, watch.spooled) == (0, 0)
    assert not (state / SPOOL_NAME).exists()


async def test_two_watchers_cannot_share_a_state_directory(tmp_path: Path) -> None:
    path, state = tmp_path / "mail.log", tmp_path / "state"
    path.write_text("")
    options = Options(
        path=str(path),
        penaltyd=f"127.0.0.1:{free_port()}",
        poll_interval=0.01,
        flush_timeout=0.1,
        state_dir=str(state),
    )
    first = LogWatch(options)
    run = asyncio.create_task(first.run())
    try:
        assert first.follower is not None
        await first.follower.opened.wait()
        with pytest.raises(LogwatchError, match="in use by another penalty-logwatch"):
            await LogWatch(options).run()
    finally:
        first.stop()
        await run
    await LogWatch(replace(options, once=True)).run()  # free again once the first stopped


# --- 5b. ... and so does the read position


@pytest.mark.parametrize("change", ["appended", "rotated", "rewritten", "stale"])
async def test_a_restart_reads_what_was_written_while_it_was_stopped(
    tmp_path: Path, change: str
) -> None:
    path, state = tmp_path / "mail.log", tmp_path / "state"
    path.write_text(pregreet(100) + "\n")  # before the first start: not read
    options = Options(
        path=str(path),
        penaltyd=f"127.0.0.1:{free_port()}",  # down: the reports are spooled
        poll_interval=0.01,
        flush_timeout=0.1,
        state_dir=str(state),
    )
    first = LogWatch(options)
    run = asyncio.create_task(first.run())
    assert first.follower is not None
    await first.follower.opened.wait()
    append(path, pregreet(1) + "\n" + pregreet(2) + "\n")
    await until(lambda: first.tally.reports == 2)
    first.stop()
    await run
    assert first.spooled == 2
    saved = json.loads((state / POSITION_NAME).read_text())
    assert saved["offset"] == path.stat().st_size

    expected: list[int] = []
    if change == "appended":
        append(path, pregreet(3) + "\n" + pregreet(4) + "\n")
        expected = [3, 4]
    elif change == "rotated":
        os.rename(path, tmp_path / "mail.log.1")
        path.write_text(pregreet(5) + "\n")
        expected = [5]
    elif change == "rewritten":  # the same inode, other lines (an inode reused, say)
        path.write_text("".join(pregreet(i) + "\n" for i in (6, 7, 8, 9)))
        expected = [6, 7, 8, 9]
    else:
        saved["saved_at"] -= 3600
        (state / POSITION_NAME).write_text(json.dumps(saved))
        append(path, pregreet(10) + "\n")  # written while stopped, but too long ago

    second = LogWatch(options)
    run = asyncio.create_task(second.run())
    assert second.follower is not None
    await second.follower.opened.wait()
    await until(lambda: second.tally.reports == len(expected))
    second.stop()
    await run
    assert second.replayed == 2
    left = read_spool(state / SPOOL_NAME, limit=100).requests
    assert sorted(r.client.ip for r in left) == [f"203.0.113.{i}" for i in [1, 2, *expected]]


# --- 6. the parser never raises, and only ever reports what penaltyd accepts

OUTCOMES = set(outcomes.NAMES)
PROGRAMS = sorted({r.program for r in RULES} | {"qmgr"})


@st.composite
def mutated_line(draw: st.DrawFn) -> str:
    """A real Postfix 3.7 line with a few characters replaced, inserted, deleted, cut,
    repeated, or with huge numbers and envelope pieces spliced in."""
    text = draw(st.sampled_from(REAL_LINES))
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "cut", "repeat", "splice"]))
        at = draw(st.integers(0, len(text)))
        if op == "replace" and at < len(text):
            text = text[:at] + draw(st.characters()) + text[at + 1 :]
        elif op == "insert":
            text = text[:at] + draw(st.text(max_size=8)) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 16)) :]
        elif op == "cut":
            text = text[:at]
        elif op == "repeat":
            size = draw(st.integers(1, 40))
            text = text[:at] + text[at : at + size] * draw(st.integers(2, 50)) + text[at:]
        else:
            piece = draw(
                st.sampled_from(
                    [*ENVELOPE_TOKENS, *CONTENT_TOKENS, "=99999999999999", "/0", "[::1]"]
                )
            )
            text = text[:at] + piece + text[at:]
    return text


arbitrary_line = st.builds(
    lambda prefix, text: prefix + text,
    st.sampled_from(["", *(PREFIX.format(program=p) for p in PROGRAMS)]),
    st.text(max_size=300),
)


def check_parsed(text: str) -> None:
    result = parse_line(text)
    assert isinstance(result, Parsed | Ignored)
    if isinstance(result, Ignored):
        return
    assert result.outcome is None or result.outcome in OUTCOMES
    if result.rule.kind == "session":
        assert result.ip == ""
    else:
        assert str(parse_ip(result.ip)) == result.ip
    assert bound_client(result.helo, result.mail_from) == (result.helo, result.mail_from, "")
    assert all(ok >= 0 and total >= 0 for ok, total in result.counters.values())


@settings(max_examples=300)
@given(lines=st.lists(st.one_of(mutated_line(), arbitrary_line), min_size=1, max_size=12))
@example(lines=[crafted_lines(MAX_PARSE_CHARS)["envelope to"], "x" * (MAX_PARSE_CHARS + 1)])
def test_fuzzed_lines_never_raise_and_report_only_valid_bounded_outcomes(
    lines: list[str],
) -> None:
    tally = Tally()
    for text in [*REAL_LINES[:12], *lines]:  # some real sessions open, so summaries count
        check_parsed(text)
        result = tally.feed(text)
        if result is None:
            continue
        assert str(parse_ip(result.ip)) == result.ip
        assert result.counts
        assert all(o in OUTCOMES and 1 <= n <= MAX_COUNT for o, n in result.counts.items())
    assert tally.lines == 12 + len(lines)
    assert tally.reports + sum(tally.ignored.values()) == tally.lines


def test_the_real_log_parses_as_before_under_the_bounds() -> None:
    assert max(map(len, REAL_LINES)) < MAX_PARSE_CHARS < MAX_LINE_BYTES
    tally = Tally()
    reports = [r for r in map(tally.feed, REAL_LINES) if r is not None]
    assert "too-long" not in tally.ignored
    assert sum(r.counts.get(UNKNOWN_RECIPIENT, 0) for r in reports) == 6
