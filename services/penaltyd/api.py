"""gRPC servicers: validate, call the engine, map answers and errors once.

Bad input never reaches the store: `Validator` raises `BadField` and the call ends with
`INVALID_ARGUMENT` naming the field. Store trouble on the MX path never becomes an
error either: the engine answers fail-open verdicts (`degraded=true`). Admin calls do
fail (`UNAVAILABLE`) when the store cannot answer: an abuse desk wants to know.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any, NoReturn

import grpc

from penalty.v1 import penalty_pb2, penalty_pb2_grpc
from penaltyd import reasons
from penaltyd.engine import Answer, Engine
from penaltyd.store.base import PageCursor, StoreError
from penaltyd.validation import BadField, BadMessage, Validator

Verdict = penalty_pb2.Verdict


class Replies:
    """Turns answers into Verdicts with the configured SMTP reply."""

    def __init__(self, template: str) -> None:
        self._template = template
        self._render = lru_cache(maxsize=4096)(reasons.render)

    def verdict(self, answer: Answer, ip: str) -> penalty_pb2.Verdict:
        p = answer.penalty
        if p is None:
            return Verdict(identity=answer.identity, degraded=answer.degraded)
        seconds = p.seconds_left
        return Verdict(
            tempfail=True,
            seconds_left=seconds,
            expires_at_unix_ms=p.expires_at_ms,
            identity=answer.identity,
            reason=self._render(p.reason),
            smtp_reply=self._template.format(ip=ip, identity=answer.identity, seconds=seconds),
            degraded=answer.degraded,
        )


async def _invalid(
    context: grpc.aio.ServicerContext, err: BadField | BadMessage, engine: Engine
) -> NoReturn:
    engine.metrics.invalid_requests.inc()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err.field}: {err.message}")
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


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
            identity = self.validator.check(request)
        except BadField as err:
            await _invalid(context, err, self.engine)
        return self.replies.verdict(await self.engine.check(identity), request.client.ip)

    async def Report(
        self, request: penalty_pb2.ReportRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.Verdict:
        if isinstance(request, BadMessage):
            await _invalid(context, request, self.engine)
        try:
            identity, counts = self.validator.report(request)
        except BadField as err:
            await _invalid(context, err, self.engine)
        return self.replies.verdict(await self.engine.report(identity, counts), request.client.ip)

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
                    verdict(a, r.client.ip)
                    for a, r in zip(report_answers, request.reports, strict=True)
                ],
                checks=[
                    verdict(a, c.client.ip)
                    for a, c in zip(check_answers, request.checks, strict=True)
                ],
            )


class PenaltyAdmin(penalty_pb2_grpc.PenaltyAdminServicer):
    def __init__(self, engine: Engine, validator: Validator, replies: Replies) -> None:
        self.engine = engine
        self.validator = validator
        self.replies = replies

    async def _store_failed(self, context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
        code = (
            grpc.StatusCode.DEADLINE_EXCEEDED
            if isinstance(exc, TimeoutError)
            else grpc.StatusCode.UNAVAILABLE
        )
        await context.abort(code, f"store: {exc or type(exc).__name__}")
        raise AssertionError("abort returned")  # pragma: no cover

    async def Explain(
        self, request: penalty_pb2.ExplainRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.Explanation:
        if isinstance(request, BadMessage):
            await _invalid(context, request, self.engine)
        try:
            identity = self.validator.check(request)  # type: ignore[arg-type]  # same shape: .client
        except BadField as err:
            await _invalid(context, err, self.engine)
        try:
            ex = await self.engine.explain(identity)
        except (StoreError, TimeoutError) as exc:
            await self._store_failed(context, exc)
        ev = ex.decision.evidence
        return penalty_pb2.Explanation(
            identity=identity,
            window=[
                penalty_pb2.OutcomeTotal(outcome=o, n=n)  # type: ignore[arg-type]  # enum int
                for o, n in enumerate(ev.counts)
                if n and o
            ],
            events=ev.events,
            weighted_errors=ev.weighted_errors,
            error_ratio=ev.ratio,
            wilson_lower_bound=ev.lower_bound,
            threshold=ex.decision.threshold,
            window_seconds=ex.window_seconds,
            verdict=self.replies.verdict(Answer(identity, ex.window.penalty), request.client.ip),
            would_fire=ex.decision.fire,
            rule=ex.decision.rule,
        )

    async def Lift(
        self, request: penalty_pb2.LiftRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.LiftResponse:
        if isinstance(request, BadMessage):
            await _invalid(context, request, self.engine)
        try:
            identity = self.validator.check(request)  # type: ignore[arg-type]  # same shape: .client
            if len(request.actor) > 128 or len(request.note) > 1024:
                raise BadField("note" if len(request.note) > 1024 else "actor", "too long")
        except BadField as err:
            await _invalid(context, err, self.engine)
        try:
            lifted = await self.engine.lift(identity, request.actor, request.note)
        except (StoreError, TimeoutError) as exc:
            await self._store_failed(context, exc)
        return penalty_pb2.LiftResponse(lifted=lifted, identity=identity)

    async def Stats(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.StatsResponse:
        if isinstance(request, BadMessage):
            await _invalid(context, request, self.engine)
        try:
            active = await self.engine.count_penalties()
        except (StoreError, TimeoutError) as exc:
            await self._store_failed(context, exc)
        return penalty_pb2.StatsResponse(
            active_penalties=active,
            degraded_replicas=1 if self.engine.degraded else 0,
            store=self.engine.store.kind,
        )

    async def ListPenalties(
        self,
        request: penalty_pb2.ListPenaltiesRequest | BadMessage,
        context: grpc.aio.ServicerContext,
    ) -> penalty_pb2.ListPenaltiesResponse:
        if isinstance(request, BadMessage):
            await _invalid(context, request, self.engine)
        try:
            if request.page_size > 1000:
                raise BadField("page_size", "must be at most 1000")
            try:
                after = PageCursor.decode(request.page_token) if request.page_token else None
            except ValueError as exc:
                raise BadField("page_token", str(exc)) from exc
        except BadField as err:
            await _invalid(context, err, self.engine)
        try:
            page, cursor = await self.engine.list_penalties(after, request.page_size or 100)
        except (StoreError, TimeoutError) as exc:
            await self._store_failed(context, exc)
        return penalty_pb2.ListPenaltiesResponse(
            penalties=[
                penalty_pb2.Penalty(
                    identity=p.identity,
                    seconds_left=p.seconds_left,
                    expires_at_unix_ms=p.expires_at_ms,
                    reason=reasons.render(p.reason),
                )
                for p in page
            ],
            next_page_token=cursor.encode() if cursor else "",
        )
