"""relaycheck.headers: header blocks and Received lines as the MTAs really write them.

One case per format the walker must read (Postfix, Exim, Sendmail, Exchange, qmail,
Haraka), folded lines, comments, IPv6 literals and missing parts; client-controlled
strings that try to pass for MTA-written ones; and hostile input (hypothesis): the
parser never raises and its work is bounded.
"""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaycheck.headers import (
    Limits,
    address_domain,
    parse_address,
    parse_hops,
    parse_received,
    split_header_block,
    srs_original,
)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# (value, from_ip, by_host, protocol, authenticated, local_submission, for_address, mta)
FORMATS = [
    pytest.param(
        "from mail.example.net (mail.example.net [203.0.113.5]) (using TLSv1.3 with cipher "
        "TLS_AES_256_GCM_SHA384 (256/256 bits)) (No client certificate requested) by "
        "mx.example.com (Postfix) with ESMTPS id 4ABC for <user@example.com>; Tue, 11 Jun 2024",
        "203.0.113.5",
        "mx.example.com",
        "ESMTPS",
        False,
        "",
        "user@example.com",
        "postfix",
        id="postfix-tls",
    ),
    pytest.param(
        "from [192.168.1.20] (unknown [198.51.100.77]) (Authenticated sender: a@b.example) "
        "by mail.b.example (Postfix) with ESMTPSA id 4XyZ; Tue, 11 Jun 2024",
        "198.51.100.77",
        "mail.b.example",
        "ESMTPSA",
        True,
        "",
        "",
        "postfix",
        id="postfix-auth-helo-literal",
    ),
    pytest.param(
        "by web1.example.com (Postfix, from userid 33) id 4F; Tue, 11 Jun 2024",
        None,
        "web1.example.com",
        "",
        False,
        "Postfix, from userid 33",
        "",
        "postfix",
        id="postfix-pickup",
    ),
    pytest.param(
        "from host.example.net ([203.0.113.5]:43210 helo=mx) by mx.example.org with esmtpsa "
        "(TLS1.3) tls TLS_AES_256_GCM_SHA384 (Exim 4.96) (envelope-from <a@b.example>) "
        "id 1x for c@d.example; Tue",
        "203.0.113.5",
        "mx.example.org",
        "esmtpsa",
        True,
        "",
        "c@d.example",
        "exim",
        id="exim-esmtpsa-port",
    ),
    pytest.param(
        "from [203.0.113.66] (port=51234 helo=[10.0.0.1]) by mx.example.org with esmtp "
        "(Exim 4.96) id 1abc-000; Tue",
        "203.0.113.66",
        "mx.example.org",
        "esmtp",
        False,
        "",
        "",
        "exim",
        id="exim-no-rdns-helo-literal",
    ),
    pytest.param(
        "from www-data by host.example.com with local (Exim 4.96) "
        "(envelope-from <www-data@host>) id 1abc; Tue",
        None,
        "host.example.com",
        "local",
        False,
        "Exim local submission by www-data",
        "",
        "exim",
        id="exim-local",
    ),
    pytest.param(
        "from helo.example (rdns.example [IPv6:2001:db8::5]) by mx.example.com (8.17.1/8.17.1) "
        "with ESMTP id x; date",
        "2001:db8::5",
        "mx.example.com",
        "ESMTP",
        False,
        "",
        "",
        "sendmail",
        id="sendmail-ipv6",
    ),
    pytest.param(
        "from c.example (c.example [203.0.113.200]) (authenticated bits=0) by m.example "
        "(8.15.2/8.15.2) with ESMTP id 1; date",
        "203.0.113.200",
        "m.example",
        "ESMTP",
        True,
        "",
        "",
        "sendmail",
        id="sendmail-authenticated-bits",
    ),
    pytest.param(
        "(from apache@localhost) by host.example.com (8.15.2/8.15.2/Submit) id x; date",
        None,
        "host.example.com",
        "",
        False,
        "Sendmail submission from apache",
        "",
        "sendmail",
        id="sendmail-submit",
    ),
    pytest.param(
        "from EXCH01.corp.example.com (10.0.0.5) by EXCH02.corp.example.com (10.0.0.6) with "
        "Microsoft SMTP Server (version=TLS1_2, cipher=X) id 15.1.2507.6; Mon",
        "10.0.0.5",
        "EXCH02.corp.example.com",
        "Microsoft SMTP Server",
        False,
        "",
        "",
        "exchange",
        id="exchange",
    ),
    pytest.param(
        "from EXCH01.corp.example.com ([fe80::1%12]) by EXCH01.corp.example.com ([fe80::1%12]) "
        "with mapi id 15.01.2507.006; Mon",
        "fe80::1",
        "EXCH01.corp.example.com",
        "mapi",
        True,
        "",
        "",
        "exchange",
        id="exchange-mapi-scope-id",
    ),
    pytest.param(
        "(qmail 12345 invoked by uid 89); 10 Jan 2024",
        None,
        "",
        "",
        False,
        "qmail invoked by uid 89",
        "",
        "qmail",
        id="qmail-uid",
    ),
    pytest.param(
        "from unknown (HELO [10.0.0.1]) (203.0.113.66) by mail.example.com with SMTP; date",
        "203.0.113.66",
        "mail.example.com",
        "SMTP",
        False,
        "",
        "",
        "qmail",
        id="qmail-helo-literal",
    ),
    pytest.param(
        "from unknown (HELO foo) (u@hooli.example@203.0.113.5) by mail.example.com with "
        "ESMTPA; date",
        "203.0.113.5",
        "mail.example.com",
        "ESMTPA",
        True,
        "",
        "",
        "qmail",
        id="qmail-auth-user-at-ip",
    ),
    pytest.param(
        "from helo (rdns [203.0.113.5]) by haraka.example.com (Haraka/3.0.2) with ESMTPSA id "
        "UUID.1 envelope-from <a@b> (authenticated bits=0); date",
        "203.0.113.5",
        "haraka.example.com",
        "ESMTPSA",
        True,
        "",
        "",
        "haraka",
        id="haraka",
    ),
]


