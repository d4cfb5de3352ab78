"""The store contract: what every backend does, with identical semantics.

The store only *counts* and *remembers*; deciding is `penaltyd.detector`'s job. Every
time a backend reports (remaining time, bucket numbers, expiry instants) comes from the
store's own clock, so replicas with skewed clocks agree (DESIGN.md section 5).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from penalty.identity import IPAddress, sub_identity
from penaltyd.events import FeedEvent
from serving.errors import StoreError as StoreError  # the store tree, re-exported
from serving.errors import StoreMisconfigured as StoreMisconfigured
from serving.errors import StoreUnavailable as StoreUnavailable


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


#: In a stored reason, before the marks of the one client a penalty binds
#: (`penaltyd.reasons`): a start whose reason lacks it replaces a bound penalty.
BIND = "\x1d"


@dataclass(frozen=True, slots=True)
class ReportItem:
    """One client's outcomes, as validated: the unit of a report batch."""

    identity: str  # the address identity
    counts: Sequence[tuple[int, int]]  # merged (outcome, n) pairs; empty: read only
    fingerprint: str = ""  # the client's fingerprint behind its address ("" unknown)
    shared_configured: bool = False  # the address is in a configured shared CIDR
    # What a shared mark of this address is indexed and announced as: "" for the identity
    # itself; with identity_key, the sealed address (`penaltyd.keying`), so the watch
    # stream can name it while the store never holds it in the clear.
    label: str = ""
    weighted: float = 0.0  # the report's weighted errors (the identity's reputation adds them)

    @property
    def sub_identity(self) -> str:
        return sub_identity(self.identity, self.fingerprint)

    @property
    def mark(self) -> str:
        """The name of this address's shared mark in indexes and feed events."""
        return self.label or self.identity


@dataclass(frozen=True, slots=True)
class Reputation:
    """Long-horizon counters of an identity or a neighbourhood, decayed to the store's now
    (half-life `reputation_half_life_seconds`): events, weighted errors, penalties."""

    events: float = 0.0
    weighted_errors: float = 0.0
    penalties: float = 0.0

    @property
    def ratio(self) -> float:
        return min(1.0, self.weighted_errors / self.events) if self.events > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.events:.1f} events, {self.weighted_errors:.1f} weighted errors, "
            f"{self.penalties:.2f} penalties (decayed)"
        )


def decay(value: float, age_ms: float, half_life_ms: float) -> float:
    """`value` as it is `age_ms` later: halved every `half_life_ms` (both stores)."""
    return value * 2.0 ** (-max(0.0, age_ms) / half_life_ms) if value else 0.0


@dataclass(frozen=True, slots=True)
class NeighbourhoodDelta:
    """What one replica saw of one neighbourhood since its last flush (`name`: the
    store's name of the network, a keyed token with identity_key; `label`: what the
    worst-neighbourhoods index lists, the network or its seal)."""

    name: str
    label: str
    events: int = 0
    weighted_errors: float = 0.0
    penalties: int = 0


@dataclass(frozen=True, slots=True)
class Window:
    """What the store knows about one address (and one client behind it) after a report."""

    counts: tuple[int, ...]  # address window by Outcome number; excludes evidence used up
    penalty: Penalty | None  # the whole address's penalty
    distinct: int = 0  # distinct client fingerprints seen on the address (estimate)
    shared: bool = False  # configured shared, or marked shared by detection
    newly_shared: bool = False  # this very report marked it
    sub_counts: tuple[int, ...] | None = None  # the client's own window, when kept
    sub_penalty: Penalty | None = None  # the client's own penalty
    reputation: Reputation | None = None  # the address's long-horizon counters, after it


@dataclass(frozen=True, slots=True)
class AllowEntry:
    cidr: str
    expires_at_ms: int
    note: str = ""
    actor: str = ""
    created_at_ms: int = 0

    def encode(self) -> str:
        return json.dumps(
            [self.cidr, self.expires_at_ms, self.note, self.actor, self.created_at_ms]
        )

    @classmethod
    def decode(cls, raw: str) -> AllowEntry:
        cidr, expires, note, actor, created = json.loads(raw)
        return cls(str(cidr), int(expires), str(note), str(actor), int(created))


