"""The customer store contract (relaycheck): identical semantics on every backend.

`CustomerStoreContract` holds the tests; a subclass says how to make a store (memory in
tests/unit/relaycheck, Redis on one node, Sentinel and Cluster in
tests/integration/relaycheck).
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from relaycheck.customers import build_customer
from relaycheck.store.base import CustomerStore, NetworkConflict


class CustomerStoreContract:
    """Subclasses provide `make(ttl_ms=...)`, returning a started store (closed after)."""

    async def make(self, ttl_ms: int = 400 * 86_400_000) -> CustomerStore:
        raise NotImplementedError

    async def test_upsert_get_find_delete(self) -> None:
        store = await self.make()
        acme = build_customer("acme", ["198.51.100.8/29", "2001:db8:ac::/48"], [], ["acme.example"])
        stored = await store.upsert(acme)
        assert (await store.get("acme")) == stored
        found = await store.find_by_ip(ipaddress.ip_address("2001:db8:ac:5::1"))
        assert found is not None
        assert found.id == "acme"
        tenant = await store.upsert(build_customer("tenant", ["198.51.100.12/32"]))
        # Longest prefix wins: a tenant inside acme's relay network.
        assert (await store.find_by_ip(ipaddress.ip_address("198.51.100.12"))) == tenant
        assert (await store.find_by_ip(ipaddress.ip_address("198.51.100.13"))) == stored
        assert await store.find_by_ip(ipaddress.ip_address("192.0.2.1")) is None

    async def test_a_network_belongs_to_one_customer(self) -> None:
        store = await self.make()
        await store.upsert(build_customer("acme", ["198.51.100.8/29"]))
        with pytest.raises(NetworkConflict) as info:
            await store.upsert(build_customer("thief", ["192.0.2.0/24", "198.51.100.8/29"]))
        assert (info.value.index, info.value.owner) == (1, "acme")
        assert await store.get("thief") is None

    async def test_replacing_and_deleting_release_networks(self) -> None:
        store = await self.make()
        await store.upsert(build_customer("acme", ["198.51.100.8/29"]))
        await store.upsert(build_customer("acme", ["192.0.2.8/29"]))
        assert await store.find_by_ip(ipaddress.ip_address("198.51.100.9")) is None
        assert await store.delete("acme")
        assert not await store.delete("acme")
        assert await store.find_by_ip(ipaddress.ip_address("192.0.2.9")) is None
        await store.upsert(build_customer("next", ["198.51.100.8/29"]))  # free again

    async def test_records_expire_and_free_their_networks(self) -> None:
        store = await self.make(ttl_ms=300)
        await store.upsert(build_customer("acme", ["198.51.100.8/29"]))
        await asyncio.sleep(0.4)  # the behaviour under test is time passing
        assert await store.get("acme") is None
        assert await store.find_by_ip(ipaddress.ip_address("198.51.100.9")) is None
        await store.upsert(build_customer("next", ["198.51.100.8/29"]))
