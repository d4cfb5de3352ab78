"""Customers: who may send through the smart relay, and from which networks.

A customer record is configuration written by a provisioning system (`UpsertCustomer`):
its relay networks (the addresses its mail servers connect to the smart relay from),
its internal networks (declared servers and LANs behind them) and its own domains.
`Customer.networks` is the compiled form the walker matches hops against; private
ranges count as the customer's too (DESIGN.md section 9) but live in the walker's own
set, so one customer's record never says anything about another's.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from penalty.identity import InvalidAddress, IPAddress, NetworkSet, parse_network

ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
DOMAIN_PATTERN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
MAX_NETWORKS = 1000  # per list; a customer with more should be split or summarised
MAX_DOMAINS = 1000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BadCustomer(ValueError):
    """A customer field is not acceptable; `field` is its protobuf path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Customer:
    id: str
    relay_networks: tuple[str, ...] = ()
    internal_networks: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    note: str = ""
    updated_at_ms: int = 0
    expires_at_ms: int = 0

    @cached_property
    def networks(self) -> NetworkSet[str]:
        """relay and internal networks -> "relay" / "internal" (longest prefix wins)."""
        nets: NetworkSet[str] = NetworkSet()
        for cidr in self.internal_networks:
            nets.add(parse_network(cidr), "internal")
        for cidr in self.relay_networks:
            nets.add(parse_network(cidr), "relay")
        return nets

    @cached_property
    def relay_set(self) -> NetworkSet[str]:
        nets: NetworkSet[str] = NetworkSet()
        for cidr in self.relay_networks:
            nets.add(parse_network(cidr), "relay")
        return nets

    def owns_domain(self, domain: str) -> bool:
        """`domain` is one of the customer's domains or a subdomain of one."""
        d = domain.lower().rstrip(".")
        if not d:
            return False
        return any(d == own or d.endswith("." + own) for own in self.domains)

    def is_relay(self, addr: IPAddress) -> bool:
        return self.relay_set.match(addr) is not None

    # --- storage form: the configuration only; times are the store's

    def config_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "relay_networks": list(self.relay_networks),
                "internal_networks": list(self.internal_networks),
                "domains": list(self.domains),
                "note": self.note,
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(
        cls, text: str | bytes, updated_at_ms: int = 0, expires_at_ms: int = 0
    ) -> Customer:
        data: dict[str, Any] = json.loads(text)
        return cls(
            id=str(data["id"]),
            relay_networks=tuple(data.get("relay_networks", ())),
            internal_networks=tuple(data.get("internal_networks", ())),
            domains=tuple(data.get("domains", ())),
            note=str(data.get("note", "")),
            updated_at_ms=updated_at_ms,
            expires_at_ms=expires_at_ms,
        )


@dataclass(frozen=True, slots=True)
class NetworkRules:
    """How broad a relay network may be: a /8 "relay" would claim a tenth of the net."""

    relay_min_prefix_v4: int = 16
    relay_min_prefix_v6: int = 32


def _networks(values: Any, name: str, min_prefix: dict[int, int] | None) -> tuple[str, ...]:
    if len(values) > MAX_NETWORKS:
        raise BadCustomer(name, f"more than {MAX_NETWORKS} entries")
    out: dict[str, None] = {}
    for i, text in enumerate(values):
        try:
            net = parse_network(text)
        except InvalidAddress as exc:
            raise BadCustomer(f"{name}[{i}]", str(exc)) from exc
        floor = (min_prefix or {}).get(net.version, 1)
        if net.prefixlen < floor:
            raise BadCustomer(
                f"{name}[{i}]", f"/{net.prefixlen} is broader than the allowed /{floor}"
            )
        out[str(net)] = None
    return tuple(out)


def normalise_domain(text: str) -> str:
    """Lower-case, no trailing dot, IDNA-encoded; raises ValueError when not a domain."""
    d = text.strip().lower().rstrip(".")
    if d.startswith("*."):
        d = d[2:]  # "*.example.com" means what "example.com" already means: subdomains
    try:
        d = d.encode("idna").decode("ascii") if not d.isascii() else d
    except UnicodeError as exc:
        raise ValueError(f"not a domain name: {text[:64]!r}") from exc
    if not d or len(d) > 253 or not DOMAIN_PATTERN.fullmatch(d):
        raise ValueError(f"not a domain name: {text[:64]!r}")
    return d


def build_customer(
    id: str,
    relay_networks: Any = (),
    internal_networks: Any = (),
    domains: Any = (),
    note: str = "",
    rules: NetworkRules = NetworkRules(),
) -> Customer:
    """A validated, normalised customer (CIDRs canonical and de-duplicated, domains
    lower-case); raises `BadCustomer` naming the field."""
    if not id:
        raise BadCustomer("id", "required")
    if not ID_PATTERN.fullmatch(id):
        raise BadCustomer("id", "must be 1-128 characters of A-Z a-z 0-9 _ . : @ -")
    relay = _networks(
        relay_networks,
        "relay_networks",
        {4: rules.relay_min_prefix_v4, 6: rules.relay_min_prefix_v6},
    )
    internal = _networks(internal_networks, "internal_networks", None)
    if len(domains) > MAX_DOMAINS:
        raise BadCustomer("domains", f"more than {MAX_DOMAINS} entries")
    doms: dict[str, None] = {}
    for i, text in enumerate(domains):
        try:
            doms[normalise_domain(text)] = None
        except ValueError as exc:
            raise BadCustomer(f"domains[{i}]", str(exc)) from exc
    if len(note) > 1024:
        raise BadCustomer("note", "longer than 1024 characters")
    return Customer(id, relay, internal, tuple(doms), note)


# Ranges that are nobody's on the public internet: a client there is inside the customer.
DEFAULT_PRIVATE_NETWORKS = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)


@dataclass
class PrivateNetworks:
    """The ranges that count as inside every customer (settings: private_networks)."""

    cidrs: tuple[str, ...] = DEFAULT_PRIVATE_NETWORKS
    _set: NetworkSet[str] = field(default_factory=NetworkSet, repr=False)

    def __post_init__(self) -> None:
        for cidr in self.cidrs:
            self._set.add(parse_network(cidr), "private")

    def match(self, addr: IPAddress) -> str | None:
        hit = self._set.match(addr)
        return hit[0] if hit else None
