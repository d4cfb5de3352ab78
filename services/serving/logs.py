"""structlog JSON logs for every program here: one event per line, and rate limiting.

penaltyd, relaycheck and the MX clients log in one shape (one JSON object per line, ISO
timestamps, request-scoped fields bound with contextvars) so one log pipeline reads them
all; that is why the configuration lives once, beside the contract, and not per service.

When Redis dies every check would log; `RateLimitedLog` says it once per interval with
the number of suppressed repeats, so the log stays readable and cheap.
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
    """Emit an event at most once per `interval` seconds, counting what was suppressed."""

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
