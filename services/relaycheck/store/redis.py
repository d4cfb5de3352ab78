"""The fleet customer store: Redis, one Lua script and one round trip per operation.

Key scheme (`{cust}` is the Redis Cluster hash tag: every script touches one slot)::

    <p>:{cust}:rec    hash  customer id -> "<updated_ms>:<expires_ms>:<config json>"
    <p>:{cust}:relay  hash  relay cidr  -> customer id (longest-prefix lookup by HMGET)

Customers are configuration, not traffic, yet DESIGN.md wants every key to expire. A
hash field cannot expire on its own before Redis 7.4, so each record carries its own
expiry (`customer_ttl_days` after its last upsert, enforced on every read and swept
when met) and each hash expires with its newest record (`PEXPIRE` renewed by every
upsert). A provisioning system re-upserting its customers keeps them; one that stops
leaves nothing behind. Times come from Redis (`TIME`): one clock for the fleet.

Lookup by address sends every network containing the address, most specific first, to
one `HMGET`, so the answer is the longest match in a single round trip however many
customers there are. As in penaltyd, redis-py's per-read socket timeout is off
(DESIGN.md s. 12a); the caller enforces one deadline per operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from penalty.identity import IPAddress
from relaycheck.customers import Customer
from relaycheck.store.base import (
    NetworkConflict,
    candidate_networks,
)
from serving.redis.errors import mapped_errors
from serving.redis.scripts import Scripts
from serving.redis.topology import connect

_SCRIPT_NAMES = ("upsert", "lookup", "delete")


_SCRIPTS = Scripts("relaycheck.store", _SCRIPT_NAMES)


def _decode(value: bytes | None) -> Customer | None:
    if not value:
        return None
    updated, expires, config = value.decode().split(":", 2)
    return Customer.from_json(config, int(updated), int(expires))


class RedisStore:
    """`CustomerStore` on Redis: one node, Sentinel or Cluster (`serving.redis.topology`)."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "rc",
        ttl_ms: int = 400 * 86_400_000,
        relay_min_prefix_v4: int = 16,
        relay_min_prefix_v6: int = 32,
        max_connections: int = 16,
    ) -> None:
        # Any topology (one node, Sentinel, Cluster): every key carries the `{cust}` hash
        # tag, so each script touches one slot. No feed here: the second client is unused.
        self.topology, self._client, feed = connect(url, max_connections)
        self._unused_feed = feed
        self._keys = (f"{key_prefix}:{{cust}}:rec", f"{key_prefix}:{{cust}}:relay")
        self.ttl_ms = ttl_ms
        self._min_prefix = {4: relay_min_prefix_v4, 6: relay_min_prefix_v6}
        self._scripts = _SCRIPTS

    @property
    def keys(self) -> tuple[str, str]:
        return self._keys

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self._unused_feed.aclose()
        await self._client.aclose()

    async def ping(self) -> None:
        async with mapped_errors():
            await self._client.ping()

    async def _evalsha(self, name: str, args: Sequence[Any]) -> Any:
        return await self._scripts.run(self._client, name, self._keys, args)

    async def get(self, customer_id: str) -> Customer | None:
        value, _, _ = await self._evalsha("lookup", ("id", customer_id))
        return _decode(value)

    async def find_by_ip(self, addr: IPAddress) -> Customer | None:
        candidates = candidate_networks(addr, self._min_prefix[addr.version])
        value, _, _ = await self._evalsha("lookup", ("ip", *candidates))
        return _decode(value)

    async def upsert(self, customer: Customer) -> Customer:
        result = await self._evalsha(
            "upsert",
            (customer.id, customer.config_json(), self.ttl_ms, *customer.relay_networks),
        )
        if result[0] == b"conflict":
            raise NetworkConflict(int(result[1]), result[2].decode(), result[3].decode())
        stored = _decode(result[1])
        assert stored is not None
        return stored

    async def delete(self, customer_id: str) -> bool:
        return bool(await self._evalsha("delete", (customer_id,)))