@dataclass(frozen=True, slots=True)
class LiftRecord:
    actor: str
    note: str
    at_ms: int

    def encode(self) -> str:
        return json.dumps([self.actor, self.note, self.at_ms])

    @classmethod
    def decode(cls, raw: str) -> LiftRecord:
        actor, note, at = json.loads(raw)
        return cls(str(actor), str(note), int(at))

    def describe(self) -> str:
        return f"lifted by {self.actor or '?'} at unix ms {self.at_ms}: {self.note or '(no note)'}"


@dataclass(frozen=True, slots=True)
class Held:
    """One thing a store holds about an identity (`Store.held`, the Disclose RPC).

    `kind` is one of `HELD_KINDS`; docs/privacy.md says what each holds and for how long.
    """

    kind: str
    identity: str  # the store's name of the identity or sub-identity it is about
    stored_as: str  # the key (or index) as stored
    expires_at_ms: int  # deleted at the latest then (store clock)
    content: str  # what it holds, in words (a penalty: its stored reason)
    member: str = ""  # for an index entry: the member naming the identity


def describe_counts(counts: Sequence[int]) -> str:
    """Outcome totals in words ("accepted=3 unknown_recipient=5"), by Outcome number."""
    from penalty.outcomes import name

    return " ".join(f"{name(o)}={n}" for o, n in enumerate(counts) if n) or "no events"


HELD_KINDS = (
    "window",
    "penalty",
    "client_fingerprints",
    "shared_mark",
    "offence_counter",
    "last_lift",
    "active_index",
    "shared_index",
    "allow_entry",
    "reputation",
    "neighbourhood_reputation",
    "worst_index",
)


@dataclass(frozen=True, slots=True)
class Escalation:
    """Repeat offences lengthen penalties: base x multiplier^offences, capped."""

    multiplier: float = 1.0  # 1.0: off
    cap_ms: int = 3_600_000
    memory_ms: int = 86_400_000  # offences older than this are forgotten


@dataclass(frozen=True, slots=True)
class StatsDelta:
    """What one replica saw since its last flush (aggregated locally: no hot key)."""

    replica: str
    events: int = 0
    weighted_errors: float = 0.0
    identities: frozenset[str] = frozenset()
    degraded: bool = False


@dataclass(frozen=True, slots=True)
class FleetStats:
    active_penalties: int
    tracked_identities: int
    shared_addresses: int
    degraded_replicas: int
    baseline_events: int
    baseline_errors: float

    @property
    def baseline(self) -> float:
        return self.baseline_errors / self.baseline_events if self.baseline_events else 0.0


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
        """Raises ValueError on a token we did not produce (the store checks the shard)."""
        try:
            if len(token) > 1024:
                raise ValueError("too long")
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            shard, expires, identity = raw.split("\n")
            cursor = cls(int(shard), int(expires), identity)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError("not a page token from this service") from exc
        if cursor.shard < 0:
            raise ValueError("not a page token from this service")
        return cursor


#: Receives every change to penalties, shared marks and the allowlist (WatchPenalties).
Listener = Callable[[FeedEvent], None]

#: A copy of what the feed describes, taken at one instant: active penalties
#: (identity -> (expires_at_ms, stored reason)), shared addresses (mark, see
#: `ReportItem.mark` -> expires_at_ms) and the allowlist. Copies, so a caller may read
#: them across awaits.
RawSnapshot = tuple[dict[str, tuple[int, str]], dict[str, int], list[AllowEntry]]


