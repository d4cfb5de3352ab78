"""The penalty loop: store + detector + fail-open, independent of gRPC.

`api` validates requests and maps answers to protobuf; this module does the work:
record outcomes, evaluate the window, start a penalty, answer checks, and fail open
(DESIGN.md section 8): every store call has a deadline, and a store that is late or down
yields "no penalty, degraded" instead of an error.

Reports that failed to reach the store (connection refused or lost: the store is down,
and whatever was in flight died with it) wait in a bounded buffer and are replayed when
the store is back; drops are counted. A report whose *deadline* expired is not buffered:
a slow or paused Redis still holds the command and applies it when it catches up, so
replaying it would count it twice. It is counted as "in doubt" instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from penaltyd import reasons
from penaltyd.batching import Coalescer
from penaltyd.detector import Decision, Detector
from penaltyd.logs import RateLimitedLog
from penaltyd.metrics import Metrics
from penaltyd.settings import Settings
from penaltyd.store.base import (
    PageCursor,
    Penalty,
    ReportItem,
    Store,
    StoreError,
    Window,
)

log = structlog.get_logger("penaltyd.engine")


@dataclass(frozen=True, slots=True)
class Answer:
    """What the service knows about one identity after a check or a report."""

    identity: str
    penalty: Penalty | None
    degraded: bool = False


@dataclass(frozen=True, slots=True)
class Explained:
    identity: str
    window: Window
    decision: Decision
    window_seconds: int


class Engine:
    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.store = store
        self.detector = Detector(settings)
        self.metrics = metrics or Metrics()
        self._check_timeout = settings.check_timeout_ms / 1000
        self._report_timeout = settings.report_timeout_ms / 1000
        self._admin_timeout = settings.admin_timeout_ms / 1000
        self._penalty_ms = settings.penalty_seconds * 1000
        self._buffer: collections.deque[ReportItem] = collections.deque()
        self._buffer_max = settings.report_buffer
        self._degraded_log = RateLimitedLog(log)
        self._tasks: list[asyncio.Task[None]] = []
        self._reports: Coalescer[ReportItem, Answer] | None = None
        self.degraded_until = 0.0

    async def start(self) -> None:
        await self.store.start()
        self._reports = Coalescer(self.report_many)
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="engine-housekeeping"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._reports:
            await self._reports.close()
        await self.store.close()

    # --- fail-open bookkeeping

    def _failed(self, op: str, exc: BaseException) -> None:
        self.degraded_until = time.monotonic() + 10.0
        self.metrics.degraded.set(1)
        self._degraded_log.warning(
            "store_unavailable_fail_open", op=op, error=str(exc) or type(exc).__name__
        )

    def _ok(self) -> None:
        if self.degraded_until and time.monotonic() > self.degraded_until:
            self.degraded_until = 0.0
            self.metrics.degraded.set(0)

    @property
    def degraded(self) -> bool:
        return time.monotonic() < self.degraded_until

    # --- checks

    async def check(self, identity: str) -> Answer:
        known, penalty = self.store.local_penalty(identity)
        if known:
            (self.metrics.check_tempfail if penalty else self.metrics.check_pass).inc()
            return Answer(identity, penalty)
        try:
            async with asyncio.timeout(self._check_timeout):
                penalty = await self.store.penalty(identity)
        except (StoreError, TimeoutError) as exc:
            self._failed("check", exc)
            self.metrics.check_degraded.inc()
            return Answer(identity, None, degraded=True)
        (self.metrics.check_tempfail if penalty else self.metrics.check_pass).inc()
        return Answer(identity, penalty)

    async def check_many(self, identities: Sequence[str]) -> list[Answer]:
        try:
            async with asyncio.timeout(self._check_timeout):
                found = await self.store.penalties(identities)
        except (StoreError, TimeoutError) as exc:
            self._failed("check", exc)
            self.metrics.check_degraded.inc(len(identities))
            return [Answer(i, None, degraded=True) for i in identities]
        for p in found:
            (self.metrics.check_tempfail if p else self.metrics.check_pass).inc()
        return [Answer(i, p) for i, p in zip(identities, found, strict=True)]

    # --- reports

    async def report(self, identity: str, counts: Sequence[tuple[int, int]]) -> Answer:
        """One report; concurrent callers share a store round trip."""
        assert self._reports is not None, "Engine.start() was not awaited"
        return await self._reports.submit((identity, counts))

    async def report_many(self, items: Sequence[ReportItem]) -> list[Answer]:
        """Record a batch in one round trip; start the penalties it triggers."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self._report_timeout):
                windows = await self.store.record(items)
                answers = [
                    await self._decide(i, w) for (i, _), w in zip(items, windows, strict=True)
                ]
        except TimeoutError as exc:
            self._failed("report", exc)
            self.metrics.reports_in_doubt.inc(len(items))
            return [Answer(identity, None, degraded=True) for identity, _ in items]
        except StoreError as exc:
            self._failed("report", exc)
            self._buffer_reports(items)
            return [Answer(identity, None, degraded=True) for identity, _ in items]
        self.metrics.store_latency.labels("report").observe(time.perf_counter() - t0)
        self.metrics.reports.inc(len(items))
        self._ok()
        return answers

    async def _decide(self, identity: str, window: Window) -> Answer:
        if window.penalty is not None:
            return Answer(identity, window.penalty)
        decision = self.detector.evaluate(window.counts)
        if not decision.fire:
            return Answer(identity, None)
        penalty, created = await self.store.start_penalty(
            identity, self._penalty_ms, reasons.encode(decision)
        )
        if created:
            self.metrics.penalties_started.labels(decision.rule).inc()
            log.info(
                "penalty_started",
                identity=identity,
                reason=reasons.render(penalty.reason),
                rule=decision.rule,
                seconds=penalty.seconds_left,
            )
        return Answer(identity, penalty)

    def _buffer_reports(self, items: Sequence[ReportItem]) -> None:
        for item in items:
            if len(self._buffer) >= self._buffer_max:
                self.metrics.reports_dropped.inc()
                continue
            self._buffer.append(item)
        self.metrics.reports_buffered.set(len(self._buffer))

    async def flush_buffer(self) -> int:
        """Replay buffered reports; returns how many were stored. Stops at the first failure."""
        stored = 0
        while self._buffer:
            chunk = [self._buffer.popleft() for _ in range(min(500, len(self._buffer)))]
            try:
                async with asyncio.timeout(self._admin_timeout):
                    windows = await self.store.record(chunk)
                    for (identity, _), window in zip(chunk, windows, strict=True):
                        await self._decide(identity, window)
            except (StoreError, TimeoutError):
                self._buffer.extendleft(reversed(chunk))
                break
            stored += len(chunk)
        self.metrics.reports_buffered.set(len(self._buffer))
        if stored:
            log.info("buffered_reports_replayed", reports=stored, left=len(self._buffer))
        return stored

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # --- admin

    async def explain(self, identity: str) -> Explained:
        async with asyncio.timeout(self._admin_timeout):
            window = await self.store.window(identity)
        return Explained(
            identity, window, self.detector.evaluate(window.counts), self.settings.window_seconds
        )

    async def lift(self, identity: str, actor: str, note: str) -> bool:
        async with asyncio.timeout(self._admin_timeout):
            lifted = await self.store.lift(identity)
        log.info("penalty_lifted", identity=identity, lifted=lifted, actor=actor, note=note)
        return lifted

    async def count_penalties(self) -> int:
        async with asyncio.timeout(self._admin_timeout):
            return await self.store.count_penalties()

    async def list_penalties(
        self, after: PageCursor | None, limit: int
    ) -> tuple[list[Penalty], PageCursor | None]:
        async with asyncio.timeout(self._admin_timeout):
            return await self.store.list_penalties(after, limit)

    # --- background

    async def _housekeeping(self) -> None:
        """Replay buffered reports, refresh gauges, notice recovery."""
        while True:
            await asyncio.sleep(0.5)
            view = getattr(self.store, "view", None)
            self.metrics.feed_synced.set(1 if view is None or view.synced else 0)
            if self._buffer:
                await self.flush_buffer()
            self._ok()
