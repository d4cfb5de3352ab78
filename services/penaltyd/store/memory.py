"""The embedded store: one process, no Redis, the same semantics as `redis`.

It is the default when no Redis URL is configured, and the store unit tests run on. The
clock is injectable (unix ms) so tests move time instead of sleeping. Memory stays
bounded: every entry carries its expiry, checked lazily on access and by a sweep every
bucket, mirroring the TTLs of the Redis keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from penalty.identity import IPAddress, NetworkSet, address_of, parse_network
from penaltyd.detector import N_OUTCOMES
from penaltyd.feed import ALLOW_ADDED, ALLOW_REMOVED, LIFTED, SHARED, STARTED, FeedEvent
from penaltyd.store.base import (
    AllowEntry,
    Escalation,
    FleetStats,
    LiftRecord,
    Listener,
    PageCursor,
    Penalty,
    ReportItem,
    StatsDelta,
    Window,
)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class _Window:
    buckets: dict[int, list[int]] = field(default_factory=dict)
    marker: int = -1  # buckets <= marker were used by a penalty already
    expires_at_ms: int = 0


@dataclass(slots=True)
class _Expiring:
    value: object
    expires_at_ms: int


class MemoryStore:
    """Everything in dicts; every method completes without awaiting I/O."""

    kind = "memory"

    def __init__(
        self,
        *,
        window_seconds: int = 600,
        bucket_seconds: int = 60,
        shared_min_sub_identities: int = 20,
        shared_ttl_seconds: int = 3600,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        self._bucket_ms = bucket_seconds * 1000
        self._nbuckets = window_seconds // bucket_seconds
        self._window_ms = window_seconds * 1000
        self._k = shared_min_sub_identities
        self._shared_ttl_ms = shared_ttl_seconds * 1000
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._penalties: dict[str, tuple[int, str]] = {}  # identity -> (expires_at_ms, reason)
        self._clients: dict[str, dict[int, set[str]]] = {}  # address -> generation -> fingerprints
        self._shared: dict[str, int] = {}  # address -> mark expiry
        self._offences: dict[str, tuple[int, int]] = {}  # identity -> (count, expiry)
        self._lifts: dict[str, tuple[LiftRecord, int]] = {}
        self._allow: NetworkSet[AllowEntry] = NetworkSet()
        self._baseline: dict[int, list[float]] = {}  # bucket -> [events, weighted errors]
        self._tracked: dict[int, set[str]] = {}  # generation -> identities
        self._degraded: dict[str, int] = {}  # replica -> last degraded (ms)
        self._listener: Listener | None = None
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

    def listen(self, listener: Listener | None) -> None:
        self._listener = listener

    def _emit(self, event: FeedEvent) -> None:
        if self._listener is not None:
            self._listener(event)

    @property
    def feed_exact(self) -> bool:
        return True

    def now_ms(self) -> int:
        return self._clock()

    # --- penalties

    def _active(self, identity: str, now: int) -> Penalty | None:
        p = self._penalties.get(identity)
        if p is None:
            return None
        if p[0] <= now:
            del self._penalties[identity]
            return None
        return Penalty(identity, p[0] - now, p[0], p[1])

    def local_penalty(self, identity: str) -> tuple[bool, Penalty | None]:
        return True, self._active(identity, self._clock())

    async def penalty(self, identity: str) -> Penalty | None:
        return self._active(identity, self._clock())

    async def penalties(self, identities: Sequence[str]) -> list[Penalty | None]:
        now = self._clock()
        return [self._active(i, now) for i in identities]

    async def start_penalty(
        self, identity: str, ttl_ms: int, reason: str, escalation: Escalation | None = None
    ) -> tuple[Penalty, bool]:
        return (await self.start_penalties([(identity, ttl_ms, reason)], escalation))[0]

    async def start_penalties(
        self, starts: Sequence[tuple[str, int, str]], escalation: Escalation | None = None
    ) -> list[tuple[Penalty, bool]]:
        return [self._start(identity, ttl, reason, escalation) for identity, ttl, reason in starts]

    def _start(
        self, identity: str, ttl_ms: int, reason: str, escalation: Escalation | None
    ) -> tuple[Penalty, bool]:
        now = self._clock()
        existing = self._active(identity, now)
        if existing is not None:
            return existing, False
        if escalation is not None and escalation.multiplier > 1:
            count, expires = self._offences.get(identity, (0, 0))
            count = count if expires > now else 0
            ttl_ms = min(int(ttl_ms * escalation.multiplier**count), escalation.cap_ms)
            self._offences[identity] = (count + 1, now + escalation.memory_ms)
        self._penalties[identity] = (now + ttl_ms, reason)
        # A client's penalty behind a shared address uses up its evidence in the address
        # window too, so a few such penalties never add up to one on the whole address.
        for key in {identity, address_of(identity)}:
            w = self._windows.get(key)
            if w is not None:
                w.marker = now // self._bucket_ms
        self._emit(FeedEvent(STARTED, identity, now + ttl_ms, reason))
        return Penalty(identity, ttl_ms, now + ttl_ms, reason), True

    async def lift(self, identity: str, record: LiftRecord) -> bool:
        if self._active(identity, self._clock()) is None:
            return False
        del self._penalties[identity]
        self._lifts[identity] = (record, self._clock() + self._window_ms)
        self._emit(FeedEvent(LIFTED, identity))
        return True

    async def last_lift(self, identity: str) -> LiftRecord | None:
        hit = self._lifts.get(identity)
        return hit[0] if hit and hit[1] > self._clock() else None

    # --- windows

    def _totals(self, w: _Window | None, now: int, prune: bool) -> tuple[int, ...]:
        totals = [0] * N_OUTCOMES
        if w is None or w.expires_at_ms <= now:
            return tuple(totals)
        oldest = now // self._bucket_ms - self._nbuckets + 1
        if prune:
            for b in [b for b in w.buckets if b < oldest]:
                del w.buckets[b]
        for b, counts in w.buckets.items():
            if b > w.marker and b >= oldest:
                for i, n in enumerate(counts):
                    totals[i] += n
        return tuple(totals)

    def _add(self, key: str, counts: Sequence[tuple[int, int]], now: int) -> _Window:
        w = self._windows.get(key)
        if w is None or w.expires_at_ms <= now:
            w = self._windows[key] = _Window()
        bucket = now // self._bucket_ms
        row = w.buckets.setdefault(bucket, [0] * N_OUTCOMES)
        for outcome, n in counts:
            row[outcome] += n
        w.expires_at_ms = (bucket + 1 + self._nbuckets) * self._bucket_ms
        return w

    def _one(self, item: ReportItem, now: int) -> Window:
        writing = bool(item.counts)
        address = item.identity
        if writing:
            self._add(address, item.counts, now)
        counts = self._totals(self._windows.get(address), now, writing)
        penalty = self._active(address, now)
        fp = item.fingerprint
        if not fp:
            return Window(counts, penalty)
        gen = now // self._window_ms
        gens = self._clients.setdefault(address, {})
        if writing:
            gens.setdefault(gen, set()).add(fp)
            for g in [g for g in gens if g < gen - 1]:
                del gens[g]
        distinct = len(gens.get(gen, set()) | gens.get(gen - 1, set()))
        shared = item.shared_configured or self._shared.get(address, 0) > now
        newly = False
        if not shared and writing and distinct > self._k:
            self._shared[address] = now + self._shared_ttl_ms
            shared = newly = True
            self._emit(FeedEvent(SHARED, address, now + self._shared_ttl_ms))
        if not (shared or distinct >= 2):
            return Window(counts, penalty, distinct, shared, newly)
        sub = item.sub_identity
        if writing:
            self._add(sub, item.counts, now)
        sub_counts = self._totals(self._windows.get(sub), now, writing)
        return Window(counts, penalty, distinct, shared, newly, sub_counts, self._active(sub, now))

    async def record(self, items: Sequence[ReportItem]) -> list[Window]:
        now = self._clock()
        return [self._one(item, now) for item in items]

    # --- fleet-wide figures

    async def count_penalties(self) -> int:
        now = self._clock()
        return sum(1 for exp, _ in self._penalties.values() if exp > now)

    async def list_penalties(
        self, after: PageCursor | None, limit: int
    ) -> tuple[list[Penalty], PageCursor | None]:
        now = self._clock()
        rows = sorted((exp, i, r) for i, (exp, r) in self._penalties.items() if exp > now)
        if after is not None:
            rows = [r for r in rows if (r[0], r[1]) > (after.expires_at_ms, after.identity)]
        page = [Penalty(i, e - now, e, r) for e, i, r in rows[:limit]]
        more = len(rows) > limit
        cursor = PageCursor(0, page[-1].expires_at_ms, page[-1].identity) if more else None
        return page, cursor

    async def flush_stats(self, delta: StatsDelta) -> None:
        now = self._clock()
        if delta.events:
            row = self._baseline.setdefault(now // self._bucket_ms, [0.0, 0.0])
            row[0] += delta.events
            row[1] += delta.weighted_errors
        if delta.identities:
            self._tracked.setdefault(now // self._window_ms, set()).update(delta.identities)
        if delta.degraded:
            self._degraded[delta.replica] = now

    async def fleet_stats(self) -> FleetStats:
        now = self._clock()
        oldest = now // self._bucket_ms - self._nbuckets + 1
        events = sum(r[0] for b, r in self._baseline.items() if b >= oldest)
        errors = sum(r[1] for b, r in self._baseline.items() if b >= oldest)
        gen = now // self._window_ms
        tracked = len(self._tracked.get(gen, set()) | self._tracked.get(gen - 1, set()))
        return FleetStats(
            active_penalties=await self.count_penalties(),
            tracked_identities=tracked,
            shared_addresses=sum(1 for exp in self._shared.values() if exp > now),
            degraded_replicas=sum(1 for t in self._degraded.values() if t > now - 60_000),
            baseline_events=int(events),
            baseline_errors=errors,
        )

    # --- allowlist

    def allowed(self, addr: IPAddress) -> AllowEntry | None:
        if not len(self._allow):
            return None
        hit = self._allow.match(addr)
        return hit[1] if hit and hit[1].expires_at_ms > self._clock() else None

    async def allow(self, entry: AllowEntry, ttl_ms: int) -> AllowEntry:
        now = self._clock()
        stored = AllowEntry(entry.cidr, now + ttl_ms, entry.note, entry.actor, now)
        self._allow.add(parse_network(entry.cidr), stored)
        self._emit(FeedEvent(ALLOW_ADDED, stored.cidr, stored.expires_at_ms, stored.encode()))
        return stored

    async def remove_allow(self, cidr: str) -> bool:
        removed = self._allow.remove(parse_network(cidr))
        if removed:
            self._emit(FeedEvent(ALLOW_REMOVED, cidr))
        return removed

    async def allowlist(self) -> list[AllowEntry]:
        now = self._clock()
        return sorted(
            (e for _, e in self._allow.items() if e.expires_at_ms > now), key=lambda e: e.cidr
        )

    def snapshot(self) -> tuple[list[Penalty], list[tuple[str, int]], list[AllowEntry]]:
        now = self._clock()
        penalties = [p for i in list(self._penalties) if (p := self._active(i, now))]
        shared = [(a, exp) for a, exp in self._shared.items() if exp > now]
        allow = [e for _, e in self._allow.items() if e.expires_at_ms > now]
        return penalties, shared, allow

    # --- housekeeping

    def sweep(self) -> None:
        """Drop everything expired: nothing outlives its window or penalty."""
        now = self._clock()
        for k in [k for k, w in self._windows.items() if w.expires_at_ms <= now]:
            del self._windows[k]
        for k in [k for k, (exp, _) in self._penalties.items() if exp <= now]:
            del self._penalties[k]
        for k in [k for k, exp in self._shared.items() if exp <= now]:
            del self._shared[k]
        for k in [k for k, (_, exp) in self._offences.items() if exp <= now]:
            del self._offences[k]
        for k in [k for k, (_, exp) in self._lifts.items() if exp <= now]:
            del self._lifts[k]
        gen = now // self._window_ms
        for address in list(self._clients):
            gens = self._clients[address]
            for g in [g for g in gens if g < gen - 1]:
                del gens[g]
            if not gens:
                del self._clients[address]
        for g in [g for g in self._tracked if g < gen - 1]:
            del self._tracked[g]
        oldest = now // self._bucket_ms - self._nbuckets + 1
        for b in [b for b in self._baseline if b < oldest]:
            del self._baseline[b]
        for cidr, entry in self._allow.items():
            if entry.expires_at_ms <= now:
                self._allow.remove(parse_network(cidr))

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._bucket_ms / 1000)
            self.sweep()
