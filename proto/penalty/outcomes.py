"""The outcome vocabulary: what an MX reports, by number and by name, defined once.

Every component that turns outcomes into names (reasons, logs, Explain, penaltyctl,
the log watcher's pattern table, relaycheck's setting) or sizes a vector by them (the
detector's weights, the stores' windows) uses this module, derived from the contract's
`Outcome` enum, so a new outcome in the .proto reaches every one of them.

The stores encode a window's counts as `bucket * SLOT_WIDTH + outcome` (hash fields in
Redis, codes in the embedded store); `SLOT_WIDTH` is that width, checked here against
the enum at import, and the Lua scripts declare the same value (checked by a test).
"""

from __future__ import annotations

from penalty.v1 import penalty_pb2

UNSPECIFIED = penalty_pb2.OUTCOME_UNSPECIFIED
ACCEPTED = penalty_pb2.OUTCOME_ACCEPTED

#: "unknown_recipient" -> 2, every outcome but UNSPECIFIED.
NUMBERS: dict[str, int] = {
    name.removeprefix("OUTCOME_").lower(): int(number)
    for name, number in penalty_pb2.Outcome.items()
    if number != UNSPECIFIED
}
#: 2 -> "unknown_recipient".
NAMES: dict[int, str] = {number: name for name, number in NUMBERS.items()}
#: The names of error outcomes (everything but "accepted").
ERROR_NAMES: frozenset[str] = frozenset(NUMBERS) - {"accepted"}
#: Length of a vector indexed by outcome number (index 0, UNSPECIFIED, is never used).
COUNT = max(NUMBERS.values()) + 1
#: Outcome slots per bucket in the stores' window encoding (bucket * SLOT_WIDTH + outcome).
SLOT_WIDTH = 16

if COUNT > SLOT_WIDTH:  # pragma: no cover - fails the import the day the enum outgrows it
    raise RuntimeError(f"{COUNT} outcomes do not fit the stores' {SLOT_WIDTH} slots per bucket")


def name(number: int) -> str:
    """`OUTCOME_UNKNOWN_RECIPIENT` (2) -> "unknown_recipient"; KeyError if unknown."""
    return NAMES[number]


def number(text: str) -> int:
    """ "unknown_recipient" or "OUTCOME_UNKNOWN_RECIPIENT" (any case) -> 2; KeyError."""
    return NUMBERS[text.lower().removeprefix("outcome_")]