@runtime_checkable
class Store(Protocol):
    """What penaltyd needs from a backend. Async methods may raise `StoreError`."""

    kind: str
    #: True when `record` and `start_penalties` complete without ever suspending (no
    #: I/O, no lock): the engine then runs them without a deadline timer, which could
    #: never fire (asyncio cancels only at a suspension) and costs a timer handle per call.
    in_process: bool

    async def start(self) -> None:
        """Connect, load scripts, start background work. Tolerates an absent store."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless the store answers now."""

    # --- the check path

    def local_penalty(self, identity: str) -> tuple[bool, Penalty | None]:
        """Answer from process memory if that answer is exact: (True, penalty or None).

        (False, None) means "ask the store" (`penalty`). The memory store always knows;
        the Redis store knows while its feed-fed view is synced. This is the check fast
        path: no coroutine, no deadline timer, no I/O.
        """

    async def penalty(self, identity: str) -> Penalty | None:
        """The active penalty for `identity` with its exact remaining time."""

    async def penalties(self, identities: Sequence[str]) -> list[Penalty | None]:
        """`penalty` for many identities in one round trip."""

    def allowed(self, addr: IPAddress) -> AllowEntry | None:
        """The allowlist entry containing `addr` (from memory; last known if the feed is down)."""

    # --- reports

    async def record(self, items: Sequence[ReportItem]) -> list[Window]:
        """Add outcomes to the windows and return each window after its update.

        An item with no counts only reads. Marks an address shared when more than the
        configured number of distinct clients were seen on it.
        """

    async def start_penalty(
        self, identity: str, ttl_ms: int, reason: str, escalation: Escalation | None = None
    ) -> tuple[Penalty, bool]:
        """Start a penalty unless one is active (NX); returns it and whether it is new.

        `identity` may be a sub-identity. A new penalty marks the window's evidence as
        used, so it cannot re-fire later.
        """

    async def start_penalties(
        self, starts: Sequence[tuple[str, int, str]], escalation: Escalation | None = None
    ) -> list[tuple[Penalty, bool]]:
        """`start_penalty` for many (identity, ttl_ms, reason) at once: one round trip to
        start them and one to index and announce the new ones, however many fire."""

    async def lift(self, identity: str, record: LiftRecord) -> bool:
        """End a penalty now and keep who/why for Explain; False if there was none."""

    async def last_lift(self, identity: str) -> LiftRecord | None: ...

    async def held(self, identity: str, mark: str) -> list[Held]:
        """Everything held about the address `identity` (the store's name of it) and every
        client behind it, with each item's expiry; `mark` names its shared mark. For the
        Disclose RPC: it may scan every key (Redis SCAN), never on the MX path."""

    # --- fleet-wide indexes

    async def count_penalties(self) -> int:
        """Active penalties fleet-wide, from the index (never a key scan)."""

    async def list_penalties(
        self, after: PageCursor | None, limit: int
    ) -> tuple[list[Penalty], PageCursor | None]:
        """One page of active penalties in index order; a cursor for the next page."""

    async def flush_stats(self, delta: StatsDelta) -> None:
        """Add one replica's aggregates (baseline, identities seen, degraded)."""

    # --- reputation of neighbourhoods (aggregated per replica, flushed with the stats)

    async def flush_neighbourhoods(self, deltas: Sequence[NeighbourhoodDelta]) -> list[Reputation]:
        """Add each delta to its neighbourhood's decayed counters (and enter it in the
        worst-neighbourhoods index); returns each one's counters after the update. A delta
        with no counts only reads."""

    async def worst_neighbourhoods(self, limit: int) -> list[tuple[str, float]]:
        """(label, decayed weighted errors) of the worst indexed neighbourhoods, worst first."""

    async def neighbourhood_held(self, name: str, label: str) -> list[Held]:
        """What is held about one neighbourhood (Disclose of an address inside it)."""

    async def fleet_stats(self) -> FleetStats: ...

    # --- allowlist

    async def allow(self, entry: AllowEntry, ttl_ms: int) -> AllowEntry: ...

    async def remove_allow(self, cidr: str) -> bool: ...

    async def allowlist(self) -> list[AllowEntry]: ...

    # --- the feed (WatchPenalties)

    def listen(self, listener: Listener | None) -> None:
        """Install the one callback that receives every change (the engine's hub)."""

    def snapshot(self) -> tuple[list[Penalty], list[tuple[str, int]], list[AllowEntry]]:
        """Active penalties, shared addresses (address, expires_at_ms), allowlist: from memory."""

    def snapshot_raw(self) -> RawSnapshot:
        """The same as plain copies, without an object per penalty (the watch hub takes
        one per snapshot it serves: cheap, and safe to read across awaits)."""

    @property
    def feed_exact(self) -> bool:
        """Whether `snapshot` and the listener's events are complete right now."""

    def now_ms(self) -> int:
        """The store's clock (unix ms), estimated without I/O: stamped on watch events so
        live replicas convert expiry instants with their own offset."""
