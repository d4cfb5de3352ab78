"""Reports kept while the store is down, replayed when it is back (failing open).

A report that failed to reach the store (connection refused or lost: the store is down,
and whatever was in flight died with it) waits here, bounded by `report_buffer`; beyond
it reports are dropped and counted. Bounded in time too: a report older than `max_age`
(the detection window) is dropped when its turn comes, counted, never replayed: it
would count as evidence of now, and it must not outlive the retention the window
states. A report whose *deadline* expired is not buffered by
the engine: a slow or paused Redis still holds the command and applies it when it
catches up, so replaying it would count it twice (it is counted "in doubt" instead).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import structlog

from penaltyd.metrics import Metrics
from penaltyd.store.base import StoreError

log = structlog.get_logger("penaltyd.reportbuffer")

REPLAY_CHUNK = 500
T = TypeVar("T")


class ReportBuffer(Generic[T]):
    """Reports (whatever the engine keeps of one) in arrival order, with their age."""

    def __init__(
        self,
        limit: int,
        metrics: Metrics,
        max_age: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._items: collections.deque[tuple[float, T]] = collections.deque()
        self._limit = limit
        self._max_age = max_age
        self._clock = clock
        self.metrics = metrics

    def __len__(self) -> int:
        return len(self._items)

    def add(self, items: Sequence[T]) -> None:
        now = self._clock()
        for item in items:
            if len(self._items) >= self._limit:
                self.metrics.reports_dropped.inc()
                continue
            self._items.append((now, item))
        self.metrics.reports_buffered.set(len(self._items))

    def _drop_stale(self) -> int:
        oldest, dropped = self._clock() - self._max_age, 0
        while self._items and self._items[0][0] < oldest:
            self._items.popleft()
            dropped += 1
        if dropped:
            self.metrics.reports_dropped.inc(dropped)
            log.warning("buffered_reports_expired", reports=dropped, max_age_s=self._max_age)
        return dropped

    async def replay(
        self, apply: Callable[[Sequence[T]], Awaitable[object]], timeout_s: float
    ) -> int:
        """Hand buffered reports to `apply` in chunks; returns how many were stored.
        Stops at the first failure (the chunk goes back in front, in order). Reports
        older than `max_age` are dropped first, whether or not the store is back."""
        stored = 0
        self._drop_stale()
        while self._items:
            chunk = [self._items.popleft() for _ in range(min(REPLAY_CHUNK, len(self._items)))]
            try:
                with self.metrics.store_call("replay", timeout_s):
                    async with asyncio.timeout(timeout_s):
                        await apply([item for _, item in chunk])
            except (StoreError, TimeoutError):
                self._items.extendleft(reversed(chunk))
                break
            stored += len(chunk)
        self.metrics.reports_buffered.set(len(self._items))
        if stored:
            log.info("buffered_reports_replayed", reports=stored, left=len(self._items))
        return stored
