"""The penalty loop: store + detector + fail-open, independent of gRPC.

`api` validates requests and maps answers to protobuf; this module does the work: record
outcomes, evaluate windows, start penalties, answer checks and admin calls, and fail
open (DESIGN.md section 8): every store call has a deadline, and a store that is late or
down yields "no penalty, degraded" instead of an error. It composes three units of its
own: `ReportBuffer` (reports kept while the store is down; a report whose deadline
expired is counted "in doubt" instead, a paused Redis still applies it),
`FleetStatistics` (the baseline and fleet figures) and `WatchHub` (WatchPenalties).

Shared addresses (DESIGN.md section 3): as soon as a second client fingerprint shows up
on an address, the store keeps a window per client as well as the address's; each
client is judged on its own window, and the whole address only by the much stricter
shared rules. So a penalty never lands on a whole address merely because detection had
not yet seen enough of its clients: the decision always asks first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import cast

import structlog

from penalty.identity import NetworkSet, bindable, parse_network
from penalty.v1 import penalty_pb2 as pb
from penaltyd import reasons
from penaltyd.batching import Coalescer
from penaltyd.detector import Baseline, Decision, Detector, Standing
from penaltyd.events import FeedEvent
from penaltyd.fleetstats import FleetStatistics
from penaltyd.keying import Keying
from penaltyd.metrics import Metrics
from penaltyd.reportbuffer import ReportBuffer
from penaltyd.reputation import FleetDistribution, Neighbourhoods
from penaltyd.retention import longest_penalty_seconds
from penaltyd.settings import Settings
from penaltyd.store.base import (
    AllowEntry,
    Escalation,
    FleetStats,
    Held,
    LiftRecord,
    PageCursor,
    Penalty,
    ReportItem,
    Reputation,
    Store,
    StoreError,
    Window,
)
from penaltyd.validation import ClientRef
from penaltyd.watch import WatchHub
from serving.logs import RateLimitedLog

log = structlog.get_logger("penaltyd.engine")

#: A report on its way to the store: what the store is told, and who it is about.
Pending = tuple[ReportItem, ClientRef]

#: Where a penalty starts (`Engine._plan`): on the address; on the client behind it; on
#: the address but bound to its one known client (cold start, docs/detection.md).
ADDRESS, CLIENT, BOUND = "address", "client", "bound"


@dataclass(frozen=True, slots=True)
class Answer:
    """What the service knows about one client after a check or a report."""

    identity: str  # the identity the answer is about (a sub-identity for a shared address)
    penalty: Penalty | None
    degraded: bool = False
    allow: AllowEntry | None = None


@dataclass(frozen=True, slots=True)
class Explained:
    ref: ClientRef
    window: Window
    decision: Decision
    sub_decision: Decision | None
    shared_reason: str
    allow: AllowEntry | None
    last_lift: LiftRecord | None
    baseline: Baseline
    window_seconds: int
    standing: Standing | None = None  # reputation (None for a whole address told apart)
    reputation: Reputation | None = None  # the address's long-horizon counters
    neighbourhood: str = ""  # its network ("203.0.113.0/24")
    neighbourhood_reputation: Reputation | None = None


@dataclass(frozen=True, slots=True)
class ReputationView:
    """The reputation query (PenaltyAdmin.Reputation): an address's or a network's."""

    identity: str  # "" for a network query
    network: str
    reputation: Reputation | None  # the address's (None for a network query)
    neighbourhood: Reputation
    standing: Standing


@dataclass(frozen=True, slots=True)
class Disclosed:
    ref: ClientRef
    items: list[Held]
    at_ms: int
    keyed: bool


#: The deadline of a store that never suspends (`Store.in_process`): nothing to time.
_NO_DEADLINE: contextlib.nullcontext[None] = contextlib.nullcontext()

#: Disclose scans the store's keys: it may take longer than other admin calls.
DISCLOSE_TIMEOUT_S = 60.0


class Engine:
    """Checks, reports and admin calls over a store, failing open.

    `clock` (monotonic seconds) times the degraded window and `wall_ms` stamps lift
    records: injected, so the simulator runs the engine on simulated time.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.settings = settings
        self.store = store
        self.detector = Detector(settings)
        self.metrics = metrics or Metrics()
        self.replica = uuid.uuid4().hex[:12]
        self._check_timeout = settings.check_timeout_ms / 1000
        self._report_timeout = settings.report_timeout_ms / 1000
        self._per_item_timeout = settings.report_timeout_per_item_ms / 1000
        self._admin_timeout = settings.admin_timeout_ms / 1000
        self._penalty_ms = settings.penalty_seconds * 1000
        self._escalation = Escalation(
            settings.escalation_multiplier,
            settings.escalation_cap_seconds * 1000,
            settings.escalation_window_seconds * 1000,
        )
        self._shared_cidrs: NetworkSet[bool] = NetworkSet()
        for cidr in settings.shared_cidrs:
            self._shared_cidrs.add(parse_network(cidr), True)
        self._clock = clock
        self._wall_ms = wall_ms
        self.keying = Keying(*settings.identity_keys())
        self.buffer: ReportBuffer[Pending] = ReportBuffer(
            settings.report_buffer, self.metrics, settings.window_seconds, clock
        )
        self._degraded_log = RateLimitedLog(log)
        self._tasks: list[asyncio.Task[None]] = []
        self._reports: Coalescer[tuple[ClientRef, Sequence[tuple[int, int]]], Answer] | None = None
        self._direct = False  # reports skip the Coalescer (see `start`)
        # The bulk lane: large Session messages are processed one at a time, in slices of
        # `slice_size` items with a yield between, so checks never wait behind a flood.
        self.slice_size = settings.bulk_slice
        self._bulk = asyncio.Semaphore(settings.bulk_lanes)
        rules = settings.identity_rules
        done = pb.PenaltyEvent(
            kind=pb.PenaltyEvent.Kind.KIND_SNAPSHOT_DONE,
            smtp_reply_template=settings.smtp_reply,
            identity_rules=pb.IdentityRules(
                ipv4_prefix=rules.ipv4_prefix,
                ipv6_prefix=rules.ipv6_prefix,
                nat64_prefixes=rules.nat64_prefixes,
            ),
        )
        self.hub = WatchHub(
            lambda: self.store.snapshot_raw(),
            store.now_ms,
            self.reveal,
            done,
            log_size=settings.watch_log_events,
            stall_seconds=settings.watch_stall_seconds,
            address=self.keying.reveal_label,
            max_age=longest_penalty_seconds(settings),
            clock=clock,
        )
        self.degraded_until = 0.0
        self._down_since: float | None = None
        self.stats = FleetStatistics(
            store,
            self.detector,
            self.metrics,
            replica=self.replica,
            identity_cap=settings.baseline_identity_events,
            timeout_s=self._admin_timeout,
            degraded=lambda: self.degraded,
        )
        self.neighbourhoods = Neighbourhoods(
            settings, self.keying, store.now_ms, self._admin_timeout
        )
        self.distribution = FleetDistribution()

    async def start(self) -> None:
        self.store.listen(self._on_event)
        await self.store.start()
        self._reports = Coalescer(self.report_many)
        # A store whose single calls already share round trips (the Redis lane's single
        # flight, `serving.redis.lane`) gains nothing from the hand-off (docs/performance.md),
        # nor does one that never suspends (`in_process`): no call is ever on the wire when
        # the next arrives, so nothing would ever queue behind it.
        self._direct = self.store.in_process or bool(
            getattr(getattr(self.store, "topology", None), "lane", False)
        )
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="engine-housekeeping"))
        self._tasks.append(asyncio.create_task(self._stats_loop(), name="engine-stats"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._reports:
            await self._reports.close()
        self.hub.close()
        self.store.listen(None)
        await self.store.close()

    # --- fail-open bookkeeping

    def failed(self, op: str, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = self._clock()
        self.degraded_until = self._clock() + 10.0
        self.metrics.degraded.set(1)
        self._degraded_log.warning(
            "store_unavailable_fail_open", op=op, error=str(exc) or type(exc).__name__
        )

    def answered(self) -> None:
        """The store answered (its health probe): if it had been failing, say it is back."""
        if self._down_since is not None:
            log.info(
                "store_recovered",
                store=self.store.kind,
                down_seconds=round(self._clock() - self._down_since, 1),
            )
            self._down_since = None

    @property
    def degraded(self) -> bool:
        return self._clock() < self.degraded_until

    @property
    def baseline(self) -> Baseline:
        """The fleet-wide baseline the threshold adapts to (from the last stats read)."""
        return self.stats.baseline

    @property
    def fleet(self) -> FleetStats:
        return self.stats.fleet

    # --- checks

    def shared_configured(self, ref: ClientRef) -> str | None:
        """The configured shared CIDR containing the client, if any."""
        if not len(self._shared_cidrs):
            return None
        hit = self._shared_cidrs.match(ref.addr)
        return hit[0] if hit else None

    def _local(self, ref: ClientRef) -> tuple[bool, Answer | None]:
        """The check fast path: allowlist and in-process penalties, no I/O."""
        allow = self.store.allowed(ref.addr)
        if allow is not None:
            return True, Answer(ref.identity, None, allow=allow)
        sid = self.keying.store_identity
        known, penalty = self.store.local_penalty(sid(ref.identity))
        if not known:
            return False, None
        if penalty is not None and not self.keying.binds(penalty.reason, ref.marks):
            penalty = None  # bound to another client of the address (cold start)
        if penalty is None and ref.fingerprint:
            _, sub = self.store.local_penalty(sid(ref.sub_identity))
            if sub is not None:
                return True, Answer(ref.sub_identity, sub)
        if penalty is None and self.keying.rotating:
            return True, self._local_previous(ref)
        return True, Answer(ref.identity, penalty)

    def _local_previous(self, ref: ClientRef) -> Answer:
        """During a key rotation: penalties started under the previous key."""
        for plain in (ref.identity, ref.sub_identity) if ref.fingerprint else (ref.identity,):
            old = self.keying.previous_identity(plain)
            if old is not None:
                _, penalty = self.store.local_penalty(old)
                if penalty is not None and self.keying.binds(penalty.reason, ref.marks):
                    return Answer(plain, penalty)
        return Answer(ref.identity, None)

    def _count_check(self, answer: Answer) -> Answer:
        (self.metrics.check_tempfail if answer.penalty else self.metrics.check_pass).inc()
        return answer

    async def check(self, ref: ClientRef) -> Answer:
        t0 = time.perf_counter()
        known, answer = self._local(ref)
        if known:
            assert answer is not None
            self.metrics.check_view.observe(time.perf_counter() - t0)
            return self._count_check(answer)
        answered = (await self._check_store([ref]))[0]
        self.metrics.check_store.observe(time.perf_counter() - t0)
        return answered

    async def check_many(self, refs: Sequence[ClientRef]) -> list[Answer]:
        answers: list[Answer | None] = []
        missing: list[ClientRef] = []
        for ref in refs:
            known, answer = self._local(ref)
            answers.append(self._count_check(answer) if known and answer else None)
            if not known:
                missing.append(ref)
        if missing:
            fetched = iter(await self._check_store(missing))
            answers = [a if a is not None else next(fetched) for a in answers]
        return [a for a in answers if a is not None]

    async def _check_store(self, refs: Sequence[ClientRef]) -> list[Answer]:
        # One read per distinct identity: the address, and the client behind it when the
        # MX told us who that is (no fingerprint: the two are the same key); during a key
        # rotation, under both keys' names.
        names = self.keying.store_names
        ids = list(
            dict.fromkeys(n for r in refs for i in (r.identity, r.sub_identity) for n in names(i))
        )
        try:
            with self.metrics.store_call("check", self._check_timeout):
                async with asyncio.timeout(self._check_timeout):
                    found = dict(zip(ids, await self.store.penalties(ids), strict=True))
        except (StoreError, TimeoutError) as exc:
            self.failed("check", exc)
            self.metrics.check_degraded.inc(len(refs))
            return [Answer(r.identity, None, degraded=True) for r in refs]

        def held(identity: str, marks: str = "") -> Penalty | None:
            return next(
                (
                    p
                    for n in names(identity)
                    if (p := found[n]) is not None and self.keying.binds(p.reason, marks)
                ),
                None,
            )

        out = []
        for ref in refs:
            whole, sub = held(ref.identity, ref.marks), held(ref.sub_identity)
            if whole is None and sub is not None:
                out.append(self._count_check(Answer(ref.sub_identity, sub)))
            else:
                out.append(self._count_check(Answer(ref.identity, whole)))
        return out

    # --- reports

    def bulk(self) -> asyncio.Semaphore:
        """Hold while processing a large message (see `slice_size`)."""
        return self._bulk

    async def report(self, ref: ClientRef, counts: Sequence[tuple[int, int]]) -> Answer:
        """One report; concurrent callers share a store round trip."""
        assert self._reports is not None, "Engine.start() was not awaited"
        if self._direct:
            return (await self.report_many(((ref, counts),)))[0]
        return await self._reports.submit((ref, counts))

    async def report_many(
        self, batch: Sequence[tuple[ClientRef, Sequence[tuple[int, int]]]]
    ) -> list[Answer]:
        """Record a batch in one round trip; start the penalties it triggers.

        Allowlisted clients are answered at once and nothing of theirs is stored.
        """
        answers: list[Answer | None] = []
        pending: list[Pending] = []
        keying = self.keying
        for ref, counts in batch:
            allow = self.store.allowed(ref.addr)
            if allow is not None:
                answers.append(Answer(ref.identity, None, allow=allow))
                continue
            answers.append(None)
            fp = ref.fingerprint
            weighted = self.detector.weighted(counts)
            item = ReportItem(
                keying.store_identity(ref.identity),
                counts,
                keying.store_fingerprint(fp) if fp else "",
                self.shared_configured(ref) is not None,
                keying.label(ref.identity) if fp and keying.keyed else "",
                weighted,
            )
            self.neighbourhoods.add(ref.addr, sum(n for _, n in counts), weighted)
            pending.append((item, ref))
        if pending:
            fresh = iter(await self._record(pending))
            answers = [a if a is not None else next(fresh) for a in answers]
        return [a for a in answers if a is not None]

    async def _record(self, pending: Sequence[Pending]) -> list[Answer]:
        # A Session message of hundreds of reports (each perhaps starting a penalty) is
        # one pipeline, but a longer one: its deadline grows with it.
        items = [item for item, _ in pending]
        deadline = self._report_timeout + self._per_item_timeout * (len(items) - 1)
        try:
            with self.metrics.store_call("report", deadline):
                async with _NO_DEADLINE if self.store.in_process else asyncio.timeout(deadline):
                    windows = await self.store.record(items)
                    answers = await self._decide(pending, windows)
        except TimeoutError as exc:
            self.failed("report", exc)
            self.metrics.reports_in_doubt.inc(len(items))
            return [Answer(ref.identity, None, degraded=True) for _, ref in pending]
        except StoreError as exc:
            self.failed("report", exc)
            self.buffer.add(pending)
            return [Answer(ref.identity, None, degraded=True) for _, ref in pending]
        self.metrics.reports.inc(len(items))
        self.stats.add(items, windows)
        return answers

    def standing(self, ref: ClientRef, window: Window) -> Standing:
        """What the address's and its neighbourhood's long memory say (pure: no I/O)."""
        return self.detector.standing(
            window.reputation,
            self.neighbourhoods.get(ref.addr),
            self.baseline,
            self.distribution.typical,
        )

    def _plan(
        self, ref: ClientRef, window: Window, erring: bool = True
    ) -> Answer | tuple[str, Decision]:
        """The answer a window gives, or the penalty it starts: (where: ADDRESS, CLIENT
        behind it, or BOUND to the address's one known client; decision). `erring`: the
        report itself holds an error (only then may the penalty bind its client, so an
        attacker's anonymous errors never land on the next bystander). Pure: no I/O."""
        other = False  # the address holds a penalty bound to another of its clients
        if window.penalty is not None:
            if self.keying.binds(window.penalty.reason, ref.marks):
                return Answer(ref.identity, window.penalty)
            other = True
        if window.sub_penalty is not None:
            return Answer(ref.sub_identity, window.sub_penalty)
        if window.sub_counts is None:
            if other:
                # A newcomer not told apart (the bound client has left the window's
                # count of clients): the address's fresh evidence since the bound penalty
                # started is the newcomers' own; on probation, it replaces the binding.
                nc = self.detector.newcomer(window.counts, self.baseline)
                return (ADDRESS, nc) if nc.fire else Answer(ref.identity, None)
            # Judged alone, with its history and its neighbourhood's as evidence. When the
            # address's one client is known (its HELO, sender), the penalty on the address
            # binds that client (cold start): clients that come later and differ in every
            # mark are not deferred, so they are reported and the address is told apart.
            if not self.detector.has_errors(window.counts):
                return Answer(ref.identity, None)  # no rule fires without an error (cheap)
            decision = self.detector.judge(window.counts, self.baseline, self.standing(ref, window))
            if not decision.fire:
                return Answer(ref.identity, None)
            bound = erring and bindable(ref.marks) and window.distinct <= 1 and not window.shared
            return (BOUND if bound else ADDRESS), decision
        # Told apart: the client on its own window, the whole address by the shared rules.
        # A newcomer behind an address penalized for another client is on probation: the
        # spammer that changes HELO and sender to shed its penalty is deferred again on
        # a few errors of the new client's, not twenty.
        sub = self.detector.evaluate(window.sub_counts, self.baseline)
        if not sub.fire and other:
            sub = self.detector.newcomer(window.sub_counts, self.baseline)
        if sub.fire:
            return CLIENT, sub
        # The whole address by the shared rules, also while a penalty binds one of its
        # clients: its fresh evidence is then the newcomers', and a spammer rotating HELO
        # and sender (a newcomer each time) meets them after ~30 attempts; the penalty
        # they start is unbound and replaces the bound one (start_penalty.lua).
        whole = self.detector.evaluate(window.counts, self.baseline, shared=True)
        return (ADDRESS, whole) if whole.fire else Answer(ref.identity, None)

    async def _decide(self, pending: Sequence[Pending], windows: Sequence[Window]) -> list[Answer]:
        """Answers for a batch; every penalty it triggers starts in one store batch."""
        out: list[Answer | tuple[str, str, str]] = []  # or (store name, identity, marks)
        firing: dict[str, tuple[str, Decision]] = {}  # store name -> (identity, decision)
        refs: dict[str, ClientRef] = {}
        binding: dict[str, str] = {}  # store name -> marks of the client a penalty binds
        for (item, ref), window in zip(pending, windows, strict=True):
            if window.newly_shared:
                log.info("shared_address_marked", identity=ref.identity, rule="detected")
            self.distribution.add(item.identity, window.reputation)
            plan = self._plan(ref, window, item.weighted > 0)
            if isinstance(plan, Answer):
                out.append(plan)
                continue
            where, decision = plan
            name, plain = (
                (item.sub_identity, ref.sub_identity)
                if where == CLIENT
                else (item.identity, ref.identity)
            )
            if name not in firing:
                firing[name] = (plain, decision)
                refs[name] = ref
                if where == BOUND:
                    binding[name] = ref.marks
            out.append((name, plain, ref.marks))
        if not firing:
            return cast(list[Answer], out)
        starts = [
            (
                name,
                self._penalty_ms,
                self.keying.stored_reason(reasons.encode(d), plain, binding.get(name, "")),
            )
            for name, (plain, d) in firing.items()
        ]
        started = await self.store.start_penalties(starts, self._escalation)
        penalties = {}
        for (name, (plain, decision)), (penalty, created) in zip(
            firing.items(), started, strict=True
        ):
            if not created and penalty.remaining_ms <= 0:
                # The store refused to start it (the embedded store's penalty table is
                # full): fail open, counted, never a tempfail of its own making.
                self.metrics.penalties_refused.inc()
                self._degraded_log.warning("penalty_refused_store_full", identity=plain)
                continue
            penalties[name] = penalty
            if created:
                self.metrics.penalties_started.labels(decision.rule).inc()
                self.neighbourhoods.add(refs[name].addr, 0, 0.0, 1)
                log.info(
                    "penalty_started",
                    identity=plain,
                    reason=reasons.render(penalty.reason),
                    rule=decision.rule,
                    seconds=penalty.seconds_left,
                )
        return [a if isinstance(a, Answer) else self._answer(a, penalties) for a in out]

    def _answer(self, started: tuple[str, str, str], penalties: dict[str, Penalty]) -> Answer:
        """A report's answer from the penalties its batch started: one bound to another
        client of the address (started by an earlier report of the batch) is not its."""
        name, plain, marks = started
        penalty = penalties.get(name)
        if penalty is not None and not self.keying.binds(penalty.reason, marks):
            penalty = None
        return Answer(plain, penalty)

    async def flush_buffer(self) -> int:
        """Replay buffered reports; returns how many were stored (stops at a failure)."""

        async def apply(chunk: Sequence[Pending]) -> None:
            await self._decide(chunk, await self.store.record([item for item, _ in chunk]))

        return await self.buffer.replay(apply, self._admin_timeout)

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    async def ping(self) -> None:
        """The store's health probe, timed like every store call."""
        with self.metrics.store_call("ping", 1.0):
            await self.store.ping()

    # --- admin

    @contextlib.asynccontextmanager
    async def _admin_call(self, op: str) -> AsyncIterator[None]:
        """The deadline of an admin call's store work, timed (timeouts included)."""
        with self.metrics.store_call(op, self._admin_timeout):
            async with asyncio.timeout(self._admin_timeout):
                yield

    async def explain(self, ref: ClientRef) -> Explained:
        configured = self.shared_configured(ref)
        keying = self.keying
        item = ReportItem(
            keying.store_identity(ref.identity),
            (),
            keying.store_fingerprint(ref.fingerprint) if ref.fingerprint else "",
            configured is not None,
        )
        async with self._admin_call("explain"):
            (window,) = await self.store.record([item])
            last_lift = None
            for plain in (ref.identity, ref.sub_identity) if ref.fingerprint else (ref.identity,):
                for name in keying.store_names(plain):
                    last_lift = last_lift or await self.store.last_lift(name)
            if window.penalty is None and keying.rotating:
                # A penalty started under identity_key_previous still answers checks: so
                # does Explain (its window, under the new key, starts afresh).
                for name in keying.store_names(ref.identity)[1:]:
                    (held,) = await self.store.penalties([name])
                    if held is not None:
                        window = dataclasses.replace(window, penalty=held)
        told_apart = window.sub_counts is not None
        standing = None if told_apart else self.standing(ref, window)
        if not told_apart and window.penalty is None and ref.fingerprint:
            # A cold-start penalty is on the client, not the address: it is this client's.
            async with self._admin_call("explain"):
                for name in keying.store_names(ref.sub_identity):
                    (held,) = await self.store.penalties([name])
                    if held is not None:
                        window = dataclasses.replace(window, penalty=held)
                        break
        if configured:
            why = f"configured: {configured} is in shared_cidrs"
        elif window.shared:
            why = (
                f"detected: more than {self.settings.shared_min_sub_identities} distinct "
                f"clients within the window ({window.distinct} seen)"
            )
        elif told_apart:
            why = (
                f"not shared yet; {window.distinct} distinct clients seen, "
                "each judged on its own window"
            )
        else:
            why = ""
        return Explained(
            ref=ref,
            window=window,
            decision=(
                self.detector.evaluate(window.counts, self.baseline, shared=True)
                if told_apart
                else self.detector.judge(window.counts, self.baseline, standing)
            ),
            sub_decision=(
                self.detector.evaluate(window.sub_counts, self.baseline)
                if window.sub_counts is not None
                else None
            ),
            shared_reason=why,
            allow=self.store.allowed(ref.addr),
            last_lift=last_lift,
            baseline=self.baseline,
            window_seconds=self.settings.window_seconds,
            standing=standing,
            reputation=window.reputation,
            neighbourhood=self.neighbourhoods.of(ref.addr),
            neighbourhood_reputation=self.neighbourhoods.get(ref.addr),
        )

    async def reputation(self, ref: ClientRef | None, network: str = "") -> ReputationView:
        """An address's reputation and its neighbourhood's, or one neighbourhood's (fresh
        from the store, not the cache); `network` as `Validator.neighbourhood` gives it."""
        nbs = self.neighbourhoods
        if ref is not None:
            network = nbs.of(ref.addr)
        rep = None
        async with self._admin_call("reputation"):
            if ref is not None:
                item = ReportItem(self.keying.store_identity(ref.identity), ())
                (window,) = await self.store.record([item])
                rep = window.reputation
            nb = await nbs.read(self.store, network)
        standing = self.detector.standing(rep, nb, self.baseline, self.distribution.typical)
        return ReputationView(ref.identity if ref else "", network, rep, nb, standing)

    async def worst_neighbourhoods(self, limit: int) -> list[ReputationView]:
        """The neighbourhoods with the most (decayed) weighted errors, worst first."""
        nbs = self.neighbourhoods
        out = []
        async with self._admin_call("reputation"):
            for label, _ in await self.store.worst_neighbourhoods(limit):
                network = self.keying.reveal_label(label)
                try:
                    parse_network(network)
                except ValueError:
                    continue  # sealed under a key this replica lacks
                nb = await nbs.read(self.store, network)
                standing = self.detector.standing(
                    None, nb, self.baseline, self.distribution.typical
                )
                out.append(ReputationView("", network, None, nb, standing))
        out.sort(key=lambda v: -v.neighbourhood.weighted_errors)
        return out

    async def lift(self, ref: ClientRef, actor: str, note: str) -> list[str]:
        """Lift the address's penalty and, with a fingerprint, the client's; returns what ended."""
        record = LiftRecord(actor, note, self._wall_ms())
        targets = [ref.identity] + ([ref.sub_identity] if ref.fingerprint else [])
        lifted = []
        async with self._admin_call("lift"):
            for identity in targets:
                for name in self.keying.store_names(identity):
                    if await self.store.lift(name, record) and identity not in lifted:
                        lifted.append(identity)
        if not lifted and not ref.fingerprint:
            lifted = await self._lift_clients(ref, record)
        log.info("penalty_lifted", identity=ref.identity, lifted=lifted, actor=actor, note=note)
        return lifted

    async def _lift_clients(self, ref: ClientRef, record: LiftRecord) -> list[str]:
        """Lift by address alone when the penalty is on a client behind it (a cold-start
        penalty lands on its one known client): found by the scan Disclose uses."""
        lifted = []
        timeout = max(self._admin_timeout, DISCLOSE_TIMEOUT_S)
        with self.metrics.store_call("lift", timeout):
            async with asyncio.timeout(timeout):
                for name in self.keying.store_names(ref.identity):
                    for h in await self.store.held(name, name):
                        client = h.kind == "penalty" and h.identity.startswith(name + "#")
                        if client and await self.store.lift(h.identity, record):
                            lifted.append(ref.identity + h.identity[len(name) :])
        return lifted

    async def disclose(self, ref: ClientRef) -> Disclosed:
        """Everything held about the address and every client behind it (Disclose).

        Under each name the address has in the store (both keys during a rotation), named
        back by its plain identity; a client behind it keeps its fingerprint (a keyed
        hash: nobody can say which HELO name or sender it was, only that it is one)."""
        keying = self.keying
        items: list[Held] = []
        timeout = max(self._admin_timeout, DISCLOSE_TIMEOUT_S)
        with self.metrics.store_call("disclose", timeout):
            async with asyncio.timeout(timeout):
                names = keying.store_names(ref.identity)
                for name, mark in zip(names, keying.store_labels(ref.identity), strict=True):
                    for h in await self.store.held(name, mark):
                        plain = ref.identity + h.identity[len(name) :]
                        reason = h.content
                        if h.kind == "penalty":
                            reason = reasons.render(h.content)
                        items.append(
                            Held(h.kind, plain, h.stored_as, h.expires_at_ms, reason, h.member)
                        )
                network = self.neighbourhoods.of(ref.addr)
                nb_name = self.neighbourhoods.name(network)
                for h in await self.store.neighbourhood_held(
                    nb_name, self.neighbourhoods.label(network)
                ):
                    items.append(
                        Held(
                            h.kind,
                            ref.identity,
                            h.stored_as,
                            h.expires_at_ms,
                            f"{network}: {h.content}",
                            h.member,
                        )
                    )
                allow = await self.store.allowlist()
        for entry in allow:
            if ref.addr in parse_network(entry.cidr):
                items.append(
                    Held(
                        "allow_entry",
                        ref.identity,
                        f"allowlist[{entry.cidr}]",
                        entry.expires_at_ms,
                        f"allowlisted by {entry.actor or '?'}: {entry.note or '(no note)'}",
                    )
                )
        return Disclosed(ref, items, self.store.now_ms(), keying.keyed)

    async def allow(self, cidr: str, ttl_s: int, note: str, actor: str) -> AllowEntry:
        async with self._admin_call("allow"):
            entry = await self.store.allow(AllowEntry(cidr, 0, note, actor), ttl_s * 1000)
        log.info("allowlist_added", cidr=cidr, ttl_seconds=ttl_s, actor=actor, note=note)
        return entry

    async def remove_allow(self, cidr: str, actor: str) -> bool:
        async with self._admin_call("allow"):
            removed = await self.store.remove_allow(cidr)
        log.info("allowlist_removed", cidr=cidr, removed=removed, actor=actor)
        return removed

    async def allowlist(self) -> list[AllowEntry]:
        async with self._admin_call("allow"):
            return await self.store.allowlist()

    async def fleet_stats(self) -> FleetStats:
        async with self._admin_call("stats_read"):
            self.stats.fleet = await self.store.fleet_stats()
        return self.stats.fleet

    async def list_penalties(
        self, after: PageCursor | None, limit: int
    ) -> tuple[list[Penalty], PageCursor | None]:
        async with self._admin_call("list"):
            page, cursor = await self.store.list_penalties(after, limit)
        return [self._revealed(p) for p in page], cursor

    def _revealed(self, p: Penalty) -> Penalty:
        """A penalty as the store holds it, named by its plain identity (with identity_key,
        from its sealed identity; a penalty sealed under a key we lack keeps its token)."""
        if not self.keying.keyed:
            return p
        identity, compact = self.keying.reveal(p.identity, p.reason)
        return Penalty(identity, p.remaining_ms, p.expires_at_ms, compact)

    def reveal(self, stored: str, reason: str) -> tuple[str, str, str]:
        """(identity, sentence, marks of the client it binds) of a penalty as the store
        names it (the watch hub's)."""
        identity, _, marks = self.keying.reveal_bound(stored, reason)
        return identity, reasons.render(reason), marks

    # --- the watch hub (WatchPenalties)

    def _on_event(self, event: FeedEvent) -> None:
        self.hub.publish(event)

    # --- background

    async def _housekeeping(self) -> None:
        """Replay buffered reports, refresh gauges."""
        while True:
            await asyncio.sleep(0.25)
            self.metrics.feed_synced.set(1 if self.store.feed_exact else 0)
            if self.buffer:
                await self.flush_buffer()
            if self.degraded_until and not self.degraded:
                self.degraded_until = 0.0
                self.metrics.degraded.set(0)

    async def _stats_loop(self) -> None:
        """Flush this replica's aggregates, then read the fleet's, every few seconds.

        Aggregating locally and flushing every few seconds keeps the fleet-wide baseline
        free of a hot key per request.
        """
        while True:
            await asyncio.sleep(self.settings.stats_flush_seconds)
            await self.refresh_stats()

    async def refresh_stats(self) -> bool:
        """One flush and read of the fleet statistics (`FleetStatistics.refresh`), then of
        the neighbourhoods' reputation (`Neighbourhoods.flush`)."""
        ok = await self.stats.refresh()
        typical = self.distribution.refresh()
        flushed = await self.neighbourhoods.flush(self.store)
        m, detector = self.metrics, self.detector
        m.reputation_typical_ratio.set(typical or 0.0)
        m.reputation_threshold.set(detector.reputation_threshold(self.baseline, typical))
        m.bad_neighbourhoods.set(
            sum(
                1
                for rep in self.neighbourhoods.flushed
                if detector.standing(None, rep, self.baseline, typical).bad_neighbourhood
            )
        )
        return flushed and ok
