"""Fixtures of the MX-side clients' tests (policyd, milters, logwatch, the library)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from penaltyd.store.memory import MemoryStore
from tests.harness.inprocess import ServeFactory
from tests.harness.policy import Policy, start_policy


@pytest.fixture
async def policy(serve: ServeFactory) -> AsyncIterator[Policy]:
    pd = await serve(MemoryStore())
    async for p in start_policy(pd.address, live=True):
        assert await p.policy.client.wait_synced()
        yield p
