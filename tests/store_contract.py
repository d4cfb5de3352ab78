"""The store contract: one suite, run against every backend (DESIGN.md section 5).

Subclasses provide `store` (a started store with a 10 s window of 1 s buckets) and
`advance(ms)`: the memory store moves its injected clock, Redis really waits (its
clock is Redis's own `TIME`, which is the point).
"""

from __future__ import annotations

import pytest

from penaltyd.detector import N_OUTCOMES
from penaltyd.store.base import PageCursor, Store
from tests.helpers import ACCEPTED, UNKNOWN

RELAY = 3


def counts(**by: int) -> tuple[int, ...]:
    out = [0] * N_OUTCOMES
    out[ACCEPTED] = by.get("accepted", 0)
    out[UNKNOWN] = by.get("unknown", 0)
    out[RELAY] = by.get("relay", 0)
    return tuple(out)


class StoreContract:
    store: Store

    async def advance(self, ms: int) -> None:
        raise NotImplementedError

    async def test_record_returns_window_after_update(self) -> None:
        (w,) = await self.store.record([("203.0.113.7", [(ACCEPTED, 2), (UNKNOWN, 3)])])
        assert w.counts == counts(accepted=2, unknown=3)
        assert w.penalty is None
        (w,) = await self.store.record([("203.0.113.7", [(UNKNOWN, 1)])])
        assert w.counts == counts(accepted=2, unknown=4)

    async def test_batch_keeps_identities_apart(self) -> None:
        ws = await self.store.record(
            [
                ("203.0.113.7", [(UNKNOWN, 5)]),
                ("203.0.113.8", [(ACCEPTED, 7)]),
                ("203.0.113.7", [(RELAY, 1)]),
            ]
        )
        assert [w.counts for w in ws] == [
            counts(unknown=5),
            counts(accepted=7),
            counts(unknown=5, relay=1),
        ]

    async def test_window_reads_without_changing(self) -> None:
        await self.store.record([("203.0.113.7", [(UNKNOWN, 2)])])
        assert (await self.store.window("203.0.113.7")).counts == counts(unknown=2)
        assert (await self.store.window("203.0.113.7")).counts == counts(unknown=2)
        assert (await self.store.window("203.0.113.9")).counts == counts()

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
        assert p.seconds_left in (9, 10) or 8 <= p.seconds_left <= 9
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
        (w,) = await self.store.record([("203.0.113.7", [(ACCEPTED, 1)])])
        assert w.penalty is None

    async def test_record_reports_active_penalty(self) -> None:
        await self.store.start_penalty("203.0.113.7", 60_000, "r")
        (w,) = await self.store.record([("203.0.113.7", [(UNKNOWN, 1)])])
        assert w.penalty is not None
        assert w.penalty.reason == "r"

    async def test_evidence_that_caused_a_penalty_does_not_count_again(self) -> None:
        await self.store.record([("203.0.113.7", [(UNKNOWN, 30)])])
        await self.store.start_penalty("203.0.113.7", 300, "r")
        await self.advance(1100)  # the penalty is over; a later bucket begins
        (w,) = await self.store.record([("203.0.113.7", [(UNKNOWN, 1)])])
        assert w.penalty is None
        assert w.counts == counts(unknown=1)

    async def test_events_leave_the_window(self) -> None:
        await self.store.record([("203.0.113.7", [(UNKNOWN, 4)])])
        await self.advance(5_000)
        (w,) = await self.store.record([("203.0.113.7", [(ACCEPTED, 1)])])
        assert w.counts == counts(unknown=4, accepted=1)
        await self.advance(6_000)  # the first bucket is now older than 10 s
        assert (await self.store.window("203.0.113.7")).counts == counts(accepted=1)

    async def test_lift(self) -> None:
        await self.store.start_penalty("203.0.113.7", 60_000, "r")
        assert await self.store.lift("203.0.113.7")
        assert await self.store.penalty("203.0.113.7") is None
        assert await self.store.count_penalties() == 0
        assert not await self.store.lift("203.0.113.7")
        _, created = await self.store.start_penalty("203.0.113.7", 60_000, "r")
        assert created

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
                await self.store.lift(ids[24])  # change under the pager: no duplicates, no crash
                token = cursor.encode() if cursor else ""
                cursor = PageCursor.decode(token) if token else None
            if cursor is None:
                break
        assert len(seen) == len(set(seen))
        assert set(ids[:24]) <= set(seen)
        assert ids[24] not in seen[10:]
        assert all(p.reason.startswith("r") for p in (await self.store.list_penalties(None, 5))[0])

    async def test_page_token_rejects_garbage(self) -> None:
        with pytest.raises(ValueError, match="page token"):
            PageCursor.decode("not-a-token!!")
