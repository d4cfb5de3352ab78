"""Store deadlines: a store that can stall meets its deadline and fails open; one that
never suspends (`Store.in_process`, the embedded store) is run without a deadline timer,
which could never fire and cost ~4-6 µs of every report (docs/performance.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from penaltyd.store.base import Escalation, ReportItem, Window
from penaltyd.store.memory import MemoryStore
from tests.contracts.penalty_store import counts, item
from tests.harness.builders import ACCEPTED, UNKNOWN
from tests.harness.clocked import Clock, engine, ref

T = TypeVar("T")


def one_step(coro: Coroutine[Any, Any, T]) -> T:
    """The coroutine's result if it finishes in its first step, without suspending."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]  # StopIteration.value is Any
    coro.close()
    raise AssertionError(f"{coro!r} suspended")


def test_the_embedded_store_never_suspends_where_in_process_says_so() -> None:
    """What `in_process` promises: record and start_penalties finish in one step, for a
    plain address, a client told apart behind a shared one and a penalized address."""
    clock = Clock()
    store = MemoryStore(shared_min_sub_identities=2, clock=clock)
    assert store.in_process
    esc = Escalation(multiplier=2.0, cap_ms=60_000, memory_ms=60_000)
    started = one_step(store.start_penalties([("192.0.2.9", 60_000, "r")], esc))
    assert started[0][1]
    assert started[0][0].remaining_ms == 60_000
    items = [item("192.0.2.1", (UNKNOWN, 2))] + [
        item("192.0.2.2", (ACCEPTED, 1), fp=f"client{i}") for i in range(4)
    ]
    items.append(item("192.0.2.9", (UNKNOWN, 1)))
    windows = one_step(store.record(items))
    assert windows[0].counts == counts(unknown=2)
    assert windows[-2].sub_counts == counts(accepted=1)  # told apart by then
    assert windows[-1].penalty is not None


async def test_an_in_process_store_is_run_without_a_deadline_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    e, _, v = engine()
    await e.start()
    try:

        def no_timer(delay: float | None) -> Any:
            raise AssertionError("a deadline timer for a store that cannot stall")

        monkeypatch.setattr(asyncio, "timeout", no_timer)  # what the engine calls
        answers = await e.report_many([(ref(v, "192.0.2.1"), [(UNKNOWN, 1)])] * 3)
        assert [a.degraded for a in answers] == [False] * 3
    finally:
        monkeypatch.undo()
        await e.close()


class _Stalling(MemoryStore):
    """A store that may stall (as Redis may): its record waits for the test."""

    in_process = False

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.release = asyncio.Event()

    async def record(self, items: Sequence[ReportItem]) -> list[Window]:
        await self.release.wait()
        return await super().record(items)


async def test_a_store_that_stalls_meets_the_report_deadline_and_fails_open() -> None:
    e, _, v = engine(_Stalling, report_timeout_ms=20)
    store = e.store
    assert isinstance(store, _Stalling)
    await e.start()
    try:
        answer = (await e.report_many([(ref(v, "192.0.2.1"), [(UNKNOWN, 1)])]))[0]
        assert answer.degraded
        assert answer.penalty is None
        assert e.metrics.registry.get_sample_value("penaltyd_reports_in_doubt_total") == 1
        assert e.degraded
    finally:
        store.release.set()
        await e.close()
