"""The store contract on the embedded memory store, with a clock the tests move."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from penaltyd.events import FeedEvent
from penaltyd.store.memory import MemoryStore
from tests.contracts.penalty_store import K, StoreContract, counts, item
from tests.harness.builders import UNKNOWN


class TestMemoryStore(StoreContract):
    @pytest.fixture(autouse=True)
    async def _store(self) -> AsyncIterator[None]:
        self.now = 1_800_000_000_000
        self.events: list[FeedEvent] = []
        store = MemoryStore(
            window_seconds=10, bucket_seconds=1, shared_min_sub_identities=K, clock=lambda: self.now
        )
        store.listen(self.events.append)
        self.store = store
        await store.start()
        yield
        await store.close()

    async def advance(self, ms: int) -> None:
        self.now += ms

    async def test_sweep_forgets_everything_expired(self) -> None:
        store = self.store
        assert isinstance(store, MemoryStore)
        await self.record(
            item("203.0.113.7", (UNKNOWN, 1), fp="a"), item("203.0.113.7", (UNKNOWN, 1), fp="b")
        )
        await store.start_penalty("203.0.113.8", 1000, "r")
        await self.advance(25_000)
        store.sweep()
        assert store.window_buckets() == {}
        assert store.tracked_windows == 0
        assert store.identity_units == 0
        assert store.snapshot() == ([], [], [])
        assert await store.count_penalties() == 0
        assert (await self.read("203.0.113.7")).counts == counts()
