"""The client library's stdlib log records, as a sidecar's JSON lines.

`penaltyclient.aio` and `penaltyclient.sync` log with stdlib `logging`: they are a
library, and a library must not configure structlog for the program that imports it.
The sidecars (penalty-policyd, penalty-milter, penalty-logwatch) log structlog JSON, one
event per line (DESIGN.md section 11); without this, a record such as "penaltyd check
failed (UNAVAILABLE ...): answering no penalty" would reach stderr through logging's
last-resort handler as a bare line of text.
"""

from __future__ import annotations

import logging

import structlog


class ToStructlog(logging.Handler):
    """Emit each stdlib record as a structlog event of the same logger name and level."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger(record.name).log(record.levelno, record.getMessage())


def route_stdlib_logs(level: str) -> None:
    """Send every stdlib record at `level` or above through structlog (configured by the
    program: `serving.logs.configure`); grpc's own Python logger from warnings only."""
    root = logging.getLogger()
    root.handlers[:] = [ToStructlog()]
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("grpc").setLevel(logging.WARNING)
