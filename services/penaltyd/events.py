"""Store events: what changed in penalties, shared marks and the allowlist.

Every store emits them (the embedded one to its listener, the Redis one through its
pub/sub feed, `pd:feed`); the engine's watch hub turns them into WatchPenalties events.
The encoding is the feed's wire format: `kind\tidentity\texpires_at_ms\treason`.
"""

from __future__ import annotations

from dataclasses import dataclass

STARTED = "S"  # identity, expires_at_ms, reason
LIFTED = "L"  # identity, reason (the lifted penalty's: a sealed identity travels in it)
SHARED = "M"  # identity = address (its label with identity_key), expires_at_ms
ALLOW_ADDED = "A"  # identity = cidr, expires_at_ms, reason = AllowEntry.encode()
ALLOW_REMOVED = "D"  # identity = cidr
RESYNC = "R"  # in-process only: the feed was lost; watchers must take a new snapshot
_KINDS = frozenset((STARTED, LIFTED, SHARED, ALLOW_ADDED, ALLOW_REMOVED))


@dataclass(frozen=True, slots=True)
class FeedEvent:
    kind: str
    identity: str
    expires_at_ms: int = 0
    reason: str = ""

    def encode(self) -> bytes:
        return f"{self.kind}\t{self.identity}\t{self.expires_at_ms}\t{self.reason}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> FeedEvent:
        """Raises ValueError on anything we did not publish."""
        kind, identity, expires, reason = raw.decode().split("\t", 3)
        if kind not in _KINDS or not identity:
            raise ValueError(f"unknown feed event {raw[:80]!r}")
        return cls(kind, identity, int(expires), reason)
