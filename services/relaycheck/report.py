"""Relayed origins to penaltyd: fire and forget, never on the verdict's path.

A relayed verdict names the address that pushed third-party mail into a customer's open
relay. penaltyd learns it as `OUTCOME_RELAY_DENIED` (configurable), so when that address
talks to the fleet's own MXs it is already counted. The report is an append to the
client library's bounded `SessionReporter` queue (batched on one Session stream, at
least once, reconnecting by itself); a full queue drops and counts, and penaltyd being
slow or down changes nothing about the answer Classify gives.
"""

from __future__ import annotations

import structlog

from penaltyclient.aio import AsyncPenaltyClient, SessionReporter

log = structlog.get_logger("relaycheck.report")


class PenaltyReporter:
    def __init__(
        self, target: str, outcome: int, max_queue: int = 10_000, close_within: float = 2.0
    ) -> None:
        self.target = target
        self.outcome = outcome
        self.max_queue = max_queue
        self.close_within = close_within  # on shutdown, how long queued reports may drain
        self._client: AsyncPenaltyClient | None = None
        self._reporter: SessionReporter | None = None

    def start(self) -> None:
        """Open the channel and the Session writer (needs the running loop)."""
        if self._client is None:
            self._client = AsyncPenaltyClient(self.target)
            self._reporter = self._client.reporter(max_queue=self.max_queue)
            self._reporter.start()

    def report(self, ip: str, helo: str = "", mail_from: str = "") -> bool:
        """Queue one relayed origin; False when not started or the queue is full."""
        if self._reporter is None:
            return False
        return self._reporter.report(
            ip, {self.outcome: 1}, helo=helo[:255], mail_from=mail_from[:512]
        )

    @property
    def stats(self) -> dict[str, int]:
        r = self._reporter
        if r is None:
            return {}
        return {"sent": r.sent, "acked": r.acked, "pending": r.pending, "dropped": r.dropped}

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until every queued report is acknowledged (tests, shutdown)."""
        return await self._reporter.flush(within) if self._reporter is not None else True

    async def close(self) -> None:
        if self._reporter is not None:
            await self._reporter.close(self.close_within)
        if self._client is not None:
            await self._client.close()
        self._client = self._reporter = None