@pytest.mark.parametrize(
    ("value", "from_ip", "by_host", "protocol", "authenticated", "local", "for_address", "mta"),
    FORMATS,
)
def test_formats(
    value: str,
    from_ip: str | None,
    by_host: str,
    protocol: str,
    authenticated: bool,
    local: str,
    for_address: str,
    mta: str,
) -> None:
    hop = parse_received(value)
    assert hop.from_ip == (ip(from_ip) if from_ip else None)
    assert hop.by_host == by_host
    assert hop.protocol == protocol
    assert hop.authenticated is authenticated
    assert hop.local_submission == local
    assert hop.for_address == for_address
    assert hop.mta == mta


def test_qmail_markers() -> None:
    assert parse_received("(qmail 1 invoked from network); date").neutral
    alias = parse_received("(qmail 5 invoked by alias); date")
    assert alias.forwarded == "qmail invoked by alias"
    assert not alias.neutral


def test_exim_helo_and_rdns_are_told_apart() -> None:
    hop = parse_received("from rdns.example.net ([203.0.113.9] helo=client.example) by mx; d")
    assert (hop.from_rdns, hop.from_helo, hop.from_ip) == (
        "rdns.example.net",
        "client.example",
        ip("203.0.113.9"),
    )


def test_exim_envelope_from_and_mark() -> None:
    hop = parse_received(
        "from mta.example.com ([192.0.2.200] helo=mta.example.com) by mx.globex.example "
        "with esmtps (TLS1.3) tls TLS_AES_256_GCM_SHA384 (Exim 4.96) "
        "(envelope-from <alerts@monitor.example.com>) id 1sZxWu-000Dm7-0R; d"
    )
    assert (hop.envelope_from, hop.exim_written, hop.mta) == (
        "alerts@monitor.example.com",
        True,
        "exim",
    )
    local = parse_received("from www-data by mx with local (Exim 4.96) (envelope-from <>) id 1")
    assert (local.envelope_from, local.exim_written) == ("", True)
    postfix = parse_received("from a (a [192.0.2.1]) by mx (Postfix) with ESMTP id 1 for <b@c>")
    assert (postfix.envelope_from, postfix.exim_written) == ("", False)


@pytest.mark.parametrize(
    "value",
    [
        # "exim" in the HELO makes the `mta` guess say exim; only the MTA's comment counts
        "from exim.example (exim.example [203.0.113.9]) by mx (8.17.1/8.17.1) with ESMTP id 1",
        # a quoted envelope sender carrying an Exim comment and a second envelope-from
        "from [203.0.113.9] (helo=a) by mx with esmtp "
        '(envelope-from <"x) (Exim 4.96) (envelope-from <a@b.example"@c.example>) id 1',
        # a recipient carrying them (Exim writes `for` without brackets)
        'from [203.0.113.9] (helo=a) by mx with esmtp id 1 for "(Exim 4.96)"@c.example',
        # the HELO, in the from comment
        "from x ([203.0.113.9] helo=(Exim) by mx with esmtp id 1",
    ],
)
def test_client_strings_do_not_make_an_exim_line(value: str) -> None:
    hop = parse_received(value)
    assert not hop.exim_written
    assert hop.envelope_from in ("", '"x) (Exim 4.96) (envelope-from <a@b.example"@c.example')


