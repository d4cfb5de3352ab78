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
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import lru_cache
from typing import Any, NoReturn, TypeVar

import grpc

from penalty.grpc_support import (
    AdminGate,
    BadField,
    BadMessage,
    abort_invalid,
    abort_store_error,
)
from penalty.v1 import penalty_pb2, penalty_pb2_grpc
from penaltyd import reasons
from penaltyd.detector import Decision
from penaltyd.engine import END_WATCH, Answer, Engine, Explained
from penaltyd.feed import ALLOW_ADDED, ALLOW_REMOVED, LIFTED, SHARED, STARTED, FeedEvent
from penaltyd.store.base import AllowEntry, PageCursor, Penalty, StoreError
from penaltyd.validation import Validator

Verdict = penalty_pb2.Verdict
Kind = penalty_pb2.PenaltyEvent.Kind
R = TypeVar("R")


class Replies:
    """Turns answers into Verdicts with the configured SMTP reply."""

    def __init__(self, template: str) -> None:
        self._template = template
        self.render = lru_cache(maxsize=4096)(reasons.render)

    def verdict(self, answer: Answer, ip: str) -> penalty_pb2.Verdict:
        p = answer.penalty
        if p is None:
            return Verdict(
                identity=answer.identity,
                degraded=answer.degraded,
                allowlisted=answer.allow is not None,
            )
        seconds = p.seconds_left
        return Verdict(
            tempfail=True,
            seconds_left=seconds,
            expires_at_unix_ms=p.expires_at_ms,
            identity=answer.identity,
            reason=self.render(p.reason),
            smtp_reply=self._template.format(ip=ip, identity=answer.identity, seconds=seconds),
            degraded=answer.degraded,
        )

    def penalty(self, p: Penalty) -> penalty_pb2.Penalty:
        return penalty_pb2.Penalty(
            identity=p.identity,
            seconds_left=p.seconds_left,
            expires_at_unix_ms=p.expires_at_ms,
            reason=self.render(p.reason),
        )


def allow_entry(e: AllowEntry) -> penalty_pb2.AllowEntry:
    return penalty_pb2.AllowEntry(
        cidr=e.cidr,
        expires_at_unix_ms=e.expires_at_ms,
        note=e.note,
        actor=e.actor,
        created_at_unix_ms=e.created_at_ms,
    )


async def _invalid(
    context: grpc.aio.ServicerContext, err: BadField | BadMessage, engine: Engine
) -> NoReturn:
    await abort_invalid(context, err, engine.metrics.invalid_requests)


