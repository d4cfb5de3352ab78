"""The store contract: what every backend does, with identical semantics.

The store only *counts* and *remembers*; deciding is `penaltyd.detector`'s job. Every
time a backend reports (remaining time, bucket numbers, expiry instants) comes from the
store's own clock, so replicas with skewed clocks agree (DESIGN.md section 5).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class StoreError(Exception):
    """Base of everything a store raises."""


class StoreUnavailable(StoreError):
    """The store did not answer within the deadline or cannot be reached: fail open."""


class StoreMisconfigured(StoreError):
    """The store answered but cannot serve us (bad URL, auth, missing commands)."""


@dataclass(frozen=True, slots=True)
class Penalty:
    """An active penalty as the store sees it right now."""

    identity: str
    remaining_ms: int  # from the store's TTL, never from a replica's wall clock
    expires_at_ms: int  # unix ms on the store's clock
    reason: str  # compact reason as stored (see `penaltyd.reasons`)

    @property
    def seconds_left(self) -> int:
        """Remaining time rounded up: "try again in N seconds" is never too short."""
        return max(1, math.ceil(self.remaining_ms / 1000))


@dataclass(frozen=True, slots=True)
class Window:
    """Per-outcome totals of the evidence that still counts, and the penalty if any."""

    counts: tuple[int, ...]  # indexed by Outcome number; excludes evidence already used
    penalty: Penalty | None


#: One report in a batch: identity and merged (outcome, n) pairs.
ReportItem = tuple[str, Sequence[tuple[int, int]]]


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Position in the active-penalty index: (shard, expiry, identity) of the last row."""

    shard: int
    expires_at_ms: int
    identity: str

    def encode(self) -> str:
        raw = f"{self.shard}\n{self.expires_at_ms}\n{self.identity}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> PageCursor:
        """Raises ValueError on a token we did not produce."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            shard, expires, identity = raw.split("\n")
            return cls(int(shard), int(expires), identity)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError("not a page token from this service") from exc


@runtime_checkable
class Store(Protocol):
    """What penaltyd needs from a backend. All methods may raise `StoreError`."""

    kind: str

    async def start(self) -> None:
        """Connect, load scripts, start background work. Tolerates an absent store."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless the store answers now."""

    def local_penalty(self, identity: str) -> tuple[bool, Penalty | None]:
        """Answer from process memory if that answer is exact: (True, penalty or None).

        (False, None) means "ask the store" (`penalty`). The memory store always knows;
        the Redis store knows while its feed-fed view is synced. This is the check fast
        path: no coroutine, no deadline timer, no I/O.
        """

    async def penalty(self, identity: str) -> Penalty | None:
        """The active penalty for `identity` with its exact remaining time (check path)."""

    async def penalties(self, identities: Sequence[str]) -> list[Penalty | None]:
        """`penalty` for many identities in one round trip."""

    async def record(self, items: Sequence[ReportItem]) -> list[Window]:
        """Add outcomes to the windows and return each window after its update."""

    async def window(self, identity: str) -> Window:
        """Read a window without changing it (Explain)."""

    async def start_penalty(self, identity: str, ttl_ms: int, reason: str) -> tuple[Penalty, bool]:
        """Start a penalty unless one is active (NX); returns it and whether it is new.

        A new penalty marks the window's evidence as used, so it cannot re-fire later.
        """

    async def lift(self, identity: str) -> bool:
        """End a penalty now; False if there was none."""

    async def count_penalties(self) -> int:
        """Active penalties fleet-wide, from the index (never a key scan)."""

    async def list_penalties(
        self, after: PageCursor | None, limit: int
    ) -> tuple[list[Penalty], PageCursor | None]:
        """One page of active penalties in index order; a cursor for the next page."""
