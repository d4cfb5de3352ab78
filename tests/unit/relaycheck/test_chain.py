"""relaycheck.chain: the walk from the newest Received line to the entry hop, rule by rule.

Each test writes the smallest header block that exercises one rule of DESIGN.md
section 9; the corpus (test_relaycheck_corpus.py) covers realistic messages.
"""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaycheck.chain import Envelope, Judgement, Verdict, WalkOptions, classify_headers
from relaycheck.customers import Customer, PrivateNetworks, build_customer
from relaycheck.headers import Limits

ACME = build_customer(
    "acme",
    ["198.51.100.8/29"],
    ["192.0.2.96/28"],
    ["acme.example"],
)
RELAY = ipaddress.ip_address("198.51.100.10")
OPTIONS = WalkOptions(own_hostnames=("smart.isp.example",))
ORIGINATED = Verdict.ORIGINATED_BY_CUSTOMER
RELAYED = Verdict.RELAYED_THIRD_PARTY
UNDETERMINED = Verdict.UNDETERMINED


def judge(
    headers: str,
    rcpt: tuple[str, ...] = ("v@example.org",),
    customer: Customer = ACME,
    client: str | None = "198.51.100.10",
    mail_from: str = "",
    options: WalkOptions = OPTIONS,
) -> Judgement:
    env = Envelope(ipaddress.ip_address(client) if client else None, "", mail_from, rcpt)
    return classify_headers(customer, headers.encode(), env, options)


def relay_line(client: str, extra: str = "", proto: str = "ESMTP", for_: str = "") -> str:
    f = f" for <{for_}>" if for_ else ""
    return (
        f"Received: from h.example (h.example [{client}]){extra}\n"
        f"\tby mail.acme.example (Postfix) with {proto} id 1{f}; Tue, 11 Jun 2024\n"
    )


OUR_LINE = (
    "Received: from mail.acme.example (mail.acme.example [198.51.100.10])\n"
    "\tby smart.isp.example (Postfix) with ESMTPS id 9 for <v@example.org>; date\n"
)


def rules(j: Judgement) -> list[str]:
    return [e.rule for e in j.evidence]


def test_authenticated_submission_from_outside() -> None:
    j = judge(relay_line("203.0.113.5", " (Authenticated sender: a@acme.example)", "ESMTPSA"))
    assert (j.verdict, j.rule) == (ORIGINATED, "authenticated_submission")
    assert j.entry_hop is not None
    assert j.entry_hop.index == 0
    assert j.origin_ip == ipaddress.ip_address("203.0.113.5")


def test_relayed_for_a_foreign_recipient_whatever_the_weak_claims() -> None:
    j = judge(
        relay_line("203.0.113.66", for_="v@example.org")
        + "Received: from x (x [192.168.1.2]) by mail.acme.example with ESMTPSA id 0\n"
        + "From: ceo@acme.example\nMessage-ID: <1@acme.example>\n",
        mail_from="ceo@acme.example",
    )
    assert (j.verdict, j.rule) == (RELAYED, "foreign_recipient")
    assert j.origin_ip == ipaddress.ip_address("203.0.113.66")
    weak = [e for e in j.evidence if e.weak]
    assert len(weak) == 3
    assert all(e.rule == "weak_own_domain" for e in weak)
    assert j.leaning == Verdict.UNSPECIFIED  # only set on UNDETERMINED


def test_relayed_for_foreign_envelope_recipients_without_a_for_clause() -> None:
    j = judge(relay_line("203.0.113.66"), rcpt=("a@example.org", "b@example.net"))
    assert (j.verdict, j.rule) == (RELAYED, "foreign_envelope")


def test_own_envelope_recipient_is_not_relaying() -> None:
    j = judge(relay_line("203.0.113.66"), rcpt=("a@example.org", "x@sub.acme.example"))
    assert j.verdict == UNDETERMINED
    assert "own_envelope_recipient" in rules(j)


def test_external_client_for_own_recipient_is_a_forward() -> None:
    j = judge(relay_line("203.0.113.66", for_="info@Sub.ACME.example"))
    assert (j.verdict, j.rule) == (ORIGINATED, "own_recipient")


