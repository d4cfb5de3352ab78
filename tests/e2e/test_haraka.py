"""End to end with a real Haraka 3: the shipped plugin (clients/haraka/penaltyd.js) with
its shipped config, penalty-policyd and penaltyd.

penaltyd runs with a non-default reply, `451 4.7.1 ...`: Haraka's DENYSOFT alone would
answer 450, so a 451 shows the code is the configured one. A client that sends to 40
unknown recipients is refused 550 by Haraka each time; the plugin reports those, and the
next recipient (an existing one) gets the configured reply with the true seconds left,
on the same connection. Accepted recipients are reported by the sidecar. An unpenalized
client delivers; with the sidecar's port closed, or a sidecar that accepts and never
answers, mail is accepted (the latter within the plugin's timeout).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from penalty.v1 import penalty_pb2 as pb
from penaltyclient import PenaltyClient
from tests.e2e.haraka import Haraka, ensure_haraka
from tests.harness.mta import closed_port, silent_listener, smtp_from, until
from tests.harness.ports import free_port
from tests.harness.processes import PenaltydProcess, ServiceProcess

ADMIN = "e2e-admin-token"
REPLY = "451 4.7.1 penalty for {ip}: try again in {seconds} seconds"


@pytest.fixture(scope="module")
def penaltyd() -> Iterator[PenaltydProcess]:
    ensure_haraka()  # skips before anything starts when Haraka cannot be had
    env = {"PENALTYD_SMTP_REPLY": REPLY, "PENALTYD_ADMIN_TOKEN": ADMIN}
    with PenaltydProcess(env=env) as pd:
        yield pd


@pytest.fixture(scope="module")
def policy_port(penaltyd: PenaltydProcess) -> Iterator[int]:
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--penaltyd", penaltyd.address]
    with ServiceProcess("penaltyclient.policyd", args, port) as policyd:
        yield port
        print("--- policyd\n" + policyd.output()[-3000:])


@pytest.fixture(scope="module")
def haraka(policy_port: int, penaltyd: PenaltydProcess) -> Iterator[Haraka]:
    with Haraka(policy_port, penaltyd.address) as mx:
        yield mx
        print("--- haraka\n" + mx.log()[-4000:])


def window(penaltyd: PenaltydProcess, ip: str) -> dict[int, int]:
    with PenaltyClient(penaltyd.address, admin_token=ADMIN) as client:
        return {t.outcome: t.n for t in client.explain(ip).window}


def test_dictionary_attack_is_reported_and_deferred(
    haraka: Haraka, penaltyd: PenaltydProcess
) -> None:
    spam = smtp_from("127.0.0.17", haraka.port, "bot.spam.example")
    assert spam.mail("offers@spam.example")[0] == 250
    for i in range(40):
        code, text = spam.rcpt(f"nobody{i}@test.example")
        assert (code, text) == (550, b"5.1.1 No such user here")
    # The plugin reports the 550s to penaltyd (and the sidecar's live replica learns of
    # the penalty from penaltyd's feed); the next recipient, one that exists, is deferred.
    code, text = until(lambda: spam.rcpt("root@test.example"), lambda r: r[0] != 250)
    reply = text.decode()
    assert code == 451, reply  # penaltyd's configured code, not DENYSOFT's 450
    match = re.fullmatch(r"4\.7\.1 penalty for 127\.0\.0\.17: try again in (\d+) seconds", reply)
    assert match, reply
    with PenaltyClient(penaltyd.address) as client:
        verdict = client.check("127.0.0.17")
    assert verdict.seconds_left <= int(match.group(1)) <= verdict.seconds_left + 1  # true time
    assert "unknown_recipient=" in verdict.reason, verdict.reason  # what the plugin reported
    assert spam.noop()[0] == 250  # the connection stays open
    assert spam.rcpt("postmaster@test.example")[0] == 451
    spam.quit()


def test_relay_attempts_are_reported(haraka: Haraka, penaltyd: PenaltydProcess) -> None:
    smtp = smtp_from("127.0.0.19", haraka.port, "relay.probe.example")
    assert smtp.mail("probe@probe.example")[0] == 250
    code, text = smtp.rcpt("victim@elsewhere.example")
    assert code == 550, text  # Haraka's own: no plugin accepted the domain
    smtp.quit()  # the last rejection is counted at QUIT
    counts = until(lambda: window(penaltyd, "127.0.0.19"), lambda c: len(c) > 0)
    assert counts == {pb.OUTCOME_RELAY_DENIED: 1}


def test_unpenalized_client_delivers_and_is_counted(
    haraka: Haraka, penaltyd: PenaltydProcess
) -> None:
    good = smtp_from("127.0.0.18", haraka.port, "mail.good.example")
    assert good.mail("alice@good.example")[0] == 250
    assert good.rcpt("root@test.example")[0] == 250
    assert good.rcpt("postmaster@test.example")[0] == 250
    code, text = good.data(b"Subject: hello\r\n\r\nhi\r\n")
    assert code == 250, text
    good.quit()
    # The sidecar reports the recipients it was asked about as accepted.
    counts = until(
        lambda: window(penaltyd, "127.0.0.18"),
        lambda c: c.get(pb.OUTCOME_ACCEPTED, 0) >= 2,
    )
    assert counts == {pb.OUTCOME_ACCEPTED: 2}


@pytest.mark.parametrize("sidecar", ["down", "silent"])
def test_mail_flows_when_the_sidecar_is_down_or_silent(sidecar: str) -> None:
    ensure_haraka()
    with silent_listener() as silent_port:
        port = closed_port() if sidecar == "down" else silent_port
        # penaltyd is not there either: reports fail, quietly.
        with Haraka(port, f"127.0.0.1:{closed_port()}") as mx:
            smtp = smtp_from("127.0.0.20", mx.port, "mail.other.example")
            assert smtp.mail("bob@other.example")[0] == 250
            assert smtp.rcpt("nobody@test.example")[0] == 550  # reported: nowhere to go
            started = time.monotonic()
            code, text = smtp.rcpt("root@test.example")
            took = time.monotonic() - started
            assert code == 250, text
            if sidecar == "down":
                assert took < 0.9, took  # refused at once: no wait
            else:
                assert 0.9 <= took < 3.0, took  # the plugin's 1000 ms, then accepted
            assert smtp.data(b"Subject: still\r\n\r\nflowing\r\n")[0] == 250
            smtp.quit()
            log = mx.log()
            print("--- haraka\n" + log[-3000:])
            assert "CRIT" not in log  # the plugin never crashed
