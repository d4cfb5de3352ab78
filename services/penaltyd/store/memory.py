"""The embedded store: one process, no Redis, the same semantics as `redis`.

It is the default when no Redis URL is configured, and the store unit tests run on. The
clock is injectable (unix ms) so tests move time instead of sleeping. Memory stays
bounded: a window disappears when its newest bucket leaves the window, a penalty when it
expires (lazily on access and by a sweep every bucket).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from penaltyd.detector import N_OUTCOMES
from penaltyd.store.base import PageCursor, Penalty, ReportItem, Window


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class _Window:
    buckets: dict[int, list[int]] = field(default_factory=dict)
    marker: int = -1  # buckets <= marker were used by a penalty already
    expires_at_ms: int = 0


@dataclass(slots=True)
class _Penalty:
    expires_at_ms: int
    reason: str


class MemoryStore:
    """Windows and penalties in dicts; every method completes without awaiting I/O."""

    kind = "memory"

    def __init__(
        self,
        *,
        window_seconds: int = 600,
        bucket_seconds: int = 60,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        self._bucket_ms = bucket_seconds * 1000
        self._nbuckets = window_seconds // bucket_seconds
        self._window_ms = window_seconds * 1000
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._penalties: dict[str, _Penalty] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-store-sweep")

    async def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def ping(self) -> None:
        return None

    # --- penalties

    def _active(self, identity: str, now: int) -> Penalty | None:
        p = self._penalties.get(identity)
        if p is None:
            return None
        if p.expires_at_ms <= now:
            del self._penalties[identity]
            return None
        return Penalty(identity, p.expires_at_ms - now, p.expires_at_ms, p.reason)

    def local_penalty(self, identity: str) -> tuple[bool, Penalty | None]:
        return True, self._active(identity, self._clock())

    async def penalty(self, identity: str) -> Penalty | None:
        return self._active(identity, self._clock())

    async def penalties(self, identities: Sequence[str]) -> list[Penalty | None]:
        now = self._clock()
        return [self._active(i, now) for i in identities]

    async def start_penalty(self, identity: str, ttl_ms: int, reason: str) -> tuple[Penalty, bool]:
        now = self._clock()
        existing = self._active(identity, now)
        if existing is not None:
            return existing, False
        self._penalties[identity] = _Penalty(now + ttl_ms, reason)
        w = self._windows.get(identity)
        if w is not None:
            w.marker = now // self._bucket_ms
        return Penalty(identity, ttl_ms, now + ttl_ms, reason), True

    async def lift(self, identity: str) -> bool:
        if self._active(identity, self._clock()) is None:
            return False
        del self._penalties[identity]
        return True

    # --- windows

    def _totals(self, w: _Window, now: int) -> tuple[int, ...]:
        oldest = now // self._bucket_ms - self._nbuckets + 1
        totals = [0] * N_OUTCOMES
        for b in [b for b in w.buckets if b < oldest]:
            del w.buckets[b]
        for b, counts in w.buckets.items():
            if b > w.marker:
                for i, n in enumerate(counts):
                    totals[i] += n
        return tuple(totals)

    async def record(self, items: Sequence[ReportItem]) -> list[Window]:
        now = self._clock()
        bucket = now // self._bucket_ms
        out: list[Window] = []
        for identity, counts in items:
            w = self._windows.get(identity)
            if w is None or w.expires_at_ms <= now:
                w = self._windows[identity] = _Window()
            row = w.buckets.setdefault(bucket, [0] * N_OUTCOMES)
            for outcome, n in counts:
                row[outcome] += n
            w.expires_at_ms = (bucket + 1) * self._bucket_ms + self._window_ms
            out.append(Window(self._totals(w, now), self._active(identity, now)))
        return out

    async def window(self, identity: str) -> Window:
        now = self._clock()
        w = self._windows.get(identity)
        counts = self._totals(w, now) if w and w.expires_at_ms > now else (0,) * N_OUTCOMES
        return Window(counts, self._active(identity, now))

    # --- index

    async def count_penalties(self) -> int:
        now = self._clock()
        return sum(1 for p in self._penalties.values() if p.expires_at_ms > now)

    async def tracked_identities(self) -> int:
        now = self._clock()
        return sum(1 for w in self._windows.values() if w.expires_at_ms > now)

    async def list_penalties(
        self, after: PageCursor | None, limit: int
    ) -> tuple[list[Penalty], PageCursor | None]:
        now = self._clock()
        rows = sorted(
            (p.expires_at_ms, identity, p.reason)
            for identity, p in self._penalties.items()
            if p.expires_at_ms > now
        )
        if after is not None:
            rows = [r for r in rows if (r[0], r[1]) > (after.expires_at_ms, after.identity)]
        page = [Penalty(i, e - now, e, r) for e, i, r in rows[:limit]]
        more = len(rows) > limit
        cursor = PageCursor(0, page[-1].expires_at_ms, page[-1].identity) if more else None
        return page, cursor

    # --- housekeeping

    def sweep(self) -> None:
        """Drop expired windows and penalties: nothing outlives its window or penalty."""
        now = self._clock()
        for identity in [i for i, p in self._penalties.items() if p.expires_at_ms <= now]:
            del self._penalties[identity]
        for identity in [i for i, w in self._windows.items() if w.expires_at_ms <= now]:
            del self._windows[identity]

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._bucket_ms / 1000)
            self.sweep()
