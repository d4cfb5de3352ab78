"""`batching.Coalescer`: concurrent calls share store round trips (Sentinel, Cluster and
TLS Redis use it; a plain node has the lane, the embedded store needs neither)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from penaltyd.batching import Coalescer


class _Store:
    """A round trip that waits for the test: what queues meanwhile is visible."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.arrived = asyncio.Event()  # a batch is on the wire
        self.fail: Exception | None = None

    async def call(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.arrived.set()
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [i * 10 for i in items]


async def _one_turn() -> None:
    """One turn of the loop: the tasks just created make their calls (deterministic)."""
    await asyncio.sleep(0)


async def _one_on_the_wire() -> tuple[_Store, Coalescer[int, int], asyncio.Task[int]]:
    """A coalescer whose first call (1) is on the wire, waiting for `store.gate`."""
    store = _Store()
    c: Coalescer[int, int] = Coalescer(store.call)
    first = asyncio.create_task(c.submit(1))
    await store.arrived.wait()
    return store, c, first


async def test_calls_made_while_one_is_on_the_wire_leave_together() -> None:
    store, c, first = await _one_on_the_wire()
    assert store.batches == [[1]]
    rest = [asyncio.create_task(c.submit(i)) for i in range(2, 6)]
    await _one_turn()
    store.gate.set()
    assert await first == 10
    assert await asyncio.gather(*rest) == [20, 30, 40, 50]
    assert store.batches == [[1], [2, 3, 4, 5]]
    assert (c.batches, c.items) == (2, 5)
    await c.close()


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_one_goes() -> None:
    store, c, first = await _one_on_the_wire()
    queued = [asyncio.create_task(c.submit(i)) for i in (2, 3)]
    await _one_turn()
    store.fail = RuntimeError("store down")
    store.gate.set()
    for task in (first, *queued):
        with pytest.raises(RuntimeError, match="store down"):
            await task
    store.fail = None
    assert await c.submit(4) == 40  # nothing left busy
    await c.close()


async def test_a_caller_that_gave_up_is_not_sent() -> None:
    store, c, first = await _one_on_the_wire()
    gone = asyncio.create_task(c.submit(2))
    kept = asyncio.create_task(c.submit(3))
    await _one_turn()
    gone.cancel()  # its deadline
    await _one_turn()
    store.gate.set()
    assert await first == 10
    assert await kept == 30
    assert store.batches == [[1], [3]]
    await c.close()
