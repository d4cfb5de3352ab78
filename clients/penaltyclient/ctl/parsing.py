"""Parsing what an operator types: outcomes, durations and penaltyd addresses.

Pure functions, kept apart from the commands so that they can be tested (and reused by
new commands) without a server. A bad outcome or duration raises `typer.BadParameter`,
which typer reports as a usage error (exit 2) naming the argument; a bad address raises
`ValueError`, which the session maps to exit 2 with the `--penaltyd` value.
"""

from __future__ import annotations

import re

import typer

from penalty.v1 import penalty_pb2 as pb

# Outcome names operators type: the enum names without the OUTCOME_ prefix, lower case.
OUTCOMES: dict[str, int] = {
    name.removeprefix("OUTCOME_").lower(): number
    for name, number in pb.Outcome.items()
    if number != pb.OUTCOME_UNSPECIFIED
}
_UINT32_MAX = 2**32 - 1
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TTL_PART = re.compile(r"(\d+)([smhdw])")
_TARGET_URI = re.compile(r"^[a-z][a-z0-9+.-]*:(//|/|[^0-9/])")


def parse_outcome(text: str) -> tuple[int, int]:
    """`unknown_recipient=3` -> (OUTCOME_UNKNOWN_RECIPIENT, 3); `accepted` -> (ACCEPTED, 1).

    Names are case-insensitive, `-` works for `_`, and the `OUTCOME_` prefix is optional,
    so both what the README prints and what an operator types are accepted. A count must
    fit the message's uint32; its allowed range (1..max_count) is penaltyd's to enforce,
    and its refusal names the field.
    """
    name, sep, count = text.partition("=")
    key = name.strip().lower().replace("-", "_").removeprefix("outcome_")
    if key not in OUTCOMES:
        valid = ", ".join(OUTCOMES)
        raise typer.BadParameter(
            f"unknown outcome {name!r}; valid outcomes: {valid}", param_hint="'OUTCOME[=N]'"
        )
    if not sep:
        return OUTCOMES[key], 1
    if not count.strip().isdigit() or int(count) > _UINT32_MAX:
        raise typer.BadParameter(
            f"{text!r}: the count after '=' must be a whole number", param_hint="'OUTCOME[=N]'"
        )
    return OUTCOMES[key], int(count)


def parse_ttl(text: str) -> int:
    """`2592000`, `30d`, `12h`, `15m`, `1d12h` -> seconds. `0` asks for penaltyd's default."""
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    parts = _TTL_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise typer.BadParameter(
            f"{text!r} is not a duration: give seconds or e.g. 30d, 12h, 15m, 1d12h",
            param_hint="'--ttl'",
        )
    return sum(int(n) * _TTL_UNITS[u] for n, u in parts)


def check_target(address: str) -> None:
    """Refuse what is surely a typo before grpc turns it into a slow "unavailable".

    A gRPC target URI (`dns:///name:port`, `unix:/path`) is passed on as given; anything
    else must be HOST:PORT entries with a numeric port (`[::1]:50051` for IPv6).
    """
    if _TARGET_URI.match(address):
        return
    for part in address.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not (sep and host and port.isdigit()):
            raise ValueError(f"not HOST:PORT: {part.strip()!r}")