class PenaltyService(penalty_pb2_grpc.PenaltyServiceServicer):
    def __init__(self, engine: Engine, validator: Validator, replies: Replies) -> None:
        self.engine = engine
        self.validator = validator
        self.replies = replies

    async def Check(
        self, request: penalty_pb2.CheckRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.Verdict:
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
        """Each message is validated whole; a bad one is answered with `error` and skipped."""
        async for request in request_iterator:
            if isinstance(request, BadMessage):
                await _invalid(context, request, self.engine)
            try:
                checks, reports = self.validator.session(request)
            except BadField as err:
                self.engine.metrics.invalid_requests.inc()
                yield penalty_pb2.SessionResponse(
                    id=request.id,
                    error=penalty_pb2.FieldError(field=err.field, message=err.message),
                )
                continue
            report_answers = await self.engine.report_many(reports) if reports else []
            check_answers = await self.engine.check_many(checks) if checks else []
            verdict = self.replies.verdict
            yield penalty_pb2.SessionResponse(
                id=request.id,
                reports=[
                    verdict(a, r.ip) for a, (r, _) in zip(report_answers, reports, strict=True)
                ],
                checks=[verdict(a, c.ip) for a, c in zip(check_answers, checks, strict=True)],
            )

    async def WatchPenalties(
        self, request: penalty_pb2.WatchRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[penalty_pb2.PenaltyEvent]:
        """Snapshot (ending with SNAPSHOT_DONE), then live changes until the feed is lost."""
        if isinstance(request, BadMessage):
            await _invalid(context, request, self.engine)
        store = self.engine.store
        if not store.feed_exact:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "penalty feed not synced; retry")
        queue = self.engine.watch()
        event_type = penalty_pb2.PenaltyEvent
        try:
            penalties, shared, allow = store.snapshot()
            now = store.now_ms()
            for p in penalties:
                penalty = self.replies.penalty(p)
                yield event_type(
                    kind=Kind.KIND_PENALTY_STARTED, penalty=penalty, store_now_unix_ms=now
                )
            for address, _ in shared:
                yield event_type(
                    kind=Kind.KIND_SHARED_MARKED, address=address, store_now_unix_ms=now
                )
            for entry in allow:
                allowed = allow_entry(entry)
                yield event_type(kind=Kind.KIND_ALLOW_ADDED, allow=allowed, store_now_unix_ms=now)
            yield event_type(
                kind=Kind.KIND_SNAPSHOT_DONE,
                store_now_unix_ms=store.now_ms(),
                smtp_reply_template=self.engine.settings.smtp_reply,
            )
            while True:
                event = await queue.get()
                if event is END_WATCH:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "penalty feed resynced; watch again"
                    )
                out = self._event(event)
                out.store_now_unix_ms = store.now_ms()
                yield out
        finally:
            self.engine.unwatch(queue)

    def _event(self, event: FeedEvent) -> penalty_pb2.PenaltyEvent:
        if event.kind == STARTED:
            now = self.engine.store.local_penalty(event.identity)[1]
            penalty = now or Penalty(event.identity, 0, event.expires_at_ms, event.reason)
            return penalty_pb2.PenaltyEvent(
                kind=Kind.KIND_PENALTY_STARTED, penalty=self.replies.penalty(penalty)
            )
        if event.kind == LIFTED:
            return penalty_pb2.PenaltyEvent(
                kind=Kind.KIND_PENALTY_LIFTED, penalty=penalty_pb2.Penalty(identity=event.identity)
            )
        if event.kind == SHARED:
            return penalty_pb2.PenaltyEvent(kind=Kind.KIND_SHARED_MARKED, address=event.identity)
        if event.kind == ALLOW_ADDED:
            return penalty_pb2.PenaltyEvent(
                kind=Kind.KIND_ALLOW_ADDED, allow=allow_entry(AllowEntry.decode(event.reason))
            )
        assert event.kind == ALLOW_REMOVED, event
        return penalty_pb2.PenaltyEvent(
            kind=Kind.KIND_ALLOW_REMOVED, allow=penalty_pb2.AllowEntry(cidr=event.identity)
        )


AdminMethod = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def admin(method: AdminMethod[R]) -> AdminMethod[R]:
    """Authorize, refuse undecodable requests, map BadField and store errors: once."""

    @functools.wraps(method)
    async def wrapper(self: PenaltyAdmin, request: Any, context: grpc.aio.ServicerContext) -> R:
        await self.gate.authorize(context)
        if isinstance(request, BadMessage):
            await _invalid(context, request, self.engine)
        try:
            return await method(self, request, context)
        except BadField as err:
            await _invalid(context, err, self.engine)
        except (StoreError, TimeoutError) as exc:
            await abort_store_error(context, exc)
        raise AssertionError("abort returned")  # pragma: no cover

    return wrapper


class PenaltyAdmin(penalty_pb2_grpc.PenaltyAdminServicer):
    def __init__(self, engine: Engine, validator: Validator, replies: Replies) -> None:
        self.engine = engine
        self.validator = validator
        self.replies = replies
        self.gate = AdminGate(
            engine.settings.admin_token.get_secret_value(),
            engine.settings.listen,
            api="admin",
            env_var="PENALTYD_ADMIN_TOKEN",
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
        ex = await self.engine.explain(ref)
        out = self._decision(ex, ex.decision, ref.identity, ex.window.penalty)
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
        self.validator.text(request.actor, "actor", 128)
        self.validator.text(request.note, "note", 1024)
        lifted = await self.engine.lift(ref, request.actor, request.note)
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
        page, cursor = await self.engine.list_penalties(after, request.page_size or 100)
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
        return allow_entry(await self.engine.allow(cidr, ttl_s, request.note, request.actor))

    @admin
    async def RemoveAllow(
        self, request: penalty_pb2.RemoveAllowRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.RemoveAllowResponse:
        cidr = self.validator.cidr(request.cidr)
        self.validator.text(request.actor, "actor", 128)
        return penalty_pb2.RemoveAllowResponse(
            removed=await self.engine.remove_allow(cidr, request.actor)
        )

    @admin
    async def ListAllowlist(
        self, request: penalty_pb2.ListAllowlistRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.ListAllowlistResponse:
        return penalty_pb2.ListAllowlistResponse(
            entries=[allow_entry(e) for e in await self.engine.allowlist()]
        )
