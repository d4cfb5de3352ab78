"""The penalty feed and the in-process view it keeps exact.

Every replica keeps a dict of active penalties, filled from a snapshot of the sharded
index and then kept current by the feed (Redis pub/sub). While the view is *synced*, a
check is a dict lookup: no Redis round trip, which is what lets a Python replica answer
checks near the gRPC ceiling. When the feed is down the view says so (`synced` is False)
and checks go to Redis again; a dead Redis then means a fail-open answer.

Remaining time is never carried as "N ms from when I sent this" (that drifts with
delivery delay): events carry the expiry instant on Redis's clock, and the view converts
with an offset between Redis's clock and our monotonic clock measured at each sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from penaltyd.store.base import Penalty

STARTED = "S"
LIFTED = "L"


@dataclass(frozen=True, slots=True)
class FeedEvent:
    kind: str  # STARTED or LIFTED
    identity: str
    expires_at_ms: int = 0
    reason: str = ""

    def encode(self) -> bytes:
        return f"{self.kind}\t{self.identity}\t{self.expires_at_ms}\t{self.reason}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> FeedEvent:
        """Raises ValueError on anything we did not publish."""
        kind, identity, expires, reason = raw.decode().split("\t", 3)
        if kind not in (STARTED, LIFTED) or not identity:
            raise ValueError(f"unknown feed event {raw[:80]!r}")
        return cls(kind, identity, int(expires), reason)


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
    """Active penalties in memory, exact while `synced`."""

    def __init__(self, clock: StoreClock) -> None:
        self.clock = clock
        self.synced = False
        self._entries: dict[str, tuple[int, str]] = {}  # identity -> (expires_at_ms, reason)

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

    def apply(self, event: FeedEvent) -> None:
        if event.kind == STARTED:
            self._entries[event.identity] = (event.expires_at_ms, event.reason)
        else:
            self._entries.pop(event.identity, None)

    def replace(self, entries: dict[str, tuple[int, str]]) -> None:
        self._entries = entries

    def sweep(self) -> int:
        """Drop expired entries; returns how many remain."""
        now = self.clock.now_ms()
        for identity in [i for i, (exp, _) in self._entries.items() if exp <= now]:
            del self._entries[identity]
        return len(self._entries)
