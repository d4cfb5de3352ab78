"""The asyncio client: checks and reports that never block mail.

- Every call has a deadline (default 200 ms) and retries `UNAVAILABLE` with a short
  backoff while the deadline lasts.
- `check`/`report` fail open: if penaltyd does not answer in time the verdict is "no
  penalty" with `degraded=True`, never an exception (DESIGN.md section 8).
- With `live_replica=True` a background task follows `WatchPenalties` and `check`
  answers in-process (microseconds); while the stream is down it falls back to RPCs.
- `reporter()` batches reports over one `Session` stream for high rates.
- Admin calls (`explain`, `lift`, ...) raise `PenaltydError`: an abuse desk wants errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc

from penalty.identity import bound_client, bound_count
from penalty.v1 import penalty_pb2 as pb
from penalty.v1 import penalty_pb2_grpc as pbg
from penaltyclient.base import ClientBase, keep_answering
from penaltyclient.channel import aio_channel

log = logging.getLogger("penaltyclient")
T = TypeVar("T")
# Outcome numbers (ints or the generated enum values) to counts.
Counts = Mapping[Any, int] | Iterable[tuple[Any, int]]


class PenaltydError(Exception):
    """An admin call failed; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def outcome_counts(counts: Counts, *, bound: bool = False) -> list[pb.OutcomeCount]:
    """OutcomeCount messages; with `bound`, counts that came from the internet (logs,
    milters) are clamped to what penaltyd accepts and zero counts are left out."""
    pairs = counts.items() if isinstance(counts, Mapping) else counts
    if bound:
        pairs = [(o, bound_count(n)) for o, n in pairs]
        return [pb.OutcomeCount(outcome=o, n=n) for o, n in pairs if n]
    return [pb.OutcomeCount(outcome=o, n=n) for o, n in pairs]


def client_msg(ip: str, helo: str = "", mail_from: str = "", fingerprint: str = "") -> pb.Client:
    """A Client message with what the SMTP client chose bounded at the edge."""
    helo, mail_from, fingerprint = bound_client(helo, mail_from, fingerprint)
    return pb.Client(ip=ip[:64], helo=helo, mail_from=mail_from, fingerprint=fingerprint)