def test_internal_chain_then_external_entry() -> None:
    headers = (
        OUR_LINE
        + relay_line("10.0.0.5")
        + "Received: from localhost (localhost [127.0.0.1]) by exch with ESMTP id 2; d\n"
        + "Received: from ext (ext [203.0.113.9]) by exch with ESMTP id 3; d\n"
    )
    j = judge(headers, rcpt=("x@example.org",))
    assert (j.verdict, j.rule) == (RELAYED, "foreign_envelope")
    assert j.entry_hop is not None
    assert j.entry_hop.index == 3
    assert rules(j)[:2] == ["own_hop", "customer_relay"]


def test_internal_client_at_the_bottom_originates() -> None:
    j = judge(relay_line("192.0.2.100") + relay_line("192.168.3.4"))
    assert (j.verdict, j.rule) == (ORIGINATED, "internal_client")
    assert j.origin_ip == ipaddress.ip_address("192.168.3.4")


def test_private_ranges_are_configurable() -> None:
    options = WalkOptions(private=PrivateNetworks(()), own_hostnames=())
    j = judge(relay_line("192.168.3.4"), options=options)
    assert j.verdict == RELAYED


@pytest.mark.parametrize(
    "line",
    [
        "Received: by mail.acme.example (Postfix, from userid 33) id 1; d\n",
        "Received: (from apache@localhost) by mail.acme.example (8.17.1/8.17.1/Submit) id 1;\n",
        "Received: from www-data by mail.acme.example with local (Exim 4.96) id 1; d\n",
        "Received: (qmail 1 invoked by uid 48); d\n",
    ],
)
def test_local_submission(line: str) -> None:
    assert judge(line).rule == "local_submission"


def test_delivered_to_counts_only_above_the_entry() -> None:
    above = "Delivered-To: sales@acme.example\n" + relay_line("203.0.113.7")
    below = relay_line("203.0.113.7") + "Delivered-To: sales@acme.example\n"
    assert judge(above).rule == "delivered_to_own"
    assert judge(below).verdict == RELAYED


def test_qmail_alias_forward() -> None:
    headers = "Received: (qmail 5 invoked by alias); d\n" + relay_line("203.0.113.7")
    assert judge(headers).rule == "forwarded"


def test_our_own_line_is_found_by_name_and_by_address() -> None:
    by_name = judge(OUR_LINE + relay_line("203.0.113.7"), client=None)
    assert by_name.verdict == RELAYED  # the client came from our line
    assert "own_hop" in rules(by_name)
    by_ip = judge(OUR_LINE + relay_line("203.0.113.7"), options=WalkOptions())
    assert by_ip.verdict == RELAYED
    assert rules(by_ip)[0] == "own_hop"


@pytest.mark.parametrize(
    ("headers", "rule"),
    [
        ("", "no_received"),
        ("From: a@acme.example\n", "no_received"),
        (OUR_LINE, "no_received"),
        (
            "Received: from mail.acme.example by mail.acme.example with ESMTP; d\n",
            "no_client_address",
        ),
        ("Received: ((( [[[ garbage\n", "unreadable_hop"),
        (relay_line("203.0.113.7"), "external_unknown_recipient"),
    ],
)
def test_undetermined(headers: str, rule: str) -> None:
    j = judge(headers, rcpt=())
    assert (j.verdict, j.rule) == (UNDETERMINED, rule)


def test_leaning_comes_from_weak_evidence_only_when_undetermined() -> None:
    own = judge("From: a@acme.example\nMessage-ID: <x@acme.example>\n", mail_from="a@acme.example")
    assert (own.verdict, own.leaning) == (UNDETERMINED, ORIGINATED)
    foreign = judge("From: a@example.net\n", mail_from="b@example.org")
    assert foreign.leaning == RELAYED
    mixed = judge("From: a@acme.example\n", mail_from="b@example.org")
    assert mixed.leaning == Verdict.UNSPECIFIED


def test_neutral_lines_are_walked_through() -> None:
    headers = (
        "Received: (qmail 1 invoked from network); d\n"
        "Received: by mail.acme.example with LMTP id 5; d\n" + relay_line("203.0.113.7")
    )
    assert judge(headers).verdict == RELAYED


def test_too_many_internal_hops_is_undetermined() -> None:
    """The entry is beyond the lines we read: we cannot know where the mail came from."""
    limits = WalkOptions(limits=Limits(max_received=8))
    for headers in (
        relay_line("10.0.0.1") * 40,
        relay_line("10.0.0.1") * 8 + relay_line("203.0.113.7"),
    ):
        j = judge(headers, options=limits)
        assert (j.verdict, j.rule, j.hops) == (UNDETERMINED, "too_many_hops", 8)
    assert judge(relay_line("10.0.0.1") * 8, options=limits).verdict == ORIGINATED


