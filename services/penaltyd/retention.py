"""What penaltyd keeps, where, and for how long: one registry, the source of docs/privacy.md.

Every kind of Redis key the store writes is a `KeyKind` here: what it holds, who writes
it, and its maximum lifetime as a formula of the settings with a function that computes
it. The embedded store holds the same things in process memory for the same times.
`MX_SIDE` lists what the components on the MX nodes keep. Three things depend on it:

- `docs/privacy.md` embeds `markdown()` (a test keeps the two identical);
- the privacy integration test matches every key a full run leaves in Redis to a kind
  here and checks its TTL against the kind's lifetime;
- `rotation_seconds`: how long an `identity_key_previous` must be kept.

Run `python -m penaltyd.retention [CONFIG]` to print the tables for a configuration,
`python -m penaltyd.retention --update` to rewrite them (defaults) in docs/privacy.md.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from penaltyd.settings import Settings


def longest_penalty_seconds(s: Settings) -> int:
    """The longest a penalty can last: `penalty_seconds`, or the escalation cap."""
    if s.escalation_multiplier > 1:
        return max(s.penalty_seconds, s.escalation_cap_seconds)
    return s.penalty_seconds


def _window_key(s: Settings) -> float:
    # A window key dies when its newest bucket has left the window, or with its penalty.
    return max(s.window_seconds + s.bucket_seconds, longest_penalty_seconds(s))


@dataclass(frozen=True, slots=True)
class KeyKind:
    pattern: str  # as documented: <p> is key_prefix, {A} the address's hash tag
    regex: str  # matches the key after "<prefix>:"
    type: str
    holds: str
    written_by: str
    lifetime: str  # the formula, in settings
    seconds: Callable[[Settings], float]
    names_address: bool  # holds an identity (a keyed token with identity_key)
    # Looked up under identity_key_previous during a rotation (reputation is not: under a
    # new key it starts again, which fails open), so it sets `rotation_seconds`.
    rotated: bool = True

    def matches(self, key: str, prefix: str) -> bool:
        return (
            key.startswith(prefix + ":")
            and re.fullmatch(self.regex, key[len(prefix) + 1 :]) is not None
        )


_A = r"\{[^{}]+\}"  # an address's hash tag: {203.0.113.7}, {2001:db8::/64} or {k<token>}
_FP = r"[^:{}]+"

KEY_KINDS: tuple[KeyKind, ...] = (
    KeyKind(
        "<p>:{A}:w",
        rf"{_A}:w",
        "hash",
        "the address's error window: outcome counts per bucket, the bucket a penalty used "
        "up, and its penalty (reason with the numbers, expiry; a penalty bound to the "
        "address's one known client also holds that client's marks: hashes of its HELO, "
        "sender domain and MX fingerprint, keyed with identity_key)",
        "Report (record.lua), a penalty starting, Lift",
        "max(window_seconds + bucket_seconds, longest penalty) after the last report",
        _window_key,
        True,
    ),
    KeyKind(
        "<p>:{A}:w:<fp>",
        rf"{_A}:w:{_FP}",
        "hash",
        "the same for one client behind a shared address (fp: a hash of its HELO name and "
        "sender domain, keyed with identity_key)",
        "Report once a second client shows up on the address",
        "max(window_seconds + bucket_seconds, longest penalty) after the last report",
        _window_key,
        True,
    ),
    KeyKind(
        "<p>:{A}:h:<gen>",
        rf"{_A}:h:\d+",
        "HyperLogLog",
        "client fingerprints seen on the address in one window generation (registers "
        "only: a fingerprint cannot be read back)",
        "Report with a HELO name, sender or fingerprint",
        "2 x window_seconds after the last report",
        lambda s: 2 * s.window_seconds,
        True,
    ),
    KeyKind(
        "<p>:{A}:s",
        rf"{_A}:s",
        "string",
        "the mark that the address is shared (more distinct clients than "
        "shared_min_sub_identities)",
        "Report (detection)",
        "shared_ttl_seconds",
        lambda s: s.shared_ttl_seconds,
        True,
    ),
    KeyKind(
        "<p>:{A}:o[:<fp>]",
        rf"{_A}:o(:{_FP})?",
        "string",
        "how many penalties the identity had (escalation)",
        "a penalty starting, with escalation_multiplier > 1",
        "escalation_window_seconds after the last penalty (none with escalation off)",
        lambda s: s.escalation_window_seconds if s.escalation_multiplier > 1 else 0,
        True,
    ),
    KeyKind(
        "<p>:{A}:l[:<fp>]",
        rf"{_A}:l(:{_FP})?",
        "string",
        "the last lift: who lifted the penalty, when, and their note",
        "Lift",
        "window_seconds",
        lambda s: s.window_seconds,
        True,
    ),
    KeyKind(
        "<p>:{A}:r",
        r"\{(?!nb:)[^{}]+\}:r",
        "hash",
        "the address's reputation: decayed counts of its events, weighted errors and "
        "penalties (no outcome detail, no client)",
        "Report (record.lua), a penalty starting",
        "reputation_ttl_seconds after the last report or penalty",
        lambda s: s.reputation_ttl_seconds,
        True,
        False,
    ),
    KeyKind(
        "<p>:{nb:<N>}:r",
        r"\{nb:[^{}]+\}:r",
        "hash",
        "a neighbourhood's reputation (N: its network, a /24 or /48, or the network's keyed "
        "token with identity_key): decayed counts of events, weighted errors, penalties",
        "every replica, every stats_flush_seconds",
        "reputation_ttl_seconds after the last flush that added to it",
        lambda s: s.reputation_ttl_seconds,
        True,
        False,
    ),
    KeyKind(
        "<p>:{nbw<N>}:worst",
        r"\{nbw\d+\}:worst",
        "sorted set",
        "the worst neighbourhoods (member: the network, or its seal with identity_key) by "
        "decayed weighted errors, at most neighbourhood_worst_keep per shard",
        "every replica, every stats_flush_seconds",
        "reputation_ttl_seconds after the last entry on the shard",
        lambda s: s.reputation_ttl_seconds,
        True,
        False,
    ),
    KeyKind(
        "<p>:{idx<N>}:active",
        r"\{idx\d+\}:active",
        "sorted set",
        "identities with an active penalty (member) and its expiry (score)",
        "a penalty starting; Lift removes it",
        "longest penalty + 1 s after the last penalty indexed on the shard",
        lambda s: longest_penalty_seconds(s) + 1,
        True,
    ),
    KeyKind(
        "<p>:{sh<N>}:shared",
        r"\{sh\d+\}:shared",
        "sorted set",
        "shared addresses (member: the address, or its seal with identity_key) and the "
        "mark's expiry",
        "Report (detection)",
        "shared_ttl_seconds + 1 s after the last mark on the shard",
        lambda s: s.shared_ttl_seconds + 1,
        True,
    ),
    KeyKind(
        "<p>:{trk<N>}:<gen>",
        r"\{trk\d+\}:\d+",
        "HyperLogLog",
        "identities seen per window generation, for Stats (registers only: an identity "
        "cannot be read back)",
        "every replica, every stats_flush_seconds",
        "2 x window_seconds",
        lambda s: 2 * s.window_seconds,
        True,
    ),
    KeyKind(
        "<p>:{bl<N>}:<bucket>",
        r"\{bl\d+\}:\d+",
        "hash",
        "fleet-wide event and weighted-error totals per bucket (no identity)",
        "every replica, every stats_flush_seconds",
        "window_seconds + bucket_seconds",
        lambda s: s.window_seconds + s.bucket_seconds,
        False,
    ),
    KeyKind(
        "<p>:{rep}:degraded",
        r"\{rep\}:degraded",
        "sorted set",
        "replica ids and when each last failed open (no identity)",
        "a replica that failed open",
        "120 s after the last write",
        lambda s: 120,
        False,
    ),
    KeyKind(
        "<p>:{rep}:probe:<replica>",
        r"\{rep\}:probe:[0-9a-f]+",
        "string",
        "a replica's health probe (no identity)",
        "every replica's health check",
        "10 s",
        lambda s: 10,
        False,
    ),
    KeyKind(
        "<p>:{allow}:e:<cidr>",
        r"\{allow\}:e:[0-9a-fA-F.:/]+",
        "string",
        "an allowlist entry: the CIDR an operator entered, its note, actor and times",
        "Allow; RemoveAllow deletes it",
        "its ttl_seconds, at most allow_max_ttl_seconds",
        lambda s: s.allow_max_ttl_seconds,
        False,
    ),
    KeyKind(
        "<p>:{allow}:idx",
        r"\{allow\}:idx",
        "sorted set",
        "allowlisted CIDRs and their expiry",
        "Allow; RemoveAllow",
        "allow_max_ttl_seconds + 1 s",
        lambda s: s.allow_max_ttl_seconds + 1,
        False,
    ),
)

#: Not stored: the pub/sub channel `<p>:feed` carries each change (penalties, shared
#: marks, allowlist) to the replicas and keeps nothing.
FEED = "<p>:feed"


@dataclass(frozen=True, slots=True)
class Kept:
    """Something kept outside Redis: in a process's memory or an MX node's disk."""

    where: str
    holds: str
    lifetime: str


MX_SIDE: tuple[Kept, ...] = (
    Kept(
        "penaltyd replica: in-process view (Redis store)",
        "active penalties, shared marks and the allowlist, as in Redis",
        "as in Redis: each until it ends",
    ),
    Kept(
        "penaltyd replica: report buffer",
        "reports that could not reach the store (identity, fingerprint, counts)",
        "until replayed; at most window_seconds and report_buffer reports; memory only",
    ),
    Kept(
        "penaltyd replica: WatchPenalties event log",
        "the last changes sent to watchers (identities as watchers see them)",
        "at most the longest penalty and watch_log_events events; memory only",
    ),
    Kept(
        "penaltyd replica and MX live replicas: fingerprint cache",
        "HELO names and sender domains (never full senders) with their fingerprints",
        "the 65,536 most recently seen distinct clients; memory only",
    ),
    Kept(
        "penaltyd replica: key caches (identity_key)",
        "addresses with their tokens and seals, for speed",
        "the 131,072 most recently used; memory only",
    ),
    Kept(
        "MX: live replica (client library, policyd, milter)",
        "active penalties (identity, expiry, reason; for a penalty bound to one client of "
        "its address, that client's marks: unkeyed 40-bit hashes of its HELO, sender "
        "domain and MX fingerprint, each matchable against a list of names) and the "
        "allowlist",
        "each until it ends; memory only",
    ),
    Kept(
        "MX: report queues (policyd, milter, client library)",
        "reports not yet taken by penaltyd (client address, HELO name, sender, counts)",
        "until penaltyd takes them; at most 600 s (then dropped: older than its window) "
        "and max_queue reports; memory only",
    ),
    Kept(
        "MX: penalty-logwatch --state-dir",
        "the read position in the mail log, and reports undelivered at exit (spool)",
        "until the next start, which uses them only if younger than --resume-within",
    ),
)


def rotation_seconds(s: Settings) -> float:
    """How long to keep `identity_key_previous` after every replica has the new key:
    the longest lifetime of any key that names an identity (tokens under the old key)."""
    return max(k.seconds(s) for k in KEY_KINDS if k.names_address and k.rotated)


def kind_of(key: str, prefix: str) -> KeyKind | None:
    return next((k for k in KEY_KINDS if k.matches(key, prefix)), None)


def _duration(seconds: float) -> str:
    """`3601` -> "1 h 1 s"; 0 -> "none" (a key not written with these settings)."""
    left, parts = int(seconds), []
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size} {unit}")
            left %= size
    return " ".join(parts) or "none"


def markdown(s: Settings | None = None) -> str:
    """The retention tables of docs/privacy.md (defaults unless `s` is given)."""
    s = s or Settings()
    lines = [
        "| Key | Type | Holds | Written by | Kept at most | Default |",
        "|---|---|---|---|---|---|",
    ]
    for k in KEY_KINDS:
        lines.append(
            f"| `{k.pattern}` | {k.type} | {k.holds} | {k.written_by} | {k.lifetime} "
            f"| {_duration(k.seconds(s))} |"
        )
    lines += [
        "",
        f"`{FEED}` (pub/sub) carries every change to the replicas and stores nothing. "
        f"Longest lifetime of a key naming an identity that is looked up under the previous "
        f"key during a rotation (keep `identity_key_previous` this long after a rotation): "
        f"**{_duration(rotation_seconds(s))}** with the defaults. Reputation keys are not: "
        f"under a new key an address's and a neighbourhood's history start again.",
        "",
        "| Where | Holds | Kept at most |",
        "|---|---|---|",
    ]
    lines += [f"| {k.where} | {k.holds} | {k.lifetime} |" for k in MX_SIDE]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- retention: begin -->\n", "<!-- retention: end -->"


def update(path: str) -> None:
    """Rewrite the tables between the markers of `path` (docs/privacy.md)."""
    with open(path, encoding="utf-8") as fh:
        doc = fh.read()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(head + BEGIN + markdown() + END + tail)


if __name__ == "__main__":  # pragma: no cover
    from penaltyd.settings import load_settings

    if sys.argv[1:2] == ["--update"]:
        update(sys.argv[2] if len(sys.argv) > 2 else "docs/privacy.md")
    else:
        sys.stdout.write(markdown(load_settings(sys.argv[1] if len(sys.argv) > 1 else None)))
