"""The store contract: one suite, run against every backend (DESIGN.md section 5).

Subclasses provide `store` (a started store with a 10 s window of 1 s buckets, K = 3
distinct clients for a shared address) and `advance(ms)`: the memory store moves its
injected clock, Redis really waits (its clock is Redis's own `TIME`, which is the point).
"""

from __future__ import annotations

import pytest

from penalty.identity import parse_ip
from penalty.outcomes import COUNT as N_OUTCOMES
from penaltyd.events import ALLOW_ADDED, LIFTED, SHARED, STARTED, FeedEvent
from penaltyd.store.base import (
    AllowEntry,
    Escalation,
    LiftRecord,
    NeighbourhoodDelta,
    PageCursor,
    ReportItem,
    StatsDelta,
    Store,
    Window,
)
from tests.harness.builders import ACCEPTED, UNKNOWN

RELAY = 3
K = 3  # shared_min_sub_identities used by the contract stores
WINDOW_MS = 10_000


def counts(**by: int) -> tuple[int, ...]:
    out = [0] * N_OUTCOMES
    out[ACCEPTED] = by.get("accepted", 0)
    out[UNKNOWN] = by.get("unknown", 0)
    out[RELAY] = by.get("relay", 0)
    return tuple(out)


def item(identity: str, *pairs: tuple[int, int], fp: str = "", shared: bool = False) -> ReportItem:
    return ReportItem(identity, list(pairs), fp, shared)


