"""Identity derivation (shared by service and clients)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from penalty.identity import IdentityRules, InvalidAddress, identity_for, parse_ip


@pytest.mark.parametrize(
    ("text", "identity"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::1", "2001:db8:1:2::/64"),
        ("::1", "::/64"),
    ],
)
def test_default_identities(text: str, identity: str) -> None:
    assert identity_for(text) == identity


@pytest.mark.parametrize(
    "text",
    [
        "",
        "010.1.1.1",
        " 1.2.3.4",
        "1.2.3.4\n",
        "fe80::1%eth0",
        "1.2.3.4/32",
        "abc",
        "1.2.3",
        "x" * 100,
    ],
)
def test_strict_parsing(text: str) -> None:
    with pytest.raises(InvalidAddress):
        identity_for(text)


def test_configurable_prefixes() -> None:
    rules = IdentityRules(ipv4_prefix=24, ipv6_prefix=48)
    assert identity_for("203.0.113.7", rules) == "203.0.113.0/24"
    assert identity_for("2001:db8:1:2::1", rules) == "2001:db8:1::/48"
    assert identity_for("2001:db8:1:2::1", IdentityRules(ipv6_prefix=128)) == "2001:db8:1:2::1"
    with pytest.raises(ValueError, match="ipv4_prefix"):
        IdentityRules(ipv4_prefix=4)


@given(st.ip_addresses())
def test_every_address_has_a_stable_identity(addr: object) -> None:
    text = str(addr)
    assert identity_for(text) == identity_for(text)
    assert str(parse_ip(text)) in (text, str(parse_ip(text)))