@pytest.mark.parametrize(
    ("address", "original"),
    [
        ("SRS0=HHbV=PB=example.org=alice@fwd.example", "alice@example.org"),
        ("<srs0+HHbV=pb=example.org=alice@fwd.example>", "alice@example.org"),
        ("SRS0-a/b+=PB=example.org=a=b@fwd.example", "a=b@example.org"),
        (
            "SRS1=77aa=first.example==HHbV=PB=example.org=alice@fwd.example",
            "SRS0=HHbV=PB=example.org=alice@first.example",
        ),
        (
            "SRS1+77aa=first.example=-HHbV=PB=example.org=alice@fwd.example",
            "SRS0-HHbV=PB=example.org=alice@first.example",
        ),
        ("alice@example.org", None),
        ("SRS0=HHbV=P1=example.org=alice@fwd.example", None),  # "1" is no base32 digit
        ("SRS0=HHbV=PBX=example.org=alice@fwd.example", None),
        ("SRS0=HHbV=PB=example.org=@fwd.example", None),
        ("SRS0=HHbV=PB=example.org@fwd.example", None),
        ("SRS0==PB=example.org=alice@fwd.example", None),
        ("SRS0=HHbV=PB=exa mple.org=alice@fwd.example", None),
        ("SRS0xHHbV=PB=example.org=alice@fwd.example", None),
        ("SRS1=77aa=first.example=HHbV@fwd.example", None),
        ("SRS2=HHbV=PB=example.org=alice@fwd.example", None),
        ("SRS0=HHbV=PB=example.org=alice", None),
        ("", None),
    ],
)
def test_srs_original(address: str, original: str | None) -> None:
    assert srs_original(address) == original


# --- client-controlled strings cannot pose as MTA-written ones


@pytest.mark.parametrize(
    "value",
    [
        # HELO "(Authenticated" would open a comment that swallows the rest
        "from (Authenticated (unknown [203.0.113.97]) by relay.example (Postfix) with ESMTP id 1",
        # HELO ending in ';' would end the line early
        "from x; (unknown [203.0.113.97]) by relay.example (Postfix) with ESMTP id 1",
        # a quoted envelope local part carrying a fake with-clause and auth comment
        "from [203.0.113.97] (port=1 helo=a) by relay.example with esmtp (Exim 4.96) "
        '(envelope-from <"x) with esmtpsa (authenticated bits=0"@e.example>) id 1 '
        'for "v) (Authenticated sender: b"@example.net; date',
        # Exim helo= naming a private address
        "from [203.0.113.97] (helo=[192.168.1.1]) by relay.example with esmtp id 1; date",
        # Postfix: HELO a private literal, the verified address in the comment
        "from [10.1.2.3] (unknown [203.0.113.97]) by relay.example (Postfix) with ESMTP id 1",
    ],
)
def test_client_strings_do_not_authenticate_or_move_the_address(value: str) -> None:
    hop = parse_received(value)
    assert hop.from_ip == ip("203.0.113.97")
    assert hop.by_host == "relay.example"
    assert not hop.authenticated
    assert not hop.local_submission


def test_repeated_keywords_keep_the_first_clause() -> None:
    hop = parse_received("from a (a [203.0.113.1]) by b.example with ESMTP by evil with ESMTPSA")
    assert hop.by_host == "b.example"
    assert not hop.authenticated


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:db8::1]", "2001:db8::1"),
        ("ipv6:2001:DB8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("192.0.2.1:25", "192.0.2.1"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("not-an-address", None),
        ("999.1.1.1", None),
        ("", None),
    ],
)
def test_parse_address(text: str, expected: str | None) -> None:
    assert parse_address(text) == (ip(expected) if expected else None)


@pytest.mark.parametrize(
    ("text", "domain"),
    [
        ("<a@B.Example.>", "b.example"),
        ("Name <a@b.example>", "b.example"),
        ('"x@y"@b.example', "b.example"),
        ("<@r.example:a@b.example>", "b.example"),
        ("c@d.example", "d.example"),
        ("<>", ""),
        ("postmaster", ""),
    ],
)
def test_address_domain(text: str, domain: str) -> None:
    assert address_domain(text) == domain


# --- header blocks


def test_folding_crlf_mbox_and_body() -> None:
    raw = (
        b"From MAILER-DAEMON Tue Jun 11 09:14:28 2024\r\n"
        b"Received: from a.example (a.example [192.0.2.1])\r\n"
        b"\tby b.example (Postfix) with ESMTP id X\r\n"
        b"  for <u@b.example>; Tue, 11 Jun 2024\r\n"
        b"X-Junk: 1\r\n"
        b"Delivered-To: u@b.example\r\n"
        b"Received: by c.example (Postfix, from userid 0) id Y; date\r\n"
        b"\r\n"
        b"Received: from body (body [198.51.100.1]) by nobody\r\n"
    )
    block = split_header_block(raw)
    assert [f.name for f in block.fields] == ["received", "delivered-to", "received"]
    assert [f.position for f in block.fields] == [0, 2, 3]
    hops = parse_hops(block)
    assert len(hops) == 2
    assert hops[0].from_ip == ip("192.0.2.1")
    assert hops[0].for_address == "u@b.example"
    assert hops[1].local_submission


