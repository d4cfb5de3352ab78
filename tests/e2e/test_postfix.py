"""End to end with a real Postfix 3.7 wired exactly as the README says.

The README's three sidecar commands (penalty-policyd `--no-report-accepted`,
penalty-milter, penalty-logwatch `--no-rejects --no-accepted`) and its `main.cf` lines
are taken from README.md as they stand; only the ports and the log file change
(`tests.e2e.postfix.wiring_for`). Every other Postfix parameter is its default, the
error limits included: a dictionary attacker is cut off with `421 4.7.0` after 20
errors.

- A dictionary attacker's penalty starts during its first connection (before Postfix's
  421), from its 20 unknown recipients each counted once; its next connection gets the
  `450 4.7.1 ... try again in N seconds` at its first RCPT, N the true remaining time.
- A well-behaved client on another address delivers; its recipient counts as accepted,
  once.
- With penaltyd stopped, mail still flows; the sidecars then stop on SIGTERM with exit 0
  and no traceback while Postfix still holds its connections, and say what became of
  the reports they could not send.

The tests of this module share one stack and run in order (the last stops penaltyd).
"""

from __future__ import annotations

import json
import re
import smtplib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from penalty.v1 import penalty_pb2 as pb
from penaltyclient import PenaltyClient
from tests.e2e.postfix import MX_CF, SCRIPTS, Postfix, wiring_for
from tests.harness.mta import smtp_from, until
from tests.harness.ports import established, free_port
from tests.harness.processes import PenaltydProcess, ServiceProcess

ATTACKER = "127.0.0.7"
GOOD = "127.0.0.8"
LATE = "127.0.0.9"


@dataclass
class Stack:
    pd: PenaltydProcess
    postfix: Postfix
    sidecars: dict[str, ServiceProcess]


class PenaltyWatch:
    """penaltyd's WatchPenalties stream in a thread: when each identity's penalty was
    first announced (monotonic clock), to compare with what the SMTP client saw."""

    def __init__(self, address: str) -> None:
        self.client = PenaltyClient(address, deadline=2.0)
        self.started: dict[str, float] = {}
        self.synced = threading.Event()
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.synced.wait(10), "no WatchPenalties snapshot within 10 s"

    def _run(self) -> None:
        try:
            for event in self.client.watch():
                if event.kind == pb.PenaltyEvent.KIND_SNAPSHOT_DONE:
                    self.synced.set()
                elif event.kind == pb.PenaltyEvent.KIND_PENALTY_STARTED:
                    with self.changed:
                        self.started.setdefault(event.penalty.identity, time.monotonic())
                        self.changed.notify_all()
        except Exception:  # the stream ends when penaltyd stops or the client closes
            pass

    def wait_started(self, identity: str, within: float = 10.0) -> float:
        with self.changed:
            ok = self.changed.wait_for(lambda: identity in self.started, within)
            assert ok, f"no penalty for {identity} announced within {within} s"
            return self.started[identity]

    def close(self) -> None:
        self.client.close()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    pd = PenaltydProcess().start()
    policy_port, milter_port = free_port(), free_port()
    postfix = Postfix(MX_CF + wiring_for(policy_port, milter_port, pd.address, "").main_cf)
    wiring = wiring_for(policy_port, milter_port, pd.address, str(postfix.maillog))
    ports = {"penalty-policyd": policy_port, "penalty-milter": milter_port}
    sidecars: dict[str, ServiceProcess] = {}
    try:
        for script, module in SCRIPTS.items():
            args = list(wiring.command(script)[1:])
            sidecars[script] = ServiceProcess(module, args, ports.get(script)).start()
        # The log does not exist yet: the watcher waits for it and reads it from its
        # first line once Postfix creates it, so no line falls before the watcher.
        until(sidecars["penalty-logwatch"].output, lambda out: "waiting for the log file" in out)
        postfix.start()
        yield Stack(pd, postfix, sidecars)
    finally:
        for name, proc in sidecars.items():
            proc.stop()
            print(f"--- {name}\n" + proc.output()[-3000:])
        print("--- maillog\n" + postfix.log()[-5000:])
        postfix.stop()
        pd.stop()


def rcpt(smtp: smtplib.SMTP, address: str) -> tuple[int, str]:
    """RCPT, and the reply; a server that closes the connection after its reply (421)
    gives that reply too."""
    try:
        code, text = smtp.rcpt(address)
    except smtplib.SMTPServerDisconnected:
        return 421, "4.7.0 (disconnected without a reply)"
    return code, text.decode()


def explain(pd: PenaltydProcess, ip: str) -> pb.Explanation:
    with PenaltyClient(pd.address, deadline=2.0) as client:
        return client.explain(ip)


def window(pd: PenaltydProcess, ip: str) -> dict[int, int]:
    """The counts that still count as evidence (a penalty consumes what started it)."""
    return {t.outcome: t.n for t in explain(pd, ip).window}


def seconds_left(pd: PenaltydProcess, ip: str) -> int:
    with PenaltyClient(pd.address, deadline=2.0) as client:
        return int(client.check(ip).seconds_left)


