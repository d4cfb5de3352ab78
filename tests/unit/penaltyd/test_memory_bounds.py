"""The embedded store under hostile input: bounded memory, a sweep that serves the event
loop, paging in index order whatever changes underneath (see `penaltyd.store.memory`)."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from penalty.outcomes import COUNT as N_OUTCOMES
from penaltyd.store import memory
from penaltyd.store.base import Escalation, LiftRecord, PageCursor, ReportItem, StatsDelta
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import UNKNOWN, Clock

BUCKET_MS = 1000
WINDOW_MS = 10_000


def make(clock: Clock, **bounds: int) -> MemoryStore:
    return MemoryStore(
        window_seconds=10, bucket_seconds=1, shared_min_sub_identities=3, clock=clock, **bounds
    )


def ip(n: int) -> str:
    return f"198.18.{n >> 8 & 255}.{n & 255}"


def reports(identities: list[str], fp: str = "") -> list[ReportItem]:
    return [ReportItem(i, [(UNKNOWN, 1)], fp) for i in identities]


# --- memory bounds


async def test_a_full_table_evicts_the_least_recently_written_first() -> None:
    clock = Clock()
    store = make(clock, max_identities=100)
    await store.record(reports([ip(n) for n in range(100)]))
    clock.now += BUCKET_MS
    await store.record(reports([ip(n) for n in range(10)]))  # written again: renewed
    clock.now += BUCKET_MS
    await store.record(reports([ip(n) for n in range(100, 150)]))  # 50 more: 50 must go
    assert store.tracked_windows == store.identity_units == 100
    assert store.windows_evicted == store.evicted == 50
    assert set(store.window_buckets()) == {ip(n) for n in [*range(10), *range(60, 150)]}
    (w,) = await store.record([ReportItem(ip(20), ())])
    assert w.counts == (0,) * N_OUTCOMES  # evicted: its evidence is forgotten (fail open)


async def test_active_penalties_are_never_evicted() -> None:
    clock = Clock()
    store = make(clock, max_identities=50)
    await store.record(reports([ip(n) for n in range(10)]))
    await store.start_penalties([(ip(n), 60_000, "r") for n in range(10)])
    for k in range(5):
        clock.now += BUCKET_MS
        await store.record(reports([ip(1000 + 100 * k + n) for n in range(100)]))
        assert store.tracked_windows <= 50
    assert not set(store.window_buckets()) & {ip(n) for n in range(10)}  # windows went
    assert all(store.local_penalty(ip(n))[1] is not None for n in range(10))  # penalties stay
    assert await store.count_penalties() == 10
    (w,) = await store.record(reports([ip(3)]))
    assert w.penalty is not None


async def test_a_full_penalty_table_refuses_new_penalties() -> None:
    clock = Clock()
    store = make(clock, max_penalties=10)
    started = await store.start_penalties([(ip(n), 5_000, "r") for n in range(15)])
    assert [created for _, created in started] == [True] * 10 + [False] * 5
    assert all(p.remaining_ms == 0 for p, _ in started[10:])
    assert store.penalties_refused == 5
    assert await store.count_penalties() == 10
    assert store.local_penalty(ip(12)) == (True, None)  # failed open: no penalty
    existing, created = await store.start_penalty(ip(3), 5_000, "r")
    assert not created
    assert existing.remaining_ms == 5_000  # an active one is returned, not refused
    assert store.penalties_refused == 5
    clock.now += 5_001
    _, created = await store.start_penalty(ip(12), 5_000, "r")  # the expired made room
    assert created
    assert await store.count_penalties() == 1


async def test_marks_offences_and_lift_records_are_bounded_too() -> None:
    clock = Clock()
    store = make(clock, max_penalties=5)
    for a in range(8):  # K = 3: a fourth client marks an address shared
        for f in range(4):
            await store.record([ReportItem(ip(a), [(UNKNOWN, 1)], f"fp{f}")])
    _, shared, _ = store.snapshot()
    assert {a for a, _ in shared} == {ip(a) for a in range(3, 8)}  # the oldest forgotten
    assert (await store.fleet_stats()).shared_addresses == 5
    esc = Escalation(multiplier=2.0, cap_ms=60_000, memory_ms=60_000)
    for n in range(8):
        await store.start_penalty(ip(100 + n), 1000, "r", esc)
        assert await store.lift(ip(100 + n), LiftRecord("desk", f"n{n}", n))
    assert await store.last_lift(ip(100)) is None
    assert await store.last_lift(ip(107)) == LiftRecord("desk", "n7", 7)
    first_again, _ = await store.start_penalty(ip(100), 1000, "r", esc)
    assert first_again.remaining_ms == 1000  # its offence was forgotten: not escalated
    last_again, _ = await store.start_penalty(ip(107), 1000, "r", esc)
    assert last_again.remaining_ms == 2000
    assert store.evicted >= 3 * 3


async def test_rewriting_the_same_records_does_not_fill_the_tables() -> None:
    clock = Clock()
    store = make(clock, max_penalties=3)
    esc = Escalation(multiplier=2.0, cap_ms=4_000, memory_ms=60_000)
    for _ in range(20):  # the same identity offends and is lifted, again and again
        _, created = await store.start_penalty(ip(1), 1000, "r", esc)
        assert created
        assert await store.lift(ip(1), LiftRecord("t", "", 0))
    await store.start_penalty(ip(2), 1000, "r", esc)
    assert await store.lift(ip(2), LiftRecord("t", "", 0))
    assert store.evicted == 0
    again, _ = await store.start_penalty(ip(1), 1000, "r", esc)
    assert again.remaining_ms == 4_000  # its offences are all still remembered (capped)
    assert await store.last_lift(ip(1)) is not None


async def test_fingerprints_per_address_are_capped() -> None:
    clock = Clock()
    store = make(clock)  # K = 3: at most max(4 K, 1000) fingerprints per generation
    address = "198.51.100.1"
    for start in range(0, 1500, 250):
        await store.record(
            [ReportItem(address, [(UNKNOWN, 1)], f"h{n}") for n in range(start, start + 250)]
        )
    (w,) = await store.record([ReportItem(address, [(UNKNOWN, 1)], "one more")])
    assert w.distinct >= 1000
    assert w.shared
    assert store.identity_units - store.tracked_windows == 1000  # the address's set, capped
    clock.now += 2 * WINDOW_MS
    store.sweep()
    assert store.tracked_windows == store.identity_units == 0


async def test_fingerprints_count_against_max_identities() -> None:
    clock = Clock()
    store = make(clock, max_identities=300)
    for start in range(0, 1200, 50):
        await store.record(
            [ReportItem("198.51.100.2", [(UNKNOWN, 1)], f"h{n}") for n in range(start, start + 50)]
        )
        assert store.identity_units <= 300
    assert store.windows_evicted > 0


async def test_a_penalty_uses_up_evidence_even_without_a_window() -> None:
    """As in Redis, where the penalty and its marker live in the window hash."""
    clock = Clock()
    store = make(clock)
    await store.start_penalty(ip(1), 60_000, "r")
    (w,) = await store.record(reports([ip(1)]))
    assert w.counts == (0,) * N_OUTCOMES  # this bucket was used by the penalty
    clock.now += BUCKET_MS
    (w,) = await store.record(reports([ip(1)]))
    assert w.counts[UNKNOWN] == 1


async def test_clients_are_remembered_for_their_generation_after_the_counts_left() -> None:
    """As Redis's per-generation HyperLogLogs outlive the window they were counted in."""
    clock = Clock()
    store = make(clock)
    await store.record([ReportItem(ip(2), [(UNKNOWN, 1)], "aaaa")])
    clock.now += WINDOW_MS + BUCKET_MS + 500  # the window has expired; the generation not
    (w,) = await store.record([ReportItem(ip(2), [(UNKNOWN, 1)], "bbbb")])
    assert w.distinct == 2
    assert w.counts[UNKNOWN] == 1
    assert w.sub_counts is not None
    assert w.sub_counts[UNKNOWN] == 1


