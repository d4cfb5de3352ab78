"""The embedded customer store: one process, no Redis, the same semantics as `redis`.

The default when no Redis URL is configured (a single smart relay), and what the unit
tests run on. The clock is injectable (unix ms) so expiry is tested without sleeping.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from penalty.identity import IPAddress, NetworkSet, parse_network
from relaycheck.customers import Customer
from relaycheck.store.base import NetworkConflict


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class MemoryStore:
    """Customers in a dict, relay networks in a longest-prefix `NetworkSet`."""

    kind = "memory"

    def __init__(
        self, *, ttl_ms: int = 400 * 86_400_000, clock: Callable[[], int] = wall_ms
    ) -> None:
        self.ttl_ms = ttl_ms
        self.clock = clock
        self._customers: dict[str, Customer] = {}
        self._relays: NetworkSet[str] = NetworkSet()  # longest-prefix match
        self._owner: dict[str, str] = {}  # exact cidr -> customer id

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def _live(self, customer_id: str) -> Customer | None:
        c = self._customers.get(customer_id)
        if c is None:
            return None
        if c.expires_at_ms <= self.clock():
            self._drop(c)
            return None
        return c

    def _drop(self, c: Customer) -> None:
        self._customers.pop(c.id, None)
        for cidr in c.relay_networks:
            if self._owner.get(cidr) == c.id:
                del self._owner[cidr]
                self._relays.remove(parse_network(cidr))

    async def get(self, customer_id: str) -> Customer | None:
        return self._live(customer_id)

    async def find_by_ip(self, addr: IPAddress) -> Customer | None:
        # Expired owners are dropped as they are met; the next longest match is tried.
        while True:
            hit = self._relays.match(addr)
            if hit is None:
                return None
            c = self._live(hit[1])
            if c is not None:
                return c
            self._owner.pop(hit[0], None)
            self._relays.remove(parse_network(hit[0]))

    async def upsert(self, customer: Customer) -> Customer:
        for i, cidr in enumerate(customer.relay_networks):
            owner = self._owner.get(cidr)
            if owner is not None and owner != customer.id and self._live(owner) is not None:
                raise NetworkConflict(i, cidr, owner)
        old = self._customers.get(customer.id)
        if old is not None:
            self._drop(old)
        now = self.clock()
        stored = dataclasses.replace(customer, updated_at_ms=now, expires_at_ms=now + self.ttl_ms)
        self._customers[customer.id] = stored
        for cidr in customer.relay_networks:
            self._owner[cidr] = customer.id
            self._relays.add(parse_network(cidr), customer.id)
        return stored

    async def delete(self, customer_id: str) -> bool:
        c = self._live(customer_id)
        if c is None:
            return False
        self._drop(c)
        return True
