"""The customer store contract: the same semantics on every backend.

Exception tree (`serving.errors`'s, plus one leaf; mapped once at the RPC boundary,
`relaycheck.api`)::

    StoreError
     ├── StoreUnavailable      no answer in time, connection refused: Classify fails open
     ├── StoreMisconfigured    the store answered but cannot serve us (auth, bad URL)
     └── NetworkConflict       a relay network already belongs to another customer

Every record expires (DESIGN.md: every Redis key has a TTL): `upsert` renews it for
the store's `ttl_ms`, so a provisioning system re-upserting its customers (idempotent)
keeps them, and a customer nobody maintains disappears instead of living forever.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from penalty.identity import IPAddress
from relaycheck.customers import Customer
from serving.errors import StoreError as StoreError  # the store tree, re-exported
from serving.errors import StoreMisconfigured as StoreMisconfigured
from serving.errors import StoreUnavailable as StoreUnavailable


class NetworkConflict(StoreError):
    """A relay network is already another customer's: one relay, one customer."""

    def __init__(self, index: int, cidr: str, owner: str) -> None:
        super().__init__(f"{cidr} already belongs to customer {owner}")
        self.index = index
        self.cidr = cidr
        self.owner = owner


def candidate_networks(addr: IPAddress, min_prefix: int) -> list[str]:
    """Every network containing `addr` from the host route down to `/min_prefix`,
    most specific first: the keys a longest-prefix lookup tries in one round trip."""
    bits = 32 if addr.version == 4 else 128
    value = int(addr)
    cls = type(addr)
    out = []
    for length in range(bits, min_prefix - 1, -1):
        shift = bits - length
        network = cls((value >> shift) << shift)
        out.append(f"{network}/{length}")
    return out


@runtime_checkable
class CustomerStore(Protocol):
    kind: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def get(self, customer_id: str) -> Customer | None:
        """The live record, or None (unknown or expired)."""
        ...

    async def find_by_ip(self, addr: IPAddress) -> Customer | None:
        """The customer whose relay networks contain `addr` (longest prefix), or None."""
        ...

    async def upsert(self, customer: Customer) -> Customer:
        """Create or replace; returns the stored record with its times. Raises
        `NetworkConflict` when a relay network is another live customer's."""
        ...

    async def delete(self, customer_id: str) -> bool: ...
