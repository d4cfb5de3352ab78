"""Identity derivation: who gets penalized (DESIGN.md section 3).

An *identity* is the key windows and penalties live under. It exists once, here, so that
penaltyd, the policy sidecar and the live replica in `clients/` agree to the byte on what
"203.0.113.7" or "2001:db8:1:2::/64" means.

- IPv4: the address itself (a /32 by default; shorter prefixes are configurable).
- IPv6: the /64 by default, because one host commonly owns a whole /64 and a spammer
  rotating through it must be one identity.
- IPv4-mapped IPv6 (``::ffff:192.0.2.1``) is folded to IPv4 before anything else.
- Behind a *shared* address (NAT, CGNAT), a *sub-identity* tells its clients apart:
  ``<identity>#<fingerprint>``, the fingerprint hashing HELO name, envelope-sender
  domain and the MX's optional client fingerprint.

Parsing is strict (`ipaddress`): leading zeros, scope ids, surrounding blanks and
prefix notation are refused with `InvalidAddress`, never guessed at.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import Generic, TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
V = TypeVar("V")


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
def _cached(text: str, ipv4_prefix: int, ipv6_prefix: int) -> tuple[IPAddress, str]:
    # Checks repeat the same few thousand addresses; parsing dominates the check path
    # once the store answers from memory, so the pure function is memoised.
    addr = parse_ip(text)
    return addr, identity_of(addr, IdentityRules(ipv4_prefix, ipv6_prefix))


def address_and_identity(text: str, rules: IdentityRules | None = None) -> tuple[IPAddress, str]:
    """Parse `text` once: the address and its identity; raises `InvalidAddress`."""
    r = rules or _DEFAULT_RULES
    return _cached(text, r.ipv4_prefix, r.ipv6_prefix)


def identity_for(text: str, rules: IdentityRules | None = None) -> str:
    """Parse `text` and return its identity; raises `InvalidAddress` on bad input."""
    return address_and_identity(text, rules)[1]


_DEFAULT_RULES = IdentityRules()


# --- sub-identities: one client among many behind a shared (NAT, CGNAT) address


def sender_domain(mail_from: str) -> str:
    """The envelope sender's domain, lower-cased; "" for the null sender or no domain."""
    addr = mail_from.strip().strip("<>")
    return addr.rpartition("@")[2].lower().rstrip(".") if "@" in addr else ""


@lru_cache(maxsize=65536)
def client_fingerprint(helo: str, mail_from: str, fingerprint: str) -> str:
    """A short stable fingerprint of what tells clients behind one address apart.

    HELO name, envelope-sender domain and the MX's optional client fingerprint are hashed
    (blake2b, 40 bits: collisions among the few hundred clients of one address are
    negligible) so raw envelope data is never used as a key. "" when nothing is known.
    """
    if not (helo or mail_from or fingerprint):
        return ""
    material = f"{helo.strip().lower()}\0{sender_domain(mail_from)}\0{fingerprint}"
    return hashlib.blake2b(material.encode(), digest_size=5).hexdigest()


def sub_identity(identity: str, fingerprint: str) -> str:
    """`<identity>#<fingerprint>`: the key of one client behind a shared address."""
    return f"{identity}#{fingerprint}" if fingerprint else identity


def address_of(identity: str) -> str:
    """The address part of an identity or sub-identity."""
    return identity.partition("#")[0]


# --- sets of networks (shared-address CIDRs, the allowlist)


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (host bits must be zero) or a bare address; IPv4-mapped IPv6 folds to IPv4."""
    if not text or text.strip() != text or "%" in text:
        raise InvalidAddress(f"not a CIDR: {text[:64]!r}")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidAddress(f"not a CIDR: {text[:64]!r} ({exc})") from exc
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


class NetworkSet(Generic[V]):
    """Longest-prefix match of addresses against a set of networks, each with a value.

    One dict per prefix length present: a lookup masks the address once per length (a
    handful), so it stays O(lengths) however many networks are listed.
    """

    def __init__(self) -> None:
        self._by_len: dict[tuple[int, int], dict[int, tuple[str, V]]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count  # asked on every check (is there an allowlist at all?)

    def add(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network, value: V) -> None:
        bucket = self._by_len.setdefault((net.version, net.prefixlen), {})
        address = int(net.network_address)
        self._count += address not in bucket
        bucket[address] = (str(net), value)

    def remove(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
        bucket = self._by_len.get((net.version, net.prefixlen))
        if bucket is None or bucket.pop(int(net.network_address), None) is None:
            return False
        self._count -= 1
        if not bucket:
            del self._by_len[(net.version, net.prefixlen)]
        return True

    def match(self, addr: IPAddress) -> tuple[str, V] | None:
        """The most specific (cidr, value) containing `addr`, or None."""
        bits = 32 if addr.version == 4 else 128
        value = int(addr)
        best: tuple[str, V] | None = None
        best_len = -1
        for (version, length), bucket in self._by_len.items():
            if version != addr.version or length <= best_len:
                continue
            hit = bucket.get(value >> (bits - length) << (bits - length) if length else 0)
            if hit is not None:
                best, best_len = hit, length
        return best

    def items(self) -> list[tuple[str, V]]:
        return [entry for bucket in self._by_len.values() for entry in bucket.values()]