def test_dictionary_attacker_meets_the_450_at_the_first_rcpt_of_its_next_connection(
    stack: Stack,
) -> None:
    watch = PenaltyWatch(stack.pd.address)
    try:
        spam = smtp_from(ATTACKER, stack.postfix.port, "bot.spam.example", timeout=30)
        assert spam.mail("offers@spam.example")[0] == 250
        replies = []
        for i in range(25):  # Postfix's default hard error limit cuts it off before that
            code, text = rcpt(spam, f"nobody{i}@test.example")
            replies.append((code, text.split(" ", 1)[0]))
            if code == 421:
                break
        cut_off = time.monotonic()
        spam.close()
        # Postfix's defaults: 20 guesses answered 550 5.1.1, then 421 4.7.0 and closed.
        assert replies == [(550, "5.1.1")] * 20 + [(421, "4.7.0")], replies
        assert text == "4.7.0 mx.test.example Error: too many errors", text
        started = watch.wait_started(ATTACKER)
        assert started < cut_off, "the penalty should start during the first connection"
    finally:
        watch.close()
    # The milter reported each refused recipient once, and nothing else counted anything
    # for this client: the penalty started on exactly those 20, and nothing came after.
    ex = explain(stack.pd, ATTACKER)
    assert ex.verdict.tempfail
    assert "20 weighted errors in 20 events" in ex.verdict.reason, ex.verdict.reason
    assert "(unknown_recipient=20)" in ex.verdict.reason, ex.verdict.reason
    # Its one client known (HELO and sender from the milter): the penalty binds it.
    assert ex.verdict.client, ex.verdict
    assert {t.outcome: t.n for t in ex.window} == {}

    again = smtp_from(ATTACKER, stack.postfix.port, "bot.spam.example")
    assert again.mail("offers@spam.example")[0] == 250
    code, reply = rcpt(again, "nobody99@test.example")
    truth = seconds_left(stack.pd, ATTACKER)
    assert code == 450, reply
    match = re.fullmatch(
        r"4\.7\.1 <nobody99@test\.example>: Recipient address rejected: too many SMTP "
        rf"errors from {re.escape(ATTACKER)}; try again in (\d+) seconds",
        reply,
    )
    assert match, reply
    n = int(match.group(1))
    assert truth <= n <= truth + 1  # the true remaining time, asked after Postfix's answer
    assert 280 <= n <= 300
    # An address that exists gets the same 450 (the check stands before the recipient
    # checks), and the connection stays open.
    assert rcpt(again, "root@test.example")[0] == 450
    assert again.noop()[0] == 250
    again.quit()
    # penaltyd's own 450s are not counted as the client's errors.
    until(stack.postfix.log, lambda log: log.count(f"disconnect from unknown[{ATTACKER}]") == 2)
    assert window(stack.pd, ATTACKER) == {}


def test_a_well_behaved_client_delivers_and_is_counted_once(stack: Stack) -> None:
    good = smtp_from(GOOD, stack.postfix.port, "mail.good.example")
    assert good.mail("alice@good.example")[0] == 250
    assert good.rcpt("root@test.example")[0] == 250
    code, text = good.data(b"Subject: hello\r\n\r\nhi\r\n")
    assert code == 250, text
    good.quit()
    until(lambda: window(stack.pd, GOOD), lambda w: w == {pb.OUTCOME_ACCEPTED: 1})
    until(stack.postfix.log, lambda log: "status=sent" in log)
    # The session's summary line has been read by now and added nothing.
    until(
        stack.postfix.log,
        lambda log: (
            f"disconnect from localhost[{GOOD}]" in log or f"disconnect from unknown[{GOOD}]" in log
        ),
    )
    assert window(stack.pd, GOOD) == {pb.OUTCOME_ACCEPTED: 1}


def events(proc: ServiceProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]


def test_penaltyd_down_mail_flows_and_the_sidecars_stop_cleanly(stack: Stack) -> None:
    stack.pd.stop()
    late = smtp_from(LATE, stack.postfix.port, "mail.other.example")
    assert late.mail("bob@other.example")[0] == 250
    assert late.rcpt("root@test.example")[0] == 250  # policyd: DUNNO within its deadline
    assert late.rcpt("no-such-user@test.example")[0] == 550  # a report the milter cannot send
    assert late.data(b"Subject: still\r\n\r\nflowing\r\n")[0] == 250
    late.quit()
    until(stack.postfix.log, lambda log: log.count("status=sent") >= 2)
    # Postfix keeps its policy connection open after the session: SIGTERM now.
    policy_port = stack.sidecars["penalty-policyd"].port
    assert policy_port is not None
    assert established(policy_port) >= 1
    for name in ("penalty-milter", "penalty-policyd", "penalty-logwatch"):
        proc = stack.sidecars[name]
        assert proc.stop() == 0, proc.output()[-3000:]
        assert "Traceback" not in proc.output(), proc.output()[-3000:]
        lines = proc.output().splitlines()
        assert all(line.startswith("{") for line in lines), lines  # JSON only
    policyd = events(stack.sidecars["penalty-policyd"])[-1]
    assert policyd["event"] == "policyd_stopped"
    assert policyd["open_connections"] == 0
    milter = events(stack.sidecars["penalty-milter"])
    assert milter[-1]["event"] == "milter_stopped"
    # Two reports for LATE never reached penaltyd: counted and said to be dropped.
    assert milter[-1]["reports_pending_dropped"] == 2
    assert [e["reports"] for e in milter if e["event"] == "milter_reports_dropped_at_exit"] == [2]
    logwatch = events(stack.sidecars["penalty-logwatch"])[-1]
    assert logwatch["event"] == "logwatch stopped"
