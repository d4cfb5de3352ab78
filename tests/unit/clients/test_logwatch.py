"""penalty-logwatch: the pattern table on a real Postfix 3.7 log, the follower, end to end.

The sample log and its README (`../shared/data/postfix-3.7/`) say which client did what;
the first tests hold the parser to exactly that. Follower and end-to-end tests use real
files and an in-process penaltyd (memory store); waits poll a condition, never sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.logpatterns import (
    ACCEPTED,
    AUTH_FAILED,
    BAD_HELO,
    CONTENT_REJECTED,
    LOST_CONNECTION,
    PROTOCOL_VIOLATION,
    REASONS,
    RELAY_DENIED,
    RULES,
    UNKNOWN_RECIPIENT,
    Ignored,
    Parsed,
    Reason,
    Rule,
    Tally,
    markdown_tables,
    parse_line,
    tally_by_client,
)
from penaltyclient.logwatch import FileFollower, LogWatch, Options, main, parser
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import eventually
from tests.harness.inprocess import ServeFactory
from tests.harness.paths import REPO
from tests.harness.ports import free_port

ROOT = REPO
SAMPLE = ROOT.parent / "shared" / "data" / "postfix-3.7" / "maillog-sample.log"
PREFIX = "Nov 23 05:02:09 mx postfix/{program}[22153]: "

# What each client of the README's table did, as outcome counts. Reject lines are one
# event each; the summary adds ACCEPTED = ok commands, plus PROTOCOL_VIOLATION for each
# failed command no other line explains (203.0.113.25: RCPT before MAIL and DATA without
# RCPT, both 503s Postfix does not log); postscreen HANGUP is a lost connection.
EXPECTED: dict[str, dict[int, int]] = {
    "203.0.113.21": {UNKNOWN_RECIPIENT: 6, ACCEPTED: 5},
    "203.0.113.22": {RELAY_DENIED: 3, ACCEPTED: 4},
    "203.0.113.23": {BAD_HELO: 1, ACCEPTED: 4},
    "203.0.113.24": {BAD_HELO: 1, ACCEPTED: 4},
    "203.0.113.25": {PROTOCOL_VIOLATION: 3, RELAY_DENIED: 1, ACCEPTED: 4},
    "203.0.113.26": {PROTOCOL_VIOLATION: 1, ACCEPTED: 2},
    "203.0.113.27": {PROTOCOL_VIOLATION: 2, ACCEPTED: 4},
    "203.0.113.28": {LOST_CONNECTION: 1, ACCEPTED: 3},
    "198.51.100.61": {ACCEPTED: 6},
    "127.0.0.5": {PROTOCOL_VIOLATION: 1, LOST_CONNECTION: 1},
    "127.0.0.6": {PROTOCOL_VIOLATION: 1, LOST_CONNECTION: 1},
    "127.0.0.7": {PROTOCOL_VIOLATION: 1},
    # Not in the README's table: a probe right after start-up that connected and left.
    "127.0.0.1": {LOST_CONNECTION: 1},
}


def sample_lines() -> list[str]:
    return SAMPLE.read_text().splitlines()


def line(program: str, message: str) -> str:
    return PREFIX.format(program=program) + message


def parsed(text: str) -> Parsed:
    result = parse_line(text)
    assert isinstance(result, Parsed), result
    return result


def as_dicts(clients: dict[str, Any]) -> dict[str, dict[int, int]]:
    return {ip: dict(c) for ip, c in clients.items()}


# --- the parser on the real log


def test_sample_log_gives_each_client_exactly_its_outcomes() -> None:
    lines = sample_lines()
    assert len(lines) == 63
    clients, tally = tally_by_client(lines)
    assert as_dicts(clients) == EXPECTED
    # Every line is accounted for: it reported something, or was ignored for a reason.
    assert tally.lines == 63
    assert tally.reports + sum(tally.ignored.values()) == 63
    assert tally.ignored == {
        "other-program": 8,  # master, postfix-script, qmgr, local
        "no-pattern": 8,  # postscreen CONNECT/DISCONNECT/cache, cleanup message-id
        "session-start": 10,
        "queue-id": 2,
        "nothing-to-report": 1,  # disconnect ... commands=0/0
        "pipelining-consequence": 1,
        "ps-reject": 1,
    }


def test_no_rejects_skips_rcpt_rejects_but_they_still_explain_the_summary() -> None:
    clients, tally = tally_by_client(sample_lines(), no_rejects=True)
    expected = {ip: dict(c) for ip, c in EXPECTED.items()}
    for counts in expected.values():
        counts.pop(UNKNOWN_RECIPIENT, None)
        counts.pop(RELAY_DENIED, None)
        counts.pop(BAD_HELO, None)  # those were RCPT rejects too (smtpd_delay_reject)
    # No PROTOCOL_VIOLATION appears in their place: the skipped lines still account
    # for the failed RCPTs in the summary.
    assert as_dicts(clients) == expected
    assert tally.ignored["no-rejects"] == 12


def test_no_accepted_leaves_the_denominator_to_another_component() -> None:
    clients, tally = tally_by_client(sample_lines(), no_accepted=True)
    expected = {ip: {o: n for o, n in c.items() if o != ACCEPTED} for ip, c in EXPECTED.items()}
    assert as_dicts(clients) == {ip: c for ip, c in expected.items() if c}
    assert tally.outcomes["protocol_violation"] == 9  # unexplained failures still count
    assert "accepted" not in tally.outcomes


def test_ignore_loopback_drops_loopback_clients_only() -> None:
    clients, tally = tally_by_client(sample_lines(), ignore_loopback=True)
    assert as_dicts(clients) == {ip: c for ip, c in EXPECTED.items() if not ip.startswith("127.")}
    assert tally.ignored["loopback"] == 6


def test_summary_carries_the_sessions_helo_and_sender() -> None:
    tally = Tally()
    reports = [r for r in map(tally.feed, sample_lines()) if r is not None]
    summary = next(r for r in reports if r.ip == "203.0.113.21" and ACCEPTED in r.counts)
    # Same HELO and sender as the session's rejects: one sub-identity behind a NAT.
    assert (summary.helo, summary.mail_from) == ("bot21.example", "offers@spam21.example")
    clean = next(r for r in reports if r.ip == "198.51.100.61")
    assert (clean.helo, clean.mail_from) == ("", "")


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_every_rule_matches_its_documented_example(rule: Rule) -> None:
    p = parsed(line(rule.program, rule.example))
    assert p.rule.name == rule.name
    if rule.kind == "reject":
        assert p.outcome == UNKNOWN_RECIPIENT
    else:
        assert p.outcome == rule.outcome


@pytest.mark.parametrize("reason", REASONS, ids=lambda r: r.name)
def test_every_reject_reason_matches_its_documented_example(reason: Reason) -> None:
    p = parsed(
        line(
            "smtpd",
            f"NOQUEUE: reject: RCPT from mx.example[203.0.113.9]: {reason.example}; "
            "from=<a@b.example> to=<c@d.example> proto=ESMTP helo=<h.example>",
        )
    )
    assert (p.label, p.outcome) == (reason.name, reason.outcome)
    assert (p.ip, p.command) == ("203.0.113.9", "rcpt")
    assert (p.helo, p.mail_from) == ("h.example", "a@b.example")


@pytest.mark.parametrize(
    ("message", "ip"),
    [
        ("lost connection after RCPT from unknown[2001:db8::1]", "2001:db8::1"),
        ("lost connection after RCPT from unknown[IPv6:2001:DB8::1]", "2001:db8::1"),
        ("lost connection after RCPT from unknown[::ffff:203.0.113.9]", "203.0.113.9"),
        ("lost connection after RCPT from unknown[fe80::1%eth0]", "fe80::1"),
        ("lost connection after DATA (2048 bytes) from a.example[203.0.113.9]", "203.0.113.9"),
    ],
)
def test_client_addresses_ipv4_and_ipv6(message: str, ip: str) -> None:
    assert parsed(line("smtpd", message)).ip == ip


def test_postscreen_ipv6_and_unusable_addresses() -> None:
    p = parsed(line("postscreen", "PREGREET 11 after 0 from [2001:db8::2]:4000: EHLO x\\r\\n"))
    assert (p.ip, p.outcome) == ("2001:db8::2", PROTOCOL_VIOLATION)
    assert parse_line(line("smtpd", "lost connection after CONNECT from unknown[unknown]")) == (
        Ignored("bad-address")
    )


def test_lines_that_match_nothing_are_counted_per_reason() -> None:
    tally = Tally()
    junk = [
        "",
        "hello world",
        "Nov 23 05:02:10 mx kernel: [12.3] eth0 link up",
        "Nov 23 05:02:10 mx postfix/qmgr[22152]: 97C9720E2B7: removed",
        line("smtpd", "warning: hostname x.example does not resolve to address 203.0.113.9"),
        line("smtpd", "NOQUEUE: reject_warning: RCPT from unknown[203.0.113.9]: 550 5.1.1 x"),
        line(
            "smtpd",  # greylisting, or penaltyd's own tempfail: no client error
            "NOQUEUE: reject: RCPT from unknown[203.0.113.9]: 450 4.7.1 <a@t.example>: "
            "Recipient address rejected: too many SMTP errors from 203.0.113.9; try again in "
            "287 seconds; from=<a@b.example> to=<a@t.example> proto=ESMTP helo=<h.example>",
        ),
        "2026-11-23T05:02:10.123456+00:00 mx postfix/smtpd[7]: lost connection after EHLO "
        "from unknown[203.0.113.9]",
    ]
    reports = [tally.feed(text) for text in junk]
    assert reports[:-1] == [None] * 7
    assert reports[-1] is not None  # RFC 3339 stamps are syslog lines too
    assert tally.ignored == {
        "not-syslog": 2,
        "other-program": 2,
        "no-pattern": 2,
        "reject-unmatched": 1,
    }
    assert tally.lines == 8


def test_client_text_cannot_turn_an_error_into_an_ignored_line() -> None:
    # The recipient (client text) spells out the ignored reasons and a fake envelope.
    rcpt = '"x; from=<a> to=<b> proto=ESMTP helo=<c>: Improper use of SMTP command pipelining"'
    p = parsed(
        line(
            "smtpd",
            f"NOQUEUE: reject: RCPT from unknown[203.0.113.9]: 550 5.1.1 <{rcpt}@t.example>: "
            "Recipient address rejected: User unknown in local recipient table; "
            f"from=<s@b.example> to=<{rcpt}@t.example> proto=ESMTP helo=<h.example>",
        )
    )
    assert (p.outcome, p.ip, p.helo) == (UNKNOWN_RECIPIENT, "203.0.113.9", "h.example")
    # Pipelined input naming another client does not move the blame.
    p = parsed(
        line(
            "smtpd",
            "improper command pipelining after EHLO from unknown[203.0.113.9]: "
            "lost connection after RCPT from unknown[198.51.100.1]",
        )
    )
    assert (p.rule.name, p.ip) == ("improper-pipelining", "203.0.113.9")


def session(ip: str, *middle: str, summary: str, pid: int = 500) -> list[str]:
    head = f"Nov 23 05:02:09 mx postfix/smtpd[{pid}]: "
    return [
        head + "connect from localhost[127.0.0.1]",
        *(text if text.startswith("Nov ") else head + text for text in middle),
        head + f"disconnect from unknown[{ip}] {summary}",
    ]


def test_summary_failures_count_only_when_the_session_start_was_seen() -> None:
    lines = session(
        "203.0.113.40", summary="ehlo=1 mail=1 rcpt=0/3 data=0/1 unknown=0/2 quit=1 commands=3/9"
    )
    clients, _ = tally_by_client(lines)
    # 3 RCPT + 1 DATA + 2 unknown failures, none logged: six 5xx syntax/sequence errors.
    assert as_dicts(clients) == {"203.0.113.40": {ACCEPTED: 3, PROTOCOL_VIOLATION: 6}}
    clients, _ = tally_by_client(lines[1:])  # the watcher started after `connect`
    assert as_dicts(clients) == {"203.0.113.40": {ACCEPTED: 3}}
    clients, _ = tally_by_client(lines, no_rejects=True)  # the milter saw the unknown ones
    assert as_dicts(clients) == {"203.0.113.40": {ACCEPTED: 3, PROTOCOL_VIOLATION: 4}}


def test_auth_and_content_rejections_account_for_their_failed_commands() -> None:
    lines = session(
        "203.0.113.41",
        "warning: unknown[203.0.113.41]: SASL LOGIN authentication failed: UGFzc3dvcmQ6",
        "warning: unknown[203.0.113.41]: SASL PLAIN authentication failed: ",
        "4F2B1C0A1: client=unknown[203.0.113.41]",
        # cleanup runs in another process: the queue id ties its line to the session.
        "Nov 23 05:02:09 mx postfix/cleanup[600]: 4F2B1C0A1: reject: header Subject: "
        "x from y[192.0.2.1]; z from unknown[203.0.113.41]; from=<a@b.example> "
        "to=<r@t.example> proto=ESMTP helo=<h.example>: 5.7.1 message content rejected",
        summary="ehlo=1 auth=0/2 mail=1 rcpt=1 data=0/1 quit=1 commands=4/7",
    )
    clients, _ = tally_by_client(lines)
    assert as_dicts(clients) == {"203.0.113.41": {AUTH_FAILED: 2, CONTENT_REJECTED: 1, ACCEPTED: 4}}


def test_docs_show_the_current_pattern_table(capsys: pytest.CaptureFixture[str]) -> None:
    docs = (ROOT / "docs" / "logwatch.md").read_text()
    assert markdown_tables() in docs
    assert main(["--patterns"]) == 0
    assert capsys.readouterr().out == markdown_tables()


def test_help_documents_every_flag() -> None:
    p = parser()
    text = p.format_help()
    for action in p._actions:
        assert action.help, action.dest
        for flag in action.option_strings:
            assert flag in text
    for flag in ("--penaltyd", "--from-start", "--no-rejects", "--ignore-loopback", "--once"):
        assert flag in text


# --- the follower


def pregreet(i: int) -> str:
    return line("postscreen", f"PREGREET 4 after 0 from [203.0.113.{i}]:4000: x\\r\\n")


def append(path: Path, text: str) -> None:
    with path.open("a") as fh:
        fh.write(text)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async def probe() -> bool:
        return condition()

    await eventually(probe, bool, within=within)


async def test_follower_survives_rotation_and_truncation_reporting_each_line_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mail.log"
    path.write_text(pregreet(1) + "\n" + pregreet(2) + "\n")
    watch = LogWatch(Options(path=str(path), dry_run=True, from_start=True, poll_interval=0.01))
    run = asyncio.create_task(watch.run())

    def reported(n: int) -> Callable[[], bool]:
        return lambda: watch.tally.reports == n

    await until(reported(2))
    append(path, pregreet(3) + "\n")
    await until(reported(3))
    # logrotate: rename; the writer still finishes a line in the old file; a new file.
    os.rename(path, tmp_path / "mail.log.1")
    append(tmp_path / "mail.log.1", pregreet(4) + "\n")
    path.write_text(pregreet(5) + "\n" + pregreet(6) + "\n")
    await until(reported(6))
    # copytruncate: the same file, shorter than what was read.
    path.write_text(pregreet(7) + "\n")
    await until(reported(7))
    append(path, pregreet(8)[:30])  # a line written in two parts
    append(path, pregreet(8)[30:] + "\n")
    await until(reported(8))
    watch.stop()
    await run
    assert watch.dry is not None
    assert watch.follower is not None
    assert watch.dry.clients == {f"203.0.113.{i}": {"protocol_violation": 1} for i in range(1, 9)}
    assert list(watch.dry.clients) == [f"203.0.113.{i}" for i in range(1, 9)]  # in order
    assert (watch.follower.rotations, watch.follower.truncations) == (1, 1)
    assert watch.tally.lines == 8


async def test_follower_starts_at_the_end_by_default(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    path.write_text("old 1\nold 2\n")
    follower = FileFollower(path, poll=0.01)
    got: list[str] = []

    async def collect() -> None:
        async for text in follower.lines():
            got.append(text)

    task = asyncio.create_task(collect())
    await follower.opened.wait()
    append(path, "new 1\n")
    await until(lambda: got == ["new 1"])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_follower_waits_for_a_missing_file_and_reads_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "later.log"
    follower = FileFollower(path, poll=0.01)
    got: list[str] = []

    async def collect() -> None:
        async for text in follower.lines():
            got.append(text)

    task = asyncio.create_task(collect())
    await follower.waiting.wait()
    path.write_text("first\n")
    await until(lambda: got == ["first"])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- end to end


def attack_log(ip: str, n: int) -> str:
    rejects = [
        f"NOQUEUE: reject: RCPT from unknown[{ip}]: 550 5.1.1 <u{i}@t.example>: Recipient "
        f"address rejected: User unknown in local recipient table; from=<x@spam.example> "
        f"to=<u{i}@t.example> proto=ESMTP helo=<bot.example>"
        for i in range(n)
    ]
    lines = session(ip, *rejects, summary=f"ehlo=1 mail=1 rcpt=0/{n} quit=1 commands=3/{n + 3}")
    return "\n".join(lines) + "\n"


async def test_once_against_penaltyd_starts_the_penalty(
    serve: ServeFactory, tmp_path: Path
) -> None:
    pd = await serve(MemoryStore())
    path = tmp_path / "mail.log"
    path.write_text(attack_log("203.0.113.50", 40))
    watch = LogWatch(Options(path=str(path), penaltyd=pd.address, once=True, flush_timeout=5))
    await watch.run()
    stats = watch.stats()
    assert stats["matched"] == {"unknown_recipient": 40, "accepted": 3}
    assert (stats["reports"], stats["reports_sent"], stats["reports_dropped"]) == (41, 41, 0)
    client = pb.Client(ip="203.0.113.50", helo="bot.example", mail_from="x@spam.example")
    verdict = await pd.service.Check(pb.CheckRequest(client=client))
    assert verdict.tempfail
    assert 0 < verdict.seconds_left <= 300
    # Explain the client as it reported (its penalty may be its own: cold start).
    explained = await pd.admin.Explain(pb.ExplainRequest(client=client))
    assert explained.verdict.tempfail
    assert "unknown_recipient" in explained.verdict.reason
    bystander = pb.CheckRequest(client=pb.Client(ip="203.0.113.51"))
    assert not (await pd.service.Check(bystander)).tempfail


async def test_penaltyd_down_reading_goes_on_and_drops_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    path.write_text(SAMPLE.read_text())
    started = time.monotonic()
    # A queue of 4: most reports are refused at once, the rest are lost at exit.
    watch = LogWatch(
        Options(
            path=str(path),
            penaltyd=f"127.0.0.1:{free_port()}",
            once=True,
            flush_timeout=0.2,
            max_queue=4,
        )
    )
    await watch.run()
    assert time.monotonic() - started < 3
    stats = watch.stats()
    assert stats["lines"] == 63
    assert stats["reports"] == 32
    assert stats["reports_sent"] == 0
    assert stats["reports_dropped"] == 32
    assert watch.refused > 0


async def test_cli_on_stdin_flushes_and_exits_0_on_sigterm(
    serve: ServeFactory, tmp_path: Path
) -> None:
    pd = await serve(MemoryStore())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penaltyclient.logwatch",
        "--penaltyd",
        pd.address,
        "--stats-interval",
        "0.05",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    events: list[dict[str, Any]] = []

    async def next_event(name: str, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            while True:
                raw = await proc.stdout.readline()
                assert raw, "penalty-logwatch exited early"
                event: dict[str, Any] = json.loads(raw)
                events.append(event)
                if event["event"] == name and ok(event):
                    return event

    try:
        proc.stdin.write(SAMPLE.read_bytes())
        await proc.stdin.drain()  # the pipe stays open: the watcher keeps following
        await next_event("logwatch stats", lambda e: e["lines"] == 63)
        proc.send_signal(signal.SIGTERM)
        final = await next_event("logwatch stopped", lambda e: True)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert final["lines"] == 63
    assert (final["reports"], final["reports_sent"], final["reports_dropped"]) == (32, 32, 0)
    assert final["matched"]["accepted"] == 36
