"""Fleet statistics: what one replica adds to the fleet-wide figures, and what it reads.

Each replica aggregates the events and weighted errors it records (the baseline error
ratio of the adaptive threshold) and the identities it sees (`Stats.tracked_identities`),
and every `stats_flush_seconds` adds them to the store and reads the fleet's back, so
no request ever touches a shared key (no hot key). The aggregate is robust: no caller
may move the baseline far (DESIGN.md s. 4). Statistics are not traffic: a slow flush
never makes a replica "degraded".

The unit has no clock of its own: the engine's loop calls `refresh` on real time; the
simulator (`bench/simulate.py`) calls the same `refresh` on its simulated clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from penaltyd.detector import Baseline, Detector
from penaltyd.metrics import Metrics
from penaltyd.store.base import FleetStats, ReportItem, StatsDelta, Store, StoreError, Window
from serving.logs import RateLimitedLog

log = structlog.get_logger("penaltyd.fleetstats")

IDENTITY_SLICE = 2000  # identities per stats pipeline (each with its own deadline)
MAX_PENDING_IDENTITIES = 2_000_000  # identities kept for the next flush after a failure


@dataclass(slots=True)
class Aggregates:
    """What this replica saw since its last flush."""

    events: int = 0
    weighted: float = 0.0
    identities: set[str] = field(default_factory=set)


class FleetStatistics:
    def __init__(
        self,
        store: Store,
        detector: Detector,
        metrics: Metrics,
        *,
        replica: str,
        identity_cap: int,
        timeout_s: float,
        degraded: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.detector = detector
        self.metrics = metrics
        self.replica = replica
        self._cap = identity_cap
        self._timeout = timeout_s
        self._degraded = degraded
        self._log = RateLimitedLog(log)
        self.pending = Aggregates()
        self.fleet = FleetStats(0, 0, 0, 0, 0, 0.0)
        self.baseline = Baseline(0, 0.0)

    def add(self, items: Sequence[ReportItem], windows: Sequence[Window]) -> None:
        """Add a recorded batch, robustly.

        An identity counts for at most `baseline_identity_events` events per window,
        whatever it reports. The window the store just returned says how many it already
        had, fleet-wide, so the cap holds across replicas without any state of our own;
        the excess of a report is dropped, its error ratio kept. One crafted Report with
        n=100000 thus weighs like 100 events, not like the rest of the fleet together.
        """
        agg, cap = self.pending, self._cap
        for item, window in zip(items, windows, strict=True):
            agg.identities.add(item.identity)
            events = sum(n for _, n in item.counts)
            if not events:
                continue
            room = cap - (sum(window.counts) - events)
            if room <= 0:
                continue
            share = 1.0 if events <= room else room / events
            agg.events += min(events, room)
            agg.weighted += self.detector.weighted(item.counts) * share

    async def refresh(self) -> bool:
        """One flush of this replica's aggregates and one read of the fleet's: baseline
        and gauges. Returns False if the store did not take all of it (nothing is lost:
        what could not be flushed is kept for the next time).

        The baseline and degraded mark go in one small pipeline (a timeout there is in
        doubt, like a report's, and not re-sent); identities seen go in slices, each with
        its own deadline, and slices that fail are kept and sent next time (adding to a
        HyperLogLog twice changes nothing). Under a flood of reports this used to time
        out as a whole, undercounting identities and raising a false `degraded`.
        """
        agg, self.pending = self.pending, Aggregates()
        ok = True
        try:
            with self.metrics.store_call("stats_flush", self._timeout):
                async with asyncio.timeout(self._timeout):
                    await self.store.flush_stats(
                        StatsDelta(
                            self.replica, agg.events, agg.weighted, frozenset(), self._degraded()
                        )
                    )
        except TimeoutError as exc:
            ok = self._failed("baseline", exc)
        except StoreError as exc:  # not applied: keep it for the next flush
            self.pending.events += agg.events
            self.pending.weighted += agg.weighted
            ok = self._failed("baseline", exc)
        identities = list(agg.identities)
        for start in range(0, len(identities), IDENTITY_SLICE):
            part = identities[start : start + IDENTITY_SLICE]
            try:
                async with asyncio.timeout(self._timeout):
                    await self.store.flush_stats(
                        StatsDelta(self.replica, identities=frozenset(part))
                    )
            except (StoreError, TimeoutError) as exc:
                if len(self.pending.identities) < MAX_PENDING_IDENTITIES:
                    self.pending.identities.update(identities[start:])
                ok = self._failed("identities", exc)
                break
        try:
            with self.metrics.store_call("stats_read", self._timeout):
                async with asyncio.timeout(self._timeout):
                    self.fleet = await self.store.fleet_stats()
        except (StoreError, TimeoutError) as exc:
            return self._failed("read", exc)
        self.baseline = Baseline(self.fleet.baseline_events, self.fleet.baseline_errors)
        self.metrics.active_penalties.set(self.fleet.active_penalties)
        self.metrics.shared_addresses.set(self.fleet.shared_addresses)
        return ok

    def _failed(self, part: str, exc: BaseException) -> bool:
        self.metrics.stats_flush_failures.inc()
        self._log.warning("stats_flush_failed", part=part, error=str(exc) or type(exc).__name__)
        return False
