"""The watch hub: WatchPenalties streams fed in bounded memory, whatever the readers do.

MX-side live replicas follow `WatchPenalties`: a snapshot of active penalties, shared
addresses and the allowlist, then every change. A reader is a remote party and may be
slow, stalled or hostile, so nothing here grows with what a reader fails to read:

- **One event log for all watchers.** Every change is serialized once into a ring of
  the last `log_size` events (sequence numbered). A watcher is only a cursor into it; a
  watcher whose cursor falls off the ring has missed changes and is ended with
  `RESOURCE_EXHAUSTED` (it watches again and gets a fresh snapshot).
- **One snapshot for many watchers.** A snapshot is taken at a sequence number and
  serialized once, in chunks built in slices that yield to the event loop; watchers that
  arrive while it is fresh (`snapshot_max_age`) and the ring still covers its sequence
  share it, then replay the events after it. A hundred replicas re-subscribing at once
  cost one snapshot, not a hundred.
- **Bounded writes.** The server's HTTP/2 write buffer is bounded (`grpc.http2.
  write_buffer_size` in `penaltyd.server`), so a write completes only when the reader's
  flow-control window takes it; a write that does not complete within `stall_seconds`
  ends the stream with `RESOURCE_EXHAUSTED` and a log line.
- **Bounded in time.** An event is kept at most `max_age` seconds (the longest a
  penalty can last): the ring names identities, and nothing may hold one longer than
  docs/privacy.md says. A watcher that far behind is ended like one that fell off the ring.
- **Exact clocks.** Events are stored without `store_now_unix_ms`; it is appended at
  write time (a serialized field appended to a message overrides it, protobuf merge
  semantics), so live replicas convert expiry instants with a fresh offset.

When the feed is lost (`RESYNC`) every watcher is ended with `UNAVAILABLE`: changes may
have been missed, and a replica must re-snapshot rather than answer from a stale view.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import structlog

from penalty.v1 import penalty_pb2 as pb
from penaltyd.events import ALLOW_ADDED, ALLOW_REMOVED, LIFTED, RESYNC, SHARED, STARTED, FeedEvent
from penaltyd.store.base import AllowEntry, RawSnapshot

log = structlog.get_logger("penaltyd.watch")

_TURN_SECONDS = 0.05  # a snapshot write slower than this gives its sending turn up
Kind = pb.PenaltyEvent.Kind


class WatchEnded(Exception):
    """A watcher must stop: `code` is the gRPC status name, `message` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _now_field(now_ms: int) -> bytes:
    """`store_now_unix_ms` (field 5, varint) serialized on its own, to append to an event."""
    return pb.PenaltyEvent(store_now_unix_ms=now_ms).SerializeToString()


def allow_message(e: AllowEntry) -> pb.AllowEntry:
    return pb.AllowEntry(
        cidr=e.cidr,
        expires_at_unix_ms=e.expires_at_ms,
        note=e.note,
        actor=e.actor,
        created_at_unix_ms=e.created_at_ms,
    )


@dataclass(slots=True)
class _Snapshot:
    seq: int  # the log's sequence number when the snapshot was taken
    epoch: int
    built_at: float  # monotonic
    chunks: list[bytes]  # KIND_SNAPSHOT_CHUNK events, serialized (store_now appended later)
    raw: RawSnapshot  # for watchers that want one event per entry


