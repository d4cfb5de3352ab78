"""Identity derivation: who gets penalized (DESIGN.md section 3).

An *identity* is the key windows and penalties live under. It exists once, here, so that
penaltyd, the policy sidecar and the live replica in `clients/` agree to the byte on what
"203.0.113.7" or "2001:db8:1:2::/64" means.

- IPv4: the address itself (a /32 by default; shorter prefixes are configurable).
- IPv6: the /64 by default, because one host commonly owns a whole /64 and a spammer
  rotating through it must be one identity.
- IPv4 carried in IPv6 is folded to the IPv4 address before anything else: IPv4-mapped
  (``::ffff:192.0.2.1``, ``::ffff:0:0/96``), SIIT's IPv4-translated form
  (``::ffff:0:192.0.2.1``, ``::ffff:0:0:0/96``, RFC 2765), the NAT64 well-known
  prefix (``64:ff9b::192.0.2.1``, RFC 6052) and any local NAT64 prefixes configured
  (RFC 6052 lengths /32 to /96). Otherwise every IPv4 sender behind a translator would
  share the translator's /64, and one spammer would defer all of them.
- Behind a *shared* address (NAT, CGNAT), a *sub-identity* tells its clients apart:
  ``<identity>#<fingerprint>``, the fingerprint hashing HELO name, envelope-sender
  domain and the MX's optional client fingerprint.

Parsing is strict (`ipaddress`): leading zeros, scope ids, surrounding blanks and
prefix notation are refused with `InvalidAddress`, never guessed at.

Everything else an SMTP client chooses (HELO name, envelope sender, the MX's client
fingerprint, counts taken from logs) is *bounded at the edge* here, once, by every client
and by the service alike (`bound_client`, `bound_count`): a value that is too long is
replaced by a prefix and a digest of the whole, so the same client keeps the same
sub-identity, the result is idempotent (bounding twice changes nothing), and no crafted
field can make a check or a batch of other clients' reports fail.
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


#: RFC 6052 prefix lengths of an IPv4-embedded IPv6 address.
NAT64_LENGTHS = (32, 40, 48, 56, 64, 96)
#: The NAT64 well-known prefix (RFC 6052), always folded.
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
# IPv4-translated addresses of SIIT (RFC 2765 s. 2.1): ::ffff:0:a.b.c.d. (The IPv4-mapped
# prefix, ::ffff:0:0/96, is `ipv4_mapped`.)
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")


@dataclass(frozen=True, slots=True)
class IdentityRules:
    """Prefix lengths that turn an address into an identity, and local NAT64 prefixes."""

    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    nat64_prefixes: tuple[str, ...] = ()  # local NAT64 prefixes (RFC 6052), e.g. 64:ff9b:1::/96

    def __post_init__(self) -> None:
        if not 8 <= self.ipv4_prefix <= 32:
            raise ValueError("ipv4_prefix must be between 8 and 32")
        if not 16 <= self.ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be between 16 and 128")
        for text in self.nat64_prefixes:
            nat64_network(text)


def nat64_network(text: str) -> ipaddress.IPv6Network:
    """A NAT64 prefix as configured; raises ValueError unless it is an RFC 6052 one."""
    try:
        net = ipaddress.IPv6Network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"not an IPv6 prefix: {text[:64]!r} ({exc})") from exc
    if net.prefixlen not in NAT64_LENGTHS:
        raise ValueError(f"NAT64 prefix {text!r}: length must be one of {NAT64_LENGTHS}")
    return net


def _embedded_ipv4(addr: ipaddress.IPv6Address, net: ipaddress.IPv6Network) -> IPAddress:
    """The IPv4 address RFC 6052 embeds after `net` (skipping the u-octet, bits 64-71)."""
    value = int(addr)
    length = net.prefixlen
    if length == 96:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    octets = value.to_bytes(16, "big")
    start = length // 8
    carried = [b for i, b in enumerate(octets[start:], start) if i != 8][:4]
    return ipaddress.IPv4Address(bytes(carried))


@lru_cache(maxsize=64)
def _nat64_networks(prefixes: tuple[str, ...]) -> tuple[ipaddress.IPv6Network, ...]:
    return (NAT64_WELL_KNOWN, *(nat64_network(p) for p in prefixes))


def fold_ipv4(addr: IPAddress, nat64_prefixes: tuple[str, ...] = ()) -> IPAddress:
    """IPv4 carried in IPv6 (mapped, SIIT, NAT64) as the IPv4 address; others unchanged."""
    if isinstance(addr, ipaddress.IPv4Address):
        return addr
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _SIIT:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    for net in _nat64_networks(nat64_prefixes):
        if addr in net:
            return _embedded_ipv4(addr, net)
    return addr


def parse_ip(text: str, nat64_prefixes: tuple[str, ...] = ()) -> IPAddress:
    """Parse one client address strictly, folding IPv4 carried in IPv6 to IPv4."""
    if not text:
        raise InvalidAddress("empty address")
    if len(text) > 45 or text.strip() != text or "%" in text or "/" in text:
        raise InvalidAddress(f"not a plain IP address: {text[:64]!r}")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise InvalidAddress(f"not an IP address: {text[:64]!r}") from exc
    return fold_ipv4(addr, nat64_prefixes)


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
def _cached(
    text: str, ipv4_prefix: int, ipv6_prefix: int, nat64: tuple[str, ...]
) -> tuple[IPAddress, str]:
    # Checks repeat the same few thousand addresses; parsing dominates the check path
    # once the store answers from memory, so the pure function is memoised (on plain
    # arguments: hashing them is C code, hashing the dataclass would be Python).
    addr = parse_ip(text, nat64)
    return addr, identity_of(addr, IdentityRules(ipv4_prefix, ipv6_prefix, nat64))


def address_and_identity(text: str, rules: IdentityRules | None = None) -> tuple[IPAddress, str]:
    """Parse `text` once: the address and its identity; raises `InvalidAddress`."""
    r = rules or _DEFAULT_RULES
    return _cached(text, r.ipv4_prefix, r.ipv6_prefix, r.nat64_prefixes)


def identity_for(text: str, rules: IdentityRules | None = None) -> str:
    """Parse `text` and return its identity; raises `InvalidAddress` on bad input."""
    return address_and_identity(text, rules)[1]


_DEFAULT_RULES = IdentityRules()


# --- what the SMTP client chooses, bounded at the edge (the same in every component)

MAX_HELO = 255  # characters of a HELO/EHLO name (a domain is at most 253 octets)
MAX_MAIL_FROM = 512  # characters of an envelope sender (RFC 5321 paths are <= 256 octets)
MAX_DOMAIN = 255  # characters of the sender's domain kept whole when a sender is cut
MAX_FINGERPRINT = 128  # characters of the MX's optional client fingerprint
MAX_COUNT = 100_000  # events in one outcome count (a log's commands=N summary, say)
_DIGEST_CHARS = 16


def bounded(text: str, limit: int) -> str:
    """`text` if it fits in `limit` characters, else a prefix, "~" and a digest of the whole.

    Deterministic (the same input always gives the same output, in every process) and
    idempotent (the result fits, so bounding it again changes nothing); text that cannot
    be encoded (lone surrogates) has them replaced, so it can always be sent.
    """
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) <= limit:
        return text
    digest = hashlib.blake2b(text.encode(), digest_size=_DIGEST_CHARS // 2).hexdigest()
    return f"{text[: limit - _DIGEST_CHARS - 1]}~{digest}"


def bound_mail_from(mail_from: str) -> str:
    """An envelope sender bounded like `bounded`, keeping its domain whole when it can
    (the domain is what tells clients behind one address apart)."""
    if len(mail_from) <= MAX_MAIL_FROM and mail_from.isascii():
        return mail_from
    local, at, domain = mail_from.rpartition("@")
    if at and len(domain) <= MAX_DOMAIN:
        domain = bounded(domain, MAX_DOMAIN)
        return f"{bounded(local, MAX_MAIL_FROM - 1 - len(domain))}@{domain}"
    return bounded(mail_from, MAX_MAIL_FROM)


def bound_client(helo: str, mail_from: str, fingerprint: str = "") -> tuple[str, str, str]:
    """(helo, mail_from, fingerprint) bounded at the edge; cheap when nothing is long."""
    if (
        helo.isascii()
        and mail_from.isascii()
        and fingerprint.isascii()
        and (
            len(helo) <= MAX_HELO
            and len(mail_from) <= MAX_MAIL_FROM
            and len(fingerprint) <= MAX_FINGERPRINT
        )
    ):
        return helo, mail_from, fingerprint
    return (
        bounded(helo, MAX_HELO),
        bound_mail_from(mail_from),
        bounded(fingerprint, MAX_FINGERPRINT),
    )


def bound_count(n: int) -> int:
    """An event count from the internet (a log line, a milter) clamped to 0..MAX_COUNT."""
    return 0 if n < 0 else min(n, MAX_COUNT)


# --- sub-identities: one client among many behind a shared (NAT, CGNAT) address


def sender_domain(mail_from: str) -> str:
    """The envelope sender's domain, lower-cased; "" for the null sender or no domain."""
    addr = mail_from.strip().strip("<>")
    return addr.rpartition("@")[2].lower().rstrip(".") if "@" in addr else ""


