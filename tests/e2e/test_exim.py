"""End to end with a real Exim 4.96: the README's RCPT ACL asking penalty-policyd.

A penalized client gets penaltyd's whole reply, `450 4.7.1 ... try again in N seconds`
with N the true remaining time (Exim's default for `defer` would be a bare 451); an
unpenalized client is accepted, and its verified recipient counted as accepted; with
the sidecar's port closed, or a sidecar that accepts and never answers, mail is accepted
(the latter within the ACL's 1 s timeout).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from penalty.v1 import penalty_pb2 as pb
from penaltyclient import PenaltyClient
from tests.e2e.exim import Exim
from tests.harness.mta import closed_port, silent_listener, smtp_from, until
from tests.harness.ports import free_port
from tests.harness.processes import PenaltydProcess, ServiceProcess

ADMIN = "e2e-admin-token"


@pytest.fixture(scope="module")
def penaltyd() -> Iterator[PenaltydProcess]:
    with PenaltydProcess(env={"PENALTYD_ADMIN_TOKEN": ADMIN}) as pd:
        yield pd


@pytest.fixture(scope="module")
def policy_port(penaltyd: PenaltydProcess) -> Iterator[int]:
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--penaltyd", penaltyd.address]
    with ServiceProcess("penaltyclient.policyd", args, port) as policyd:
        yield port
        print("--- policyd\n" + policyd.output()[-3000:])


@pytest.fixture
def exim(policy_port: int) -> Iterator[Exim]:
    with Exim(policy_port) as mx:
        yield mx
        print("--- exim mainlog\n" + mx.log()[-3000:])


def penalize(address: str, ip: str) -> None:
    with PenaltyClient(address, deadline=2.0) as client:
        for _ in range(40):
            verdict = client.report(ip, {pb.OUTCOME_UNKNOWN_RECIPIENT: 1}, helo="bot.spam.example")
        assert verdict.tempfail, verdict


def seconds_left(address: str, ip: str) -> int:
    with PenaltyClient(address, deadline=2.0) as client:
        return int(client.check(ip).seconds_left)


def test_penalized_client_gets_the_whole_reply(exim: Exim, penaltyd: PenaltydProcess) -> None:
    penalize(penaltyd.address, "203.0.113.7")  # first: the replica hears of it first
    penalize(penaltyd.address, "127.0.0.7")
    smtp = smtp_from("127.0.0.7", exim.port, "bot.spam.example")
    assert smtp.mail("offers@spam.example")[0] == 250
    # The sidecar's live replica learns of the penalty from penaltyd's feed.
    code, text = until(lambda: smtp.rcpt("root@test.example"), lambda r: r[0] != 250)
    reply = text.decode()
    assert code == 450, reply
    match = re.fullmatch(
        r"4\.7\.1 too many SMTP errors from 127\.0\.0\.7; try again in (\d+) seconds", reply
    )
    assert match, reply  # one line: the configured code, enhanced code, text and seconds
    n = int(match.group(1))
    truth = seconds_left(penaltyd.address, "127.0.0.7")
    assert truth <= n <= truth + 1  # the true remaining time, asked after Exim's answer
    assert 280 <= n <= 300
    # The connection stays open and each later RCPT is asked again.
    assert smtp.noop()[0] == 250
    assert smtp.rcpt("postmaster@test.example")[0] == 450
    smtp.quit()

    # Exim's host-checking mode, as if from the README's address: the same reply.
    out = exim.host_check(
        "203.0.113.7",
        "EHLO bot.spam.example\nMAIL FROM:<offers@spam.example>\nRCPT TO:<root@test.example>\n"
        "QUIT\n",
    )
    lines = out.splitlines()
    tempfail = [line for line in lines if line.startswith("450")]
    assert len(tempfail) == 1, out  # one line, not a multi-line reply
    assert re.fullmatch(
        r"450 4\.7\.1 too many SMTP errors from 203\.0\.113\.7; try again in \d+ seconds",
        tempfail[0],
    ), out


def test_unpenalized_client_is_accepted_and_counted(exim: Exim, penaltyd: PenaltydProcess) -> None:
    smtp = smtp_from("127.0.0.8", exim.port, "mail.good.example")
    assert smtp.mail("alice@good.example")[0] == 250
    assert smtp.rcpt("root@test.example") == (250, b"Accepted")
    assert smtp.rcpt("nobody@test.example")[0] == 550  # refused before the sidecar is asked
    code, text = smtp.data(b"Subject: hello\r\n\r\nhi\r\n")
    assert code == 250, text
    smtp.quit()
    assert "<= alice@good.example H=(mail.good.example) [127.0.0.8]" in exim.log()
    # The sidecar reports the recipient it was asked about (after verify) as accepted.
    with PenaltyClient(penaltyd.address, admin_token=ADMIN) as client:
        window = until(
            lambda: {t.outcome: t.n for t in client.explain("127.0.0.8").window},
            lambda w: len(w) > 0,
        )
    assert window == {pb.OUTCOME_ACCEPTED: 1}


@pytest.mark.parametrize("sidecar", ["down", "silent"])
def test_mail_flows_when_the_sidecar_is_down_or_silent(sidecar: str) -> None:
    with silent_listener() as silent_port:
        port = closed_port() if sidecar == "down" else silent_port
        with Exim(port) as mx:
            smtp = smtp_from("127.0.0.9", mx.port, "mail.other.example")
            assert smtp.mail("bob@other.example")[0] == 250
            started = time.monotonic()
            code, text = smtp.rcpt("root@test.example")
            took = time.monotonic() - started
            assert (code, text) == (250, b"Accepted")
            if sidecar == "down":
                assert took < 0.9, took  # refused at once: no wait
            else:
                assert 0.9 <= took < 3.0, took  # the ACL's {1s}, then accepted
            assert smtp.data(b"Subject: still\r\n\r\nflowing\r\n")[0] == 250
            smtp.quit()
