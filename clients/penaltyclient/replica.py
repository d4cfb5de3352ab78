"""The live replica: active penalties in the MX's own memory, answering checks in-process.

`WatchPenalties` sends a snapshot then every change; `ReplicaState` applies them and
answers `check` with a dict lookup or two and the *exact* remaining time: expiry instants
are on the store's clock, and every event carries the store's "now", so the replica
keeps an offset between the store's clock and its own monotonic clock (error: one
network hop, well under a millisecond).

The state is pure (no I/O): `AsyncPenaltyClient` feeds it from an asyncio task, the sync
`PenaltyClient` from a thread. While the stream is down it says so (`synced` is False)
and the clients fall back to RPCs.
"""

from __future__ import annotations

import math
import time

from penalty import replies
from penalty.identity import (
    IdentityRules,
    InvalidAddress,
    NetworkSet,
    address_and_identity,
    client_fingerprint_and_marks,
    parse_network,
    same_client,
    sub_identity,
)
from penalty.replies import DEFAULT_SMTP_REPLY
from penalty.v1 import penalty_pb2 as pb

Kind = pb.PenaltyEvent.Kind


class ReplicaState:
    def __init__(self, rules: IdentityRules | None = None) -> None:
        self.rules = rules or IdentityRules()
        self._synced = False
        self._stale_until = 0.0  # while re-watching: keep answering until then (monotonic)
        self.restarts = 0
        self.template = DEFAULT_SMTP_REPLY
        self.events = 0
        self.learned = 0  # penalties taken from our own reports' verdicts
        self._offset_ms = 0.0  # store clock - local monotonic clock
        # identity -> (expiry, reason, marks of the one client it binds or "")
        self._penalties: dict[str, tuple[int, str, str]] = {}
        self._building: dict[str, tuple[int, str, str]] | None = None
        self._allow: NetworkSet[int] = NetworkSet()
        self._building_allow: NetworkSet[int] | None = None
        self.last_event_monotonic = 0.0

    def __len__(self) -> int:
        return len(self._penalties)

    @property
    def synced(self) -> bool:
        """Whether checks may be answered from here (a full snapshot, kept current)."""
        if not self._synced:
            return False
        return not self._stale_until or time.monotonic() < self._stale_until

    def reset(self, keep_for: float = 0.0) -> None:
        """The stream ended: build from the next snapshot.

        With `keep_for`, the current state keeps answering for that many seconds while
        the new snapshot arrives: for a stream that ended because the server recycles
        connections (every few minutes, so clients rebalance), not because changes were
        missed. Without it (or after it), checks go to penaltyd until the snapshot is in.
        """
        self.restarts += 1
        self._building = {}
        self._building_allow = NetworkSet()
        if keep_for > 0 and self._synced:
            self._stale_until = time.monotonic() + keep_for
            return
        self._synced = False
        self._stale_until = 0.0

    def now_ms(self) -> float:
        return time.monotonic() * 1000 + self._offset_ms

    def apply(self, event: pb.PenaltyEvent) -> None:
        self.events += 1
        self.last_event_monotonic = time.monotonic()
        if event.store_now_unix_ms:
            self._offset_ms = event.store_now_unix_ms - time.monotonic() * 1000
        target = self._penalties if self._building is None else self._building
        allow = self._allow if self._building_allow is None else self._building_allow
        kind = event.kind
        if kind == Kind.KIND_PENALTY_STARTED:
            target[event.penalty.identity] = (
                event.penalty.expires_at_unix_ms,
                event.penalty.reason,
                event.penalty.client,
            )
        elif kind == Kind.KIND_PENALTY_LIFTED:
            target.pop(event.penalty.identity, None)
        elif kind == Kind.KIND_ALLOW_ADDED:
            allow.add(parse_network(event.allow.cidr), event.allow.expires_at_unix_ms)
        elif kind == Kind.KIND_ALLOW_REMOVED:
            allow.remove(parse_network(event.allow.cidr))
        elif kind == Kind.KIND_SNAPSHOT_CHUNK:
            for p in event.penalties:
                target[p.identity] = (p.expires_at_unix_ms, p.reason, p.client)
            for entry in event.allow_entries:
                allow.add(parse_network(entry.cidr), entry.expires_at_unix_ms)
        elif kind == Kind.KIND_SNAPSHOT_DONE:
            if event.smtp_reply_template:
                self.template = event.smtp_reply_template
            if event.HasField("identity_rules"):
                r = event.identity_rules
                # Key checks exactly as the server does (prefix lengths, NAT64 prefixes).
                self.rules = IdentityRules(r.ipv4_prefix, r.ipv6_prefix, tuple(r.nat64_prefixes))
            if self._building is not None:
                self._penalties = self._building
                self._building = None
            if self._building_allow is not None:
                self._allow = self._building_allow
                self._building_allow = None
            self._synced = True
            self._stale_until = 0.0

    def learn(self, verdict: pb.Verdict) -> None:
        """A tempfail verdict penaltyd just answered to one of our reports: known now.

        The feed would bring the same penalty a round trip later; meanwhile this MX's
        next RCPT from that client must already meet the 450. The expiry is on the store's
        clock, like the feed's, so the remaining time stays exact."""
        if not (verdict.tempfail and verdict.identity and verdict.expires_at_unix_ms):
            return
        entry = (verdict.expires_at_unix_ms, verdict.reason, verdict.client)
        self._penalties[verdict.identity] = entry
        if self._building is not None:
            self._building[verdict.identity] = entry  # survives the snapshot's swap
        self.learned += 1

    def check(
        self, ip: str, helo: str = "", mail_from: str = "", fingerprint: str = ""
    ) -> pb.Verdict | None:
        """The verdict from memory, or None when the replica is not synced (ask penaltyd)."""
        if not self.synced:
            return None
        try:
            addr, identity = address_and_identity(ip, self.rules)
        except InvalidAddress:
            return None  # let the server name the field
        now = self.now_ms()
        if len(self._allow):
            hit = self._allow.match(addr)
            if hit is not None and hit[1] > now:
                return pb.Verdict(identity=identity, allowlisted=True)
        found = self._penalties.get(identity)
        if found is not None and found[0] <= now:
            found = None  # expired (swept later): a client's own penalty may hold it
        key = identity
        if (helo or mail_from or fingerprint) and self._penalties:
            fp, marks = client_fingerprint_and_marks(helo, mail_from, fingerprint)
            if found is not None and found[2] and not same_client(found[2], marks):
                found = None  # bound to another client of the address (cold start)
            if found is None:
                key = sub_identity(identity, fp)
                found = self._penalties.get(key)
        if found is None or found[0] <= now:
            return pb.Verdict(identity=identity)
        seconds = max(1, math.ceil((found[0] - now) / 1000))
        return pb.Verdict(
            tempfail=True,
            seconds_left=seconds,
            expires_at_unix_ms=found[0],
            identity=key,
            reason=found[1],
            smtp_reply=replies.render(self.template, ip, key, seconds),
        )

    def sweep(self) -> None:
        now = self.now_ms()
        for identity in [i for i, (exp, _, _) in self._penalties.items() if exp <= now]:
            del self._penalties[identity]
