"""gRPC servicers: validate, call the engine, map answers and errors once.

Bad input never reaches the store: `Validator` raises `BadField` and the call ends with
`INVALID_ARGUMENT` naming the field. Store trouble on the MX path never becomes an
error either: the engine answers fail-open verdicts (`degraded=true`). Admin calls do
fail (`UNAVAILABLE`) when the store cannot answer: an abuse desk wants to know.

Admin calls need `authorization: Bearer <admin_token>` (`UNAUTHENTICATED` otherwise).
Without a configured token the admin API answers only on a loopback listener, for a
single node's operator (`make run`); elsewhere it is `PERMISSION_DENIED`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import NoReturn, TypeVar

import grpc
import structlog

from penalty import replies
from penalty.v1 import penalty_pb2, penalty_pb2_grpc
from penaltyd import reasons
from penaltyd.detector import Decision, Standing, wilson_lower_bound
from penaltyd.engine import Answer, Engine, Explained, ReputationView
from penaltyd.store.base import PageCursor, Penalty, Reputation
from penaltyd.validation import Validator
from penaltyd.watch import WatchEnded, allow_message
from serving.errors import BadField, BadMessage, abort_invalid
from serving.gates import AdminGate, CallerGate, operator_call

log = structlog.get_logger("penaltyd.api")
audit_log = structlog.get_logger("penaltyd.audit")

Verdict = penalty_pb2.Verdict
Kind = penalty_pb2.PenaltyEvent.Kind
R = TypeVar("R")


#: Rendered tempfail verdicts kept (`Replies.verdict`); the cache is emptied when full.
VERDICT_CACHE = 4096


class Replies:
    """Turns answers into Verdicts with the configured SMTP reply.

    A tempfail verdict is rendered once per penalty, address and second left, not per
    call: every check that hits the same penalty within the same second gets the same
    (read-only) message, so a penalized check costs a dictionary lookup more than a pass
    instead of two string renders and a seven-field message (docs/performance.md).
    """

    def __init__(self, template: str, client_of: Callable[[str], str] = reasons.bound) -> None:
        self._template = template
        self.render = reasons.render
        # The plain marks of the one client a bound penalty applies to (`Keying.client_marks`).
        self._client_of = client_of
        self._tempfail: dict[tuple[str, str, int, int, str, bool], penalty_pb2.Verdict] = {}

    def verdict(self, answer: Answer, ip: str) -> penalty_pb2.Verdict:
        p = answer.penalty
        if p is None:
            return Verdict(
                identity=answer.identity,
                degraded=answer.degraded,
                allowlisted=answer.allow is not None,
            )
        seconds = p.seconds_left
        key = (answer.identity, ip, p.expires_at_ms, seconds, p.reason, answer.degraded)
        cached = self._tempfail.get(key)
        if cached is not None:
            return cached
        if len(self._tempfail) >= VERDICT_CACHE:
            self._tempfail.clear()
        verdict = self._tempfail[key] = Verdict(
            tempfail=True,
            seconds_left=seconds,
            expires_at_unix_ms=p.expires_at_ms,
            identity=answer.identity,
            reason=self.render(p.reason),
            smtp_reply=replies.render(self._template, ip, answer.identity, seconds),
            degraded=answer.degraded,
            client=self._client_of(p.reason),
        )
        return verdict

    def penalty(self, p: Penalty) -> penalty_pb2.Penalty:
        return penalty_pb2.Penalty(
            identity=p.identity,
            seconds_left=p.seconds_left,
            expires_at_unix_ms=p.expires_at_ms,
            reason=self.render(p.reason),
        )


allow_entry = allow_message

#: What holds an address (or its token) but cannot be read back per address: Disclose
#: names these in every answer (docs/privacy.md, "What Disclose cannot itemize").
NOT_ITEMIZED = [
    "fleet identity counts: pd:{trk<N>}:<generation> HyperLogLogs count each identity "
    "seen (registers only; an identity cannot be read back or removed), 2 x window_seconds",
    "logs: penaltyd's log lines (log_addresses decides how addresses are written), kept "
    "as long as the operator's log pipeline keeps them",
    "MX side: live replicas hold active penalties (until they end); sidecars hold reports "
    "for at most their batch interval; penalty-logwatch's spool holds undelivered reports",
]


async def _invalid(
    context: grpc.aio.ServicerContext, err: BadField | BadMessage, engine: Engine
) -> NoReturn:
    await abort_invalid(context, err, engine.metrics.invalid_requests)


class PenaltyService(penalty_pb2_grpc.PenaltyServiceServicer):
    def __init__(
        self,
        engine: Engine,
        validator: Validator,
        replies: Replies,
        gate: CallerGate | None = None,
    ) -> None:
        self.engine = engine
        self.validator = validator
        self.replies = replies
        mode = engine.settings.service_auth
        # `service_auth`: who may report (and, with "all", check and watch).
        self._gate_reports = gate if gate is not None and mode != "none" else None
        self._gate_reads = gate if gate is not None and mode == "all" else None

    async def Check(
        self, request: penalty_pb2.CheckRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.Verdict:
        if self._gate_reads is not None:
            await self._gate_reads.authorize(context, "Check")
        if isinstance(request, BadMessage):
            await _invalid(context, request, self.engine)
        try:
            ref = self.validator.check(request)
        except BadField as err:
            await _invalid(context, err, self.engine)
        return self.replies.verdict(await self.engine.check(ref), ref.ip)

    async def Report(
        self, request: penalty_pb2.ReportRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.Verdict:
        if self._gate_reports is not None:
            await self._gate_reports.authorize(context, "Report")
        if isinstance(request, BadMessage):
            await _invalid(context, request, self.engine)
        try:
            ref, counts = self.validator.report(request)
        except BadField as err:
            await _invalid(context, err, self.engine)
        return self.replies.verdict(await self.engine.report(ref, counts), ref.ip)

    async def Session(
        self,
        request_iterator: AsyncIterator[penalty_pb2.SessionRequest | BadMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[penalty_pb2.SessionResponse]:
        """Each message is validated whole; a bad one is answered with `error` and skipped.

        A message that cannot even be decoded (invalid UTF-8 in a string, say) is answered
        the same way, with its id when it could be read: one crafted message never ends
        the stream of the sidecar that relayed it. Large messages take the engine's bulk
        lane (`Engine.bulk`): one at a time, in slices that let checks run in between.
        """
        if self._gate_reports is not None:
            await self._gate_reports.authorize(context, "Session")
        async for request in request_iterator:
            if isinstance(request, BadMessage):
                self.engine.metrics.invalid_requests.inc()
                yield penalty_pb2.SessionResponse(
                    id=request.id,
                    error=penalty_pb2.FieldError(field=request.field, message=request.message),
                )
                continue
            size = len(request.checks) + len(request.reports)
            if size > self.engine.slice_size:
                async with self.engine.bulk():
                    yield await self._session_message(request, sliced=True)
            else:
                yield await self._session_message(request, sliced=False)

    async def _session_message(
        self, request: penalty_pb2.SessionRequest, *, sliced: bool
    ) -> penalty_pb2.SessionResponse:
        try:
            if sliced:
                checks, reports = await self.validator.session_sliced(
                    request, self.engine.slice_size
                )
            else:
                checks, reports = self.validator.session(request)
        except BadField as err:
            self.engine.metrics.invalid_requests.inc()
            return penalty_pb2.SessionResponse(
                id=request.id, error=penalty_pb2.FieldError(field=err.field, message=err.message)
            )
        engine, verdict = self.engine, self.replies.verdict
        response = penalty_pb2.SessionResponse(id=request.id)
        step = engine.slice_size if sliced else max(1, len(reports))
        for start in range(0, len(reports), step):
            part = reports[start : start + step]
            answers = await engine.report_many(part)
            response.reports.extend(
                verdict(a, r.ip) for a, (r, _) in zip(answers, part, strict=True)
            )
            if sliced:
                await asyncio.sleep(0)  # checks queued behind this message go first
        if checks:
            answers = await engine.check_many(checks)
            response.checks.extend(verdict(a, c.ip) for a, c in zip(answers, checks, strict=True))
        return response

    async def WatchPenalties(  # type: ignore[override]  # writes with context.write (a deadline per write) instead of yielding
        self, request: penalty_pb2.WatchRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> None:
        """Snapshot (ending with SNAPSHOT_DONE), then live changes until the feed is lost.

        Serialized events come from the engine's `WatchHub` (shared by every watcher);
        each write must complete within `watch_stall_seconds` or the stream ends with
        RESOURCE_EXHAUSTED: a reader that stops reading costs a bounded buffer, never more.
        """
        if self._gate_reads is not None:
            await self._gate_reads.authorize(context, "WatchPenalties")
        if isinstance(request, BadMessage):
            await _invalid(context, request, self.engine)
        hub = self.engine.hub
        if not self.engine.store.feed_exact:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "penalty feed not synced; retry")
        if hub.watchers >= self.engine.settings.max_watchers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {self.engine.settings.max_watchers} watchers; retry later",
            )
        try:
            async for data, bulk in hub.stream(request.chunked_snapshot):
                await hub.write(context.write, data, bulk)
        except TimeoutError:
            hub.ended_slow += 1
            log.info("watcher_too_slow", peer=context.peer(), stall_seconds=hub.stall_seconds)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"watcher did not read for {hub.stall_seconds:g} s; watch again",
            )
        except WatchEnded as end:
            await context.abort(getattr(grpc.StatusCode, end.code), end.message)


admin = operator_call()


class PenaltyAdmin(penalty_pb2_grpc.PenaltyAdminServicer):
    def __init__(self, engine: Engine, validator: Validator, replies: Replies) -> None:
        self.engine = engine
        self.validator = validator
        self.replies = replies
        self.invalid_requests = engine.metrics.invalid_requests
        # One Disclose at a time per replica: each scans the keyspace (SCAN on Redis), so
        # a burst of them queues here, within their deadline, instead of loading Redis.
        self._disclosing = asyncio.Semaphore(1)
        self.gate = AdminGate.for_settings(
            engine.settings, api="admin", env_var="PENALTYD_ADMIN_TOKEN"
        )

    @contextlib.contextmanager
    def _audit(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        actor: str,
        note: str,
        **subject: object,
    ) -> Iterator[dict[str, object]]:
        """One audit event per admin call about an address: who, what, about whom, why,
        and how it ended (the `with` body may add fields to the dict it gets). Addresses
        in it are written as `log_addresses` says, like every log line."""
        fields: dict[str, object] = dict(subject)
        outcome = "error"
        try:
            yield fields
            outcome = "ok"
        finally:
            self.engine.metrics.audit_events.labels(method).inc()
            audit_log.info(
                "audit",
                method=method,
                actor=actor,
                note=note,
                peer=context.peer(),
                outcome=outcome,
                **fields,
            )

    def _decision(
        self, ex: Explained, d: Decision, identity: str, penalty: Penalty | None
    ) -> penalty_pb2.Explanation:
        ev = d.evidence
        return penalty_pb2.Explanation(
            identity=identity,
            window=[
                penalty_pb2.OutcomeTotal(outcome=penalty_pb2.Outcome.ValueType(o), n=n)
                for o, n in enumerate(ev.counts)
                if n and o
            ],
            events=ev.events,
            weighted_errors=ev.weighted_errors,
            error_ratio=ev.ratio,
            wilson_lower_bound=ev.lower_bound,
            threshold=d.threshold,
            window_seconds=ex.window_seconds,
            verdict=self.replies.verdict(Answer(identity, penalty), ex.ref.ip),
            would_fire=d.fire,
            rule=d.rule,
            baseline=ex.baseline.ratio,
        )

    @admin
    async def Explain(
        self, request: penalty_pb2.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.Explanation:
        ref = self.validator.check(request)
        actor, note = self.validator.who(request)
        with self._audit("Explain", context, actor, note, identity=ref.identity):
            ex = await self.engine.explain(ref)
        out = self._decision(ex, ex.decision, ref.identity, ex.window.penalty)
        self._reputation_fields(out, ex)
        out.shared = ex.window.shared
        out.shared_reason = ex.shared_reason
        out.distinct_sub_identities = ex.window.distinct
        if ex.sub_decision is not None:
            out.sub_identity = ref.sub_identity
            out.sub.CopyFrom(
                self._decision(ex, ex.sub_decision, ref.sub_identity, ex.window.sub_penalty)
            )
        if ex.allow is not None:
            out.allow.CopyFrom(allow_entry(ex.allow))
        if ex.last_lift is not None:
            out.last_lift.CopyFrom(
                penalty_pb2.Lift(
                    actor=ex.last_lift.actor, note=ex.last_lift.note, at_unix_ms=ex.last_lift.at_ms
                )
            )
        return out

    @admin
    async def Lift(
        self, request: penalty_pb2.LiftRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.LiftResponse:
        ref = self.validator.check(request)
        actor, note = self.validator.who(request)
        with self._audit("Lift", context, actor, note, identity=ref.identity) as fields:
            lifted = await self.engine.lift(ref, actor, note)
            fields["lifted"] = lifted
        return penalty_pb2.LiftResponse(
            lifted=bool(lifted), identity=lifted[0] if lifted else ref.identity
        )

    @admin
    async def Stats(
        self, request: penalty_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.StatsResponse:
        fleet = await self.engine.fleet_stats()
        return penalty_pb2.StatsResponse(
            active_penalties=fleet.active_penalties,
            tracked_identities=fleet.tracked_identities,
            shared_addresses=fleet.shared_addresses,
            degraded_replicas=max(fleet.degraded_replicas, 1 if self.engine.degraded else 0),
            store=self.engine.store.kind,
        )

    @admin
    async def ListPenalties(
        self, request: penalty_pb2.ListPenaltiesRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.ListPenaltiesResponse:
        if request.page_size > 1000:
            raise BadField("page_size", "must be at most 1000")
        try:
            after = PageCursor.decode(request.page_token) if request.page_token else None
        except ValueError as exc:
            raise BadField("page_token", str(exc)) from exc
        actor, note = self.validator.who(request)
        with self._audit("ListPenalties", context, actor, note) as fields:
            try:
                page, cursor = await self.engine.list_penalties(after, request.page_size or 100)
            except ValueError as exc:  # a well-formed token that names no position of ours
                raise BadField("page_token", str(exc)) from exc
            fields["penalties"] = len(page)
        response = penalty_pb2.ListPenaltiesResponse(
            next_page_token=cursor.encode() if cursor else ""
        )
        for start in range(0, len(page), 100):
            response.penalties.extend(self.replies.penalty(p) for p in page[start : start + 100])
            await asyncio.sleep(0)  # a 1,000-row page must not hold up the checks queued behind it
        return response

    @admin
    async def Allow(
        self, request: penalty_pb2.AllowRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.AllowEntry:
        cidr, ttl_s = self.validator.allow(request)
        actor, note = self.validator.who(request)
        with self._audit("Allow", context, actor, note, cidr=cidr, ttl_seconds=ttl_s):
            return allow_entry(await self.engine.allow(cidr, ttl_s, note, actor))

    @admin
    async def RemoveAllow(
        self, request: penalty_pb2.RemoveAllowRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.RemoveAllowResponse:
        cidr = self.validator.cidr(request.cidr)
        actor, note = self.validator.who(request)
        with self._audit("RemoveAllow", context, actor, note, cidr=cidr) as fields:
            removed = await self.engine.remove_allow(cidr, actor)
            fields["removed"] = removed
        return penalty_pb2.RemoveAllowResponse(removed=removed)

    def _rep(self, rep: Reputation | None) -> penalty_pb2.Reputation | None:
        if rep is None:
            return None
        z = self.engine.detector.rep_z
        return penalty_pb2.Reputation(
            events=rep.events,
            weighted_errors=rep.weighted_errors,
            penalties=rep.penalties,
            error_ratio=rep.ratio,
            lower_bound=wilson_lower_bound(rep.weighted_errors, rep.events, z),
        )

    def _reputation_fields(self, out: penalty_pb2.Explanation, ex: Explained) -> None:
        """Explain's reputation: the long memory and how it moved the bar (issue 15)."""
        out.neighbourhood = ex.neighbourhood
        out.n_min = ex.decision.n_min
        out.burst_errors = ex.decision.burst
        st = ex.standing
        if st is None:
            out.reputation_effect = "none: the whole address is judged by the shared rules"
            return
        if (rep := self._rep(ex.reputation)) is not None:
            out.reputation.CopyFrom(rep)
        if (nb := self._rep(ex.neighbourhood_reputation)) is not None:
            out.neighbourhood_reputation.CopyFrom(nb)
        out.reputation_threshold = st.threshold
        out.history = st.history
        out.bad_neighbourhood = st.bad_neighbourhood
        out.reputation_effect = st.describe()

    def _answer(self, v: ReputationView) -> penalty_pb2.ReputationAnswer:
        st: Standing = v.standing
        out = penalty_pb2.ReputationAnswer(
            identity=v.identity,
            network=v.network,
            threshold=st.threshold,
            history=st.history,
            bad_neighbourhood=st.bad_neighbourhood,
            effect=st.describe(),
        )
        if (rep := self._rep(v.reputation)) is not None:
            out.reputation.CopyFrom(rep)
        if (nb := self._rep(v.neighbourhood)) is not None:
            out.neighbourhood.CopyFrom(nb)
        return out

    @admin
    async def Reputation(
        self, request: penalty_pb2.ReputationRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.ReputationAnswer:
        actor, note = self.validator.who(request)
        if request.HasField("client") == bool(request.network):
            raise BadField("client", "give a client or a network, not both nor neither")
        ref = self.validator.check(request) if request.HasField("client") else None
        network = "" if ref is not None else self.validator.neighbourhood(request.network)
        subject = ref.identity if ref is not None else network
        with self._audit("Reputation", context, actor, note, identity=subject):
            view = await self.engine.reputation(ref, network)
        return self._answer(view)

    @admin
    async def WorstNeighbourhoods(
        self, request: penalty_pb2.WorstNeighbourhoodsRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.WorstNeighbourhoodsResponse:
        actor, note = self.validator.who(request)
        if request.limit > 1000:
            raise BadField("limit", "must be at most 1000")
        with self._audit("WorstNeighbourhoods", context, actor, note) as fields:
            views = await self.engine.worst_neighbourhoods(request.limit or 20)
            fields["neighbourhoods"] = len(views)
        return penalty_pb2.WorstNeighbourhoodsResponse(
            neighbourhoods=[self._answer(v) for v in views]
        )

    @admin
    async def Disclose(
        self, request: penalty_pb2.DiscloseRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.Disclosure:
        """Everything held about an address and every client behind it (data requests)."""
        if not request.HasField("client"):
            raise BadField("client", "required")
        plain = penalty_pb2.Client(ip=request.client.ip)  # every client behind it
        ref = self.validator.client(plain, "client")
        actor, note = self.validator.who(request, required=True)
        with self._audit("Disclose", context, actor, note, identity=ref.identity) as fields:
            async with self._disclosing:
                found = await self.engine.disclose(ref)
            fields["items"] = len(found.items)
        return penalty_pb2.Disclosure(
            ip=ref.ip,
            identity=ref.identity,
            items=[
                penalty_pb2.HeldItem(
                    kind=h.kind,
                    identity=h.identity,
                    stored_as=h.stored_as,
                    member=h.member,
                    expires_at_unix_ms=h.expires_at_ms,
                    content=h.content,
                )
                for h in found.items
            ],
            at_unix_ms=found.at_ms,
            store=self.engine.store.kind,
            keyed=found.keyed,
            not_itemized=NOT_ITEMIZED,
        )

    @admin
    async def ListAllowlist(
        self, request: penalty_pb2.ListAllowlistRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.ListAllowlistResponse:
        return penalty_pb2.ListAllowlistResponse(
            entries=[allow_entry(e) for e in await self.engine.allowlist()]
        )
