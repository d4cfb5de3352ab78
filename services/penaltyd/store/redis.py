"""The fleet store: Redis, Lua, one round trip per operation in the common case.

Key scheme (every key has a TTL; `{...}` is the Redis Cluster hash tag)::

    <prefix>:{<identity>}:w      hash   window: field bucket*16+outcome -> count,
                                        "m" -> last bucket already used by a penalty;
                                        expires when its newest bucket leaves the window
    <prefix>:{<identity>}:p      string compact penalty reason, PX = penalty length
    <prefix>:{idx<N>}:active     zset   shard N of the active-penalty index:
                                        member identity, score expiry (unix ms);
                                        expires with its last member
    <prefix>:feed                channel penalty started / lifted events

A script touches only one identity's keys (one slot); the index shard and the feed are
written in a second, pipelined round trip, and only when a penalty starts or is lifted
(rare), so the same code runs on one node and on a Cluster. Times come from Redis
(`TIME` inside scripts): one clock for the fleet.

redis-py's per-command `socket_timeout` wraps every read in `wait_for` and halves
throughput (DESIGN.md s. 12a), so it is off; deadlines are enforced once per operation by
the caller (`penaltyd.engine`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    RedisError,
    ResponseError,
)

from penaltyd.detector import N_OUTCOMES
from penaltyd.feed import LIFTED, STARTED, FeedEvent, PenaltyView, StoreClock
from penaltyd.store.base import (
    PageCursor,
    Penalty,
    ReportItem,
    StoreMisconfigured,
    StoreUnavailable,
    Window,
)

log = structlog.get_logger("penaltyd.store.redis")

_SCRIPT_NAMES = ("record", "peek", "start_penalty", "index_add")


def _load_scripts() -> dict[str, tuple[str, str]]:
    """name -> (sha1, source); the SHA is computed locally so EVALSHA needs no round trip."""
    out = {}
    for name in _SCRIPT_NAMES:
        src = resources.files("penaltyd.store").joinpath(f"lua/{name}.lua").read_text()
        out[name] = (hashlib.sha1(src.encode()).hexdigest(), src)
    return out


@contextlib.asynccontextmanager
async def _mapped_errors() -> AsyncIterator[None]:
    """Map redis-py's exceptions to the store's, once (httpx-style)."""
    try:
        yield
    except AuthenticationError as exc:
        raise StoreMisconfigured(f"redis refused our credentials: {exc}") from exc
    except (RedisError, OSError) as exc:
        if isinstance(exc, ResponseError) and not str(exc).startswith(("LOADING", "BUSY")):
            raise StoreMisconfigured(f"redis error: {exc}") from exc
        raise StoreUnavailable(f"redis unavailable: {exc or type(exc).__name__}") from exc


def _penalty(identity: str, pttl: int, reason: bytes | None, now_ms: int) -> Penalty | None:
    if pttl <= 0 or reason is None:
        return None
    return Penalty(identity, pttl, now_ms + pttl, reason.decode())


def _window(identity: str, reply: Sequence[Any]) -> Window:
    pttl, reason, now_ms = reply[0], reply[1], reply[2]
    counts = tuple(int(n) for n in reply[3 : 3 + N_OUTCOMES])
    return Window(counts, _penalty(identity, int(pttl), reason, int(now_ms)))


class RedisStore:
    """`Store` on Redis (single node; Sentinel and Cluster come with issue 6)."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "pd",
        index_shards: int = 16,
        window_seconds: int = 600,
        bucket_seconds: int = 60,
        max_connections: int = 32,
        use_view: bool = True,
    ) -> None:
        common: dict[str, Any] = {
            "socket_timeout": None,
            "socket_connect_timeout": 0.5,
            "health_check_interval": 0,
            "decode_responses": False,
        }
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=None, **common
        )
        # One retry covers the stale pooled connection after a Redis restart.
        self._client = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 1))
        # The feed must *notice* every reconnect (it may have missed events), so its
        # connection never retries silently.
        self._feed_client = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **common)
        self._prefix = key_prefix
        self._shards = index_shards
        self._bucket_ms = bucket_seconds * 1000
        self._nbuckets = window_seconds // bucket_seconds
        self._scripts = _load_scripts()
        self._channel = f"{key_prefix}:feed"
        self.clock = StoreClock()
        self.view = PenaltyView(self.clock)
        self._use_view = use_view
        self._follower: asyncio.Task[None] | None = None
        self.feed_resyncs = 0

    # --- keys

    def _wkey(self, identity: str) -> str:
        return f"{self._prefix}:{{{identity}}}:w"

    def _pkey(self, identity: str) -> str:
        return f"{self._prefix}:{{{identity}}}:p"

    def _shard_of(self, identity: str) -> int:
        return zlib.crc32(identity.encode()) % self._shards

    def _ikey(self, shard: int) -> str:
        return f"{self._prefix}:{{idx{shard}}}:active"

    # --- lifecycle

    async def start(self) -> None:
        """Start following the feed; a Redis that is down now is retried in the background."""
        if self._use_view:
            self._follower = asyncio.create_task(self._follow(), name="penalty-feed")

    async def close(self) -> None:
        if self._follower:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self._feed_client.aclose()
        await self._client.aclose()

    async def ping(self) -> None:
        async with _mapped_errors():
            await self._client.ping()

    async def _evalsha(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        sha, src = self._scripts[name]
        async with _mapped_errors():
            try:
                return await self._client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                return await self._client.eval(src, len(keys), *keys, *args)

    async def _pipeline(
        self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Many EVALSHAs in one round trip; reloads the scripts once after a FLUSH/restart."""
        async with _mapped_errors():
            for attempt in (0, 1):
                pipe = self._client.pipeline(transaction=False)
                for name, keys, args in calls:
                    pipe.evalsha(self._scripts[name][0], len(keys), *keys, *args)
                try:
                    return list(await pipe.execute())
                except NoScriptError:
                    if attempt:
                        raise
                    for sha_src in self._scripts.values():
                        await self._client.script_load(sha_src[1])
            raise AssertionError("unreachable")

    # --- penalties

    def local_penalty(self, identity: str) -> tuple[bool, Penalty | None]:
        if self.view.synced:
            return True, self.view.get(identity)
        return False, None

    async def penalty(self, identity: str) -> Penalty | None:
        if self.view.synced:
            return self.view.get(identity)
        pttl, reason, now_ms = await self._evalsha("peek", (self._pkey(identity),), ())
        return _penalty(identity, int(pttl), reason, int(now_ms))

    async def penalties(self, identities: Sequence[str]) -> list[Penalty | None]:
        if self.view.synced:
            return [self.view.get(i) for i in identities]
        replies = await self._pipeline([("peek", (self._pkey(i),), ()) for i in identities])
        return [
            _penalty(i, int(r[0]), r[1], int(r[2]))
            for i, r in zip(identities, replies, strict=True)
        ]

    async def start_penalty(self, identity: str, ttl_ms: int, reason: str) -> tuple[Penalty, bool]:
        created, pttl, stored_reason, now_ms = await self._evalsha(
            "start_penalty",
            (self._pkey(identity), self._wkey(identity)),
            (ttl_ms, reason, self._bucket_ms),
        )
        penalty = Penalty(identity, int(pttl), int(now_ms) + int(pttl), stored_reason.decode())
        if created:
            # Index and feed live in other slots: a second round trip, only when one starts.
            async with _mapped_errors():
                pipe = self._client.pipeline(transaction=False)
                shard = self._ikey(self._shard_of(identity))
                pipe.evalsha(
                    self._scripts["index_add"][0], 1, shard, penalty.expires_at_ms, identity
                )
                event = FeedEvent(STARTED, identity, penalty.expires_at_ms, penalty.reason)
                pipe.publish(self._channel, event.encode())
                try:
                    await pipe.execute()
                except NoScriptError:
                    await self._client.eval(
                        self._scripts["index_add"][1], 1, shard, penalty.expires_at_ms, identity
                    )
                    await self._client.publish(self._channel, event.encode())
            if self.view.synced:
                self.view.apply(event)  # our own view need not wait for the echo
        return penalty, bool(created)

    async def lift(self, identity: str) -> bool:
        async with _mapped_errors():
            removed = await self._client.delete(self._pkey(identity))
            if removed:
                pipe = self._client.pipeline(transaction=False)
                pipe.zrem(self._ikey(self._shard_of(identity)), identity)
                event = FeedEvent(LIFTED, identity)
                pipe.publish(self._channel, event.encode())
                await pipe.execute()
                self.view.apply(event)
        return bool(removed)

    # --- windows

    async def record(self, items: Sequence[ReportItem]) -> list[Window]:
        calls = []
        for identity, counts in items:
            args: list[int] = [self._bucket_ms, self._nbuckets]
            for outcome, n in counts:
                args += (outcome, n)
            calls.append(("record", (self._wkey(identity), self._pkey(identity)), args))
        if len(calls) == 1:
            replies = [await self._evalsha(*calls[0])]
        else:
            replies = await self._pipeline(calls)
        return [_window(identity, r) for (identity, _), r in zip(items, replies, strict=True)]

    async def window(self, identity: str) -> Window:
        reply = await self._evalsha(
            "record",
            (self._wkey(identity), self._pkey(identity)),
            (self._bucket_ms, self._nbuckets),
        )
        return _window(identity, reply)

    # --- index

    async def _store_now_ms(self) -> int:
        async with _mapped_errors():
            sec, usec = await self._client.time()
        return int(sec) * 1000 + int(usec) // 1000

    async def count_penalties(self) -> int:
        now = await self._store_now_ms()
        async with _mapped_errors():
            pipe = self._client.pipeline(transaction=False)
            for shard in range(self._shards):
                pipe.zcount(self._ikey(shard), f"({now}", "+inf")
            return sum(int(n) for n in await pipe.execute())

    async def _index_page(
        self, shard: int, lo: int, offset: int, num: int
    ) -> list[tuple[str, int]]:
        """(identity, expires_at_ms) of one shard from score `lo` on, in index order."""
        batch = await self._client.zrangebyscore(
            self._ikey(shard), lo, "+inf", start=offset, num=num, withscores=True
        )
        return [(m.decode(), int(score)) for m, score in cast(list[tuple[bytes, float]], batch)]

    async def _reasons(self, identities: Sequence[str]) -> list[str | None]:
        raw = await self._client.mget([self._pkey(i) for i in identities]) if identities else []
        return [r.decode() if r is not None else None for r in cast(list[bytes | None], raw)]

    async def list_penalties(
        self, after: PageCursor | None, limit: int
    ) -> tuple[list[Penalty], PageCursor | None]:
        """Shard by shard, each in (expiry, identity) order; stable under inserts/removals."""
        now = await self._store_now_ms()
        rows: list[tuple[int, str, int]] = []  # (shard, identity, expires)
        shard = after.shard if after else 0
        async with _mapped_errors():
            while shard < self._shards and len(rows) <= limit:
                resume = after is not None and after.shard == shard
                lo = max(now + 1, after.expires_at_ms) if after and resume else now + 1
                offset = 0
                while len(rows) <= limit:
                    batch = await self._index_page(shard, lo, offset, limit + 1)
                    for identity, expires in batch:
                        if (
                            after
                            and resume
                            and (expires, identity) <= (after.expires_at_ms, after.identity)
                        ):
                            continue
                        rows.append((shard, identity, expires))
                    if len(batch) < limit + 1:
                        break
                    offset += len(batch)
                shard += 1
            page = rows[:limit]
            reasons = await self._reasons([i for _, i, _ in page])
        penalties = [
            Penalty(i, e - now, e, r)
            for (_, i, e), r in zip(page, reasons, strict=True)
            if r is not None  # lifted or expired since the index was read
        ]
        more = len(rows) > limit
        cursor = PageCursor(page[-1][0], page[-1][2], page[-1][1]) if more and page else None
        return penalties, cursor

    async def _snapshot(self) -> dict[str, tuple[int, str]]:
        now = await self._store_now_ms()
        entries: dict[str, tuple[int, str]] = {}
        async with _mapped_errors():
            for shard in range(self._shards):
                offset = 0
                while batch := await self._index_page(shard, now + 1, offset, 5000):
                    reasons = await self._reasons([i for i, _ in batch])
                    for (identity, expires), reason in zip(batch, reasons, strict=True):
                        if reason is not None:
                            entries[identity] = (expires, reason)
                    offset += len(batch)
        return entries

    # --- the feed

    async def _follow(self) -> None:
        """Keep `view` exact: subscribe, snapshot, apply events; resync on any doubt."""
        backoff = 0.05
        while True:
            pubsub = self._feed_client.pubsub()
            try:
                async with _mapped_errors():
                    await pubsub.subscribe(self._channel)
                    confirm = await pubsub.get_message(timeout=2.0)
                    if not confirm or confirm["type"] != "subscribe":
                        raise StoreUnavailable("no subscribe confirmation from redis")
                    t0 = time.monotonic()
                    now = await self._store_now_ms()
                    self.clock.calibrate(now, (time.monotonic() - t0) * 1000)
                    self.view.replace(await self._snapshot())
                    self.view.synced = True
                    self.feed_resyncs += 1
                    backoff = 0.05
                    log.info("feed_synced", active_penalties=len(self.view))
                    await self._consume(pubsub)
            except asyncio.CancelledError:
                self.view.synced = False
                raise
            except (StoreUnavailable, StoreMisconfigured, ValueError) as exc:
                if self.view.synced:
                    log.warning("feed_lost", error=str(exc))
                self.view.synced = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated

    async def _consume(self, pubsub: Any) -> None:
        last_seen = last_ping = time.monotonic()
        while True:
            msg = await pubsub.get_message(timeout=0.5)
            now = time.monotonic()
            if msg is not None:
                last_seen = now
                kind = msg["type"]
                if kind == "message":
                    self.view.apply(FeedEvent.decode(msg["data"]))
                elif kind == "subscribe":
                    raise StoreUnavailable("feed resubscribed: events may have been missed")
            if now - last_ping >= 1.0:
                await pubsub.ping()
                last_ping = now
                self.view.sweep()
            if now - last_seen > 3.0:
                raise StoreUnavailable("feed silent for 3 s")
