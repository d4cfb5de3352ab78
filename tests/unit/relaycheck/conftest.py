"""Fixtures of relaycheck's unit tests: an in-process relaycheck on the embedded store.

Test files that need customers in it override `rc` with their own (test_service.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from relaycheck.store.memory import MemoryStore
from tests.harness.inprocess import RelaycheckServed, relaycheck_serving


@pytest.fixture
async def rc() -> AsyncIterator[RelaycheckServed]:
    with capture_logs():
        async with relaycheck_serving(MemoryStore()) as served:
            yield served
