"""Reports kept while the store is down, replayed when it is back (failing open).

A report that failed to reach the store (connection refused or lost: the store is down,
and whatever was in flight died with it) waits here, bounded by `report_buffer`; beyond
it reports are dropped and counted. A report whose *deadline* expired is not buffered by
the engine: a slow or paused Redis still holds the command and applies it when it
catches up, so replaying it would count it twice (it is counted "in doubt" instead).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence

import structlog

from penaltyd.metrics import Metrics
from penaltyd.store.base import ReportItem, StoreError

log = structlog.get_logger("penaltyd.reportbuffer")

REPLAY_CHUNK = 500


class ReportBuffer:
    def __init__(self, limit: int, metrics: Metrics) -> None:
        self._items: collections.deque[ReportItem] = collections.deque()
        self._limit = limit
        self.metrics = metrics

    def __len__(self) -> int:
        return len(self._items)

    def add(self, items: Sequence[ReportItem]) -> None:
        for item in items:
            if len(self._items) >= self._limit:
                self.metrics.reports_dropped.inc()
                continue
            self._items.append(item)
        self.metrics.reports_buffered.set(len(self._items))

    async def replay(
        self, apply: Callable[[Sequence[ReportItem]], Awaitable[object]], timeout_s: float
    ) -> int:
        """Hand buffered reports to `apply` in chunks; returns how many were stored.
        Stops at the first failure (the chunk goes back in front, in order)."""
        stored = 0
        while self._items:
            chunk = [self._items.popleft() for _ in range(min(REPLAY_CHUNK, len(self._items)))]
            try:
                with self.metrics.store_call("replay", timeout_s):
                    async with asyncio.timeout(timeout_s):
                        await apply(chunk)
            except (StoreError, TimeoutError):
                self._items.extendleft(reversed(chunk))
                break
            stored += len(chunk)
        self.metrics.reports_buffered.set(len(self._items))
        if stored:
            log.info("buffered_reports_replayed", reports=stored, left=len(self._items))
        return stored