def client_fingerprint(helo: str, mail_from: str, fingerprint: str) -> str:
    """A short stable fingerprint of what tells clients behind one address apart.

    HELO name, envelope-sender domain and the MX's optional client fingerprint are hashed
    (blake2b, 40 bits: collisions among the few hundred clients of one address are
    negligible) so raw envelope data is never used as a key. "" when nothing is known.
    The sender is cut to its domain before anything is cached: a full address (a person)
    is never kept, not even in memory.
    """
    return client_fingerprint_and_marks(helo, mail_from, fingerprint)[0]


def client_fingerprint_and_marks(helo: str, mail_from: str, fingerprint: str) -> tuple[str, str]:
    """(fingerprint, marks): the fingerprint, and the client's *marks*: one hash per
    component (HELO, sender domain, the MX's fingerprint), ``h.d.f``, each "" when unknown.

    Marks tell whether two sightings may be the same client when their components differ
    in what is known (a log line knows the HELO, the policy request the sender too): see
    `same_client`. ("", "") when nothing is known."""
    if not (helo or mail_from or fingerprint):
        return "", ""
    helo, mail_from, fingerprint = bound_client(helo, mail_from, fingerprint)
    return _fingerprint(helo.strip().lower(), sender_domain(mail_from), fingerprint)