class AsyncPenaltyClient(ClientBase):
    _make_channel = staticmethod(aio_channel)
    _follower: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncPenaltyClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start following penalties if the live replica is on (idempotent)."""
        if self.replica is not None and self._follower is None:
            self._follower = asyncio.create_task(self._follow(), name="penalty-live-replica")

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self.channel.close()

    # --- the MX path: fail open

    async def _call(self, method: Any, request: Any) -> Any:
        """One unary call with retries inside the deadline; raises grpc errors."""
        end = time.monotonic() + self.deadline
        attempt = 0
        while True:
            left = end - time.monotonic()
            try:
                return await method(
                    request, timeout=max(left, 0.001), metadata=self._service_metadata or None
                )
            except grpc.aio.AioRpcError as exc:
                attempt += 1
                pause = self._retry_pause(exc.code(), attempt, end)
                if pause is None:
                    raise
                await asyncio.sleep(pause)

    def _fail_open(self, what: str, ip: str, exc: grpc.aio.AioRpcError) -> pb.Verdict:
        if self._warn_once_in_a_while():
            log.warning(
                "penaltyd %s failed (%s: %s): answering no penalty",
                what,
                exc.code().name,
                exc.details(),
            )
        return pb.Verdict(degraded=True)

    async def check(
        self, ip: str, helo: str = "", mail_from: str = "", fingerprint: str = ""
    ) -> pb.Verdict:
        """ "Tempfail, and how many seconds left?" Never raises for server trouble."""
        if self.replica is not None:
            local = self.replica.check(ip, helo, mail_from, fingerprint)
            if local is not None:
                return local
        request = pb.CheckRequest(client=client_msg(ip, helo, mail_from, fingerprint))
        try:
            verdict: pb.Verdict = await self._call(self.service.Check, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise PenaltydError(exc.code(), exc.details() or "") from exc
            return self._fail_open("check", ip, exc)
        return verdict

    async def report(
        self, ip: str, counts: Counts, helo: str = "", mail_from: str = "", fingerprint: str = ""
    ) -> pb.Verdict:
        """Report outcomes; the verdict after them. Fails open like `check`."""
        request = pb.ReportRequest(
            client=client_msg(ip, helo, mail_from, fingerprint), counts=outcome_counts(counts)
        )
        try:
            verdict: pb.Verdict = await self._call(self.service.Report, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise PenaltydError(exc.code(), exc.details() or "") from exc
            return self._fail_open("report", ip, exc)
        if verdict.tempfail and self.replica is not None:
            self.replica.learn(verdict)
        return verdict

    def reporter(self, **kw: Any) -> SessionReporter:
        """A batched reporter on this client's channel. With the live replica on, a
        tempfail verdict for one of its reports is applied to the replica at once."""
        kw.setdefault("metadata", self._service_metadata)
        if self.replica is not None:
            kw.setdefault("on_tempfail", self.replica.learn)
        return SessionReporter(self.service, **kw)

    # --- the live replica

    async def _follow(self) -> None:
        assert self.replica is not None
        backoff = 0.05
        while True:
            keep = 0.0
            try:
                stream = self.service.WatchPenalties(
                    pb.WatchRequest(chunked_snapshot=True), metadata=self._service_metadata or None
                )
                async for event in stream:
                    self.replica.apply(event)
                    backoff = 0.05
            except grpc.aio.AioRpcError as exc:
                keep = keep_answering(exc.code(), exc.details() or "")
                log.info("penalty watch ended (%s); re-watching", exc.code().name)
            self.replica.reset(keep)
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 2.0)

    async def wait_synced(self, within: float = 5.0) -> bool:
        """For tests and start-up: wait until the live replica holds a full snapshot."""
        end = time.monotonic() + within
        while self.replica is not None and not self.replica.synced:
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.01)
        return True

    # --- admin: errors are raised

    async def _admin(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.admin_deadline, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise PenaltydError(exc.code(), exc.details() or "") from exc

    async def explain(
        self,
        ip: str,
        helo: str = "",
        mail_from: str = "",
        fingerprint: str = "",
        *,
        actor: str = "",
        note: str = "",
    ) -> pb.Explanation:
        req = pb.ExplainRequest(
            client=client_msg(ip, helo, mail_from, fingerprint), actor=actor, note=note
        )
        result: pb.Explanation = await self._admin(self.admin.Explain, req)
        return result

    async def reputation(
        self, ip: str = "", network: str = "", *, actor: str = "", note: str = ""
    ) -> pb.ReputationAnswer:
        """An address's reputation and its neighbourhood's, or one network's (audited)."""
        req = pb.ReputationRequest(actor=actor, note=note, network=network)
        if ip:
            req.client.CopyFrom(pb.Client(ip=ip))
        result: pb.ReputationAnswer = await self._admin(self.admin.Reputation, req)
        return result

    async def worst_neighbourhoods(
        self, limit: int = 20, *, actor: str = "", note: str = ""
    ) -> pb.WorstNeighbourhoodsResponse:
        """The neighbourhoods with the most (decayed) weighted errors, worst first."""
        req = pb.WorstNeighbourhoodsRequest(limit=limit, actor=actor, note=note)
        result: pb.WorstNeighbourhoodsResponse = await self._admin(
            self.admin.WorstNeighbourhoods, req
        )
        return result

    async def disclose(self, ip: str, *, actor: str, note: str) -> pb.Disclosure:
        """Everything penaltyd holds about `ip` and every client behind it (audited)."""
        req = pb.DiscloseRequest(client=pb.Client(ip=ip), actor=actor, note=note)
        result: pb.Disclosure = await self._admin(self.admin.Disclose, req)
        return result

    async def lift(
        self, ip: str, actor: str = "", note: str = "", helo: str = "", mail_from: str = ""
    ) -> pb.LiftResponse:
        req = pb.LiftRequest(client=client_msg(ip, helo, mail_from), actor=actor, note=note)
        result: pb.LiftResponse = await self._admin(self.admin.Lift, req)
        return result

    async def stats(self) -> pb.StatsResponse:
        result: pb.StatsResponse = await self._admin(self.admin.Stats, pb.StatsRequest())
        return result

    async def allow(
        self, cidr: str, ttl_seconds: int = 0, note: str = "", actor: str = ""
    ) -> pb.AllowEntry:
        req = pb.AllowRequest(cidr=cidr, ttl_seconds=ttl_seconds, note=note, actor=actor)
        result: pb.AllowEntry = await self._admin(self.admin.Allow, req)
        return result

    async def remove_allow(self, cidr: str, actor: str = "", note: str = "") -> bool:
        result = await self._admin(
            self.admin.RemoveAllow, pb.RemoveAllowRequest(cidr=cidr, actor=actor, note=note)
        )
        return bool(result.removed)

    async def allowlist(self) -> list[pb.AllowEntry]:
        result = await self._admin(self.admin.ListAllowlist, pb.ListAllowlistRequest())
        return list(result.entries)

    async def penalties(
        self, page_size: int = 500, *, actor: str = "", note: str = ""
    ) -> AsyncIterator[pb.Penalty]:
        """Every active penalty, page by page."""
        token = ""
        while True:
            page = await self._admin(
                self.admin.ListPenalties,
                pb.ListPenaltiesRequest(
                    page_size=page_size, page_token=token, actor=actor, note=note
                ),
            )
            for p in page.penalties:
                yield p
            token = page.next_page_token
            if not token:
                return

    async def watch(self) -> AsyncIterator[pb.PenaltyEvent]:
        """The raw WatchPenalties stream (snapshot, SNAPSHOT_DONE, then changes)."""
        try:
            async for event in self.service.WatchPenalties(
                pb.WatchRequest(), metadata=self._service_metadata or None
            ):
                yield event
        except grpc.aio.AioRpcError as exc:
            raise PenaltydError(exc.code(), exc.details() or "") from exc


