"""The store contract on the embedded memory store, with a clock the tests move."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from penaltyd.store.memory import MemoryStore
from tests.helpers import UNKNOWN
from tests.store_contract import StoreContract, counts


class TestMemoryStore(StoreContract):
    @pytest.fixture(autouse=True)
    async def _store(self) -> AsyncIterator[None]:
        self.now = 1_800_000_000_000
        self.store = MemoryStore(window_seconds=10, bucket_seconds=1, clock=lambda: self.now)
        await self.store.start()
        yield
        await self.store.close()

    async def advance(self, ms: int) -> None:
        self.now += ms

    async def test_sweep_forgets_everything_expired(self) -> None:
        assert isinstance(self.store, MemoryStore)
        await self.store.record([("203.0.113.7", [(UNKNOWN, 1)])])
        await self.store.start_penalty("203.0.113.8", 1000, "r")
        assert await self.store.tracked_identities() == 1
        await self.advance(12_000)
        self.store.sweep()
        assert self.store._windows == {}
        assert self.store._penalties == {}
        assert (await self.store.window("203.0.113.7")).counts == counts()
