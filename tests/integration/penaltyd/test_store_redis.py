"""The store contract on a real redis-server, with and without the in-process view."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from penaltyd.events import FeedEvent
from penaltyd.store.base import LiftRecord
from penaltyd.store.redis import RedisStore
from tests.contracts.penalty_store import K, StoreContract, item
from tests.harness.builders import ACCEPTED, UNKNOWN, eventually
from tests.harness.redis import RedisServer


async def started_store(url: str, use_view: bool) -> RedisStore:
    store = RedisStore(
        url, window_seconds=10, bucket_seconds=1, shared_min_sub_identities=K, use_view=use_view
    )
    await store.start()

    async def synced() -> bool:
        return store.view.synced

    await eventually(synced, bool)
    return store


class RedisContract(StoreContract):
    use_view = True
    masters: list[int]  # ports of the Redis masters holding the data (for scans)

    @pytest.fixture(autouse=True)
    async def _store(self, redis_url: str, redis_server: RedisServer) -> AsyncIterator[None]:
        self.masters = [redis_server.port]
        async for _ in self.serve_store(redis_url):
            yield

    async def serve_store(self, url: str) -> AsyncIterator[None]:
        self.url = url
        self.events: list[FeedEvent] = []
        store = await started_store(url, self.use_view)
        store.listen(self.events.append)
        self.store = store
        yield
        await store.close()

    async def all_keys(self) -> list[tuple[aioredis.Redis, bytes]]:
        out = []
        for port in self.masters:
            r = aioredis.Redis(port=port)
            out += [(r, k) async for k in r.scan_iter()]
        return out

    async def advance(self, ms: int) -> None:
        await asyncio.sleep(ms / 1000)  # Redis keeps its own time: really let it pass

    async def settle(self) -> None:
        mark = await self.store.allowlist()  # one round trip after the publish
        del mark
        await asyncio.sleep(0.05)  # the subscriber's read loop picks the event up

    async def test_every_key_expires(self) -> None:
        """Privacy: nothing outlives its window or penalty."""
        await self.record(item("203.0.113.7", (UNKNOWN, 3), (ACCEPTED, 1), fp="aa"))
        await self.record(item("203.0.113.7", (UNKNOWN, 1), fp="bb"))
        await self.store.start_penalty("203.0.113.7", 60_000, "r")
        await self.store.start_penalty("203.0.113.7#bb", 60_000, "r")
        await self.store.lift("203.0.113.7#bb", LiftRecord("t", "n", 1))
        await self.store.start_penalty("2001:db8::/64", 60_000, "r")
        keys = await self.all_keys()
        assert len(keys) >= 6  # windows (holding their penalties), HLL, lift record, index
        for r, key in keys:
            assert await r.pttl(key) > 0, key

    async def test_keys_are_hash_tagged_per_address(self) -> None:
        await self.record(
            item("203.0.113.7", (UNKNOWN, 1), fp="aa"), item("203.0.113.7", (UNKNOWN, 1), fp="bb")
        )
        await self.store.start_penalty("203.0.113.7#bb", 60_000, "r")
        keys = sorted(
            k.decode() for _, k in await self.all_keys() if k.startswith(b"pd:{203.0.113.7}")
        )
        kinds = sorted(
            k.split("}:", 1)[1].split(":")[0] + (":fp" if k.count(":") > 2 else "") for k in keys
        )
        assert "w" in kinds  # the address window
        assert "w:fp" in kinds  # the client's window, which holds the client's penalty

    async def test_scripts_reload_after_script_flush(self) -> None:
        for port in self.masters:
            await aioredis.Redis(port=port).script_flush()
        (w,) = await self.record(item("203.0.113.7", (UNKNOWN, 1)))
        assert w.counts[UNKNOWN] == 1
        ws = await self.record(item("203.0.113.7", (UNKNOWN, 1)), item("203.0.113.8", (UNKNOWN, 1)))
        assert [w.counts[UNKNOWN] for w in ws] == [2, 1]


class TestRedisStoreWithView(RedisContract):
    use_view = True

    async def test_view_learns_penalties_started_elsewhere(self) -> None:
        other = await started_store(self.url, use_view=False)
        store = self.store
        assert isinstance(store, RedisStore)
        try:
            await other.start_penalty("203.0.113.50", 60_000, "elsewhere")

            async def seen() -> object:
                return store.view.get("203.0.113.50")

            assert await eventually(seen, lambda p: p is not None, within=2)
            await other.lift("203.0.113.50", LiftRecord("t", "", 0))
            await eventually(seen, lambda p: p is None, within=2)
        finally:
            await other.close()

    async def test_snapshot_loads_existing_state(self) -> None:
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


@dataclass
class Refused:
    """Two replicas on a Redis of their own, and a switch that makes it refuse PUBLISH
    (an ACL): how a penalty's announcement fails after its start succeeded."""

    a: RedisStore
    b: RedisStore
    raw: aioredis.Redis

    async def publish(self, allowed: bool) -> None:
        acl = self.raw.execute_command  # untyped in redis-py
        rule = "+publish" if allowed else "-publish"
        await acl("ACL", "SETUSER", "default", rule)  # type: ignore[no-untyped-call]

    async def start_unannounced(self, identity: str) -> None:
        """Start a penalty on `a` while Redis refuses its announcement, then allow it."""
        await self.publish(False)
        ((_, created),) = await self.a.start_penalties([(identity, 300_000, "r")])
        assert created
        assert self.a.view.get(identity) is not None  # its own view at once
        assert self.b.view.get(identity) is None  # the feed did not carry it
        assert self.a._unannounced  # kept, not dropped
        await self.publish(True)


@pytest.fixture
async def refused() -> AsyncIterator[Refused]:
    server = RedisServer().start()
    raw = aioredis.Redis(port=server.port)
    stores: list[RedisStore] = []
    try:
        for _ in range(2):
            stores.append(await started_store(server.url, True))
        yield Refused(stores[0], stores[1], raw)
    finally:
        for store in stores:
            await store.close()
        await raw.aclose()
        server.stop()


async def test_a_penalty_whose_announcement_redis_refused_still_reaches_every_replica(
    refused: Refused,
) -> None:
    """Found under load: the first use of a pooled connection after a Redis restart failed
    the announcement (index entry + feed event) of a penalty already in its window, so no
    replica's view and no listing held it for its whole duration. It is kept and retried."""
    a, b = refused.a, refused.b
    await refused.start_unannounced("203.0.113.50")

    async def on_b() -> object:
        return b.view.get("203.0.113.50")

    seen = await eventually(on_b, lambda p: p is not None, within=5)
    assert seen == b.view.get("203.0.113.50")
    listed, _ = await b.list_penalties(None, 10)
    assert [p.identity for p in listed] == ["203.0.113.50"]
    assert not a._unannounced


async def test_a_late_announcement_never_brings_back_a_lifted_penalty(refused: Refused) -> None:
    """Found in review: the announcement kept above, sent after an operator lifted the
    penalty on another replica, put it back in every view for its whole duration (no
    listing showed it and a second lift found nothing to lift)."""
    a, b = refused.a, refused.b
    await refused.start_unannounced("203.0.113.51")
    assert await b.lift("203.0.113.51", LiftRecord("desk", "false positive", 0))

    async def settled() -> bool:
        return not a._unannounced

    await eventually(settled, bool, within=5)
    assert a.view.get("203.0.113.51") is None
    assert b.view.get("203.0.113.51") is None
    listed, _ = await a.list_penalties(None, 10)
    assert listed == []
