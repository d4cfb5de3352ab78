"""structlog JSON logs for every program here: one event per line, and rate limiting.

penaltyd, relaycheck and the MX clients log in one shape (one JSON object per line, ISO
timestamps, request-scoped fields bound with contextvars) so one log pipeline reads them
all; that is why the configuration lives once, beside the contract, and not per service.

When Redis dies every check would log; `RateLimitedLog` says it once per interval with
the number of suppressed repeats, so the log stays readable and cheap.

`log_addresses` (every console script): `plain` writes IP addresses as they are;
`keyed` replaces each with a short keyed token (`~` + 11 base64url characters, HMAC under
the identity key where one is configured, else under a key drawn at start: lines about
one address can then be joined within one run only); `none` replaces each with `-`.
`AddressScrubber` does it for every string in every event, whatever field it is in
(an identity, an error message, a peer), so no code path can forget it; the client
fingerprint after a sub-identity's address (`-#<fp>`) and the values of the fields that
carry what a client said (`helo`, `mail_from`, ...: a HELO name often spells the
address) are replaced the same way.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

import structlog

from penalty.keyed import LogTokens

LogAddresses = Literal["plain", "keyed", "none"]
LOG_ADDRESS_MODES: tuple[str, ...] = ("plain", "keyed", "none")

# One match per run of characters an address is written with: linear, never backtracks.
_RUN = re.compile(r"[0-9A-Fa-f:.]+")
_V4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
# A sub-identity's client fingerprint after its (already replaced) address or prefix:
# 40 bits of a hash of HELO name and sender domain, reversible by guessing common names.
_FINGERPRINT = re.compile(r"(-|~[A-Za-z0-9_-]{11}|/\d{1,3})#([0-9a-f]{10})(?![0-9a-f])")
# Fields that hold what an SMTP client said about itself rather than an address: the
# whole value is replaced (a HELO name often spells the address: host-203-0-113-7...).
ENVELOPE_FIELDS = frozenset({"helo", "mail_from", "sender", "from", "to", "rcpt", "recipient"})


class AddressScrubber:
    """A structlog processor: every IPv4/IPv6 address in any string value replaced."""

    def __init__(self, mode: LogAddresses, key: bytes | None = None) -> None:
        self.mode = mode
        if mode == "keyed":
            self._replace: Callable[[str], str] = LogTokens(key or os.urandom(32)).token
        else:
            self._replace = lambda _: "-"

    def _address(self, text: str) -> str | None:
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            return None

    def _run(self, m: re.Match[str]) -> str:
        run = m.group()
        if ":" not in run and run.count(".") < 3:
            return run
        for candidate in (run, run.rstrip(".:"), run.rsplit(":", 1)[0]):
            addr = self._address(candidate)
            if addr is not None:
                return self._replace(addr) + run[len(candidate) :]
        if "." in run:  # an IPv4 address inside a longer run (":25", a mapped form)
            return _V4.sub(
                lambda v: self._replace(a) if (a := self._address(v.group())) else v.group(), run
            )
        return run

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            if not value:
                return value
            text = _RUN.sub(self._run, value)
            return _FINGERPRINT.sub(self._fingerprint, text) if "#" in text else text
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        if isinstance(value, dict):
            return {self.scrub(k): self.scrub(v) for k, v in value.items()}  # keys too
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.scrub(str(value))

    def _fingerprint(self, m: re.Match[str]) -> str:
        return f"{m.group(1)}#{self._replace(m.group(2))}"

    def field(self, name: str, value: Any) -> Any:
        if name == "event":
            return value
        if name in ENVELOPE_FIELDS and isinstance(value, str):
            return self._replace(value) if value else value
        return self.scrub(value)

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        return {k: self.field(k, v) for k, v in event.items()}


def configure(
    level: str = "info", addresses: LogAddresses = "plain", key: bytes | None = None
) -> None:
    """JSON lines to stdout, with ISO timestamps and contextvars (request-scoped fields);
    addresses written as `addresses` says (see the module docstring)."""
    scrub: list[Any] = [] if addresses == "plain" else [AddressScrubber(addresses, key)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            *scrub,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
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
