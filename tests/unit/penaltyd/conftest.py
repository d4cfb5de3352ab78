"""Fixtures of penaltyd's unit tests (the embedded store, in process)."""

from __future__ import annotations

import pytest

from tests.harness.builders import Clock


@pytest.fixture
def clock() -> Clock:
    """A store clock the test moves (see `MemoryStore(clock=...)`)."""
    return Clock()