class StoreContract:
    store: Store
    events: list[FeedEvent]

    async def advance(self, ms: int) -> None:
        raise NotImplementedError

    async def settle(self) -> None:
        """Let feed events reach the listener (Redis: a pub/sub hop)."""

    async def record(self, *items: ReportItem) -> list[Window]:
        return await self.store.record(list(items))

    async def read(self, identity: str, fp: str = "") -> Window:
        (w,) = await self.store.record([ReportItem(identity, (), fp)])
        return w

    # --- windows

    async def test_record_returns_window_after_update(self) -> None:
        (w,) = await self.record(item("203.0.113.7", (ACCEPTED, 2), (UNKNOWN, 3)))
        assert w.counts == counts(accepted=2, unknown=3)
        assert w.penalty is None
        assert w.sub_counts is None
        (w,) = await self.record(item("203.0.113.7", (UNKNOWN, 1)))
        assert w.counts == counts(accepted=2, unknown=4)

    async def test_batch_keeps_identities_apart(self) -> None:
        ws = await self.record(
            item("203.0.113.7", (UNKNOWN, 5)),
            item("203.0.113.8", (ACCEPTED, 7)),
            item("203.0.113.7", (RELAY, 1)),
        )
        assert [w.counts for w in ws] == [
            counts(unknown=5),
            counts(accepted=7),
            counts(unknown=5, relay=1),
        ]

    async def test_read_only_item_changes_nothing(self) -> None:
        await self.record(item("203.0.113.7", (UNKNOWN, 2)))
        assert (await self.read("203.0.113.7")).counts == counts(unknown=2)
        assert (await self.read("203.0.113.7")).counts == counts(unknown=2)
        assert (await self.read("203.0.113.9")).counts == counts()

    async def test_events_leave_the_window(self) -> None:
        await self.record(item("203.0.113.7", (UNKNOWN, 4)))
        await self.advance(WINDOW_MS // 2)
        (w,) = await self.record(item("203.0.113.7", (ACCEPTED, 1)))
        assert w.counts == counts(unknown=4, accepted=1)
        await self.advance(WINDOW_MS // 2 + 1100)  # the first bucket is now out of the window
        assert (await self.read("203.0.113.7")).counts == counts(accepted=1)

    # --- clients behind one address

    async def test_one_client_is_not_told_apart(self) -> None:
        for _ in range(3):
            (w,) = await self.record(item("203.0.113.7", (UNKNOWN, 1), fp="aaaa"))
        assert w.distinct == 1
        assert w.sub_counts is None
        assert not w.shared

    async def test_second_client_gets_its_own_window(self) -> None:
        await self.record(item("198.51.100.7", (ACCEPTED, 5), fp="aaaa"))
        (w,) = await self.record(item("198.51.100.7", (UNKNOWN, 2), fp="bbbb"))
        assert w.distinct == 2
        assert not w.shared
        assert w.counts == counts(accepted=5, unknown=2)
        assert w.sub_counts == counts(unknown=2)
        (w,) = await self.record(item("198.51.100.7", (ACCEPTED, 1), fp="aaaa"))
        assert w.sub_counts == counts(accepted=1)  # kept from the moment clients were told apart

    async def test_many_clients_mark_the_address_shared_once(self) -> None:
        marks = []
        for i in range(K + 2):
            (w,) = await self.record(item("100.64.0.9", (ACCEPTED, 1), fp=f"fp{i:02d}"))
            marks.append(w.newly_shared)
        assert w.shared
        assert w.distinct == K + 2
        assert marks.count(True) == 1
        assert marks.index(True) == K  # the (K+1)-th distinct client
        await self.settle()
        assert any(e.kind == SHARED and e.identity == "100.64.0.9" for e in self.events)
        _, shared, _ = self.store.snapshot()
        assert "100.64.0.9" in dict(shared)
        assert (await self.store.fleet_stats()).shared_addresses == 1

    async def test_configured_shared_address(self) -> None:
        (w,) = await self.record(item("100.64.0.10", (UNKNOWN, 1), fp="aaaa", shared=True))
        assert w.shared
        assert not w.newly_shared
        assert w.sub_counts == counts(unknown=1)

    async def test_sub_identity_penalties_are_separate(self) -> None:
        await self.record(item("100.64.0.11", (ACCEPTED, 1), fp="aaaa", shared=True))
        _, created = await self.store.start_penalty("100.64.0.11#bbbb", 60_000, "sub")
        assert created
        (w,) = await self.record(item("100.64.0.11", (UNKNOWN, 1), fp="bbbb", shared=True))
        assert w.sub_penalty is not None
        assert w.sub_penalty.identity == "100.64.0.11#bbbb"
        assert w.penalty is None
        (w,) = await self.record(item("100.64.0.11", (ACCEPTED, 1), fp="aaaa", shared=True))
        assert w.sub_penalty is None
        assert await self.store.penalty("100.64.0.11") is None
        assert (await self.store.penalty("100.64.0.11#bbbb")) is not None

    # --- penalties

    async def test_start_penalty_is_idempotent(self) -> None:
        p, created = await self.store.start_penalty("203.0.113.7", 300_000, "r1")
        assert created
        assert 299_000 <= p.remaining_ms <= 300_000
        assert p.reason == "r1"
        again, created = await self.store.start_penalty("203.0.113.7", 300_000, "r2")
        assert not created
        assert again.reason == "r1"
        assert abs(again.expires_at_ms - p.expires_at_ms) <= 5

    async def test_penalty_reports_exact_remaining_time(self) -> None:
        started, _ = await self.store.start_penalty("203.0.113.7", 10_000, "r")
        await self.advance(1200)
        p = await self.store.penalty("203.0.113.7")
        assert p is not None
        assert 8_000 <= p.remaining_ms <= 8_800
        assert abs(p.expires_at_ms - started.expires_at_ms) <= 50
        assert await self.store.penalty("203.0.113.8") is None
        both = await self.store.penalties(["203.0.113.8", "203.0.113.7"])
        assert both[0] is None
        assert both[1] is not None
        assert both[1].identity == "203.0.113.7"

    async def test_penalty_expires(self) -> None:
        await self.store.start_penalty("203.0.113.7", 300, "r")
        await self.advance(450)
        assert await self.store.penalty("203.0.113.7") is None
        assert await self.store.count_penalties() == 0
        (w,) = await self.record(item("203.0.113.7", (ACCEPTED, 1)))
        assert w.penalty is None

    async def test_record_reports_active_penalty(self) -> None:
        await self.store.start_penalty("203.0.113.7", 60_000, "r")
        (w,) = await self.record(item("203.0.113.7", (UNKNOWN, 1)))
        assert w.penalty is not None
        assert w.penalty.reason == "r"

    async def test_evidence_that_caused_a_penalty_does_not_count_again(self) -> None:
        await self.record(item("203.0.113.7", (UNKNOWN, 30)))
        await self.store.start_penalty("203.0.113.7", 300, "r")
        await self.advance(1100)  # the penalty is over; a later bucket begins
        (w,) = await self.record(item("203.0.113.7", (UNKNOWN, 1)))
        assert w.penalty is None
        assert w.counts == counts(unknown=1)

    async def test_escalation_lengthens_repeat_penalties(self) -> None:
        esc = Escalation(multiplier=2.0, cap_ms=3_000, memory_ms=60_000)
        first, _ = await self.store.start_penalty("203.0.113.70", 1000, "r", esc)
        assert 900 <= first.remaining_ms <= 1000
        await self.advance(1100)
        second, created = await self.store.start_penalty("203.0.113.70", 1000, "r", esc)
        assert created
        assert 1900 <= second.remaining_ms <= 2000
        await self.store.lift("203.0.113.70", LiftRecord("t", "", 0))
        third, _ = await self.store.start_penalty("203.0.113.70", 1000, "r", esc)
        assert 2900 <= third.remaining_ms <= 3000  # 4000 capped at 3000
        plain, _ = await self.store.start_penalty("203.0.113.71", 1000, "r")
        assert plain.remaining_ms <= 1000

    async def test_lift_records_who_and_why(self) -> None:
        await self.store.start_penalty("203.0.113.7", 60_000, "r")
        assert await self.store.lift("203.0.113.7", LiftRecord("desk", "customer called", 123))
        assert await self.store.penalty("203.0.113.7") is None
        assert await self.store.count_penalties() == 0
        assert await self.store.last_lift("203.0.113.7") == LiftRecord(
            "desk", "customer called", 123
        )
        assert not await self.store.lift("203.0.113.7", LiftRecord("desk", "", 0))
        _, created = await self.store.start_penalty("203.0.113.7", 60_000, "r")
        assert created
        await self.settle()
        kinds = [(e.kind, e.identity) for e in self.events]
        assert (STARTED, "203.0.113.7") in kinds
        assert (LIFTED, "203.0.113.7") in kinds

    async def test_count_and_page_active_penalties(self) -> None:
        ids = [f"198.51.100.{i}" for i in range(25)]
        for i, identity in enumerate(ids):
            await self.store.start_penalty(identity, 60_000 + i, f"r{i}")
        assert await self.store.count_penalties() == 25
        seen: list[str] = []
        cursor: PageCursor | None = None
        pages = 0
        while True:
            page, cursor = await self.store.list_penalties(cursor, 10)
            seen += [p.identity for p in page]
            pages += 1
            if pages == 1:
                await self.store.lift(ids[24], LiftRecord("t", "", 0))  # change under the pager
                token = cursor.encode() if cursor else ""
                cursor = PageCursor.decode(token) if token else None
            if cursor is None:
                break
        assert len(seen) == len(set(seen))
        assert set(ids[:24]) <= set(seen)
        assert ids[24] not in seen[10:]

    async def test_paging_sees_every_penalty_once_whatever_its_length(self) -> None:
        esc = Escalation(multiplier=3.0, cap_ms=120_000, memory_ms=60_000)
        long = [f"198.51.100.{i}" for i in range(4)]
        for identity in long:  # a first offence, over before paging starts
            await self.store.start_penalty(identity, 300, "r", esc)
        short = [f"198.51.100.{i}" for i in range(10, 14)]
        for identity in short:
            await self.store.start_penalty(identity, 300, "short")
        await self.advance(450)
        for identity in short:
            await self.store.start_penalty(identity, 400, "short")
        plain = [f"198.51.100.{i}" for i in range(20, 30)]
        for i, identity in enumerate(plain + long):  # escalated ones last 3x: out of order
            await self.store.start_penalty(identity, 20_000 + 1000 * (i % 3), "r", esc)
        assert await self.store.count_penalties() == len(plain + long + short)
        seen: list[str] = []
        cursor: PageCursor | None = None
        pages = 0
        while True:
            page, cursor = await self.store.list_penalties(cursor, 3)
            seen += [p.identity for p in page]
            pages += 1
            if pages == 1:
                await self.advance(550)  # the short ones end under the pager
            if cursor is None:
                break
        assert len(seen) == len(set(seen))
        assert set(plain + long) <= set(seen)
        assert not set(short) & set(seen[3:])
        assert await self.store.count_penalties() == len(plain + long)

    async def test_page_cursor_before_everything_and_a_crafted_shard(self) -> None:
        for i in range(3):
            await self.store.start_penalty(f"203.0.113.{i}", 60_000, "r")
        page, cursor = await self.store.list_penalties(PageCursor(0, 0, ""), 10)
        assert sorted(p.identity for p in page) == [f"203.0.113.{i}" for i in range(3)]
        assert cursor is None
        with pytest.raises(ValueError, match="page token"):
            await self.store.list_penalties(PageCursor(-1, 0, ""), 10)

    async def test_page_token_rejects_garbage(self) -> None:
        with pytest.raises(ValueError, match="page token"):
            PageCursor.decode("not-a-token!!")

    # --- allowlist

    async def test_allowlist(self) -> None:
        entry = await self.store.allow(AllowEntry("192.0.2.0/24", 0, "partner", "desk"), 60_000)
        assert entry.cidr == "192.0.2.0/24"
        assert 59_000 <= entry.expires_at_ms - entry.created_at_ms <= 60_000
        await self.settle()
        hit = self.store.allowed(parse_ip("192.0.2.77"))
        assert hit is not None
        assert hit.note == "partner"
        assert self.store.allowed(parse_ip("192.0.3.1")) is None
        assert [e.cidr for e in await self.store.allowlist()] == ["192.0.2.0/24"]
        assert any(e.kind == ALLOW_ADDED for e in self.events)
        assert await self.store.remove_allow("192.0.2.0/24")
        await self.settle()
        assert self.store.allowed(parse_ip("192.0.2.77")) is None
        assert not await self.store.remove_allow("192.0.2.0/24")
        assert await self.store.allowlist() == []

    async def test_allow_entries_expire(self) -> None:
        await self.store.allow(AllowEntry("2001:db8::/48", 0), 300)
        await self.settle()
        assert self.store.allowed(parse_ip("2001:db8::1")) is not None
        await self.advance(450)
        assert self.store.allowed(parse_ip("2001:db8::1")) is None
        assert await self.store.allowlist() == []

    # --- fleet aggregates

    async def test_fleet_stats_aggregate_replicas(self) -> None:
        await self.store.flush_stats(StatsDelta("r1", 100, 10.0, frozenset({"a", "b"})))
        await self.store.flush_stats(
            StatsDelta("r2", 300, 30.0, frozenset({"b", "c"}), degraded=True)
        )
        await self.store.start_penalty("203.0.113.7", 60_000, "r")
        stats = await self.store.fleet_stats()
        assert stats.baseline_events == 400
        assert stats.baseline_errors == pytest.approx(40.0)
        assert stats.baseline == pytest.approx(0.1)
        assert stats.tracked_identities == 3
        assert stats.degraded_replicas == 1
        assert stats.active_penalties == 1

    # --- what is held about an address (Disclose)

    async def test_held_names_everything_about_an_address_and_its_clients_only(self) -> None:
        a, other = "100.64.9.9", "100.64.9.10"
        for fp in ("fa", "fb", "fc", "fd"):  # K = 3: the fourth client marks it shared
            await self.record(ReportItem(a, [(ACCEPTED, 1)], fp, label="mark-of-a"))
        await self.record(item(other, (UNKNOWN, 2), fp="fa"))
        await self.store.start_penalty(f"{a}#fb", 60_000, "burst;1;1;0;0;", Escalation(2.0))
        await self.store.start_penalty(a, 60_000, "burst;2;2;0;0;")
        await self.store.lift(a, LiftRecord("desk", "TICKET-7", 1))
        held = await self.store.held(a, "mark-of-a")
        kinds = {(h.kind, h.identity) for h in held}
        assert ("window", a) in kinds
        assert ("window", f"{a}#fb") in kinds
        assert ("penalty", f"{a}#fb") in kinds
        assert ("penalty", a) not in kinds  # lifted
        assert ("last_lift", a) in kinds
        assert ("offence_counter", f"{a}#fb") in kinds
        assert ("shared_mark", a) in kinds
        assert ("client_fingerprints", a) in kinds
        assert all(h.identity == a or h.identity.startswith(a + "#") for h in held)
        lift = next(h for h in held if h.kind == "last_lift")
        assert "desk" in lift.content
        assert "TICKET-7" in lift.content
        window = next(h for h in held if (h.kind, h.identity) == ("window", a))
        assert "accepted=4" in window.content
        now = self.store.now_ms()
        assert all(h.expires_at_ms > now for h in held)  # each says when it goes
        day = Escalation().memory_ms  # the longest lifetime here: the offence memory
        assert all(h.expires_at_ms <= now + day + 1000 for h in held)
        assert await self.store.held("198.51.100.1", "198.51.100.1") == []

    # --- reputation (issue 15): the longer memory

    async def test_reputation_counts_events_and_weighted_errors_beyond_the_window(self) -> None:
        a = "203.0.113.70"
        report = ReportItem(a, [(ACCEPTED, 2), (UNKNOWN, 3)], weighted=3.0)
        (w,) = await self.record(report)
        assert w.reputation is not None
        assert w.reputation.events == pytest.approx(5, rel=1e-3)
        assert w.reputation.weighted_errors == pytest.approx(3, rel=1e-3)
        assert w.reputation.penalties == 0
        await self.advance(WINDOW_MS + 1500)  # the window forgets; the reputation does not
        w = await self.read(a)
        assert w.counts == counts()
        assert w.reputation is not None
        assert w.reputation.events == pytest.approx(5, rel=1e-2)  # one hour half-life
        assert w.reputation.ratio == pytest.approx(0.6, rel=1e-2)

    async def test_a_penalty_counts_in_its_address_reputation(self) -> None:
        a = "203.0.113.71"
        await self.record(ReportItem(a, [(UNKNOWN, 1)], weighted=1.0))
        await self.store.start_penalty(a, 60_000, "r")
        await self.store.start_penalty(a, 60_000, "r")  # not new: not counted again
        await self.store.start_penalty(f"{a}#cd", 60_000, "r")  # a client behind it counts
        rep = (await self.read(a)).reputation
        assert rep is not None
        assert rep.penalties == pytest.approx(2, rel=1e-2)

    async def test_neighbourhoods_add_up_replicas_and_list_the_worst(self) -> None:
        deltas = [
            NeighbourhoodDelta("203.0.113.0/24", "203.0.113.0/24", 10, 9.0, 1),
            NeighbourhoodDelta("198.51.100.0/24", "198.51.100.0/24", 100, 1.0, 0),
        ]
        first = await self.store.flush_neighbourhoods(deltas)
        assert [r.events for r in first] == [pytest.approx(10), pytest.approx(100)]
        again = await self.store.flush_neighbourhoods(deltas[:1])  # another replica's flush
        assert again[0].weighted_errors == pytest.approx(18, rel=1e-3)
        assert again[0].penalties == pytest.approx(2, rel=1e-2)
        (read,) = await self.store.flush_neighbourhoods(
            [NeighbourhoodDelta("203.0.113.0/24", "203.0.113.0/24")]
        )
        assert read.events == pytest.approx(20, rel=1e-3)  # a delta with no counts only reads
        worst = await self.store.worst_neighbourhoods(10)
        assert [label for label, _ in worst] == ["203.0.113.0/24", "198.51.100.0/24"]
        assert worst[0][1] == pytest.approx(18, rel=1e-2)
        assert [label for label, _ in await self.store.worst_neighbourhoods(1)] == [
            "203.0.113.0/24"
        ]
        held = await self.store.neighbourhood_held("203.0.113.0/24", "203.0.113.0/24")
        assert "neighbourhood_reputation" in {h.kind for h in held}
        now = self.store.now_ms()
        assert all(now < h.expires_at_ms <= now + 14_400_000 + 1000 for h in held)
        assert await self.store.neighbourhood_held("192.0.2.0/24", "192.0.2.0/24") == []

    async def test_held_lists_the_address_reputation(self) -> None:
        a = "203.0.113.72"
        await self.record(ReportItem(a, [(UNKNOWN, 4)], weighted=4.0))
        held = await self.store.held(a, a)
        rep = [h for h in held if h.kind == "reputation"]
        assert len(rep) == 1
        assert rep[0].identity == a
        assert "4.0 weighted errors" in rep[0].content