#: The index of the refused report in a Session error's field path: "reports[26].client.ip".
_REFUSED_ITEM = re.compile(r"reports\[(\d{1,6})\]")
_ACCEPTED = pb.OUTCOME_ACCEPTED


_Aged = tuple[float, list[pb.ReportRequest]]  # a batch and when its oldest report was queued


class SessionReporter:
    """Batches reports over one `Session` stream; never blocks the caller.

    `report()` bounds what the SMTP client chose (`penalty.identity.bound_client`, counts
    clamped) and queues (bounded: beyond `max_queue` reports are dropped and counted); a
    writer sends up to `max_batch` reports per message at least every `interval` seconds,
    and a report of an error (any outcome but ACCEPTED: it may start a penalty) at once
    when no batch is on its way, or as soon as that batch is answered; a batch not yet
    acknowledged when the stream breaks is queued again (at least once), and the stream
    reconnects with backoff. A report still waiting `max_age` seconds after
    it was queued (penaltyd down that long) is dropped and counted in `expired`: penaltyd
    would count it as fresh in a window it has left, and it holds a client's address and
    HELO name longer than penaltyd itself keeps them (600 s: penaltyd's window_seconds).

    penaltyd validates a message whole: one refused report refuses its message. A refused
    batch is never counted as delivered: the report the error names (or, if it names
    none, each half of the batch in turn) is taken out, counted in `rejected` and logged,
    and the rest is sent again, so one crafted client never costs its neighbours' reports.
    """

    def __init__(
        self,
        service: pbg.PenaltyServiceStub,
        *,
        max_batch: int = 200,
        interval: float = 0.02,
        max_queue: int = 50_000,
        metadata: tuple[tuple[str, str], ...] = (),
        on_tempfail: Callable[[pb.Verdict], None] | None = None,
        max_age: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service = service
        self.max_batch = max_batch
        self.interval = interval
        self.max_queue = max_queue
        self.max_age = max_age
        self._clock = clock
        self._metadata = metadata
        self._on_tempfail = on_tempfail
        # Each report with the moment it was queued; a batch with its oldest report's.
        self._queue: deque[tuple[float, pb.ReportRequest]] = deque()
        # Batches to send exactly as they are (halves of a refused batch), before the queue.
        self._retry: deque[_Aged] = deque()
        self._inflight: dict[int, _Aged] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0  # reports written and not given back to the queue
        self.acked = 0  # reports penaltyd stored (delivered)
        self.dropped = 0  # reports lost to a full queue
        self.rejected = 0  # reports penaltyd refused (bad input), logged one by one
        self.expired = 0  # reports older than max_age, dropped unsent
        self.reconnects = 0
        self.tempfails: deque[pb.Verdict] = deque(maxlen=1000)
        self._urgent = False  # an error report waits in the queue: send without the interval
        # Called before an error report is queued: a batching caller (penalty-policyd)
        # hands over the accepted recipients it holds first, so penaltyd never sees a
        # client's errors ahead of the accepted mail that came before them (a rate
        # judged on a short denominator would lean towards a penalty).
        self.before_error: Callable[[], None] | None = None

    def report(
        self, ip: str, counts: Counts, helo: str = "", mail_from: str = "", fingerprint: str = ""
    ) -> bool:
        """Queue a report; False if it was dropped (queue full, or no count left above 0)."""
        bounded_counts = outcome_counts(counts, bound=True)
        if not bounded_counts:
            return False
        return self.enqueue(
            pb.ReportRequest(
                client=client_msg(ip, helo, mail_from, fingerprint), counts=bounded_counts
            )
        )

    def enqueue(self, request: pb.ReportRequest, age: float = 0.0) -> bool:
        """Queue a report as it is (e.g. one kept across a restart, `age` seconds old
        already, which counts towards `max_age`); False if dropped."""
        error = any(c.outcome != _ACCEPTED for c in request.counts)
        if error and self.before_error is not None:
            self.before_error()
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            return False
        self._queue.append((self._clock() - max(0.0, age), request))
        if len(self._queue) >= self.max_batch:
            self._wakeup.set()
        elif error and not self._urgent:
            # An error may be the one that starts a penalty: it leaves now, not after the
            # batching interval, when no batch is on its way (single flight: errors that
            # come meanwhile leave together when that batch is answered).
            self._urgent = True
            if not self._inflight:
                self._wakeup.set()
        return True

    def enqueue_accepted(self, requests: list[pb.ReportRequest]) -> int:
        """Queue reports of accepted outcomes only, in bulk (penalty-policyd's flush): no
        error to look for (they never need to leave before the interval), one clock read
        for all. Those beyond `max_queue` are dropped and counted; how many were queued."""
        room = max(0, self.max_queue - len(self._queue))
        if len(requests) > room:
            self.dropped += len(requests) - room
            requests = requests[:room]
        now = self._clock()
        self._queue.extend([(now, r) for r in requests])
        if len(self._queue) >= self.max_batch:
            self._wakeup.set()
        return len(requests)

    @property
    def pending(self) -> int:
        """Reports not yet acknowledged: queued, set aside for a resend, or in flight."""
        return (
            len(self._queue)
            + sum(len(b) for _, b in self._retry)
            + sum(len(b) for _, b in self._inflight.values())
        )

    def pending_requests(self) -> list[pb.ReportRequest]:
        """Everything not yet acknowledged (in flight first, then waiting), e.g. to keep it
        across a restart. A report in flight may still be stored by penaltyd: keeping it
        means at least once."""
        out = [r for _, b in self._inflight.values() for r in b]
        out += [r for _, b in self._retry for r in b]
        out += [r for _, r in self._queue]
        return out

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="session-reporter")

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until everything queued has been acknowledged (or `within` seconds)."""
        end = time.monotonic() + within
        self._wakeup.set()
        while self.pending:
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.005)
        return True

    async def close(self, within: float = 2.0) -> None:
        await self.flush(within)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._give_back()

    def _next_batch(self) -> _Aged:
        if self._retry:
            return self._retry.popleft()
        take = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        return (take[0][0] if take else self._clock()), [r for _, r in take]

    def _give_back(self) -> None:
        """In-flight batches go back in front of the queue (at least once)."""
        for aged in reversed(list(self._inflight.values())):
            self.sent -= len(aged[1])
            self._retry.appendleft(aged)
        self._inflight.clear()

    def _expire(self) -> None:
        """Drop what has waited longer than `max_age` (a batch by its oldest report)."""
        cutoff = self._clock() - self.max_age
        before = self.expired
        while self._retry and self._retry[0][0] < cutoff:
            self.expired += len(self._retry.popleft()[1])
        while self._queue and self._queue[0][0] < cutoff:
            self._queue.popleft()
            self.expired += 1
        if self.expired > before:
            log.warning(
                "dropped %d reports older than %.0f s (penaltyd unreachable that long)",
                self.expired - before,
                self.max_age,
            )

    async def _run(self) -> None:
        backoff = 0.05
        next_id = 0
        while True:
            call = self._service.Session(metadata=self._metadata or None)
            reader = asyncio.create_task(self._read(call))
            try:
                while not reader.done():
                    self._expire()
                    if not (self._queue or self._retry):
                        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.interval):
                                await self._wakeup.wait()
                        self._wakeup.clear()
                        continue
                    aged = self._next_batch()
                    batch = aged[1]
                    if not self._queue:
                        self._urgent = False
                    next_id += 1
                    self._inflight[next_id] = aged
                    self.sent += len(batch)  # before the write: a failed write re-queues it
                    await call.write(pb.SessionRequest(id=next_id, reports=batch))
                    backoff = 0.05
                await reader
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.info("report session ended (%s); reconnecting", why)
            finally:
                reader.cancel()
                call.cancel()
                self._give_back()
            self._trim()
            self._expire()
            self.reconnects += 1
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 2.0)

    def _trim(self) -> None:
        """Keep what waits within `max_queue` after batches came back; count the rest."""
        excess = self.pending - self.max_queue
        while excess > 0 and self._queue:
            self._queue.pop()
            self.dropped += 1
            excess -= 1

    async def _read(self, call: Any) -> None:
        async for response in call:
            queued_at, batch = self._inflight.pop(response.id, (0.0, []))
            self.sent -= len(batch)
            if response.HasField("error"):
                self._refused(queued_at, batch, response.error.field, response.error.message)
                self._wakeup.set()
                continue
            self.acked += len(batch)
            for verdict in response.reports:
                if verdict.tempfail:
                    self.tempfails.append(verdict)
                    if self._on_tempfail is not None:
                        self._on_tempfail(verdict)
            if self._urgent and not self._inflight:
                self._wakeup.set()  # errors queued while this batch was on its way

    def _refused(
        self, queued_at: float, batch: list[pb.ReportRequest], field: str, message: str
    ) -> None:
        """Take the refused report out of `batch` and send the rest again."""
        m = _REFUSED_ITEM.match(field)
        index = int(m.group(1)) if m else -1
        if 0 <= index < len(batch):
            bad = batch[index]
            self.rejected += 1
            log.warning(
                "penaltyd refused a report (%s: %s) from client %r; the rest of its batch "
                "is sent again",
                field.partition(".")[2] or field,
                message,
                bad.client.ip[:64],
            )
            rest = batch[:index] + batch[index + 1 :]
            if rest:
                self._retry.appendleft((queued_at, rest))
        elif len(batch) > 1:  # the error names no report: find it by halves
            half = len(batch) // 2
            self._retry.appendleft((queued_at, batch[half:]))
            self._retry.appendleft((queued_at, batch[:half]))
        elif batch:
            self.rejected += 1
            log.warning("penaltyd refused a report (%s: %s)", field, message)
