"""Neighbourhood reputation: what one replica adds to its networks' long memory, and reads.

A *neighbourhood* is the network around an address: its IPv4 /24 or IPv6 /48 by default
(`neighbourhood_ipv4_prefix`, `neighbourhood_ipv6_prefix`). Its decayed counters (events,
weighted errors, penalties; half-life `reputation_half_life_seconds`) are kept in the
store under a key of their own per network (one hash tag per neighbourhood: no hot key),
but no report touches them: like the fleet baseline (`penaltyd.fleetstats`), each replica
adds up what it records per neighbourhood and flushes the sums every
`stats_flush_seconds`, reading each flushed neighbourhood's fleet-wide counters back into
a bounded cache. So the report path stays one store round trip, and a decision reads the
neighbourhood from memory (decayed to now), at most one flush behind.

Bounded: at most `neighbourhood_cache` networks cached (the least recently flushed are
forgotten first) and as many pending between flushes (beyond that a new network's
reports are not counted until the next flush, counted in `dropped`). With
`identity_key` the store names a network by a keyed token and the worst-neighbourhoods
index lists it sealed (`penaltyd.keying`).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from penalty.identity import IPAddress
from penaltyd.keying import Keying
from penaltyd.settings import Settings
from penaltyd.store.base import NeighbourhoodDelta, Reputation, Store, StoreError, decay
from serving.logs import RateLimitedLog

log = structlog.get_logger("penaltyd.reputation")

FLUSH_SLICE = 2000  # neighbourhoods per store call

#: A network as an int key: (IP version, address >> host bits). Cheap on the report path.
NetKey = tuple[int, int]


@dataclass(slots=True)
class _Pending:
    events: int = 0
    weighted: float = 0.0
    penalties: int = 0


class FleetDistribution:
    """The typical address's long-horizon error ratio: the `QUANTILE` (first quartile) of
    the ratios of the last `SAMPLE` distinct addresses this replica recorded (each once,
    with its latest ratio, whatever its rate), so the reputation bar adapts to the fleet's
    distribution of senders rather than to its event-weighted error ratio, which a few busy
    attackers dominate. Robust while attackers are fewer than three quarters of the
    addresses seen (the median was not: in the simulator's mix, with a 40-address botnet,
    attackers were nearly half of the addresses with history, and the median sat on the
    newsletters' 10 %)."""

    SAMPLE = 4096
    MIN_SAMPLE = 20  # fewer addresses than this: not known yet
    MIN_EVENTS = 5.0  # an address counts once its long-horizon counters hold this many
    QUANTILE = 0.25

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self.typical: float | None = None  # None: not known yet (the fleet mean is used)

    def add(self, identity: str, rep: Reputation | None) -> None:
        if rep is None or rep.events < self.MIN_EVENTS:
            return
        seen = self._seen
        seen.pop(identity, None)
        seen[identity] = rep.ratio
        if len(seen) > self.SAMPLE:
            del seen[next(iter(seen))]  # the address not seen for longest

    def refresh(self) -> float | None:
        if len(self._seen) >= self.MIN_SAMPLE:
            ratios = sorted(self._seen.values())
            self.typical = ratios[int(len(ratios) * self.QUANTILE)]
        return self.typical


class Neighbourhoods:
    def __init__(
        self, settings: Settings, keying: Keying, now_ms: Callable[[], int], timeout_s: float
    ) -> None:
        self.prefix = {4: settings.neighbourhood_ipv4_prefix, 6: settings.neighbourhood_ipv6_prefix}
        self._shift = {4: 32 - self.prefix[4], 6: 128 - self.prefix[6]}
        self._half_life_ms = settings.reputation_half_life_seconds * 1000
        self._cap = settings.neighbourhood_cache
        self._keying = keying
        self._now_ms = now_ms
        self._timeout = timeout_s
        self.pending: dict[NetKey, _Pending] = {}
        self.cache: dict[NetKey, tuple[Reputation, int]] = {}
        self.dropped = 0
        self.flushed: list[Reputation] = []  # what the last flush read back
        self._log = RateLimitedLog(log)

    # --- names

    def key(self, addr: IPAddress) -> NetKey:
        v = addr.version
        return v, int(addr) >> self._shift[v]

    def network(self, key: NetKey) -> str:
        """The network's text: "203.0.113.0/24", "2001:db8:7::/48"."""
        v, n = key
        shift = self._shift[v]
        if v == 4:
            return str(ipaddress.IPv4Network((n << shift, 32 - shift)))
        return str(ipaddress.IPv6Network((n << shift, 128 - shift)))

    def of(self, addr: IPAddress) -> str:
        return self.network(self.key(addr))

    def name(self, network: str) -> str:
        """The store's name of a network (a keyed token with identity_key)."""
        return self._keying.neighbourhood_name(network)

    def label(self, network: str) -> str:
        """What the worst-neighbourhoods index lists: the network, or its seal."""
        return self._keying.label(network) if self._keying.keyed else network

    # --- the report path

    def add(self, addr: IPAddress, events: int, weighted: float, penalties: int = 0) -> None:
        key = self.key(addr)
        p = self.pending.get(key)
        if p is None:
            if len(self.pending) >= self._cap:
                self.dropped += 1
                return
            p = self.pending[key] = _Pending()
        p.events += events
        p.weighted += weighted
        p.penalties += penalties

    def get(self, addr: IPAddress) -> Reputation | None:
        """The neighbourhood's fleet-wide counters as of the last flush, decayed to now."""
        hit = self.cache.get(self.key(addr))
        if hit is None:
            return None
        rep, at = hit
        age, hl = self._now_ms() - at, self._half_life_ms
        return Reputation(
            decay(rep.events, age, hl),
            decay(rep.weighted_errors, age, hl),
            decay(rep.penalties, age, hl),
        )

    # --- the flush (with the fleet statistics)

    async def flush(self, store: Store) -> bool:
        """Add the pending sums to the store and cache what it answers; False if part of it
        did not reach the store (that part is dropped: reputation is evidence, not data)."""
        pending, self.pending = self.pending, {}
        keys = list(pending)
        ok = True
        self.flushed = []
        for start in range(0, len(keys), FLUSH_SLICE):
            part = keys[start : start + FLUSH_SLICE]
            deltas = []
            for k in part:
                network, p = self.network(k), pending[k]
                deltas.append(
                    NeighbourhoodDelta(
                        self.name(network), self.label(network), p.events, p.weighted, p.penalties
                    )
                )
            try:
                async with asyncio.timeout(self._timeout):
                    reps = await store.flush_neighbourhoods(deltas)
            except (StoreError, TimeoutError) as exc:
                self._log.warning(
                    "neighbourhood_flush_failed", error=str(exc) or type(exc).__name__
                )
                ok = False
                continue
            now = self._now_ms()
            cache = self.cache
            self.flushed += reps
            for k, rep in zip(part, reps, strict=True):
                cache.pop(k, None)
                cache[k] = (rep, now)
            while len(cache) > self._cap:
                del cache[next(iter(cache))]
        return ok

    async def read(self, store: Store, network: str) -> Reputation:
        """A network's counters straight from the store (admin calls)."""
        (rep,) = await store.flush_neighbourhoods(
            [NeighbourhoodDelta(self.name(network), self.label(network))]
        )
        return rep
