"""structlog JSON logs: one event per line, and rate limiting for storms.

The same shape as penaltyd's logs (one JSON object per line, ISO timestamps, fields
bound with contextvars) so one log pipeline reads both; services do not import each
other, so the few lines live here too.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog


def configure(level: str = "info") -> None:
    """JSON lines to stdout, with ISO timestamps and contextvars (request-scoped fields)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


class RateLimitedLog:
    """Emit an event at most once per `interval` seconds, counting what was suppressed:
    when Redis dies every Classify would log, and the log must stay readable."""

    def __init__(self, logger: Any, interval: float = 5.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(event, -1e9) < self._interval:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return
        self._last[event] = now
        self._log.warning(event, suppressed=self._suppressed.pop(event, 0), **fields)
