"""The fleet store: Redis, Lua, one round trip per operation in the common case.

Key scheme (every key has a TTL; `{...}` is the Redis Cluster hash tag). `A` is an
address identity, `fp` a client fingerprint behind it (see `penalty.identity`)::

    <p>:{A}:w                 hash   window: field bucket*SLOTS+outcome -> count (SLOTS:
                                     penalty.outcomes.SLOT_WIDTH), "m" -> last bucket
                                     already used by a penalty, and the penalty itself: "p"
                                     its stored reason, "x" its expiry (unix ms, Redis
                                     clock); expires with its newest bucket or its
                                     penalty, the later
    <p>:{A}:w:<fp>            hash   the same for one client behind the address
    <p>:{A}:h:<gen>           HLL    distinct client fingerprints per window generation
    <p>:{A}:s                 string shared mark (detected), PX shared_ttl
    <p>:{A}:o[:<fp>]          string offence counter (escalation only), PX escalation window
    <p>:{A}:l[:<fp>]          string last lift (actor, note, time), PX window
    <p>:{A}:r                 hash   the address's reputation: e events, w weighted errors,
                                     p penalties, decayed to t (unix ms); PX reputation ttl
    <p>:{nb:<N>}:r            hash   the same for a neighbourhood N (a /24, a /48; a keyed
                                     token with identity_key), written by the stats flush
    <p>:{nbw<N>}:worst        zset   worst neighbourhoods, shard N: member the network (or
                                     its seal), score log2(weighted errors) + t / half-life
    <p>:{idx<N>}:active       zset   active penalties, shard N: member identity, score expiry
    <p>:{sh<N>}:shared        zset   shared addresses, shard N: member its mark (the address,
                                     or its seal with identity_key), score expiry
    <p>:{trk<N>}:<gen>        HLL    identities seen per window generation, shard N
    <p>:{bl<N>}:<bucket>      hash   baseline aggregates of a bucket from replicas on shard N
    <p>:{rep}:degraded        zset   replica id -> last time it failed open
    <p>:{rep}:probe:<replica> string health probe of one replica (a write), PX 10 s
    <p>:{allow}:e:<cidr>      string allowlist entry, PX its expiry
    <p>:{allow}:idx           zset   allowlist: member cidr, score expiry
    <p>:feed                  channel changes (penalties, shared marks, allowlist)

Every kind, its lifetime and what it holds: `penaltyd.retention` (docs/privacy.md); a
test keeps this list and that registry naming the same keys.

A script touches only one address's keys (one slot); indexes and the feed are written in
a second, pipelined round trip, and only when something starts, ends or is marked
(rare), so the same code runs on one node and on a Cluster. Times come from Redis (`TIME`
inside scripts): one clock for the fleet.

redis-py's per-command `socket_timeout` wraps every read in `wait_for` and halves
throughput (DESIGN.md s. 12a), so it is off; deadlines are enforced once per operation by
the caller (`penaltyd.engine`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
import zlib
from collections.abc import Sequence
from typing import Any, cast

import structlog
from redis.exceptions import (
    NoScriptError,
    RedisError,
)

from penalty import outcomes
from penalty.identity import IPAddress, address_of
from penaltyd.events import ALLOW_ADDED, ALLOW_REMOVED, LIFTED, RESYNC, SHARED, STARTED, FeedEvent
from penaltyd.store.base import (
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
    StoreError,
    StoreMisconfigured,
    StoreUnavailable,
    Window,
    decay,
    describe_counts,
)
from penaltyd.store.view import PenaltyView, StoreClock
from serving.redis.errors import mapped_errors
from serving.redis.scripts import Scripts
from serving.redis.topology import connect

log = structlog.get_logger("penaltyd.store.redis")

#: Announcements kept while Redis refuses them (`RedisStore._announce`): about 2 MB at most.
MAX_UNANNOUNCED = 10_000

_SCRIPT_NAMES = ("record", "peek", "start_penalty", "index_add", "lift", "neighbourhood")


_SCRIPTS = Scripts("penaltyd.store", _SCRIPT_NAMES)


def _penalty(identity: str, pttl: int, reason: bytes | None, now_ms: int) -> Penalty | None:
    if pttl <= 0 or not reason:
        return None
    return Penalty(identity, pttl, now_ms + pttl, reason.decode())


def _window(item: ReportItem, r: Sequence[Any]) -> Window:
    now = int(r[2])
    base = 9
    counts = tuple(int(n) for n in r[base : base + outcomes.COUNT])
    kept = bool(r[8])
    sub = base + outcomes.SLOT_WIDTH  # record.lua returns SLOTS totals for each window
    sub_counts = tuple(int(n) for n in r[sub : sub + outcomes.COUNT]) if kept else None
    rep = base + 2 * outcomes.SLOT_WIDTH
    reputation = Reputation(float(r[rep]), float(r[rep + 1]), float(r[rep + 2]))
    return Window(
        counts=counts,
        penalty=_penalty(item.identity, int(r[0]), r[1], now),
        distinct=int(r[3]),
        shared=bool(r[4]),
        newly_shared=bool(r[5]),
        sub_counts=sub_counts,
        sub_penalty=_penalty(item.sub_identity, int(r[6]), r[7], now) if item.fingerprint else None,
        reputation=reputation,
    )


def _shard(member: str, shards: int) -> int:
    # crc32, not hash(): every process must agree on the shard of a member.
    return zlib.crc32(member.encode()) % shards


class RedisStore:
    """`Store` on Redis (single node; Sentinel and Cluster come with issue 6)."""

    kind = "redis"
    in_process = False

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "pd",
        index_shards: int = 16,
        window_seconds: int = 600,
        bucket_seconds: int = 60,
        shared_min_sub_identities: int = 20,
        shared_ttl_seconds: int = 3600,
        max_connections: int = 32,
        use_view: bool = True,
        reputation_half_life_seconds: int = 3600,
        reputation_ttl_seconds: int = 14_400,
        worst_keep: int = 256,
    ) -> None:
        # The feed client must *notice* every reconnect (it may have missed events), so
        # its connection never retries silently (see `topology.connect`).
        self.topology, self._client, self._feed_client = connect(url, max_connections)
        self._cluster = self.topology.kind == "cluster"
        self._p = key_prefix
        self._shards = index_shards
        self._bucket_ms = bucket_seconds * 1000
        self._nbuckets = window_seconds // bucket_seconds
        self._window_ms = window_seconds * 1000
        self._k = shared_min_sub_identities
        self._shared_ttl_ms = shared_ttl_seconds * 1000
        self._half_life_ms = reputation_half_life_seconds * 1000
        self._rep_ttl_ms = reputation_ttl_seconds * 1000
        self._worst_keep = worst_keep
        # record.lua's constant arguments, encoded once (a report pays only for its own).
        self._record_head = (str(self._bucket_ms).encode(), str(self._nbuckets).encode())
        self._record_tails = {
            flag: tuple(
                str(a).encode()
                for a in (
                    self._k,
                    "1" if flag else "0",
                    self._shared_ttl_ms,
                    2 * self._window_ms,
                    self._half_life_ms,
                    self._rep_ttl_ms,
                )
            )
            for flag in (False, True)
        }
        self._scripts = _SCRIPTS
        self._channel = f"{key_prefix}:feed"
        self.clock = StoreClock()
        self.view = PenaltyView(self.clock)
        self._use_view = use_view
        self._listener: Listener | None = None
        self._follower: asyncio.Task[None] | None = None
        # Announcements (index entry + feed event) of penalties that started or ended while
        # Redis would not take the announcement: retried until it does (`_retry_announce`).
        self._unannounced: list[tuple[FeedEvent, str | None]] = []
        self._probe_key = f"{key_prefix}:{{rep}}:probe:{uuid.uuid4().hex[:12]}"

    # --- keys

    def _key(self, identity: str, kind: str) -> str:
        address, _, fp = identity.partition("#")
        return f"{self._p}:{{{address}}}:{kind}:{fp}" if fp else f"{self._p}:{{{address}}}:{kind}"

    def _record_keys(self, item: ReportItem) -> tuple[str, ...]:
        a = item.identity
        gen = int(self.clock.now_ms() // self._window_ms)
        sub = item.sub_identity
        return (
            self._key(a, "w"),
            f"{self._p}:{{{a}}}:h:{gen}",
            f"{self._p}:{{{a}}}:h:{gen - 1}",
            self._key(a, "s"),
            self._key(sub, "w"),
            self._key(a, "r"),
        )

    def _ikey(self, member: str) -> str:
        return f"{self._p}:{{idx{_shard(member, self._shards)}}}:active"

    def _skey(self, address: str) -> str:
        return f"{self._p}:{{sh{_shard(address, self._shards)}}}:shared"

    def _allow_key(self, cidr: str) -> str:
        return f"{self._p}:{{allow}}:e:{cidr}"

    @property
    def _allow_index(self) -> str:
        return f"{self._p}:{{allow}}:idx"

    # --- lifecycle

    async def start(self) -> None:
        """Start following the feed; a Redis that is down now is retried in the background.

        The feed always runs (allowlist, shared marks, WatchPenalties need it);
        `use_view` only decides whether checks are answered from it.
        """
        self._follower = asyncio.create_task(self._follow(), name="penalty-feed")

    async def close(self) -> None:
        if self._follower:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self._feed_client.aclose()
        await self._client.aclose()

    async def ping(self) -> None:
        """A write, not a PING: a Redis at `maxmemory` with `noeviction` answers PING but
        refuses every write (OOM), and health must say so. The probe key expires."""
        async with mapped_errors():
            await self._client.set(self._probe_key, b"1", px=10_000)

    def listen(self, listener: Listener | None) -> None:
        self._listener = listener

    @property
    def feed_exact(self) -> bool:
        return self.view.synced

    def now_ms(self) -> int:
        return int(self.clock.now_ms())

    def snapshot(self) -> tuple[list[Penalty], list[tuple[str, int]], list[AllowEntry]]:
        return self.view.snapshot()

    def snapshot_raw(self) -> RawSnapshot:
        return self.view.snapshot_raw()

    async def _evalsha(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._scripts.run(self._client, name, keys, args)

    async def _pipeline(
        self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Many EVALSHAs (lower-case script names) and plain commands (upper-case) in one
        round trip; reloads the scripts once after a script flush or a Redis restart."""
        if self._cluster:
            return await self._cluster_batch(calls)
        async with mapped_errors():
            for attempt in (0, 1):
                pipe = self._client.pipeline(transaction=False)
                for name, keys, args in calls:
                    if name.isupper():
                        pipe.execute_command(name, *keys, *args)
                    else:
                        pipe.evalsha(self._scripts.sha(name), len(keys), *keys, *args)
                try:
                    return list(await pipe.execute())
                except NoScriptError:
                    if attempt:
                        raise
                    await self._scripts.reload(self._client)
            raise AssertionError("unreachable")

    async def _cluster_batch(
        self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """Cluster: plain commands share a cluster pipeline (one round trip per node);
        redis-py refuses EVALSHA in cluster pipelines, so scripts go concurrently, each
        routed by its key's slot (one flight of requests, no waiting in line)."""
        results: list[Any] = [None] * len(calls)
        plain = [(k, c) for k, c in enumerate(calls) if c[0].isupper()]
        scripts = [(k, c) for k, c in enumerate(calls) if not c[0].isupper()]
        async with mapped_errors():
            pending = [self._evalsha(*c) for _, c in scripts]
            if plain:
                pipe = self._client.pipeline()
                for _, (name, keys, args) in plain:
                    pipe.execute_command(name, *keys, *args)
                replies, *scripted = await asyncio.gather(pipe.execute(), *pending)
                for (k, _), r in zip(plain, replies, strict=True):
                    results[k] = r
            else:
                scripted = list(await asyncio.gather(*pending))
            for (k, _), r in zip(scripts, scripted, strict=True):
                results[k] = r
        return results

    async def _announce(self, events: Sequence[tuple[FeedEvent, str | None]]) -> None:
        """Enter members in their index shards and publish the events, in one round trip.

        The penalty itself is already in its window when this runs. If Redis refuses the
        announcement (a connection lost between the two, the first use of a pooled
        connection after a restart), every other replica's view and the index would miss
        the penalty for its whole duration: so it is kept and retried (`_retry_announce`),
        never dropped, and the caller still gets its penalty."""
        if self.view.synced:
            for event, _ in events:
                self.view.apply(event)  # our own view need not wait for the echo
        try:
            await self._pipeline(self._announcement(events))
        except StoreError as exc:
            self._unannounced.extend(events)
            del self._unannounced[:-MAX_UNANNOUNCED]  # the oldest first
            log.warning(
                "penalty_announce_deferred",
                events=len(events),
                error=str(exc) or type(exc).__name__,
            )

    def _announcement(
        self, events: Sequence[tuple[FeedEvent, str | None]]
    ) -> list[tuple[str, Sequence[str], Sequence[Any]]]:
        calls: list[tuple[str, Sequence[str], Sequence[Any]]] = []
        for event, index_key in events:
            if index_key is not None:
                if event.kind == LIFTED:
                    calls.append(("ZREM", (index_key,), (event.identity,)))
                else:
                    calls.append(("index_add", (index_key,), (event.expires_at_ms, event.identity)))
            calls.append(("PUBLISH", (self._channel,), (event.encode(),)))
        return calls

    async def _retry_announce(self) -> None:
        """Send the announcements Redis refused earlier (oldest first). A start is sent
        only if its penalty is still in its window as started (not lifted, not expired,
        not replaced since): a late announcement must never bring back a lifted penalty."""
        pending, self._unannounced = self._unannounced, []
        try:
            starts = [e for e, _ in pending if e.kind == STARTED]
            peeks = (
                await self._pipeline([("peek", (self._key(e.identity, "w"),), ()) for e in starts])
                if starts
                else []
            )
            held = {
                e.identity: _penalty(e.identity, int(r[0]), r[1], int(r[2]))
                for e, r in zip(starts, peeks, strict=True)
            }

            def sent(e: FeedEvent) -> bool:
                p = held.get(e.identity)
                return e.kind != STARTED or (p is not None and p.reason == e.reason)

            still = [(e, k) for e, k in pending if sent(e)]
            for e, _ in pending:
                if e.kind == STARTED and held[e.identity] is None:
                    self.view.apply(FeedEvent(LIFTED, e.identity, 0, e.reason))  # gone since
            if still:
                await self._pipeline(self._announcement(still))
        except StoreError:
            self._unannounced = pending + self._unannounced
            del self._unannounced[:-MAX_UNANNOUNCED]
            raise
        log.info("penalty_announce_sent", events=len(still), dropped=len(pending) - len(still))

    def _forget_unannounced(self, identity: str) -> None:
        """A lift (ours, or another replica's on the feed): its start must not be sent late."""
        if self._unannounced:
            self._unannounced = [(e, k) for e, k in self._unannounced if e.identity != identity]

    # --- penalties

    def local_penalty(self, identity: str) -> tuple[bool, Penalty | None]:
        if self._use_view and self.view.synced:
            return True, self.view.get(identity)
        return False, None

    async def penalty(self, identity: str) -> Penalty | None:
        if self._use_view and self.view.synced:
            return self.view.get(identity)
        pttl, reason, now_ms = await self._evalsha("peek", (self._key(identity, "w"),), ())
        return _penalty(identity, int(pttl), reason, int(now_ms))

    async def penalties(self, identities: Sequence[str]) -> list[Penalty | None]:
        if self._use_view and self.view.synced:
            return [self.view.get(i) for i in identities]
        replies = await self._pipeline([("peek", (self._key(i, "w"),), ()) for i in identities])
        return [
            _penalty(i, int(r[0]), r[1], int(r[2]))
            for i, r in zip(identities, replies, strict=True)
        ]

    def allowed(self, addr: IPAddress) -> AllowEntry | None:
        return self.view.allowed(addr)

    async def start_penalty(
        self, identity: str, ttl_ms: int, reason: str, escalation: Escalation | None = None
    ) -> tuple[Penalty, bool]:
        return (await self.start_penalties([(identity, ttl_ms, reason)], escalation))[0]

    async def start_penalties(
        self, starts: Sequence[tuple[str, int, str]], escalation: Escalation | None = None
    ) -> list[tuple[Penalty, bool]]:
        esc = escalation or Escalation()
        calls = [
            (
                "start_penalty",
                (
                    self._key(i, "w"),
                    self._key(i, "o"),
                    self._key(address_of(i), "w"),
                    self._key(address_of(i), "r"),
                ),
                (
                    ttl,
                    reason,
                    self._bucket_ms,
                    esc.multiplier,
                    esc.cap_ms,
                    esc.memory_ms,
                    self._half_life_ms,
                    self._rep_ttl_ms,
                ),
            )
            for i, ttl, reason in starts
        ]
        replies = (
            [await self._evalsha(*calls[0])] if len(calls) == 1 else await self._pipeline(calls)
        )
        out: list[tuple[Penalty, bool]] = []
        announce: list[tuple[FeedEvent, str | None]] = []
        for (identity, _, _), (created, pttl, stored, now_ms, _) in zip(
            starts, replies, strict=True
        ):
            penalty = Penalty(identity, int(pttl), int(now_ms) + int(pttl), stored.decode())
            out.append((penalty, bool(created)))
            if created:
                event = FeedEvent(STARTED, identity, penalty.expires_at_ms, penalty.reason)
                announce.append((event, self._ikey(identity)))
        if announce:
            await self._announce(announce)
        return out

    async def lift(self, identity: str, record: LiftRecord) -> bool:
        removed = await self._evalsha(
            "lift",
            (self._key(identity, "w"), self._key(identity, "l")),
            (record.encode(), self._window_ms),
        )
        if removed:
            reason = removed.decode() if isinstance(removed, bytes) else ""
            event = FeedEvent(LIFTED, identity, 0, reason)
            self._forget_unannounced(identity)
            self.view.apply(event)
            await self._announce([(event, self._ikey(identity))])
        return bool(removed)

    async def held(self, identity: str, mark: str) -> list[Held]:
        """SCAN for the address's keys (they share its hash tag `{A}`), then one pipeline
        for their expiries and values and the index entries naming it or a client behind
        it. A scan visits every key (about a second per million on one node): admin only.
        """
        prefix = f"{self._p}:{{{identity}}}:"
        pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in prefix) + "*"
        async with mapped_errors():
            found = {
                k.decode() if isinstance(k, bytes) else str(k)
                async for k in self._client.scan_iter(match=pattern, count=1000)
            }
        keys = sorted(found)
        calls: list[tuple[str, Sequence[str], Sequence[Any]]] = []
        for key in keys:
            kind = key[len(prefix) :].split(":", 1)[0]
            read = {"w": "HGETALL", "h": "PFCOUNT", "r": "HGETALL"}.get(kind, "GET")
            calls += [("PEXPIRETIME", (key,), ()), (read, (key,), ())]
        subjects = {identity} | {
            f"{identity}#{rest.split(':', 1)[1]}"
            for rest in (k[len(prefix) :] for k in keys)
            if rest.split(":", 1)[0] in ("w", "o", "l") and ":" in rest
        }
        members = sorted(subjects)
        calls += [("ZSCORE", (self._ikey(m),), (m,)) for m in members]
        calls.append(("ZSCORE", (self._skey(mark),), (mark,)))
        calls.append(("TIME", (), ()))
        replies = await self._pipeline(calls)
        sec, usec = replies[-1]
        now = int(sec) * 1000 + int(usec) // 1000
        out: list[Held] = []
        for n, key in enumerate(keys):
            expires, value = int(replies[2 * n]), replies[2 * n + 1]
            out.extend(self._held_key(key, key[len(prefix) :], identity, expires, value, now))
        scores = replies[2 * len(keys) : -1]
        for member, score in zip(members, scores[:-1], strict=True):
            if score is not None:
                out.append(
                    Held(
                        "active_index",
                        member,
                        self._ikey(member),
                        int(float(score)),
                        "listed as an active penalty",
                        member,
                    )
                )
        if scores[-1] is not None:
            out.append(
                Held(
                    "shared_index",
                    identity,
                    self._skey(mark),
                    int(float(scores[-1])),
                    "listed as a shared address",
                    mark,
                )
            )
        return out

    def _held_key(
        self, key: str, rest: str, identity: str, expires: int, value: Any, now: int
    ) -> list[Held]:
        kind, _, tail = rest.partition(":")
        who = f"{identity}#{tail}" if tail and kind in ("w", "o", "l") else identity
        if kind == "w":
            fields = {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], value).items()}
            counts = [0] * outcomes.COUNT
            for f, v in fields.items():
                if f.isdigit():
                    counts[int(f) % outcomes.SLOT_WIDTH] += int(v)
            out = [Held("window", who, key, expires, describe_counts(counts))]
            if "p" in fields and int(fields.get("x", "0")) > now:
                out.append(Held("penalty", who, key, int(fields["x"]), fields["p"]))
            return out
        if kind == "h":
            return [
                Held(
                    "client_fingerprints",
                    who,
                    key,
                    expires,
                    f"about {int(value)} distinct client fingerprints (HyperLogLog)",
                )
            ]
        if kind == "r":
            return [Held("reputation", who, key, expires, self._describe_rep(value, now))]
        text = value.decode() if isinstance(value, bytes) else str(value or "")
        if kind == "s":
            return [Held("shared_mark", who, key, expires, "shared address (detected)")]
        if kind == "o":
            return [Held("offence_counter", who, key, expires, f"{text} offences")]
        if kind == "l":
            return [Held("last_lift", who, key, expires, LiftRecord.decode(text).describe())]
        return [Held("unknown", who, key, expires, f"a key of unknown kind {kind!r}")]

    def _describe_rep(self, value: Any, now: int) -> str:
        fields = {k.decode(): float(v) for k, v in cast(dict[bytes, bytes], value).items()}
        age = now - fields.get("t", now)
        rep = Reputation(
            *(decay(fields.get(f, 0.0), age, self._half_life_ms) for f in ("e", "w", "p"))
        )
        return rep.describe()

    # --- neighbourhoods

    def _nb_key(self, name: str) -> str:
        return f"{self._p}:{{nb:{name}}}:r"

    def _worst_key(self, label: str) -> str:
        return f"{self._p}:{{nbw{_shard(label, self._shards)}}}:worst"

    async def flush_neighbourhoods(self, deltas: Sequence[NeighbourhoodDelta]) -> list[Reputation]:
        """One pipeline: each neighbourhood's script (add and read), then the worst index
        entries of those that were written, each shard trimmed to `worst_keep`."""
        if not deltas:
            return []
        hl, ttl = self._half_life_ms, self._rep_ttl_ms
        calls: list[tuple[str, Sequence[str], Sequence[Any]]] = [
            (
                "neighbourhood",
                (self._nb_key(d.name),),
                (d.events, f"{d.weighted_errors:.6g}", d.penalties, hl, ttl),
            )
            for d in deltas
        ]
        replies = await self._pipeline(calls)
        out = [Reputation(float(r[0]), float(r[1]), float(r[2])) for r in replies]
        index: dict[str, list[Any]] = {}
        for d, r, rep in zip(deltas, replies, out, strict=True):
            if (d.events or d.penalties) and rep.weighted_errors > 0:
                score = math.log2(rep.weighted_errors) + int(r[3]) / hl
                index.setdefault(self._worst_key(d.label or d.name), []).extend(
                    (f"{score:.9f}", d.label or d.name)
                )
        more: list[tuple[str, Sequence[str], Sequence[Any]]] = []
        for key, members in index.items():
            more += [
                ("ZADD", (key,), members),
                ("ZREMRANGEBYRANK", (key,), (0, -(self._worst_keep + 1))),
                ("PEXPIRE", (key,), (ttl,)),
            ]
        if more:
            await self._pipeline(more)
        return out

    async def worst_neighbourhoods(self, limit: int) -> list[tuple[str, float]]:
        now = await self._store_now_ms()
        keys = [f"{self._p}:{{nbw{n}}}:worst" for n in range(self._shards)]
        replies = await self._pipeline(
            [("ZREVRANGE", (k,), (0, max(0, limit - 1), "WITHSCORES")) for k in keys]
        )
        rows: list[tuple[str, float]] = []
        for reply in replies:
            flat = list(reply)
            if flat and isinstance(flat[0], (list, tuple)):
                flat = [x for pair in flat for x in pair]
            for member, score in zip(flat[::2], flat[1::2], strict=True):
                value = 2.0 ** (float(score) - now / self._half_life_ms)
                label = member.decode() if isinstance(member, bytes) else str(member)
                rows.append((label, value))
        rows.sort(key=lambda row: -row[1])
        return rows[:limit]

    async def neighbourhood_held(self, name: str, label: str) -> list[Held]:
        key, worst = self._nb_key(name), self._worst_key(label)
        expires, value, score, (sec, usec) = await self._pipeline(
            [
                ("PEXPIRETIME", (key,), ()),
                ("HGETALL", (key,), ()),
                ("ZSCORE", (worst,), (label,)),
                ("TIME", (), ()),
            ]
        )
        now = int(sec) * 1000 + int(usec) // 1000
        out = []
        if value:
            out.append(
                Held(
                    "neighbourhood_reputation",
                    name,
                    key,
                    int(expires),
                    self._describe_rep(value, now),
                )
            )
        if score is not None:
            out.append(
                Held(
                    "worst_index",
                    name,
                    worst,
                    now + self._rep_ttl_ms,
                    "listed among the worst neighbourhoods",
                    label,
                )
            )
        return out

    async def last_lift(self, identity: str) -> LiftRecord | None:
        async with mapped_errors():
            raw = await self._client.get(self._key(identity, "l"))
        return LiftRecord.decode(cast(bytes, raw).decode()) if raw else None

    # --- windows

    async def record(self, items: Sequence[ReportItem]) -> list[Window]:
        calls = []
        head, tails = self._record_head, self._record_tails
        for item in items:
            w = item.weighted
            args: list[Any] = [
                *head,
                item.fingerprint,
                *tails[item.shared_configured],
                f"{w:.6g}" if w else b"0",
            ]
            for outcome, n in item.counts:
                args += (outcome, n)
            calls.append(("record", self._record_keys(item), args))
        if len(calls) == 1:
            replies = [await self._evalsha(*calls[0])]
        else:
            replies = await self._pipeline(calls)
        windows = [_window(item, r) for item, r in zip(items, replies, strict=True)]
        marked = [
            (
                FeedEvent(SHARED, item.mark, int(r[2]) + self._shared_ttl_ms),
                self._skey(item.mark),
            )
            for item, r, w in zip(items, replies, windows, strict=True)
            if w.newly_shared
        ]
        if marked:
            await self._announce(marked)
        return windows

    # --- fleet-wide indexes

    async def _store_now_ms(self) -> int:
        async with mapped_errors():
            sec, usec = await self._client.time()
        return int(sec) * 1000 + int(usec) // 1000

    def _shard_keys(self, kind: str) -> list[str]:
        if kind == "active":
            return [f"{self._p}:{{idx{n}}}:active" for n in range(self._shards)]
        return [f"{self._p}:{{sh{n}}}:shared" for n in range(self._shards)]

    def _live(self, kind: str, now: int) -> list[tuple[str, Sequence[str], Sequence[Any]]]:
        """ZCOUNTs of the members of every shard of an index that expire after `now`."""
        return [("ZCOUNT", (k,), (f"({now}", "+inf")) for k in self._shard_keys(kind)]

    async def count_penalties(self) -> int:
        replies = await self._pipeline(self._live("active", await self._store_now_ms()))
        return sum(int(n) for n in replies)

    async def _index_page(self, key: str, lo: int, offset: int, num: int) -> list[tuple[str, int]]:
        """(member, expiry) of one index shard from score `lo` on, in index order."""
        batch = await self._client.zrangebyscore(
            key, lo, "+inf", start=offset, num=num, withscores=True
        )
        return [(m.decode(), int(score)) for m, score in cast(list[tuple[bytes, float]], batch)]

    async def _mget(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        # Keys of different identities live in different slots on a Cluster.
        get = self._client.mget_nonatomic if self._cluster else self._client.mget
        raw = await get(keys)
        return [r.decode() if r is not None else None for r in cast(list[bytes | None], raw)]

    async def _penalty_reasons(self, identities: Sequence[str]) -> list[str | None]:
        """The reasons of active penalties (None where it ended), one pipeline."""
        if not identities:
            return []
        now = self.clock.now_ms()
        calls = [("HMGET", (self._key(i, "w"),), ("p", "x")) for i in identities]
        out: list[str | None] = []
        for reason, expires in await self._pipeline(calls):
            out.append(reason.decode() if reason and int(expires or 0) > now else None)
        return out

    async def list_penalties(
        self, after: PageCursor | None, limit: int
    ) -> tuple[list[Penalty], PageCursor | None]:
        """Shard by shard, each in (expiry, identity) order; stable under inserts/removals.

        Raises ValueError for a cursor that names no shard of this store (a crafted
        page token), before any I/O."""
        if after is not None and not 0 <= after.shard < self._shards:
            raise ValueError("not a page token from this service")
        now = await self._store_now_ms()
        keys = self._shard_keys("active")
        rows: list[tuple[int, str, int]] = []  # (shard, identity, expires)
        shard = after.shard if after else 0
        async with mapped_errors():
            while shard < self._shards and len(rows) <= limit:
                resume = after is not None and after.shard == shard
                lo = max(now + 1, after.expires_at_ms) if after and resume else now + 1
                offset = 0
                while len(rows) <= limit:
                    batch = await self._index_page(keys[shard], lo, offset, limit + 1)
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
            reasons = await self._penalty_reasons([i for _, i, _ in page])
        penalties = [
            Penalty(i, e - now, e, r)
            for (_, i, e), r in zip(page, reasons, strict=True)
            if r is not None  # lifted or expired since the index was read
        ]
        more = len(rows) > limit
        cursor = PageCursor(page[-1][0], page[-1][2], page[-1][1]) if more and page else None
        return penalties, cursor

    async def flush_stats(self, delta: StatsDelta) -> None:
        """One pipeline per flush: the baseline on this replica's shard, identities seen
        into their shards' HyperLogLogs, and a degraded mark."""
        now = self.clock.now_ms()
        bucket = int(now // self._bucket_ms)
        gen = int(now // self._window_ms)
        calls: list[tuple[str, Sequence[str], Sequence[Any]]] = []
        if delta.events:
            key = f"{self._p}:{{bl{_shard(delta.replica, self._shards)}}}:{bucket}"
            calls += [
                ("HINCRBY", (key,), ("n", delta.events)),
                ("HINCRBYFLOAT", (key,), ("e", delta.weighted_errors)),
                ("PEXPIRE", (key,), (self._window_ms + self._bucket_ms,)),
            ]
        if delta.degraded:
            key = f"{self._p}:{{rep}}:degraded"
            calls += [
                ("ZADD", (key,), (int(now), delta.replica)),
                ("ZREMRANGEBYSCORE", (key,), ("-inf", int(now) - 60_000)),
                ("PEXPIRE", (key,), (120_000,)),
            ]
        if calls:
            await self._pipeline(calls)
        # Identities seen go to their shards' HyperLogLogs in slices that yield to the
        # event loop: at Session rates a flush holds ~100k identities, and doing them in
        # one go stalled every call on this replica for ~90 ms (measured with py-spy).
        identities = list(delta.identities)
        for start in range(0, len(identities), 2000):
            by_shard: dict[int, list[str]] = {}
            for identity in identities[start : start + 2000]:
                by_shard.setdefault(_shard(identity, self._shards), []).append(identity)
            hll = [
                call
                for shard, members in by_shard.items()
                for call in (
                    ("PFADD", (f"{self._p}:{{trk{shard}}}:{gen}",), members),
                    ("PEXPIRE", (f"{self._p}:{{trk{shard}}}:{gen}",), (2 * self._window_ms,)),
                )
            ]
            await self._pipeline(hll)

    async def fleet_stats(self) -> FleetStats:
        now = await self._store_now_ms()
        bucket, gen = now // self._bucket_ms, now // self._window_ms
        n = self._shards
        calls: list[tuple[str, Sequence[str], Sequence[Any]]] = []
        calls += self._live("active", now) + self._live("shared", now)
        calls += [
            ("PFCOUNT", (f"{self._p}:{{trk{s}}}:{gen}", f"{self._p}:{{trk{s}}}:{gen - 1}"), ())
            for s in range(n)
        ]
        # One bucket ahead too: replicas stamp their flushes with their estimate of the
        # store's clock (`StoreClock`), which may run a little ahead of it (seen on a
        # loaded machine: a Cluster test's flush missed from the baseline).
        calls += [
            ("HMGET", (f"{self._p}:{{bl{s}}}:{b}",), ("n", "e"))
            for s in range(n)
            for b in range(bucket - self._nbuckets + 1, bucket + 2)
        ]
        calls.append(("ZCOUNT", (f"{self._p}:{{rep}}:degraded",), (now - 60_000, "+inf")))
        r = await self._pipeline(calls)
        baseline = r[3 * n : -1]
        return FleetStats(
            active_penalties=sum(int(x) for x in r[:n]),
            tracked_identities=sum(int(x) for x in r[2 * n : 3 * n]),
            shared_addresses=sum(int(x) for x in r[n : 2 * n]),
            degraded_replicas=int(r[-1]),
            baseline_events=sum(int(row[0] or 0) for row in baseline),
            baseline_errors=sum(float(row[1] or 0) for row in baseline),
        )

    # --- allowlist

    async def allow(self, entry: AllowEntry, ttl_ms: int) -> AllowEntry:
        now = await self._store_now_ms()
        stored = AllowEntry(entry.cidr, now + ttl_ms, entry.note, entry.actor, now)
        await self._pipeline(
            [("SET", (self._allow_key(entry.cidr),), (stored.encode(), "PX", ttl_ms))]
        )
        event = FeedEvent(ALLOW_ADDED, stored.cidr, stored.expires_at_ms, stored.encode())
        await self._announce([(event, self._allow_index)])
        return stored

    async def remove_allow(self, cidr: str) -> bool:
        removed, *_ = await self._pipeline(
            [("DEL", (self._allow_key(cidr),), ()), ("ZREM", (self._allow_index,), (cidr,))]
        )
        if int(removed):
            await self._announce([(FeedEvent(ALLOW_REMOVED, cidr), None)])
        return bool(int(removed))

    async def allowlist(self) -> list[AllowEntry]:
        now = await self._store_now_ms()
        async with mapped_errors():
            members = await self._index_page(self._allow_index, now + 1, 0, 100_000)
            raw = await self._mget([self._allow_key(c) for c, _ in members])
        return sorted((AllowEntry.decode(r) for r in raw if r), key=lambda e: e.cidr)

    # --- the feed

    async def _snapshot(
        self,
    ) -> tuple[dict[str, tuple[int, str]], dict[str, int], list[AllowEntry]]:
        now = await self._store_now_ms()
        entries: dict[str, tuple[int, str]] = {}
        shared: dict[str, int] = {}
        async with mapped_errors():
            for key in self._shard_keys("active"):
                offset = 0
                while batch := await self._index_page(key, now + 1, offset, 5000):
                    reasons = await self._penalty_reasons([i for i, _ in batch])
                    for (identity, expires), reason in zip(batch, reasons, strict=True):
                        if reason is not None:
                            entries[identity] = (expires, reason)
                    offset += len(batch)
            for key in self._shard_keys("shared"):
                offset = 0
                while batch := await self._index_page(key, now + 1, offset, 5000):
                    shared.update(batch)
                    offset += len(batch)
        return entries, shared, await self.allowlist()

    async def _follow(self) -> None:
        """Keep `view` exact: subscribe, snapshot, apply events; resync on any doubt."""
        backoff = 0.05
        while True:
            pubsub: Any = None
            try:
                async with mapped_errors():
                    if self._cluster:
                        # Cluster pubsub needs the slot map; refresh it on every (re)subscribe,
                        # a failover may have moved the channel's node.
                        await self._feed_client.initialize()
                        await self._feed_client.nodes_manager.initialize()
                    pubsub = self._feed_client.pubsub()
                    await pubsub.subscribe(self._channel)
                    confirm = await pubsub.get_message(timeout=2.0)
                    if not confirm or confirm["type"] != "subscribe":
                        raise StoreUnavailable("no subscribe confirmation from redis")
                    t0 = time.monotonic()
                    now = await self._store_now_ms()
                    self.clock.calibrate(now, (time.monotonic() - t0) * 1000)
                    if self._unannounced:
                        # Before the snapshot, so it holds them; a refusal is no reason
                        # not to sync (they are retried every second, and applied below).
                        with contextlib.suppress(StoreError):
                            await self._retry_announce()
                    self.view.replace(*await self._snapshot())
                    for event, _ in self._unannounced:
                        self.view.apply(event)  # ours, whatever the feed has not carried
                    self.view.synced = True
                    backoff = 0.05
                    log.info("feed_synced", active_penalties=len(self.view))
                    await self._consume(pubsub)
            except asyncio.CancelledError:
                self.view.synced = False
                raise
            except (StoreUnavailable, StoreMisconfigured, ValueError) as exc:
                if self.view.synced:
                    log.warning("feed_lost", error=str(exc))
                    if self._listener is not None:
                        self._listener(FeedEvent(RESYNC, "feed lost"))
                self.view.synced = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()

    async def _consume(self, pubsub: Any) -> None:
        last_seen = last_ping = time.monotonic()
        while True:
            msg = await pubsub.get_message(timeout=0.5)
            now = time.monotonic()
            if msg is not None:
                last_seen = now
                kind = msg["type"]
                if kind == "message":
                    event = FeedEvent.decode(msg["data"])
                    if event.kind == LIFTED:
                        self._forget_unannounced(event.identity)
                    self.view.apply(event)
                    if self._listener is not None:
                        self._listener(event)
                elif kind == "subscribe":
                    raise StoreUnavailable("feed resubscribed: events may have been missed")
            if now - last_ping >= 1.0:
                await pubsub.execute_command("PING")
                last_ping = now
                self.view.sweep()
                if self._unannounced:
                    with contextlib.suppress(StoreError):
                        await self._retry_announce()
            if now - last_seen > 3.0:
                raise StoreUnavailable("feed silent for 3 s")