async def test_tracked_identities_are_exact_when_few_and_bounded_when_many() -> None:
    clock = Clock()
    store = make(clock)
    await store.flush_stats(StatsDelta("r1", identities=frozenset(ip(n) for n in range(100))))
    assert (await store.fleet_stats()).tracked_identities == 100
    many = frozenset(f"2001:db8:{n:x}::/64" for n in range(30_000))
    await store.flush_stats(StatsDelta("r2", identities=many))
    tracked = (await store.fleet_stats()).tracked_identities
    assert abs(tracked - 30_100) < 30_100 * 0.04  # a HyperLogLog of fixed size now
    clock.now += 2 * WINDOW_MS
    store.sweep()
    assert (await store.fleet_stats()).tracked_identities == 0


# --- the sweep


async def test_the_sweep_runs_in_slices_that_serve_the_event_loop() -> None:
    clock = Clock()
    store = make(clock, sweep_slice=500)
    n = 30_000
    for start in range(0, n, 1000):
        await store.record(reports([f"2001:db8:{k:x}::/64" for k in range(start, start + 1000)]))
    await store.start_penalties([(ip(k), 1000, "r") for k in range(3000)])
    clock.now += 2 * WINDOW_MS
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(store.tracked_windows)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)
    slices = store.sweep_slices
    await store.sweep_incrementally()
    watcher.cancel()
    assert store.tracked_windows == 0
    assert await store.count_penalties() == 0
    assert store.snapshot_raw() == ({}, {}, [])
    at_least = n // (500 + 64)  # a slice ends at the first step (<= 64 entries) past 500
    assert store.sweep_slices - slices >= at_least
    progress = [x for x in seen if 0 < x < n]
    assert len(progress) >= at_least - 1  # the loop ran between slices and saw the progress
    assert seen == sorted(seen, reverse=True)


