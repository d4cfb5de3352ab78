"""End to end: relaycheck-milter on a real Postfix acting as an ISP's smart relay.

Three real MTAs on loopback: the customer's own mail server (a Postfix that is an open
relay, `mynetworks = 0.0.0.0/0`, sending everything on from 127.0.0.8), the ISP's smart
relay (a Postfix relaying for 127.0.0.8, with relaycheck-milter as its milter) and the
final destination (an aiosmtpd server). relaycheck and relaycheck-milter run as the
README runs them, the smart relay's `main.cf` lines are docs/relaycheck.md's (only the
addresses change: `tests.e2e.postfix.relaycheck_wiring_for`); relaycheck reports to a
real penaltyd.

- A customer's user submits with a login (XCLIENT LOGIN: the customer's Postfix writes
  `with ESMTPA`, `(Authenticated sender: ...)`): the mail is delivered.
- A stranger relays through the customer's open relay: the smart relay refuses it with
  `451 4.7.1` (the customer's Postfix keeps it, deferred), nothing reaches the
  destination, and the stranger's address is reported to penaltyd as RELAY_DENIED.
- relaycheck down: the same kind of mail is delivered (the milter fails open).

The tests of this module share one set of servers and run in order (the last stops
relaycheck).
"""

from __future__ import annotations

import queue
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from penalty.v1 import penalty_pb2 as pb
from penaltyclient import PenaltyClient
from relaycheck.v1 import relaycheck_pb2 as rpb
from relaycheck.v1 import relaycheck_pb2_grpc as rpbg
from tests.e2e.postfix import (
    OPEN_RELAY_CF,
    SMART_RELAY_CF,
    Postfix,
    relaycheck_wiring_for,
)
from tests.harness.mta import until
from tests.harness.ports import free_port
from tests.harness.processes import PenaltydProcess, ServiceProcess

CUSTOMER_RELAY = "127.0.0.8"  # the address the customer's server sends from
ALICE = "198.51.100.20"  # the customer's user, somewhere outside, logged in
SPAMMER = "203.0.113.66"
SPAMMER_LATER = "203.0.113.67"