def _hash(material: str) -> str:
    return hashlib.blake2b(material.encode(), digest_size=5).hexdigest()


@lru_cache(maxsize=65536)
def _fingerprint(helo: str, domain: str, fingerprint: str) -> tuple[str, str]:
    marks = ".".join(
        _hash(f"{tag}\0{part}") if part else ""
        for tag, part in (("h", helo), ("d", domain), ("f", fingerprint))
    )
    return _hash(f"{helo}\0{domain}\0{fingerprint}"), marks


def bindable(marks: str) -> bool:
    """Whether marks say enough to bind a penalty to one client: two components known
    (HELO and sender domain, or either with the MX's fingerprint). A log line's HELO
    alone does not: any new HELO would then shed the penalty."""
    return sum(1 for m in marks.split(".") if m) >= 2


def same_client(bound: str, marks: str) -> bool:
    """Whether a client with `marks` may be the one a penalty is bound to (`bound`, marks
    in the same form): yes unless it differs in *every* component the binding knows.

    Deliberately lenient towards the penalty: one shared component (the same HELO under
    a new sender domain, or the same sender domain under a new HELO) is the same client,
    and so is a client that does not show a component the binding knows (a check without
    HELO or sender, the null sender): it cannot prove it differs. Only a client that
    differs in everything the binding knows goes free: what the users behind a
    carrier-grade NAT look like next to the spammer among them."""
    if not bound or not marks:
        return True
    theirs = marks.split(".")
    for i, a in enumerate(bound.split(".")):
        if a:
            b = theirs[i] if i < len(theirs) else ""
            if not b or a == b:
                return True
    return False


def sub_identity(identity: str, fingerprint: str) -> str:
    """`<identity>#<fingerprint>`: the key of one client behind a shared address."""
    return f"{identity}#{fingerprint}" if fingerprint else identity


def address_of(identity: str) -> str:
    """The address part of an identity or sub-identity."""
    return identity.partition("#")[0]


# --- sets of networks (shared-address CIDRs, the allowlist)


MAX_CIDR = 64


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (host bits must be zero) or a bare address; IPv4-mapped IPv6 folds to IPv4."""
    # The longest CIDR is 49 characters (an IPv6 address with an embedded IPv4 and /128):
    # anything longer is refused before parsing, and an error never echoes more than 64
    # characters of what a caller sent (ipaddress's own message quotes it whole).
    if not text or len(text) > MAX_CIDR or text.strip() != text or "%" in text:
        raise InvalidAddress(f"not a CIDR: {text[:64]!r}")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        why = "host bits set" if "host bits set" in str(exc) else "not an address or network"
        raise InvalidAddress(f"not a CIDR: {text!r} ({why})") from exc
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
