"""End to end with a real Postfix: policy sidecar + log watcher + penaltyd.

A client that sends to 40 unknown recipients is answered, on the same connection, with
a 450 4.7.1 whose text carries the seconds left; a well-behaved client on another
address still delivers; with penaltyd stopped, mail still flows.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.e2e.postfix import Postfix
from tests.harness.ports import free_port, wait_port
from tests.harness.processes import PenaltydProcess


class Sidecar:
    """A client-side console script as a child process."""

    def __init__(self, module: str, *args: str, port: int | None = None) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        if port is not None:
            wait_port("127.0.0.1", port, proc=self.proc)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out.decode(errors="replace")


@pytest.fixture
def stack() -> Iterator[tuple[Postfix, PenaltydProcess]]:
    pd = PenaltydProcess().start()
    policy_port = free_port()
    policyd = Sidecar(
        "penaltyclient.policyd",
        "--listen",
        f"127.0.0.1:{policy_port}",
        "--penaltyd",
        pd.address,
        port=policy_port,
    )
    restrictions = (
        "reject_non_fqdn_recipient, reject_unauth_destination, reject_unlisted_recipient, "
        f"check_policy_service {{ inet:127.0.0.1:{policy_port}, timeout=1s, "
        "default_action=DUNNO, try_limit=1 }, "
        "permit"
    )
    postfix = Postfix(restrictions).start()
    logwatch = Sidecar(
        "penaltyclient.logwatch", "--penaltyd", pd.address, "--from-start", str(postfix.maillog)
    )
    try:
        yield postfix, pd
    finally:
        logwatch_out = logwatch.stop()
        policyd_out = policyd.stop()
        postfix.stop()
        pd.stop()
        print("--- logwatch\n" + logwatch_out[-3000:] + "\n--- policyd\n" + policyd_out[-3000:])


def session(postfix: Postfix, ip: str, helo: str) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", postfix.port, timeout=10)
    smtp.ehlo("e2e-driver.example")
    code, _ = smtp.docmd("XCLIENT", f"ADDR={ip} NAME=[UNAVAILABLE]")
    assert code == 220
    smtp.ehlo(helo)
    return smtp


def test_dictionary_attack_is_deferred_on_the_same_connection(
    stack: tuple[Postfix, PenaltydProcess],
) -> None:
    postfix, pd = stack
    spam = session(postfix, "203.0.113.7", "bot.spam.example")
    assert spam.mail("offers@spam.example")[0] == 250
    for i in range(40):
        code, _ = spam.rcpt(f"nobody{i}@test.example")
        assert code == 550
    # The log watcher reports the 550s; the policy sidecar answers the next RCPT.
    deadline = time.monotonic() + 15
    while True:
        code, text = spam.rcpt("root@test.example")
        if code != 250 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    reply = text.decode()
    assert code == 450, reply
    assert reply.startswith(
        "4.7.1 <root@test.example>: Recipient address rejected: too many SMTP errors"
    )
    seconds = int(re.search(r"try again in (\d+) seconds", reply).group(1))  # type: ignore[union-attr]
    assert 280 <= seconds <= 300
    # Still the same connection: it stays open and the next command works.
    assert spam.noop()[0] == 250
    code, text = spam.rcpt("root@test.example")
    assert code == 450
    spam.quit()

    # A well-behaved client on another address still delivers.
    good = session(postfix, "198.51.100.61", "mail.good.example")
    assert good.mail("alice@good.example")[0] == 250
    assert good.rcpt("root@test.example")[0] == 250
    code, text = good.data(b"Subject: hello\r\n\r\nhi\r\n")
    assert code == 250, text
    good.quit()

    # With penaltyd stopped, mail still flows (the sidecar answers DUNNO).
    pd.stop()
    again = session(postfix, "203.0.113.99", "mail.other.example")
    assert again.mail("bob@other.example")[0] == 250
    assert again.rcpt("root@test.example")[0] == 250
    assert again.data(b"Subject: still\r\n\r\nflowing\r\n")[0] == 250
    again.quit()
    assert "status=sent" in postfix.log()