async def test_a_renewed_window_survives_the_sweep_of_its_first_slot() -> None:
    clock = Clock()
    store = make(clock)
    await store.record(reports([ip(1), ip(2)]))
    for _ in range(15):  # ip(1) keeps writing; ip(2) falls silent
        clock.now += BUCKET_MS
        await store.record(reports([ip(1)]))
        store.sweep()
    assert set(store.window_buckets()) == {ip(1)}
    (w,) = await store.record([ReportItem(ip(1), ())])
    assert w.counts[UNKNOWN] == 10  # the window's ten buckets


# --- paging


def _expected(store: MemoryStore, after: PageCursor | None) -> list[tuple[int, str]]:
    """The oracle: every active penalty (from the table, not the index), sorted."""
    penalties, _, _ = store.snapshot()
    rows = sorted((p.expires_at_ms, p.identity) for p in penalties)
    if after is not None:
        rows = [r for r in rows if r > (after.expires_at_ms, after.identity)]
    return rows


@pytest.mark.parametrize("seed", range(6))
async def test_paging_follows_the_index_order_under_changes(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    monkeypatch.setattr(memory._Index, "LOAD", 3)  # many small blocks: splits, empty blocks
    rng = random.Random(seed)
    clock = Clock()
    store = make(clock)
    esc = Escalation(multiplier=3.0, cap_ms=50_000, memory_ms=60_000)
    names = [ip(n) for n in range(60)]

    async def start_some(k: int) -> None:
        for _ in range(k):
            ttl = rng.choice([1000, 2000, 5000])
            await store.start_penalty(
                rng.choice(names), ttl, "r", esc if rng.random() < 0.5 else None
            )

    await start_some(80)
    for _ in range(4):  # page through several times, the table changing between pages
        cursor: PageCursor | None = None
        limit = rng.randint(1, 6)
        got: list[tuple[int, str]] = []
        while True:
            expected = _expected(store, cursor)
            assert await store.count_penalties() == len(_expected(store, None))
            page, cursor = await store.list_penalties(cursor, limit)
            rows = [(p.expires_at_ms, p.identity) for p in page]
            assert rows == expected[:limit]
            assert (cursor is None) == (len(expected) <= limit)
            got += rows
            if cursor is None:
                break
            cursor = PageCursor.decode(cursor.encode())
            op = rng.random()
            if op < 0.3:
                await start_some(3)
            elif op < 0.6 and expected:
                await store.lift(rng.choice(expected)[1], LiftRecord("t", "", 0))
            elif op < 0.9:
                clock.now += rng.randint(1, 700)
            else:
                store.sweep()
        assert got == sorted(set(got))
        await start_some(20)


async def test_paging_many_penalties_is_one_pass_of_the_index() -> None:
    clock = Clock()
    store = make(clock)
    ids = [f"2001:db8:{n:x}::/64" for n in range(20_000)]
    for start in range(0, len(ids), 1000):
        clock.now += 1
        batch = ids[start : start + 1000]
        await store.start_penalties(
            [(i, 600_000 if k % 7 == 0 else 300_000, "r") for k, i in enumerate(batch)]
        )
    cursor: PageCursor | None = None
    pages: list[list[str]] = []
    while True:
        page, cursor = await store.list_penalties(cursor, 1000)
        pages.append([p.identity for p in page])
        if cursor is None:
            break
    assert len(pages) == 20
    assert sorted(i for page in pages for i in page) == sorted(ids)


@given(
    shard=st.integers(-(2**70), 2**70),
    expires=st.integers(-(2**80), 2**80),
    identity=st.text(max_size=40),
    limit=st.integers(-2, 1001),
)
async def test_crafted_cursors_raise_only_value_error(
    shard: int, expires: int, identity: str, limit: int
) -> None:
    clock = Clock()
    store = make(clock)
    await store.start_penalties([(ip(n), 1000 + n, "r") for n in range(5)])
    for cursor in (PageCursor(shard, expires, identity), PageCursor(0, expires, identity)):
        with contextlib.suppress(ValueError):  # a round trip, where the token is one
            cursor = PageCursor.decode(cursor.encode())
        try:
            page, after = await store.list_penalties(cursor, limit)
        except ValueError:
            assert cursor.shard != 0 or limit < 1
            continue
        assert limit >= 1
        assert len(page) <= limit
        assert after is None or after.shard == 0
