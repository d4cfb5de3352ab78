"""The embedded store: one process, no Redis, the same semantics as `redis`.

It is the default when no Redis URL is configured, and the store unit tests run on. The
clock is injectable (unix ms) so tests move time instead of sleeping.

Memory is bounded twice: by time and by count.

*By time* (retention, the same as the Redis key TTLs): every entry carries its expiry,
checked lazily on access, and is dropped by a sweep every bucket. The sweep is
incremental: entries are filed in a timing wheel by the bucket in which they expire, and
the due ones are handled in slices of about `sweep_slice` entries (at most ~1 ms) with
the event loop served between slices. A window lives until its newest bucket has left the
window (and, for an address, until the newer of its two client-fingerprint generations
is no longer read: 2 x window at most); a penalty until it ends; a shared mark for
`shared_ttl`; an offence counter for the escalation memory; a lift record for a window.

*By count* (the hostile case: an attacker with IPv6 space can make unlimited new
identities):

- `max_identities` bounds the windows (address and client windows; each remembered client
  fingerprint beyond the first on an address counts as one more). When it is full, the
  window that would expire soonest is evicted first: the *least recently written* one, at
  bucket granularity (ties: the one filed first in that bucket). Evicting a window only
  forgets evidence, which fails open; it never touches a penalty. Counted in `evicted`.
- `max_penalties` bounds the active penalties. Active penalties are never evicted: when
  the table is full a new penalty is *not started* (fail open) and `penalties_refused`
  counts it; `start_penalty` then returns a penalty with no time left and `created`
  False. The small per-identity records that outlive a window (shared-address marks,
  repeat-offence counters, lift records) are bounded by the same figure, each table on
  its own, and the soonest to expire is forgotten first (counted in `evicted`).
- Client fingerprints are kept per address per generation up to `max(4 K, 1000)`;
  beyond that new ones are not remembered and the distinct count stays at least that.

Layout (what one tracked identity costs): one dict entry per window whose value is one
flat tuple, untracked by the garbage collector::

    (last bucket, used-up marker, fingerprint generation, fingerprints of that
     generation, of the one before, distinct in both, code, n, code, n, ...)

where `code` is `~(bucket * SLOT_WIDTH + outcome)` (`penalty.outcomes.SLOT_WIDTH`, 16;
negative, so it never equals a count) and
fingerprints are None, one 30-bit hash, or a set of them. Bucket numbers and codes are
shared int objects, so a window of one bucket with two outcomes costs its key string, a
dict slot, a 10-slot tuple and a wheel slot: see `bench/memory_store.py`.

Active penalties are also kept in an index sorted by (expiry, identity): a list of sorted
blocks of at most ~2000 entries, appended to in the common case (every penalty lasts the
same time), so `list_penalties` is O(log n + page) and `count_penalties` O(log n).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from penalty import outcomes
from penalty.identity import IPAddress, NetworkSet, address_of, parse_network
from penaltyd.events import ALLOW_ADDED, ALLOW_REMOVED, LIFTED, SHARED, STARTED, FeedEvent
from penaltyd.store.base import (
    BIND,
    AllowEntry,
    Escalation,
    FleetStats,
    Held,
    LiftRecord,
    Listener,
    NeighbourhoodDelta,
    PageCursor,
    Penalty,
    RawSnapshot,
    ReportItem,
    Reputation,
    StatsDelta,
    Window,
    decay,
    describe_counts,
)

#: Reputation counters: (events, weighted errors, penalties, as of unix ms, expires at ms).
RepRecord = tuple[float, float, float, int, int]

V = TypeVar("V")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


# --- one window: a flat tuple (see the module docstring)

_LAST, _MARK, _GEN, _CUR, _PREV, _UNION = range(6)
_H = 6  # header length; (code, n) pairs follow
_SLOTS_PER_BUCKET = outcomes.SLOT_WIDTH  # codes: bucket * width + outcome, as Redis fields
_SLOT_BITS = _SLOTS_PER_BUCKET.bit_length() - 1  # the width is a power of two: shifts, masks
_SLOT_MASK = _SLOTS_PER_BUCKET - 1
_FP_MASK = (1 << 30) - 1  # fingerprints are kept as 30-bit hashes: one-digit ints
_NEW: tuple[Any, ...] = (-1, -1, -1, None, None, 0)  # header of a window never written
_SLICE_SECONDS = 0.001  # a sweep slice also ends after this long (two can run back to back)

assert _SLOTS_PER_BUCKET == 1 << _SLOT_BITS

Record = tuple[Any, ...]
Fingerprints = int | set[int] | None


def _size(fps: Fingerprints) -> int:
    return 0 if fps is None else 1 if isinstance(fps, int) else len(fps)


def _has(fps: Fingerprints, h: int) -> bool:
    return fps is not None and (fps == h if isinstance(fps, int) else h in fps)


def _extra(rec: Record) -> int:
    """Units a window costs beyond one: fingerprints held in sets."""
    cur, prev = rec[_CUR], rec[_PREV]
    return (len(cur) if isinstance(cur, set) else 0) + (len(prev) if isinstance(prev, set) else 0)


# --- the timing wheel


_CHUNK = 256  # keys per chunk of a wheel slot


class _Slot:
    """The keys filed in one slot, in filing order: full chunks are tuples (which the
    garbage collector stops tracking), so a full collection does not visit a million
    keys; only the tail being filled is a list."""

    __slots__ = ("chunks", "head", "pos", "tail")

    def __init__(self) -> None:
        self.chunks: deque[tuple[str, ...]] = deque()
        self.tail: list[str] = []
        self.head: tuple[str, ...] = ()  # the chunk being taken from, from `pos` on
        self.pos = 0

    def add(self, key: str) -> None:
        tail = self.tail
        tail.append(key)
        if len(tail) >= _CHUNK:
            self.chunks.append(tuple(tail))
            tail.clear()

    def empty(self) -> bool:
        return self.pos >= len(self.head) and not self.chunks and not self.tail

    def take(self) -> tuple[str, ...]:
        """The next keys not taken yet, up to a chunk of them; () when empty."""
        if self.pos < len(self.head):
            keys = self.head[self.pos :] if self.pos else self.head
        elif self.chunks:
            keys = self.chunks.popleft()
        else:
            keys = tuple(self.tail)
            self.tail.clear()
        self.head, self.pos = (), 0
        return keys

    def pop(self) -> str:
        """The next key (the slot must not be empty)."""
        if self.pos >= len(self.head):
            self.head = self.take()
        key = self.head[self.pos]
        self.pos += 1
        return key

    def keys(self) -> Iterator[str]:
        yield from self.head[self.pos :]
        for chunk in self.chunks:
            yield from chunk
        yield from self.tail

    def __len__(self) -> int:
        return len(self.head) - self.pos + sum(map(len, self.chunks)) + len(self.tail)


class _Wheel:
    """Keys filed by the slot (bucket) in which they expire, earliest slot first.

    Invariant kept by the tables: each live key is filed exactly once, in a slot no later
    than its real expiry; a key found in a slot after it was renewed is filed again in
    its new slot (so a key written every bucket costs one entry, not one per bucket).
    """

    __slots__ = ("_heap", "_slots")

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}
        self._heap: list[int] = []

    def file(self, key: str, slot: int) -> None:
        q = self._slots.get(slot)
        if q is None:
            q = self._slots[slot] = _Slot()
            heapq.heappush(self._heap, slot)
        q.add(key)

    def first(self, due: int | None = None) -> tuple[int, _Slot] | None:
        """The earliest non-empty slot and its keys (only if that slot is <= `due`)."""
        heap, slots = self._heap, self._slots
        while heap:
            slot = heap[0]
            if due is not None and slot > due:
                return None
            q = slots.get(slot)
            if q is not None and not q.empty():
                return slot, q
            heapq.heappop(heap)
            slots.pop(slot, None)
        return None

    def filed_until(self, slot: int) -> Iterator[str]:
        """Keys filed in slots <= `slot` (to count what is expired but not swept yet)."""
        for s, q in self._slots.items():
            if s <= slot:
                yield from q.keys()

    def __len__(self) -> int:
        return sum(len(q) for q in self._slots.values())


class _Table(Generic[V]):
    """A dict whose entries expire: swept through a wheel, bounded by evicting the entry
    that expires soonest. `weight` (default 1 per entry) is what the bound counts."""

    __slots__ = ("_expiry", "_slot_ms", "_weight", "d", "evicted", "limit", "size", "wheel")

    def __init__(
        self,
        slot_ms: int,
        limit: int,
        expiry: Callable[[V], int],
        weight: Callable[[V], int] | None = None,
    ) -> None:
        self.d: dict[str, V] = {}
        self.wheel = _Wheel()
        self.limit = limit
        self.size = 0
        self.evicted = 0
        self._slot_ms = slot_ms
        self._expiry = expiry
        self._weight = weight

    def slot(self, expires_at_ms: int) -> int:
        return -(-expires_at_ms // self._slot_ms)

    def get(self, key: str, now: int) -> V | None:
        v = self.d.get(key)
        return v if v is not None and self._expiry(v) > now else None

    def put(self, key: str, value: V, now: int) -> None:
        """Store an entry of weight one (the small tables)."""
        new = key not in self.d
        self.store(key, value, now, new, 1 if new else 0)

    def store(self, key: str, value: V, now: int, new: bool, grow: int) -> None:
        """Store `value`; `new`: the key was absent; `grow`: the change of weight."""
        self.d[key] = value
        self.size += grow
        if new:
            self.wheel.file(key, self.slot(self._expiry(value)))
        if self.size > self.limit:
            self._make_room(key, now)

    def _make_room(self, protect: str, now: int) -> None:
        """Evict the entries that expire soonest until the table fits (never `protect`)."""
        d, slot_ms, expiry, weight, wheel = (
            self.d,
            self._slot_ms,
            self._expiry,
            self._weight,
            self.wheel,
        )
        held = None
        while self.size > self.limit and (hit := wheel.first()) is not None:
            slot, q = hit
            key = q.pop()
            if key == protect:
                held = slot  # never evict what is being written
                continue
            value = d.get(key)
            if value is None:
                continue
            expires = expiry(value)
            true_slot = -(-expires // slot_ms)
            if true_slot > slot:  # renewed since it was filed: file it where it belongs
                wheel.file(key, true_slot)
                continue
            del d[key]
            self.size -= 1 if weight is None else weight(value)
            if expires > now:
                self.evicted += 1
        if held is not None:
            wheel.file(protect, held)

    def expire(self, now: int) -> Iterator[int]:
        """Drop what expired by `now`; yields the number of entries handled, a chunk
        (<= 256) at a time (the sweep slices the steps)."""
        d, slot_ms, expiry, weight, wheel = (
            self.d,
            self._slot_ms,
            self._expiry,
            self._weight,
            self.wheel,
        )
        due = now // slot_ms
        while (hit := wheel.first(due)) is not None:
            slot, q = hit
            keys = q.take()
            for key in keys:
                value = d.get(key)
                if value is None:
                    continue
                true_slot = -(-expiry(value) // slot_ms)
                if true_slot > slot:  # renewed since it was filed
                    wheel.file(key, true_slot)
                    continue
                del d[key]
                self.size -= 1 if weight is None else weight(value)
            yield len(keys)

    def live(self, now: int) -> int:
        """Entries not expired: expired ones can only be filed up to the next slot."""
        stale = sum(
            1
            for key in self.wheel.filed_until(now // self._slot_ms + 1)
            if (v := self.d.get(key)) is not None and self._expiry(v) <= now
        )
        return len(self.d) - stale


# --- the penalty index


Entry = tuple[int, str]  # (expires_at_ms, identity)
Block = list[Entry] | tuple[Entry, ...]


class _Index:
    """Active penalties sorted by (expiry, identity): a list of sorted blocks.

    Penalties mostly arrive in expiry order (they all last the same), so an insert is
    usually an append to the last block; a longer (escalated) one is an insort into one
    block of at most 2 x `LOAD`. Finding a cursor is two bisects. Every block but the
    last (the one appended to) is a tuple, which the garbage collector stops tracking:
    a full collection does not visit every penalty.
    """

    LOAD = 1000
    __slots__ = ("_blocks", "_maxes", "size")

    def __init__(self) -> None:
        self._blocks: list[Block] = []  # tuples, but the one appended to is a list
        self._maxes: list[Entry] = []
        self.size = 0

    def _put(self, k: int, entries: list[Entry]) -> None:
        """Store block k (split if it grew too big), keeping the last block a list."""
        blocks, maxes, load = self._blocks, self._maxes, self.LOAD
        last = k == len(blocks) - 1
        if len(entries) > 2 * load:
            head, tail = entries[:load], entries[load:]
            blocks[k : k + 1] = [tuple(head), tail if last else tuple(tail)]
            maxes[k : k + 1] = [head[-1], tail[-1]]
            return
        blocks[k] = entries if last else tuple(entries)
        maxes[k] = entries[-1]

    def add(self, e: Entry) -> None:
        blocks, maxes = self._blocks, self._maxes
        self.size += 1
        if not blocks or e > maxes[-1]:
            last = blocks[-1] if blocks else None
            if isinstance(last, list) and len(last) < self.LOAD:
                last.append(e)
                maxes[-1] = e
                return
            if last is not None:
                blocks[-1] = tuple(last)  # sealed
            blocks.append([e])
            maxes.append(e)
            return
        k = bisect_left(maxes, e)
        entries = list(blocks[k])
        insort(entries, e)
        self._put(k, entries)

    def remove(self, e: Entry) -> bool:
        blocks, maxes = self._blocks, self._maxes
        k = bisect_left(maxes, e)
        if k == len(blocks):
            return False
        block = blocks[k]
        i = bisect_left(block, e)
        if i == len(block) or block[i] != e:
            return False
        self.size -= 1
        if len(block) > 1:
            self._put(k, [*block[:i], *block[i + 1 :]])
            return True
        del blocks[k]
        del maxes[k]
        return True

    def _locate(self, key: Entry, after: bool) -> tuple[int, int]:
        """(block, offset) of the first entry > key (`after`) or >= key."""
        k = (bisect_right if after else bisect_left)(self._maxes, key)
        if k == len(self._blocks):
            return k, 0
        return k, (bisect_right if after else bisect_left)(self._blocks[k], key)

    def iterate(self, key: Entry, after: bool) -> Iterator[Entry]:
        """Entries from `key` on; the index must not change while this is consumed."""
        k, i = self._locate(key, after)
        blocks = self._blocks
        if k < len(blocks):
            yield from blocks[k][i:] if i else blocks[k]
            for block in blocks[k + 1 :]:
                yield from block

    def count_from(self, key: Entry) -> int:
        """Entries >= key (cheap when key falls in the first blocks: a swept index)."""
        k, i = self._locate(key, after=False)
        return self.size - sum(len(b) for b in self._blocks[:k]) - i

    def pop_expired(self, now: int) -> list[Entry]:
        """Remove and return the leading entries that expired by `now` (at most a block)."""
        if not self._blocks:
            return []
        block = self._blocks[0]
        i = bisect_left(block, (now + 1, ""))
        if i == 0:
            return []
        gone = list(block[:i])
        if i == len(block):
            del self._blocks[0]
            del self._maxes[0]
        else:
            self._blocks[0] = block[i:]  # a tuple stays a tuple, the last block a list
        self.size -= i
        return gone


# --- distinct identities seen (Stats.tracked_identities)


class _Distinct:
    """Distinct strings seen: exact up to `EXACT`, then a HyperLogLog (2^14 registers,
    ~0.8 % standard error, like Redis's PFCOUNT): fixed memory however many there are."""

    EXACT = 4096
    P = 14
    M = 1 << P
    __slots__ = ("exact", "regs")

    def __init__(self) -> None:
        self.exact: set[str] | None = set()
        self.regs: bytearray | None = None

    def add(self, items: Iterable[str]) -> None:
        if self.exact is not None:
            self.exact.update(items)
            if len(self.exact) <= self.EXACT:
                return
            items, self.exact = self.exact, None
            self.regs = bytearray(self.M)
        assert self.regs is not None
        _hll_add(self.regs, items)

    def registers(self) -> bytearray:
        if self.regs is not None:
            return self.regs
        regs = bytearray(self.M)
        _hll_add(regs, self.exact or ())
        return regs

    @classmethod
    def union_count(cls, parts: Sequence[_Distinct]) -> int:
        exact = [p.exact for p in parts if p.exact is not None]
        if len(exact) == len(parts):
            return len(set().union(*exact))
        regs = parts[0].registers()
        for p in parts[1:]:
            regs = bytearray(map(max, regs, p.registers()))
        return _hll_estimate(regs)


def _hll_add(regs: bytearray, items: Iterable[str]) -> None:
    p, mask, width = _Distinct.P, _Distinct.M - 1, 64 - _Distinct.P
    for item in items:
        h = hash(item) & 0xFFFF_FFFF_FFFF_FFFF
        rank = width - (h >> p).bit_length() + 1
        if regs[h & mask] < rank:
            regs[h & mask] = rank


def _hll_estimate(regs: bytearray) -> int:
    m = len(regs)
    inverse = sum(regs.count(v) * 2.0**-v for v in set(regs))
    estimate = 0.7213 / (1 + 1.079 / m) * m * m / inverse
    zeros = regs.count(0)
    if estimate <= 2.5 * m and zeros:
        estimate = m * math.log(m / zeros)
    return round(estimate)


# --- the store


class MemoryStore:
    """Everything in process memory; every method completes without awaiting I/O.

    Bounds (keyword-only): `max_identities` windows, `max_penalties` active penalties
    (and as many shared marks, offence counters and lift records); about `sweep_slice`
    entries per sweep slice. See the module docstring for what is evicted first.
    """

    kind = "memory"
    in_process = True

    def __init__(
        self,
        *,
        window_seconds: int = 600,
        bucket_seconds: int = 60,
        shared_min_sub_identities: int = 20,
        shared_ttl_seconds: int = 3600,
        max_identities: int = 1_000_000,
        max_penalties: int = 250_000,
        sweep_slice: int = 2_000,
        reputation_half_life_seconds: int = 3600,
        reputation_ttl_seconds: int = 14_400,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        if min(max_identities, max_penalties, sweep_slice) < 1:
            raise ValueError("max_identities, max_penalties and sweep_slice must be >= 1")
        self._bucket_ms = bucket_seconds * 1000
        self._nbuckets = window_seconds // bucket_seconds
        self._window_ms = window_seconds * 1000
        self._k = shared_min_sub_identities
        self._fp_cap = max(4 * shared_min_sub_identities, 1000)
        self._shared_ttl_ms = shared_ttl_seconds * 1000
        self._clock = clock
        self._sweep_slice = sweep_slice
        self.max_penalties = max_penalties
        self._windows_t: _Table[Record] = _Table(
            self._bucket_ms, max_identities, self._record_expiry, lambda r: 1 + _extra(r)
        )
        self._windows = self._windows_t.d  # identity or sub-identity -> record
        self._penalties: dict[str, tuple[int, str, int]] = {}  # -> (expires, reason, marker)
        self._index = _Index()
        self._shared: _Table[tuple[int, str]] = _Table(
            self._bucket_ms, max_penalties, lambda v: v[0]
        )  # address -> (expiry, mark)
        self._offences: _Table[tuple[int, int]] = _Table(
            self._bucket_ms, max_penalties, lambda v: v[1]
        )  # identity -> (count, expiry)
        self._lifts: _Table[tuple[LiftRecord, int]] = _Table(
            self._bucket_ms, max_penalties, lambda v: v[1]
        )
        # Reputation (issue 15): per address and per neighbourhood, each bounded like the
        # windows (the soonest to expire is forgotten first) and expiring with its TTL.
        self._half_life_ms = reputation_half_life_seconds * 1000
        self._rep_ttl_ms = reputation_ttl_seconds * 1000
        self._rep: _Table[RepRecord] = _Table(self._bucket_ms, max_identities, lambda v: v[4])
        self._nbs: _Table[tuple[RepRecord, str]] = _Table(
            self._bucket_ms, max_identities, lambda v: v[0][4]
        )  # neighbourhood -> (counters, label in the worst-neighbourhoods listing)
        self._allow: NetworkSet[AllowEntry] = NetworkSet()
        self._baseline: dict[int, list[float]] = {}  # bucket -> [events, weighted errors]
        self._tracked: dict[int, _Distinct] = {}  # generation -> identities seen
        self._degraded: dict[str, int] = {}  # replica -> last degraded (ms)
        self._listener: Listener | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._zero = (0,) * outcomes.COUNT
        self._b = -1  # the current bucket (a shared int object), see `_tick`
        self._g = -1  # the current fingerprint generation
        self._oldest = 0
        self._stale = 0
        self._codes: tuple[int, ...] = ()
        self.penalties_refused = 0
        self.sweep_slices = 0  # sweep slices run so far (each ends by serving the loop)
        self._tick(clock())

    # --- figures for operators and tests

    @property
    def evicted(self) -> int:
        """Entries dropped before they expired because a table was full."""
        return (
            self._windows_t.evicted
            + self._shared.evicted
            + self._offences.evicted
            + self._lifts.evicted
        )

    @property
    def reputation_evicted(self) -> int:
        """Reputation records (addresses, neighbourhoods) forgotten early: table full."""
        return self._rep.evicted + self._nbs.evicted

    @property
    def windows_evicted(self) -> int:
        return self._windows_t.evicted

    @property
    def tracked_windows(self) -> int:
        """Windows held (expired ones count until the sweep drops them)."""
        return len(self._windows)

    @property
    def identity_units(self) -> int:
        """What `max_identities` bounds: windows plus fingerprints kept in sets."""
        return self._windows_t.size

    def window_buckets(self) -> dict[str, dict[int, tuple[int, ...]]]:
        """Debugging: every window held, identity -> {bucket: counts by outcome}. O(n)."""
        out: dict[str, dict[int, tuple[int, ...]]] = {}
        for key, rec in self._windows.items():
            buckets: dict[int, list[int]] = {}
            for i in range(_H, len(rec), 2):
                code = ~rec[i]
                row = buckets.setdefault(code >> _SLOT_BITS, [0] * outcomes.COUNT)
                row[code & _SLOT_MASK] += rec[i + 1]
            out[key] = {b: tuple(row) for b, row in buckets.items()}
        return out

    # --- lifecycle

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
            del self._penalties[identity]  # its index entry goes with the sweep
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

    def _room_for_penalty(self, now: int) -> bool:
        if self._index.size < self.max_penalties:
            return True
        for _ in range(8):  # make room from what has expired (bounded work)
            if not self._trim_penalties(now):
                break
        return self._index.count_from((now + 1, "")) < self.max_penalties

    def _start(
        self, identity: str, ttl_ms: int, reason: str, escalation: Escalation | None
    ) -> tuple[Penalty, bool]:
        now = self._clock()
        existing = self._active(identity, now)
        if existing is not None:
            if not (BIND in existing.reason and BIND not in reason):
                return existing, False
            # An unbound penalty replaces one bound to a client (as start_penalty.lua).
            self._index.remove((existing.expires_at_ms, identity))
            del self._penalties[identity]
        if not self._room_for_penalty(now):
            self.penalties_refused += 1  # fail open: never evict an active penalty
            return Penalty(identity, 0, now, reason), False
        if escalation is not None and escalation.multiplier > 1:
            offence = self._offences.get(identity, now)
            count = offence[0] if offence else 0
            ttl_ms = min(int(ttl_ms * escalation.multiplier**count), escalation.cap_ms)
            self._offences.put(identity, (count + 1, now + escalation.memory_ms), now)
        expires = now + ttl_ms
        marker = self._tick(now)
        self._penalties[identity] = (expires, reason, marker)
        self._index.add((expires, identity))
        # Evidence up to this bucket caused this penalty; it must not cause the next one.
        # A client's penalty behind a shared address uses up its evidence in the address
        # window too, so a few such penalties never add up to one on the whole address.
        self._set_marker(identity, marker)
        address = address_of(identity)
        self._bump_rep(address, 0, 0.0, 1, now)
        if address != identity:
            self._set_marker(address, marker)
            held = self._penalties.get(address)
            if held is not None and held[0] > now:
                self._penalties[address] = (held[0], held[1], marker)
        self._emit(FeedEvent(STARTED, identity, expires, reason))
        return Penalty(identity, ttl_ms, expires, reason), True

    def _decayed(self, rec: RepRecord | None, now: int) -> Reputation | None:
        if rec is None or rec[4] <= now:
            return None
        age, hl = now - rec[3], self._half_life_ms
        return Reputation(decay(rec[0], age, hl), decay(rec[1], age, hl), decay(rec[2], age, hl))

    def _bump(
        self, rec: RepRecord | None, events: int, weighted: float, penalties: int, now: int
    ) -> RepRecord:
        """The counters decayed to `now` plus these (one decay factor for all three)."""
        if rec is None or rec[4] <= now:
            return (float(events), weighted, float(penalties), now, now + self._rep_ttl_ms)
        f = 2.0 ** (-max(0, now - rec[3]) / self._half_life_ms)
        return (
            rec[0] * f + events,
            rec[1] * f + weighted,
            rec[2] * f + penalties,
            now,
            now + self._rep_ttl_ms,
        )

    def _bump_rep(
        self, address: str, events: int, weighted: float, penalties: int, now: int
    ) -> Reputation:
        new = self._bump(self._rep.d.get(address), events, weighted, penalties, now)
        self._rep.put(address, new, now)
        return Reputation(new[0], new[1], new[2])

    async def flush_neighbourhoods(self, deltas: Sequence[NeighbourhoodDelta]) -> list[Reputation]:
        now = self._clock()
        out = []
        for d in deltas:
            held = self._nbs.d.get(d.name)
            if not (d.events or d.penalties):
                out.append(self._decayed(held[0] if held else None, now) or Reputation())
                continue
            new = self._bump(
                held[0] if held else None, d.events, d.weighted_errors, d.penalties, now
            )
            self._nbs.put(d.name, (new, d.label or (held[1] if held else d.name)), now)
            out.append(Reputation(new[0], new[1], new[2]))
        return out

    async def worst_neighbourhoods(self, limit: int) -> list[tuple[str, float]]:
        now = self._clock()
        rows = []
        for rec, label in list(self._nbs.d.values()):
            r = self._decayed(rec, now)
            if r is not None and r.weighted_errors > 0:
                rows.append((label, r.weighted_errors))
        return heapq.nlargest(limit, rows, key=lambda row: row[1])

    async def neighbourhood_held(self, name: str, label: str) -> list[Held]:
        now = self._clock()
        held = self._nbs.d.get(name)
        r = self._decayed(held[0] if held else None, now)
        if held is None or r is None:
            return []
        where = f"memory:neighbourhoods[{name}]"
        return [Held("neighbourhood_reputation", name, where, held[0][4], r.describe())]

    def _set_marker(self, key: str, marker: int) -> None:
        rec = self._windows.get(key)
        if rec is not None:
            self._windows[key] = (*rec[:_MARK], marker, *rec[_MARK + 1 :])

    async def lift(self, identity: str, record: LiftRecord) -> bool:
        now = self._clock()
        if self._active(identity, now) is None:
            return False
        expires, reason, _ = self._penalties.pop(identity)
        self._index.remove((expires, identity))
        self._lifts.put(identity, (record, now + self._window_ms), now)
        self._emit(FeedEvent(LIFTED, identity, 0, reason))
        return True

    async def held(self, identity: str, mark: str) -> list[Held]:
        """Every table scanned for the address and the clients behind it (`A` and `A#...`):
        O(tracked identities), in slices that serve the event loop in between."""
        now, sub = self._clock(), identity + "#"
        out: list[Held] = []

        def about(key: str) -> bool:
            return key == identity or key.startswith(sub)

        tables: list[tuple[str, dict[str, Any]]] = [
            ("windows", self._windows),
            ("penalties", self._penalties),
            ("shared", self._shared.d),
            ("offences", self._offences.d),
            ("lifts", self._lifts.d),
            ("reputation", self._rep.d),
        ]
        for table, d in tables:
            keys = list(d)
            for start in range(0, len(keys), 50_000):
                for key in keys[start : start + 50_000]:
                    if about(key) and (value := d.get(key)) is not None:
                        out.extend(self._held_one(table, key, value, now, mark))
                await asyncio.sleep(0)
        return out

    def _held_one(self, table: str, key: str, value: Any, now: int, mark: str) -> list[Held]:
        where = f"memory:{table}[{key}]"
        if table == "windows":
            counts = [0] * outcomes.COUNT
            for i in range(_H, len(value), 2):
                counts[~value[i] & _SLOT_MASK] += value[i + 1]
            expires = self._record_expiry(value)
            out = [Held("window", key, where, expires, describe_counts(counts))]
            fps = _size(value[_CUR]) + _size(value[_PREV])
            if fps:
                out.append(
                    Held(
                        "client_fingerprints",
                        key,
                        where,
                        expires,
                        f"{fps} client fingerprints (30-bit hashes)",
                    )
                )
            return out
        if table == "penalties":
            expires, reason, _ = value
            return [Held("penalty", key, where, expires, reason)] if expires > now else []
        if table == "shared":
            expires, name = value
            return [Held("shared_mark", key, where, expires, "shared address (detected)", name)]
        if table == "reputation":
            r = self._decayed(value, now)
            return [Held("reputation", key, where, value[4], r.describe())] if r else []
        if table == "offences":
            count, expires = value
            return [Held("offence_counter", key, where, expires, f"{count} offences")]
        record, expires = value
        return [Held("last_lift", key, where, expires, record.describe())]

    async def last_lift(self, identity: str) -> LiftRecord | None:
        hit = self._lifts.get(identity, self._clock())
        return hit[0] if hit else None

    # --- windows

    def _tick(self, now: int) -> int:
        """The current bucket; refreshes the shared per-bucket objects when it changes."""
        b = now // self._bucket_ms
        if b != self._b:
            self._b = b
            self._codes = tuple(~(b * _SLOTS_PER_BUCKET + o) for o in range(outcomes.COUNT))
            self._oldest = b - self._nbuckets + 1
            self._stale = ~(self._oldest * _SLOTS_PER_BUCKET)  # codes <= this still count
        g = now // self._window_ms
        if g != self._g:
            self._g = g
        return self._b

    def _record_expiry(self, rec: Record) -> int:
        """A window dies when its newest bucket has left it; an address's record also
        lives while its newer fingerprint generation is still read (gen + 2 windows)."""
        window_end: int = (rec[_LAST] + 1 + self._nbuckets) * self._bucket_ms
        gen: int = rec[_GEN]
        return window_end if gen < 0 else max(window_end, (gen + 2) * self._window_ms)

    def _write(
        self, key: str, counts: Sequence[tuple[int, int]], now: int, fp: int | None
    ) -> Record:
        b = self._b
        old = self._windows.get(key)
        head = _NEW if old is None else old
        pairs: list[Any]
        if old is not None and old[_LAST] + self._nbuckets >= b:  # the window is alive
            marker = old[_MARK]
            if old[_LAST] == b:
                pairs = list(old[_H:])
            else:  # first write in a new bucket: forget the buckets that left the window
                stale = self._stale
                pairs = []
                for i in range(_H, len(old), 2):
                    if old[i] <= stale:
                        pairs += old[i : i + 2]
        else:  # a fresh window: only an active penalty's marker survives (as in Redis)
            held = self._penalties.get(key)
            marker = held[2] if held is not None and held[0] > now else -1
            pairs = []
        codes = self._codes
        for outcome, n in counts:
            code = codes[outcome]
            try:
                i = pairs.index(code)  # codes are negative, counts never are
            except ValueError:
                pairs += (code, n)
            else:
                pairs[i + 1] += n
        gen, cur, prev, union = head[_GEN], head[_CUR], head[_PREV], head[_UNION]
        extra = _extra(head)
        if fp is not None:
            g = self._g
            if gen != g:
                if gen == g - 1:
                    prev, cur, union = cur, None, _size(cur)
                else:
                    prev = cur = None
                    union = 0
                gen = g
            if not _has(cur, fp) and _size(cur) < self._fp_cap:
                if cur is None:
                    cur = fp
                elif isinstance(cur, int):
                    cur = {cur, fp}
                else:
                    cur.add(fp)
                if not _has(prev, fp):
                    union += 1
        rec = (b, marker, gen, cur, prev, union, *pairs)
        grow = 1 + _extra(rec) if old is None else _extra(rec) - extra
        self._windows_t.store(key, rec, now, old is None, grow)
        return rec

    def _totals(self, rec: Record | None) -> tuple[int, ...]:
        """Counts of the evidence that still counts: inside the window, after the bucket a
        penalty already used."""
        if rec is None:
            return self._zero
        limit = self._stale
        marker: int = rec[_MARK]
        if marker >= self._oldest:
            limit = ~((marker + 1) * _SLOTS_PER_BUCKET)
        totals = [0] * outcomes.COUNT
        for i in range(_H, len(rec), 2):
            code = rec[i]
            if code <= limit:
                totals[~code & _SLOT_MASK] += rec[i + 1]
        return tuple(totals)

    def _distinct(self, rec: Record | None) -> int:
        """Distinct client fingerprints in this generation and the one before."""
        if rec is None:
            return 0
        gen: int = rec[_GEN]
        if gen == self._g:
            union: int = rec[_UNION]
            return union
        return _size(rec[_CUR]) if gen == self._g - 1 else 0

    def _one(self, item: ReportItem, now: int) -> Window:
        writing = bool(item.counts)
        address = item.identity
        fp = item.fingerprint
        rec: Record | None
        if writing:
            rec = self._write(address, item.counts, now, hash(fp) & _FP_MASK if fp else None)
        else:
            rec = self._windows.get(address)
        counts = self._totals(rec)
        penalty = self._active(address, now)
        if writing:
            events = sum(n for _, n in item.counts)
            reputation = self._bump_rep(address, events, item.weighted, 0, now)
        else:
            reputation = self._decayed(self._rep.d.get(address), now) or Reputation()
        if not fp:
            return Window(counts, penalty, reputation=reputation)
        distinct = self._distinct(rec)
        shared = item.shared_configured or self._shared.get(address, now) is not None
        newly = False
        if not shared and writing and distinct > self._k:
            self._shared.put(address, (now + self._shared_ttl_ms, item.mark), now)
            shared = newly = True
            self._emit(FeedEvent(SHARED, item.mark, now + self._shared_ttl_ms))
        if not (shared or distinct >= 2):
            # Not told apart, but the client may hold a penalty of its own (cold start).
            sub_penalty = self._active(item.sub_identity, now) if self._penalties else None
            return Window(counts, penalty, distinct, shared, newly, None, sub_penalty, reputation)
        sub = item.sub_identity
        sub_rec = self._write(sub, item.counts, now, None) if writing else self._windows.get(sub)
        return Window(
            counts,
            penalty,
            distinct,
            shared,
            newly,
            self._totals(sub_rec),
            self._active(sub, now),
            reputation,
        )

    async def record(self, items: Sequence[ReportItem]) -> list[Window]:
        now = self._clock()
        self._tick(now)
        return [self._one(item, now) for item in items]

    # --- fleet-wide figures

    async def count_penalties(self) -> int:
        return self._index.count_from((self._clock() + 1, ""))

    async def list_penalties(
        self, after: PageCursor | None, limit: int
    ) -> tuple[list[Penalty], PageCursor | None]:
        """One page in (expiry, identity) order: O(log n + limit), whatever the cursor.

        Raises ValueError (and nothing else) for a cursor that names no shard of this
        store (there is one, 0: a crafted page token) or a limit below one."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if after is not None and after.shard != 0:
            raise ValueError("not a page token from this service")
        now = self._clock()
        floor = (now + 1, "")
        if after is not None and (after.expires_at_ms, after.identity) >= floor:
            rows = self._index.iterate((after.expires_at_ms, after.identity), after=True)
        else:
            rows = self._index.iterate(floor, after=False)
        page: list[Penalty] = []
        more = False
        for expires, identity in rows:
            held = self._penalties.get(identity)
            if held is None or held[0] != expires:
                continue  # cannot happen for a live entry; be safe
            if len(page) == limit:
                more = True
                break
            page.append(Penalty(identity, expires - now, expires, held[1]))
        cursor = PageCursor(0, page[-1].expires_at_ms, page[-1].identity) if more else None
        return page, cursor

    async def flush_stats(self, delta: StatsDelta) -> None:
        now = self._clock()
        if delta.events:
            row = self._baseline.setdefault(now // self._bucket_ms, [0.0, 0.0])
            row[0] += delta.events
            row[1] += delta.weighted_errors
        if delta.degraded:
            self._degraded[delta.replica] = now
        if delta.identities:
            seen = self._tracked.setdefault(now // self._window_ms, _Distinct())
            identities = list(delta.identities)
            for start in range(0, len(identities), 2000):  # a slice at a time (~1 ms)
                if start:
                    await asyncio.sleep(0)
                seen.add(identities[start : start + 2000])

    async def fleet_stats(self) -> FleetStats:
        now = self._clock()
        oldest = now // self._bucket_ms - self._nbuckets + 1
        events = sum(r[0] for b, r in self._baseline.items() if b >= oldest)
        errors = sum(r[1] for b, r in self._baseline.items() if b >= oldest)
        gen = now // self._window_ms
        parts = [d for g, d in self._tracked.items() if g in (gen, gen - 1)]
        return FleetStats(
            active_penalties=await self.count_penalties(),
            tracked_identities=_Distinct.union_count(parts) if parts else 0,
            shared_addresses=self._shared.live(now),
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
        penalties = [
            Penalty(i, e - now, e, r) for i, (e, r, _) in self._penalties.items() if e > now
        ]
        shared = [(m, exp) for exp, m in self._shared.d.values() if exp > now]
        allow = [e for _, e in self._allow.items() if e.expires_at_ms > now]
        return penalties, shared, allow

    def snapshot_raw(self) -> RawSnapshot:
        """`snapshot` as plain copies (what the watch hub keeps), without Penalty objects."""
        now = self._clock()
        penalties = {i: (e, r) for i, (e, r, _) in self._penalties.items() if e > now}
        shared = {m: exp for exp, m in self._shared.d.values() if exp > now}
        allow = [e for _, e in self._allow.items() if e.expires_at_ms > now]
        return penalties, shared, allow

    # --- housekeeping

    def _trim_penalties(self, now: int) -> int:
        """Drop leading index entries that expired (at most a block); how many."""
        gone = self._index.pop_expired(now)
        for expires, identity in gone:
            held = self._penalties.get(identity)
            if held is not None and held[0] == expires:
                del self._penalties[identity]
        return len(gone)

    def _sweep_work(self) -> Iterator[int]:
        """Everything the sweep does, as steps (each yields the entries it handled)."""
        now = self._clock()
        yield from self._windows_t.expire(now)
        while n := self._trim_penalties(now):
            yield n
        for table in (self._shared, self._offences, self._lifts, self._rep):
            yield from table.expire(now)
        yield from self._nbs.expire(now)
        gen = now // self._window_ms
        for g in [g for g in self._tracked if g < gen - 1]:
            del self._tracked[g]
        oldest = now // self._bucket_ms - self._nbuckets + 1
        for b in [b for b in self._baseline if b < oldest]:
            del self._baseline[b]
        for r in [r for r, t in self._degraded.items() if t <= now - 60_000]:
            del self._degraded[r]
        for cidr, entry in self._allow.items():
            if entry.expires_at_ms <= now:
                self._allow.remove(parse_network(cidr))
        yield 1

    def sweep(self) -> None:
        """Drop everything expired, in one go: nothing outlives its window or penalty.

        For tests and the simulator; the running store uses `sweep_incrementally`.
        """
        for _ in self._sweep_work():
            pass

    async def sweep_incrementally(self) -> None:
        """`sweep` in slices of about `sweep_slice` entries (and at most ~1 ms), serving
        the event loop between slices."""
        work = self._sweep_work()
        finished = False
        while not finished:
            deadline = time.perf_counter() + _SLICE_SECONDS
            done = 0
            finished = True
            for n in work:
                done += n
                if done >= self._sweep_slice or time.perf_counter() > deadline:
                    finished = False
                    break
            self.sweep_slices += 1
            if not finished:
                await asyncio.sleep(0)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._bucket_ms / 1000)
            await self.sweep_incrementally()
