"""Identity derivation: who gets penalized (DESIGN.md section 3).

An *identity* is the key windows and penalties live under. It exists once, here, so that
penaltyd, the policy sidecar and the live replica in `clients/` agree to the byte on what
"203.0.113.7" or "2001:db8:1:2::/64" means.

- IPv4: the address itself (a /32 by default; shorter prefixes are configurable).
- IPv6: the /64 by default, because one host commonly owns a whole /64 and a spammer
  rotating through it must be one identity.
- IPv4-mapped IPv6 (``::ffff:192.0.2.1``) is folded to IPv4 before anything else.

Parsing is strict (`ipaddress`): leading zeros, scope ids, surrounding blanks and
prefix notation are refused with `InvalidAddress`, never guessed at.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidAddress(ValueError):
    """The text is not a single, plain IPv4 or IPv6 address."""


@dataclass(frozen=True, slots=True)
class IdentityRules:
    """Prefix lengths that turn an address into an identity."""

    ipv4_prefix: int = 32
    ipv6_prefix: int = 64

    def __post_init__(self) -> None:
        if not 8 <= self.ipv4_prefix <= 32:
            raise ValueError("ipv4_prefix must be between 8 and 32")
        if not 16 <= self.ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be between 16 and 128")


def parse_ip(text: str) -> IPAddress:
    """Parse one client address strictly, folding IPv4-mapped IPv6 to IPv4."""
    if not text:
        raise InvalidAddress("empty address")
    if len(text) > 45 or text.strip() != text or "%" in text or "/" in text:
        raise InvalidAddress(f"not a plain IP address: {text[:64]!r}")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise InvalidAddress(f"not an IP address: {text[:64]!r}") from exc
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def identity_of(addr: IPAddress, rules: IdentityRules) -> str:
    """The identity string for an already parsed address.

    A full-length prefix renders as the bare address ("203.0.113.7"); anything shorter
    renders as the network in CIDR form ("2001:db8:1:2::/64").
    """
    if isinstance(addr, ipaddress.IPv4Address):
        prefix = rules.ipv4_prefix
        if prefix == 32:
            return str(addr)
    else:
        prefix = rules.ipv6_prefix
        if prefix == 128:
            return str(addr)
    return str(ipaddress.ip_network((addr, prefix), strict=False))


@lru_cache(maxsize=65536)
def _cached_identity(text: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    # Checks repeat the same few thousand addresses; parsing dominates the check path
    # once the store answers from memory, so the pure function is memoised.
    return identity_of(parse_ip(text), IdentityRules(ipv4_prefix, ipv6_prefix))


def identity_for(text: str, rules: IdentityRules | None = None) -> str:
    """Parse `text` and return its identity; raises `InvalidAddress` on bad input."""
    r = rules or _DEFAULT_RULES
    return _cached_identity(text, r.ipv4_prefix, r.ipv6_prefix)


_DEFAULT_RULES = IdentityRules()