def test_parse_budget_is_undetermined_never_originated() -> None:
    """The walk parses lines as it reaches them, `max_parse` characters at most: an
    inside chain longer than that is UNDETERMINED (where it entered is unknown), an
    entry within it is judged, and no line below the entry is parsed at all."""
    budget = WalkOptions(limits=Limits(max_parse=600))
    inside = relay_line("10.0.0.1")
    j = judge(inside * 10, options=budget)
    assert (j.verdict, j.rule, j.hops) == (UNDETERMINED, "too_many_hops", 10)
    assert 600 <= j.parsed_chars < 600 + len(inside)
    assert j.parsed < 10
    assert judge(inside * 10).rule == "internal_client"  # the default budget reads them all
    j = judge(inside * 2 + relay_line("203.0.113.7") + inside * 50, options=budget)
    assert (j.verdict, j.origin_ip, j.parsed) == (RELAYED, ipaddress.ip_address("203.0.113.7"), 3)


def test_megabyte_of_folded_lines_is_quick_and_harmless() -> None:
    raw = relay_line("203.0.113.7") + "X-Pad: x\n" + " y\n" * 400_000
    t0 = time.perf_counter()
    j = judge(raw)
    assert time.perf_counter() - t0 < 1.0
    assert j.verdict == RELAYED


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.lists(st.text(max_size=40), max_size=5))
def test_any_input_gives_a_verdict(raw: bytes, rcpt: list[str]) -> None:
    for headers in (raw, b"Received: " + raw, relay_line("203.0.113.7").encode() + raw):
        env = Envelope(RELAY, "", "", tuple(rcpt))
        j = classify_headers(ACME, headers, env, OPTIONS)
        assert j.verdict in (ORIGINATED, RELAYED, UNDETERMINED)
        assert all(e.detail for e in j.evidence)


# --- several recipients at the entry: no `for` there (Postfix smtpd writes one only when
# rcpt_count == 1, Exim only with one `$received_for`, Sendmail only with one `$u`)

STORE_LINE = (  # the internal store took the customer's info@ alone from the edge
    "Received: from mail.acme.example (mail.acme.example [192.168.10.2])\n"
    "\tby store.acme.example (Postfix) with ESMTP id 2 for <info@acme.example>; d\n"
)
SRS = "SRS0=5e1c=pb=monitor.example.com=alerts@acme.example"


def exim_line(client: str, sender: str, for_: str = "") -> str:
    f = f"\n\tfor {for_}" if for_ else ""
    return (
        f"Received: from mta.example.com ([{client}] helo=mta.example.com)\n"
        "\tby mail.acme.example with esmtps (TLS1.3) tls TLS_AES_256_GCM_SHA384\n"
        f"\t(Exim 4.96)\n\t(envelope-from <{sender}>)\n\tid 1sZxWu-000Dm7-0R{f};\n\td\n"
    )


def test_virtual_alias_forward_to_several_recipients_is_originated() -> None:
    """Was the known false positive (a strict xfail). A forward of mail that came in
    for several of the customer's users has no `for` at the entry and an all-foreign
    envelope; it is the customer's when a customer line above the entry accepted it for
    a customer user, or when the customer's Exim rewrote the sender it recorded into
    SRS: the two ways the chain can say so that a relaying sender cannot write."""
    rcpt = ("owner@example.com", "partner@example.net")
    j = judge(relay_line("192.168.10.5") + STORE_LINE + relay_line("203.0.113.7"), rcpt=rcpt)
    assert (j.verdict, j.rule, j.origin_ip) == (
        ORIGINATED,
        "own_recipient_above",
        ipaddress.ip_address("203.0.113.7"),
    )
    assert j.entry_hop is not None
    assert j.entry_hop.index == 2
    assert [e.hop for e in j.evidence if e.rule == "own_recipient_above"] == [1]
    j = judge(exim_line("203.0.113.7", "alerts@monitor.example.com"), rcpt=rcpt, mail_from=SRS)
    assert (j.verdict, j.rule) == (ORIGINATED, "srs_rewritten")


