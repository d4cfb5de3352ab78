"""The Redis store's in-process view of the feed, and the store clock it reads.

Every replica keeps in memory the active penalties, the addresses marked shared and the
allowlist: filled from a snapshot of the sharded indexes, then kept current by the feed
(Redis pub/sub). While the view is *synced*, a check is a dict lookup with no Redis
round trip, which is what lets a Python replica answer checks near the gRPC ceiling.
When the feed is down the view says so (`synced` is False) and checks go to Redis again;
a dead Redis then means a fail-open answer. The allowlist is the exception: it keeps
answering from the last known state, because allowing is the fail-open direction.

Remaining time is never carried as "N ms from when I sent this" (that drifts with
delivery delay): events carry the expiry instant on Redis's clock, and the view converts
with an offset between Redis's clock and our monotonic clock measured at each sync.
"""

from __future__ import annotations

import time

from penalty.identity import IPAddress, NetworkSet, parse_network
from penaltyd.events import ALLOW_ADDED, ALLOW_REMOVED, LIFTED, SHARED, STARTED, FeedEvent
from penaltyd.store.base import AllowEntry, Penalty, RawSnapshot


class StoreClock:
    """Estimates the store's unix-ms clock from our monotonic clock (one fleet clock)."""

    def __init__(self) -> None:
        self._offset_ms = time.time() * 1000 - time.monotonic() * 1000

    def calibrate(self, store_now_ms: int, rtt_ms: float = 0.0) -> None:
        """`store_now_ms` was read from the store; assume it was taken mid round trip."""
        self._offset_ms = store_now_ms + rtt_ms / 2 - time.monotonic() * 1000

    def now_ms(self) -> float:
        return time.monotonic() * 1000 + self._offset_ms


class PenaltyView:
    """Active penalties, shared marks and the allowlist in memory; exact while `synced`."""

    def __init__(self, clock: StoreClock) -> None:
        self.clock = clock
        self.synced = False
        self._entries: dict[str, tuple[int, str]] = {}  # identity -> (expires_at_ms, reason)
        self._shared: dict[str, int] = {}  # address -> expires_at_ms
        self._allow: NetworkSet[AllowEntry] = NetworkSet()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, identity: str) -> Penalty | None:
        entry = self._entries.get(identity)
        if entry is None:
            return None
        remaining = entry[0] - self.clock.now_ms()
        if remaining <= 0:
            self._entries.pop(identity, None)
            return None
        return Penalty(identity, int(remaining), entry[0], entry[1])

    def allowed(self, addr: IPAddress) -> AllowEntry | None:
        if not len(self._allow):
            return None
        hit = self._allow.match(addr)
        if hit is None or hit[1].expires_at_ms <= self.clock.now_ms():
            return None
        return hit[1]

    def apply(self, event: FeedEvent) -> None:
        kind = event.kind
        if kind == STARTED:
            self._entries[event.identity] = (event.expires_at_ms, event.reason)
        elif kind == LIFTED:
            self._entries.pop(event.identity, None)
        elif kind == SHARED:
            self._shared[event.identity] = event.expires_at_ms
        elif kind == ALLOW_ADDED:
            self._allow.add(parse_network(event.identity), AllowEntry.decode(event.reason))
        elif kind == ALLOW_REMOVED:
            self._allow.remove(parse_network(event.identity))

    def replace(
        self,
        entries: dict[str, tuple[int, str]],
        shared: dict[str, int],
        allow: list[AllowEntry],
    ) -> None:
        self._entries = entries
        self._shared = shared
        fresh: NetworkSet[AllowEntry] = NetworkSet()
        for entry in allow:
            fresh.add(parse_network(entry.cidr), entry)
        self._allow = fresh

    def snapshot(self) -> tuple[list[Penalty], list[tuple[str, int]], list[AllowEntry]]:
        now = self.clock.now_ms()
        penalties = [
            Penalty(i, int(exp - now), exp, reason)
            for i, (exp, reason) in self._entries.items()
            if exp > now
        ]
        shared = [(a, exp) for a, exp in self._shared.items() if exp > now]
        allow = [e for _, e in self._allow.items() if e.expires_at_ms > now]
        return penalties, shared, allow

    def snapshot_raw(self) -> RawSnapshot:
        allow = [e for _, e in self._allow.items()]
        return dict(self._entries), dict(self._shared), allow

    def sweep(self) -> int:
        """Drop expired entries; returns how many penalties remain."""
        now = self.clock.now_ms()
        for identity in [i for i, (exp, _) in self._entries.items() if exp <= now]:
            del self._entries[identity]
        for address in [a for a, exp in self._shared.items() if exp <= now]:
            del self._shared[address]
        for cidr, entry in self._allow.items():
            if entry.expires_at_ms <= now:
                self._allow.remove(parse_network(cidr))
        return len(self._entries)
