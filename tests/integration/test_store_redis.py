"""The store contract on a real redis-server, with and without the in-process view."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from penaltyd.store.redis import RedisStore
from tests.helpers import ACCEPTED, UNKNOWN, eventually
from tests.store_contract import StoreContract


async def started_store(url: str, use_view: bool) -> RedisStore:
    store = RedisStore(url, window_seconds=10, bucket_seconds=1, use_view=use_view)
    await store.start()
    if use_view:

        async def synced() -> bool:
            return store.view.synced

        await eventually(synced, bool)
    return store


class RedisContract(StoreContract):
    use_view = True

    @pytest.fixture(autouse=True)
    async def _store(self, redis_url: str) -> AsyncIterator[None]:
        self.url = redis_url
        self.store = await started_store(redis_url, self.use_view)
        yield
        await self.store.close()

    async def advance(self, ms: int) -> None:
        await asyncio.sleep(ms / 1000)  # Redis keeps its own time: really let it pass

    async def test_every_key_expires(self) -> None:
        """Privacy: nothing outlives its window or penalty."""
        await self.store.record([("203.0.113.7", [(UNKNOWN, 3), (ACCEPTED, 1)])])
        await self.store.start_penalty("203.0.113.7", 60_000, "r")
        await self.store.start_penalty("2001:db8::/64", 60_000, "r")
        r = aioredis.Redis.from_url(self.url)
        keys = [k async for k in r.scan_iter()]
        assert len(keys) >= 4
        for key in keys:
            assert await r.pttl(key) > 0, key
        await r.aclose()

    async def test_keys_are_hash_tagged_per_identity(self) -> None:
        await self.store.record([("203.0.113.7", [(UNKNOWN, 1)])])
        await self.store.start_penalty("203.0.113.7", 60_000, "r")
        r = aioredis.Redis.from_url(self.url)
        keys = sorted([k.decode() async for k in r.scan_iter("pd:{203.0.113.7}*")])
        assert keys == ["pd:{203.0.113.7}:p", "pd:{203.0.113.7}:w"]
        await r.aclose()

    async def test_scripts_reload_after_script_flush(self) -> None:
        r = aioredis.Redis.from_url(self.url)
        await r.script_flush()
        await r.aclose()
        (w,) = await self.store.record([("203.0.113.7", [(UNKNOWN, 1)])])
        assert w.counts[UNKNOWN] == 1
        ws = await self.store.record(
            [("203.0.113.7", [(UNKNOWN, 1)]), ("203.0.113.8", [(UNKNOWN, 1)])]
        )
        assert [w.counts[UNKNOWN] for w in ws] == [2, 1]


class TestRedisStoreWithView(RedisContract):
    use_view = True

    async def test_view_learns_penalties_started_elsewhere(self) -> None:
        other = await started_store(self.url, use_view=False)
        try:
            await other.start_penalty("203.0.113.50", 60_000, "elsewhere")
            store = self.store
            assert isinstance(store, RedisStore)

            async def seen() -> object:
                return store.view.get("203.0.113.50")

            p = await eventually(seen, lambda p: p is not None, within=2)
            assert p is not None
            await other.lift("203.0.113.50")
            await eventually(seen, lambda p: p is None, within=2)
        finally:
            await other.close()

    async def test_snapshot_loads_existing_penalties(self) -> None:
        await self.store.start_penalty("203.0.113.60", 60_000, "before")
        late = await started_store(self.url, use_view=True)
        try:
            p = late.view.get("203.0.113.60")
            assert p is not None
            assert p.reason == "before"
            assert 58_000 < p.remaining_ms <= 60_000
        finally:
            await late.close()


class TestRedisStoreWithoutView(RedisContract):
    use_view = False