def test_lone_cr_and_lf_line_ends() -> None:
    block = split_header_block(b"Received: from a (a [192.0.2.1])\rby b\nFrom: x@y.example\n")
    assert len(block.received) == 1
    assert block.first("from") is not None


def test_limits_cut_received_lines_and_values() -> None:
    raw = "".join(f"Received: from h{i} (h [192.0.2.{i}]) by x; d\n" for i in range(100))
    block = split_header_block(raw, Limits(max_received=10))
    assert (len(block.received), block.received_total) == (10, 100)
    long = "Received: from a (a [192.0.2.1]) by b\n" + " x\n" * 10_000
    f = split_header_block(long, Limits(max_line=200)).received[0]
    assert f.truncated
    assert len(f.value) <= 200


def test_max_lines_bounds_the_lines_looked_at() -> None:
    """A block is looked at up to `max_lines` physical lines, whatever its size: beyond
    them it is `truncated` (limit "max_lines"); headers that end before are not."""
    raw = b"Received: from a (a [192.0.2.1]) by b; d\r\n" + b"X-A:1\r\n" * 100_000
    block = split_header_block(raw, Limits(max_lines=1000))
    assert (block.lines, block.truncated, block.limit) == (1000, True, "max_lines")
    assert len(block.received) == 1
    assert block.received_total == 1
    ended = b"Received: from a (a [192.0.2.1]) by b; d\r\n\r\n" + b"body\r\n" * 100_000
    block = split_header_block(ended, Limits(max_lines=1000))
    assert (block.lines, block.truncated, block.limit) == (2, False, "")
    cut = split_header_block(raw[:5000], Limits(max_bytes=1024))
    assert (cut.truncated, cut.limit) == (True, "max_bytes")


@pytest.mark.parametrize("eol", ["\r\n", "\n", "\r"])
def test_exactly_max_lines_then_end_of_text_is_not_a_cut(eol: str) -> None:
    raw = eol.join(f"X-{i}: {i}" for i in range(10)) + eol
    block = split_header_block(raw, Limits(max_lines=10))
    assert (block.lines, block.truncated) == (11, False)  # the 11th line is the empty end
    assert split_header_block(raw + "X-More: 1", Limits(max_lines=10)).truncated


def test_one_megabyte_of_folded_lines_is_quick() -> None:
    raw = b"Received: from a (a [192.0.2.1])\r\n" + b"\tby b with ESMTP (x)\r\n" * 50_000
    assert len(raw) > 1 << 20
    t0 = time.perf_counter()
    block = split_header_block(raw)
    hops = parse_hops(block)
    assert time.perf_counter() - t0 < 1.0
    assert block.truncated
    assert len(hops) == 1
    assert hops[0].truncated
    assert hops[0].from_ip == ip("192.0.2.1")


def test_one_megabyte_of_parentheses_is_quick() -> None:
    hop_text = "from a " + "(" * 500_000 + ")" * 500_000
    t0 = time.perf_counter()
    hop = parse_received(hop_text)
    assert time.perf_counter() - t0 < 0.5
    assert hop.truncated


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_binary_junk_never_raises(raw: bytes) -> None:
    parse_hops(split_header_block(raw))
    parse_hops(split_header_block(b"Received: " + raw))


_PIECES = st.sampled_from(
    [
        "from",
        "by",
        "with",
        "for",
        "id",
        "via",
        "(",
        ")",
        "[",
        "]",
        "<",
        ">",
        '"',
        ";",
        "\\",
        " ",
        "\t",
        "\r\n ",
        "\n",
        ":",
        "@",
        "IPv6:",
        "2001:db8::1",
        "192.0.2.1",
        "%12",
        "ESMTPSA",
        "helo=",
        "HELO",
        "Authenticated sender:",
        "from userid 33",
        "qmail 1 invoked by uid 2",
        "(Postfix)",
        "Received: ",
        "Delivered-To: a@b.example",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_PIECES, max_size=80))
def test_structured_junk_never_raises(pieces: list[str]) -> None:
    text = "".join(pieces)
    hop = parse_received(text)
    assert len(hop.raw) <= 1000
    block = split_header_block("Received: " + text)
    for h in parse_hops(block):
        assert h.index >= 0