class WatchHub:
    """Fans feed events out to watchers; see the module docstring."""

    def __init__(
        self,
        snapshot: Callable[[], RawSnapshot],
        now_ms: Callable[[], int],
        reveal: Callable[[str, str], tuple[str, str, str]],
        done: pb.PenaltyEvent,
        *,
        log_size: int = 100_000,
        chunk_size: int = 1000,
        snapshot_max_age: float = 1.0,
        stall_seconds: float = 30.0,
        snapshot_senders: int = 4,
        address: Callable[[str], str] | None = None,
        max_age: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._take_snapshot = snapshot
        self._now_ms = now_ms
        self._reveal = reveal  # (stored identity, reason) -> (identity, sentence, client marks)
        self._address: Callable[[str], str] = address or (lambda a: a)  # shared mark labels
        self._done = done.SerializeToString()  # SNAPSHOT_DONE with template and rules
        self._size = log_size
        self._ring: list[bytes] = [b""] * log_size
        self.seq = 0  # sequence number of the newest event
        self._event_max_age = max_age  # events older than this are forgotten
        self._clock = clock
        self._times: collections.deque[tuple[float, int]] = collections.deque()  # (t, seq)
        self._floor = 0  # newest sequence number dropped for its age
        self.epoch = 0  # bumped on RESYNC: every watcher of an older epoch ends
        self._chunk = chunk_size
        self._snapshot_max_age = snapshot_max_age  # a snapshot is shared this long
        self.stall_seconds = stall_seconds
        self._changed = asyncio.Event()
        self._senders = asyncio.Semaphore(snapshot_senders)
        self._snapshot: _Snapshot | None = None
        self._building: asyncio.Task[_Snapshot] | None = None
        self.watchers = 0
        self.ended_slow = 0
        self.snapshots_built = 0

    # --- input: the store's feed

    def publish(self, event: FeedEvent) -> None:
        """Called for every feed event (synchronously, from the store's listener)."""
        if event.kind == RESYNC:
            self.epoch += 1
            self._snapshot = None
            self._wake()
            return
        self.seq += 1
        self._ring[self.seq % self._size] = self._encode(event)
        now = self._clock()
        times = self._times
        if not times or times[-1][0] < now - 1.0:
            times.append((now, self.seq))  # one mark per second at most
        else:
            times[-1] = (times[-1][0], self.seq)
        self.expire(now)
        self._wake()

    def expire(self, now: float | None = None) -> None:
        """Forget events older than `max_age` (called on every publish and watch turn)."""
        oldest = (self._clock() if now is None else now) - self._event_max_age
        times = self._times
        while times and times[0][0] < oldest:
            _, upto = times.popleft()
            for seq in range(max(self._floor + 1, self.seq - self._size + 1), upto + 1):
                self._ring[seq % self._size] = b""
            self._floor = max(self._floor, upto)

    def close(self) -> None:
        """End every watcher (shutdown)."""
        self.publish(FeedEvent(RESYNC, "closing"))

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _encode(self, event: FeedEvent) -> bytes:
        kind = event.kind
        if kind == STARTED:
            remaining = max(0, event.expires_at_ms - self._now_ms())
            identity, reason, client = self._reveal(event.identity, event.reason)
            msg = pb.PenaltyEvent(
                kind=Kind.KIND_PENALTY_STARTED,
                penalty=pb.Penalty(
                    identity=identity,
                    seconds_left=max(1, -(-remaining // 1000)),
                    expires_at_unix_ms=event.expires_at_ms,
                    reason=reason,
                    client=client,
                ),
            )
        elif kind == LIFTED:
            identity, _, _ = self._reveal(event.identity, event.reason)
            msg = pb.PenaltyEvent(
                kind=Kind.KIND_PENALTY_LIFTED, penalty=pb.Penalty(identity=identity)
            )
        elif kind == SHARED:
            msg = pb.PenaltyEvent(
                kind=Kind.KIND_SHARED_MARKED, address=self._address(event.identity)
            )
        elif kind == ALLOW_ADDED:
            entry = AllowEntry.decode(event.reason)
            msg = pb.PenaltyEvent(kind=Kind.KIND_ALLOW_ADDED, allow=allow_message(entry))
        else:
            assert kind == ALLOW_REMOVED, event
            msg = pb.PenaltyEvent(
                kind=Kind.KIND_ALLOW_REMOVED, allow=pb.AllowEntry(cidr=event.identity)
            )
        return msg.SerializeToString()

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still in the ring."""
        return max(1, self.seq - self._size + 1, self._floor + 1)

    # --- snapshots

    async def _snapshot_for_new_watcher(self) -> _Snapshot:
        snap = self._snapshot
        if (
            snap is not None
            and snap.epoch == self.epoch
            and time.monotonic() - snap.built_at <= self._snapshot_max_age
            and snap.seq >= self.first_seq - 1
        ):
            return snap
        if self._building is None or self._building.done():
            self._building = asyncio.create_task(self._build(), name="watch-snapshot")
        return await asyncio.shield(self._building)

    async def _build(self) -> _Snapshot:
        # Taken at one instant (a copy of the view), serialized in slices that yield.
        seq, epoch = self.seq, self.epoch
        raw = self._take_snapshot()
        penalties, shared, allow = raw
        now = self._now_ms()
        chunks: list[bytes] = []
        entries = iter(penalties.items())  # a private copy: safe to iterate across yields
        for _ in range(0, len(penalties), self._chunk):
            event = pb.PenaltyEvent(kind=Kind.KIND_SNAPSHOT_CHUNK)
            for stored, (expires, reason) in itertools.islice(entries, self._chunk):
                if expires <= now:
                    continue
                identity, sentence, client = self._reveal(stored, reason)
                event.penalties.add(
                    identity=identity,
                    seconds_left=max(1, -(-(expires - now) // 1000)),
                    expires_at_unix_ms=expires,
                    reason=sentence,
                    client=client,
                )
            chunks.append(event.SerializeToString())
            await asyncio.sleep(0)
        addresses = [self._address(a) for a, exp in shared.items() if exp > now]
        for start in range(0, len(addresses), self._chunk * 10):
            chunks.append(
                pb.PenaltyEvent(
                    kind=Kind.KIND_SNAPSHOT_CHUNK,
                    addresses=addresses[start : start + self._chunk * 10],
                ).SerializeToString()
            )
        live = [e for e in allow if e.expires_at_ms > now]
        for start in range(0, len(live), self._chunk):
            chunks.append(
                pb.PenaltyEvent(
                    kind=Kind.KIND_SNAPSHOT_CHUNK,
                    allow_entries=[allow_message(e) for e in live[start : start + self._chunk]],
                ).SerializeToString()
            )
        self.snapshots_built += 1
        snap = _Snapshot(seq, epoch, time.monotonic(), chunks, raw)
        if epoch == self.epoch:
            self._snapshot = snap
        return snap

    def _entries(self, raw: RawSnapshot) -> Iterator[bytes]:
        """One serialized event per snapshot entry, for watchers that did not ask for
        chunks: generated one at a time from the shared copy (it is never modified), so a
        watcher holds one event, not a serialized copy of the whole snapshot."""
        penalties, shared, allow = raw
        now = self._now_ms()
        for stored, (exp, reason) in penalties.items():
            if exp > now:
                identity, sentence, client = self._reveal(stored, reason)
                yield pb.PenaltyEvent(
                    kind=Kind.KIND_PENALTY_STARTED,
                    penalty=pb.Penalty(
                        identity=identity,
                        seconds_left=max(1, -(-(exp - now) // 1000)),
                        expires_at_unix_ms=exp,
                        reason=sentence,
                        client=client,
                    ),
                ).SerializeToString()
        for address, exp in shared.items():
            if exp > now:
                yield pb.PenaltyEvent(
                    kind=Kind.KIND_SHARED_MARKED, address=self._address(address)
                ).SerializeToString()
        for entry in allow:
            if entry.expires_at_ms > now:
                yield pb.PenaltyEvent(
                    kind=Kind.KIND_ALLOW_ADDED, allow=allow_message(entry)
                ).SerializeToString()

    # --- output: one watcher

    async def write(
        self, write: Callable[[bytes], Awaitable[None]], data: bytes, bulk: bool
    ) -> None:
        """Write one event within `stall_seconds` (TimeoutError otherwise).

        Snapshot chunks (`bulk`) are written a few watchers at a time: a hundred replicas
        re-subscribing at once then cost the same total work, but never a hundred writes
        per turn of the event loop ahead of the checks. A turn is held only while the
        write progresses: a write still waiting after `_TURN_SECONDS` (a reader that does
        not read) gives its turn up and waits alone, so stalled readers never hold the
        others back.
        """
        if not bulk:
            async with asyncio.timeout(self.stall_seconds):
                await write(data)
            return
        async with self._senders:
            pending = asyncio.ensure_future(write(data))
            done, _ = await asyncio.wait((pending,), timeout=_TURN_SECONDS)
        if not done:
            try:
                async with asyncio.timeout(self.stall_seconds - _TURN_SECONDS):
                    await pending
            finally:
                pending.cancel()
        else:
            pending.result()

    async def stream(self, chunked: bool) -> AsyncIterator[tuple[bytes, bool]]:
        """The serialized events for one watcher: snapshot, SNAPSHOT_DONE, live changes,
        each with whether it is part of the snapshot (see `write`).

        Raises `WatchEnded` when the watcher must stop (feed lost, fell behind). The
        caller writes each item within `stall_seconds` or ends the stream.
        """
        self.watchers += 1
        try:
            snap = await self._snapshot_for_new_watcher()
            epoch, cursor = snap.epoch, snap.seq
            if chunked:
                for chunk in snap.chunks:
                    yield chunk + _now_field(self._now_ms()), True
            else:
                for i, body in enumerate(self._entries(snap.raw)):
                    yield body + _now_field(self._now_ms()), True
                    if i % 1000 == 999:
                        await asyncio.sleep(0)
            yield self._done + _now_field(self._now_ms()), False
            while True:
                if self.epoch != epoch:
                    raise WatchEnded("UNAVAILABLE", "penalty feed resynced; watch again")
                if cursor < self.first_seq - 1:
                    self.ended_slow += 1
                    raise WatchEnded(
                        "RESOURCE_EXHAUSTED",
                        f"watcher fell more than {self._size} events or "
                        f"{self._event_max_age:g} s behind; watch again",
                    )
                if cursor == self.seq:
                    await self._changed.wait()
                    continue
                self.expire()
                if cursor < self.first_seq - 1:
                    continue  # ended above, on the next turn
                cursor += 1
                yield self._ring[cursor % self._size] + _now_field(self._now_ms()), False
        finally:
            self.watchers -= 1