class Destination:
    """The final destination: an aiosmtpd server on a loopback port that keeps what it
    receives in a queue (the test waits on it)."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[str, list[str], str]] = queue.Queue()
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        text = content.decode(errors="replace") if isinstance(content, bytes) else str(content)
        self.received.put((str(envelope.mail_from), list(envelope.rcpt_tos), text))
        return "250 2.0.0 OK"

    def next(self, within: float = 20.0) -> tuple[str, list[str], str]:
        return self.received.get(timeout=within)


@dataclass
class Relays:
    pd: PenaltydProcess
    relaycheck: ServiceProcess
    milter: ServiceProcess
    smart_relay: Postfix
    customer: Postfix
    destination: Destination


@pytest.fixture(scope="module")
def relays() -> Iterator[Relays]:
    destination = Destination()
    destination.controller.start()
    started: list[Any] = []
    try:
        pd = PenaltydProcess().start()
        started.append(pd)
        relaycheck_port, milter_port = free_port(), free_port()
        wiring = relaycheck_wiring_for(relaycheck_port, milter_port, pd.address)
        relaycheck = ServiceProcess("relaycheck", wiring.serve, relaycheck_port).start()
        started.append(relaycheck)
        with grpc.insecure_channel(relaycheck.address) as channel:
            rpbg.RelayCheckStub(channel).UpsertCustomer(
                rpb.Customer(
                    id="acme", relay_networks=[f"{CUSTOMER_RELAY}/32"], domains=["acme.example"]
                ),
                timeout=5,
            )
        milter = ServiceProcess("relaycheckclient.milter", wiring.milter, milter_port).start()
        started.append(milter)
        smart_relay = Postfix(
            SMART_RELAY_CF.format(
                customers=f"{CUSTOMER_RELAY}/32", destination=f"[127.0.0.1]:{destination.port}"
            )
            + wiring.main_cf,
            hostname="relay.isp.example",
        ).start()
        started.append(smart_relay)
        customer = Postfix(
            OPEN_RELAY_CF.format(
                smart_relay=f"[127.0.0.1]:{smart_relay.port}", bind=CUSTOMER_RELAY
            ),
            hostname="mail.acme.example",
        ).start()
        started.append(customer)
        yield Relays(pd, relaycheck, milter, smart_relay, customer, destination)
    finally:
        for server in reversed(started):
            if isinstance(server, ServiceProcess):
                print(f"--- {server.module}\n" + server.output()[-3000:])
            else:
                print("--- maillog\n" + server.log()[-3000:])
            server.stop()
        destination.controller.stop()


def submit(relays: Relays, client: str, sender: str, rcpt: str, login: str = "") -> str:
    """One message to the customer's server, as if from `client` (XCLIENT, with a SASL
    login when given); its queue id there."""
    smtp = smtplib.SMTP("127.0.0.1", relays.customer.port, timeout=10)
    try:
        smtp.ehlo("e2e-driver.example")
        attrs = f"ADDR={client} NAME=[UNAVAILABLE]" + (f" LOGIN={login}" if login else "")
        assert smtp.docmd("XCLIENT", attrs)[0] == 220
        smtp.ehlo("laptop.example" if login else "bot.example")
        assert smtp.mail(sender)[0] == 250
        assert smtp.rcpt(rcpt)[0] == 250  # an open relay takes anything
        code, text = smtp.data(f"From: {sender}\r\nSubject: test\r\n\r\nhello\r\n".encode())
        assert code == 250, text
        smtp.quit()
    finally:
        smtp.close()
    return text.decode().rsplit(" ", 1)[-1]


def window(relays: Relays, ip: str) -> dict[int, int]:
    with PenaltyClient(relays.pd.address, deadline=2.0) as client:
        return {t.outcome: t.n for t in client.explain(ip).window}


def test_authenticated_submission_is_delivered(relays: Relays) -> None:
    submit(relays, ALICE, "alice@acme.example", "bob@example.com", login="alice@acme.example")
    sender, rcpts, text = relays.destination.next()
    assert (sender, rcpts) == ("alice@acme.example", ["bob@example.com"])
    assert "(Authenticated sender: alice@acme.example)" in text  # the customer's hop
    assert "by relay.isp.example (Postfix)" in text  # and the smart relay's
    until(relays.milter.output, lambda out: '"verdict": "ORIGINATED_BY_CUSTOMER"' in out)
    assert window(relays, ALICE) == {}


def test_mail_relayed_through_the_open_relay_is_refused_and_its_origin_reported(
    relays: Relays,
) -> None:
    queue_id = submit(relays, SPAMMER, "ceo@acme.example", "victim@example.com")
    # The smart relay answers the customer's server with a 4xx: it keeps the message.
    deferred = until(
        relays.customer.log,
        lambda log: f"{queue_id}: to=<victim@example.com>" in log and "status=deferred" in log,
    )
    line = next(x for x in deferred.splitlines() if f"{queue_id}: to=<victim@example.com>" in x)
    assert (
        f"said: 451 4.7.1 Relaying denied for acme: this message came from {SPAMMER}, "
        "not from acme's users (open relay?)"
    ) in line, line
    # The origin, not the customer's relay, is reported to penaltyd.
    until(lambda: window(relays, SPAMMER), lambda w: w == {pb.OUTCOME_RELAY_DENIED: 1})
    assert window(relays, CUSTOMER_RELAY) == {}
    assert relays.destination.received.empty()


def test_relaycheck_down_mail_is_delivered(relays: Relays) -> None:
    relays.relaycheck.stop()
    submit(relays, SPAMMER_LATER, "ceo@acme.example", "victim2@example.com")
    sender, rcpts, _ = relays.destination.next()  # the milter failed open
    assert (sender, rcpts) == ("ceo@acme.example", ["victim2@example.com"])
    until(relays.milter.output, lambda out: "milter_classify_failed" in out)
    assert window(relays, SPAMMER_LATER) == {}