def test_several_recipients_without_evidence_are_still_relayed() -> None:
    """One box expanding virtual aliases for a message sent to two of its users, and a
    spammer relaying to two victims, write the same lines: relayed, SRS sender or not
    (a spammer writes one; postsrsd rewrites relayed mail as well)."""
    rcpt = ("owner@example.com", "partner@example.net")
    for mail_from in (
        "",
        SRS,
        f"<{SRS}>",
        "SRS1=ab12=fwd.example==5e1c=pb=a.example=b@acme.example",
    ):
        j = judge(relay_line("203.0.113.7"), rcpt=rcpt, mail_from=mail_from)
        assert (j.verdict, j.rule) == (RELAYED, "foreign_envelope"), mail_from
    j = judge(relay_line("203.0.113.7"), rcpt=rcpt, mail_from=SRS)
    assert any(
        "SRS rewrite of alerts@monitor.example.com" in e.detail for e in j.evidence if e.weak
    )


def test_own_recipient_counts_only_on_customer_lines_above_the_entry() -> None:
    rcpt = ("owner@example.com",)
    below = relay_line("203.0.113.7") + STORE_LINE  # the sender's lines
    assert judge(below, rcpt=rcpt).rule == "foreign_envelope"
    ours = OUR_LINE.replace("v@example.org", "info@acme.example")  # our own line's `for`
    assert judge(ours + relay_line("203.0.113.7"), rcpt=rcpt).rule == "foreign_envelope"
    neutral = "Received: by store.acme.example with LMTP id 5 for <info@acme.example>; d\n"
    assert judge(neutral + relay_line("203.0.113.7"), rcpt=rcpt).rule == "own_recipient_above"
    # the entry's own `for` decides when it names a recipient
    foreign = relay_line("203.0.113.7", for_="v@example.org")
    assert judge(STORE_LINE.replace("192.168.10.2", "10.0.0.2") + foreign).rule == (
        "foreign_recipient"
    )


@pytest.mark.parametrize(
    ("headers", "mail_from", "rule"),
    [
        # Exim recorded S and the smart relay got SRS0(S) at a customer domain
        (exim_line("203.0.113.7", "alerts@monitor.example.com"), SRS, "srs_rewritten"),
        (exim_line("203.0.113.7", "Alerts@Monitor.Example.com"), SRS.upper(), "srs_rewritten"),
        # a second forward: SRS1 wraps the SRS0 the first forwarder sent
        (
            exim_line("203.0.113.7", "SRS0=a1b2=QK=example.org=bob@fwd.example"),
            "SRS1=77aa=fwd.example==a1b2=QK=example.org=bob@acme.example",
            "srs_rewritten",
        ),
        # recorded on a customer Exim line above the entry (the rewriter is above it)
        (
            exim_line("10.0.0.5", "alerts@monitor.example.com")
            + exim_line("203.0.113.7", "alerts@monitor.example.com"),
            SRS,
            "srs_rewritten",
        ),
        # no rewrite: the sender sent the SRS address itself, Exim recorded it as such
        (exim_line("203.0.113.7", SRS), SRS, "foreign_envelope"),
        # the SRS address is not the customer's
        (
            exim_line("203.0.113.7", "alerts@monitor.example.com"),
            SRS.replace("@acme.example", "@example.net"),
            "foreign_envelope",
        ),
        # it decodes to another sender than the one recorded
        (exim_line("203.0.113.7", "bob@monitor.example.com"), SRS, "foreign_envelope"),
        # Postfix wrote the entry (postsrsd rewrites every foreign sender, relayed or not)
        (
            relay_line("203.0.113.7").replace(
                "(Postfix)", "(Postfix)\n\t(envelope-from <alerts@monitor.example.com>)"
            ),
            SRS,
            "foreign_envelope",
        ),
        # a customer line above the Exim entry that Exim did not write may be the rewriter
        (
            relay_line("10.0.0.5") + exim_line("203.0.113.7", "alerts@monitor.example.com"),
            SRS,
            "foreign_envelope",
        ),
        # the record of the original is below the entry: the sender's
        (
            exim_line("203.0.113.7", SRS) + exim_line("192.0.2.1", "alerts@monitor.example.com"),
            SRS,
            "foreign_envelope",
        ),
    ],
)
def test_srs_rewrite_by_the_customers_exim(headers: str, mail_from: str, rule: str) -> None:
    j = judge(headers, rcpt=("x@example.org", "y@example.net"), mail_from=mail_from)
    assert j.rule == rule
    assert j.verdict == (ORIGINATED if rule == "srs_rewritten" else RELAYED)
