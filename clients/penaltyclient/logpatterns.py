"""Postfix log lines -> penaltyd outcomes: the pattern table and the parser, no I/O.

`penalty-logwatch` reports what only the log shows (DESIGN.md section 10): postscreen's
verdicts, 501/503 syntax and sequence errors, AUTH failures, lost connections and the
`disconnect ... commands=ok/total` summary that is the denominator. Everything here is
pure so the table can be tested line by line against a real Postfix 3.7 log and
rendered into `docs/logwatch.md` (`markdown_tables()`; a test keeps the two in step).

How a line becomes a report:

1. `parse_line` splits the syslog header (`host`, `postfix/smtpd[pid]`), finds the first
   `RULES` entry for that program whose pattern matches the message, and takes the
   client address **from the line itself**. With XCLIENT (or a proxy) a session starts
   as `connect from localhost[127.0.0.1]` while its reject and disconnect lines name
   the real client, so the address is never carried over from the `connect` line.
2. `reject:` lines are classified by `REASONS`, searched in the reply text with the
   envelope (`; from=<...> to=<...> proto=... helo=<...>`) cut off; the first match wins.
3. `Tally.feed` keeps a little per-session state (keyed by host and smtpd pid) so the
   summary counts each failed command once: a failure that a specific line already
   accounts for (a reject, an `Illegal address syntax` warning, a SASL failure...) is
   not counted again; a failure no line explains is a syntax or sequence error (501,
   502, 503) that Postfix does not log on its own, reported as PROTOCOL_VIOLATION.

Client-controlled text (addresses, HELO names, pipelined input) follows Postfix's own
words in most lines, so patterns anchor on the fixed part before it, and reject reasons
that mean "not an error" are checked last and anchored at the end of the reply text:
a client cannot turn its own error into an ignored line by choosing an address.

Hostile input costs linear time and bounded memory:

- A line longer than `MAX_PARSE_CHARS` (4096) is not parsed (`too-long`): Postfix cuts
  every record at 2000 characters (msg_syslog(3), postlogd), so only a line Postfix did
  not write can be longer.
- Every pattern is linear in the line: anchored at its start, with each repetition
  stopped by a character it cannot contain. The two that look for the *rightmost*
  occurrence of something (the reject envelope, the address of a content rejection,
  both after client text) do it with string searches and memoised suffix matches
  (`split_envelope`, `_content_reject_tail`) instead of a backtracking `.*`, which was
  quadratic on lines made of `; to=<` or ` from x[1]; from=<` repeated.
- Counts from `disconnect` summaries are clamped (`penalty.identity.bound_count`), HELO
  and sender bounded (`bound_client`), and per-session state is capped.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from penalty import outcomes
from penalty.identity import InvalidAddress, bound_client, bound_count, parse_ip
from penalty.v1 import penalty_pb2 as pb

K = TypeVar("K")
V = TypeVar("V")

ACCEPTED: int = pb.OUTCOME_ACCEPTED
UNKNOWN_RECIPIENT: int = pb.OUTCOME_UNKNOWN_RECIPIENT
RELAY_DENIED: int = pb.OUTCOME_RELAY_DENIED
BAD_HELO: int = pb.OUTCOME_BAD_HELO
PROTOCOL_VIOLATION: int = pb.OUTCOME_PROTOCOL_VIOLATION
AUTH_FAILED: int = pb.OUTCOME_AUTH_FAILED
SENDER_REJECTED: int = pb.OUTCOME_SENDER_REJECTED
CONTENT_REJECTED: int = pb.OUTCOME_CONTENT_REJECTED
DNSBL_LISTED: int = pb.OUTCOME_DNSBL_LISTED
LOST_CONNECTION: int = pb.OUTCOME_LOST_CONNECTION


#: Summary counters that are not the client's fault: XCLIENT/XFORWARD come from the
#: trusted proxy (`xclient=0/1` in every XCLIENT session), a failed STARTTLS ends in a
#: `lost connection` line that is already counted, QUIT cannot fail.
NOT_CLIENT_ERRORS = frozenset({"xclient", "xforward", "starttls", "quit"})

# Postfix's "name[address]" (smtpd, cleanup) and postscreen's "[address]:port". The name
# is a verified reverse-DNS name or "unknown", never client text with brackets.
_NAMEADDR = r"(?P<name>[^\s\[\]]*)\[(?P<ip>[^\]\s]+)\]"
_PSADDR = r"\[(?P<ip>[^\]\s]+)\]:\d+"
_CMD = r"(?P<cmd>[A-Za-z][\w-]*)"

# Traditional syslog ("Nov 23 05:02:08", postlogd adds microseconds) or RFC 3339 stamps.
_HEADER = re.compile(
    r"^(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d(?:\.\d+)?"
    r"|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?) "
    r"(?P<host>\S+) (?P<tag>[\w./-]+)(?:\[(?P<pid>\d+)\])?: (?P<msg>.*)$"
)
#: Lines longer than this (characters) are not parsed, counted as `too-long`. Postfix cuts
#: every log record at 2000 characters (msg_syslog(3) and postlogd's MSG_*_RECLEN), plus
#: a syslog header of a few dozen (RFC 3339 stamp, host name, tag): twice that is room
#: enough, and it bounds what any one line can cost.
MAX_PARSE_CHARS = 4096

# The envelope Postfix appends to reject lines, after "; " (smtpd_check.c log_whatsup):
# `from=<sender> to=<recipient> proto=ESMTP helo=<name>`, each part optional but proto.
# It is the rightmost "; " the tail matches (the text before holds the client's
# recipient): `split_envelope` finds that one in linear time.
_ENVELOPE_TAIL = re.compile(
    r"(?:from=<(?P<from>[^>]*)>,? )?(?:to=<.*?>,? )?proto=\w+"
    r"(?:,? helo=<(?P<helo>[^>]*)>)?$"
)
# Pieces of it, matched where `split_envelope` has pinned their position.
_PROTO_HELO_END = re.compile(r">,? proto=\w+,? helo=<[^>]*>$")  # the same with a helo
_PROTO_HELO = re.compile(r"proto=\w+,? helo=<")  # right after "; ", helo to the end
_WORDS = re.compile(r"\w+")
_COUNTER = re.compile(r"([\w-]+)=(\d+)(?:/(\d+))?")
_MAX_COUNTER_DIGITS = 12  # more digits than this (or than int() takes): the count is huge
_MAX_EXPLAINED = 64  # distinct commands one session can account for (bounded state)


@dataclass(frozen=True, slots=True)
class Rule:
    """One kind of log line: where it comes from, what it means, why.

    `kind` tells `Tally` what to do beyond the outcome: `session` lines open an smtpd
    session, `summary` is the disconnect line, `queue` links a queue id to its session,
    `reject` lines take their outcome from `REASONS`. `explains` names the summary
    counter (`rcpt`, `mail`, `unknown`...) whose failure this line accounts for; `{cmd}`
    means the command named in the line. `tail`, if set, matches the rest of the message
    from where `pattern` stopped (for what a regex could only find by backtracking).
    """

    name: str
    program: str  # last part of the syslog tag: smtpd, postscreen, cleanup
    pattern: str  # regex, matched at the start of the message
    outcome: int | None  # None: recognised, but reports nothing itself
    why: str
    example: str  # the message part of a real (or realistic) Postfix 3.7 line
    kind: str = "event"
    explains: str = ""
    tail: Callable[[str, int], dict[str, str] | None] | None = field(
        default=None, repr=False, compare=False
    )
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))

    def match(self, msg: str) -> dict[str, str | None] | None:
        """The named groups if this rule matches the message part of a line, else None."""
        m = self.regex.match(msg)
        if m is None:
            return None
        groups: dict[str, str | None] = m.groupdict()
        if self.tail is not None:
            rest = self.tail(msg, m.end())
            if rest is None:
                return None
            groups |= rest
        return groups


@dataclass(frozen=True, slots=True)
class Reason:
    """What a `reject:` line's reply text says, and the outcome it is worth."""

    name: str
    pattern: str  # regex searched in "<code> <dsn> <text>" without the envelope
    outcome: int | None
    why: str
    example: str
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))


_CONTENT_HEAD = re.compile(rf"{_NAMEADDR}; from=<")
_CONTENT_SUFFIX = re.compile(
    r"> to=<[^>]*> proto=\w+ helo=<(?P<helo>[^>]*)>: 5\.\d{1,3}\.\d{1,3}\b"
)


def _content_reject_tail(msg: str, start: int) -> dict[str, str] | None:
    """`.* from NAME[ADDR]; from=<F> to=<T> proto=P helo=<H>: 5.X.Y` from `start`.

    The header text before the address is the client's, so the address is the rightmost
    ` from ` that fits, as a greedy `.*` finds it, but in linear time: candidates are
    tried right to left with `rfind`, the first `>` after each sender is found by
    searching only up to where the previous candidate's search began, and the part from
    that `>` on (the same for every candidate that shares it) is matched once.
    """
    suffixes: dict[int, re.Match[str] | None] = {}
    end = len(msg)
    gt_from, gt = end, -1  # gt: the first ">" at or after gt_from (-1: none)
    while (p := msg.rfind(" from ", start, end)) >= 0:
        end = p + 5  # the next candidate starts before this one
        head = _CONTENT_HEAD.match(msg, p + 6)
        if head is None:
            continue
        f = head.end()
        if f < gt_from:
            i = msg.find(">", f, gt_from)
            gt, gt_from = (i if i >= 0 else gt), f
            first = gt
        else:  # not reached (a head ends before the candidate to its right); kept exact
            first = gt if gt >= f else msg.find(">", f)
        if first < 0:
            continue
        if first not in suffixes:
            suffixes[first] = _CONTENT_SUFFIX.match(msg, first)
        suffix = suffixes[first]
        if suffix is not None:
            return {
                "name": head["name"],
                "ip": head["ip"],
                "from": msg[f:first],
                "helo": suffix["helo"],
            }
    return None


RULES: tuple[Rule, ...] = (
    # --- smtpd: the session frame
    Rule(
        "session-start",
        "smtpd",
        rf"^connect from {_NAMEADDR}$",
        None,
        "Opens per-session bookkeeping for the summary. With XCLIENT this names the proxy "
        "(localhost), so no address is taken from it.",
        "connect from localhost[127.0.0.1]",
        kind="session",
    ),
    Rule(
        "summary",
        "smtpd",
        rf"^disconnect from {_NAMEADDR}(?P<counters>(?: [\w-]+=\d+(?:/\d+)?)*)$",
        ACCEPTED,
        "The denominator: ACCEPTED n=ok of `commands=ok/total`. Failed commands that no "
        "other line of the session explains (501/502/503 syntax and sequence errors, "
        "which Postfix does not log) add PROTOCOL_VIOLATION; failures already reported "
        "by their own line are not counted twice. `--no-accepted` drops the ACCEPTED "
        "when penalty-policyd or penalty-milter supplies the denominator.",
        "disconnect from unknown[203.0.113.25] ehlo=2 xclient=0/1 mail=1/2 rcpt=0/2 "
        "data=0/1 quit=1 commands=4/9",
        kind="summary",
    ),
    Rule(
        "queue-id",
        "smtpd",
        rf"^(?P<qid>\w+): client={_NAMEADDR}",
        None,
        "Links a queue id to its smtpd session, so a content rejection logged by cleanup "
        "accounts for the session's failed DATA.",
        "97C9720E2B7: client=unknown[198.51.100.61]",
        kind="queue",
    ),
    # --- smtpd: rejections and errors
    Rule(
        "reject",
        "smtpd",
        rf"^(?P<qid>NOQUEUE|\w+): reject: {_CMD} from {_NAMEADDR}: (?P<reply>.*)$",
        None,
        "A restriction refused a command; the outcome comes from the reply text "
        "(reasons table). `--no-rejects` skips the RCPT ones.",
        "NOQUEUE: reject: RCPT from unknown[203.0.113.21]: 550 5.1.1 <user0@test.example>: "
        "Recipient address rejected: User unknown in local recipient table; "
        "from=<offers@spam21.example> to=<user0@test.example> proto=ESMTP "
        "helo=<bot21.example>",
        kind="reject",
        explains="{cmd}",
    ),
    Rule(
        "illegal-address",
        "smtpd",
        rf"^warning: Illegal address syntax from {_NAMEADDR} in {_CMD} command: ",
        PROTOCOL_VIOLATION,
        "A 501 syntax error in MAIL FROM or RCPT TO (logged as a warning, not a reject).",
        "warning: Illegal address syntax from unknown[203.0.113.25] in MAIL command: <bad address>",
        explains="{cmd}",
    ),
    Rule(
        "non-smtp-command",
        "smtpd",
        rf"^warning: non-SMTP command from {_NAMEADDR}: ",
        PROTOCOL_VIOLATION,
        "HTTP requests, mail headers sent as commands (smtpd_forbidden_commands); smtpd hangs up.",
        "warning: non-SMTP command from unknown[203.0.113.26]: GET / HTTP/1.0",
        explains="unknown",
    ),
    Rule(
        "improper-pipelining",
        "smtpd",
        rf"^improper command pipelining after {_CMD} from {_NAMEADDR}: ",
        PROTOCOL_VIOLATION,
        "The client sent ahead without waiting (ratware). Logged whether or not "
        "reject_unauth_pipelining is on; the reject that may follow is its consequence.",
        "improper command pipelining after DATA from unknown[203.0.113.27]: "
        "Subject: x\\r\\n\\r\\nbody\\r\\n.\\r\\nQUIT\\r\\n",
    ),
    Rule(
        "sasl-failed",
        "smtpd",
        rf"^warning: {_NAMEADDR}: SASL [\w-]+ authentication failed",
        AUTH_FAILED,
        "Password guessing (or a user's typo: the weight is lower).",
        "warning: unknown[203.0.113.30]: SASL LOGIN authentication failed: "
        "UGFzc3dvcmQ6, sasl_username=admin",
        explains="auth",
    ),
    Rule(
        "lost-connection",
        "smtpd",
        rf"^lost connection after {_CMD}(?: \(\d+ bytes\))? from {_NAMEADDR}",
        LOST_CONNECTION,
        "The client dropped the connection mid-dialogue (bots that give up after MAIL, "
        "scanners). Flaky networks do this too: the weight is low.",
        "lost connection after MAIL from unknown[203.0.113.28]",
    ),
    Rule(
        "timeout",
        "smtpd",
        rf"^timeout after {_CMD}(?: \(\d+ bytes\))? from {_NAMEADDR}",
        LOST_CONNECTION,
        "The client stopped talking until smtpd_timeout: a dropped connection by another name.",
        "timeout after RCPT from unknown[203.0.113.31]",
    ),
    Rule(
        "too-many-errors",
        "smtpd",
        rf"^too many errors after {_CMD}(?: \(\d+ bytes\))? from {_NAMEADDR}",
        None,
        "The consequence of errors that were each counted already.",
        "too many errors after RCPT from unknown[203.0.113.32]",
    ),
    # --- cleanup: content
    Rule(
        "content-reject",
        "cleanup",
        # ... .* from NAME[ADDR]; from=<..> to=<..> proto=.. helo=<..>: 5.X.Y (the tail)
        r"^(?P<qid>\w+): reject: (?:header|body|mime-header|nested-header) ",
        CONTENT_REJECTED,
        "header_checks/body_checks REJECT (5xx only). The header text before `from` is "
        "the client's, so the address is the rightmost one; the queue id's `client=` "
        "line, when seen, names the client instead.",
        "4F2B1C0A1: reject: header Subject: cheap pills from unknown[203.0.113.33]; "
        "from=<a@spam.example> to=<root@test.example> proto=ESMTP helo=<spam.example>: "
        "5.7.1 message content rejected",
        explains="data",
        tail=_content_reject_tail,
    ),
    Rule(
        "milter-content-reject",
        "cleanup",
        rf"^(?P<qid>\w+): milter-reject: END-OF-MESSAGE from {_NAMEADDR}: "
        r"(?:5\d\d )?5\.\d{1,3}\.\d{1,3}\b",
        CONTENT_REJECTED,
        "A content milter (spam filter) refused the message with a 5xx; 4xx (greylisting) "
        "lines are not errors and do not match.",
        "4F2B1C0A2: milter-reject: END-OF-MESSAGE from unknown[203.0.113.34]: 5.7.1 Spam "
        "message rejected; from=<a@spam.example> to=<root@test.example> proto=ESMTP "
        "helo=<spam.example>",
        explains="data",
    ),
    # --- postscreen: before smtpd
    Rule(
        "pregreet",
        "postscreen",
        rf"^PREGREET \d+ after [\d.]+ from {_PSADDR}",
        PROTOCOL_VIOLATION,
        "Spoke before the greeting (early talker).",
        "PREGREET 20 after 0.19 from [127.0.0.5]:55353: EHLO early.example\\r\\n",
    ),
    Rule(
        "ps-pipelining",
        "postscreen",
        rf"^COMMAND PIPELINING from {_PSADDR} after ",
        PROTOCOL_VIOLATION,
        "Pipelined commands without PIPELINING being offered.",
        "COMMAND PIPELINING from [127.0.0.6]:45059 after EHLO: MAIL FROM:<a@b.example>"
        "\\r\\nRCPT TO:<root@test.example>\\r\\n",
    ),
    Rule(
        "ps-non-smtp",
        "postscreen",
        rf"^NON-SMTP COMMAND from {_PSADDR} after ",
        PROTOCOL_VIOLATION,
        "HTTP or other non-SMTP input.",
        "NON-SMTP COMMAND from [127.0.0.7]:59843 after CONNECT: GET / HTTP/1.1",
    ),
    Rule(
        "ps-bare-newline",
        "postscreen",
        rf"^BARE NEWLINE from {_PSADDR} after ",
        PROTOCOL_VIOLATION,
        "Lines ended with LF instead of CRLF (ratware).",
        "BARE NEWLINE from [203.0.113.35]:40001 after RCPT",
    ),
    Rule(
        "ps-command-limit",
        "postscreen",
        rf"^COMMAND (?:COUNT|LENGTH) LIMIT from {_PSADDR}",
        PROTOCOL_VIOLATION,
        "Too many or too long commands in postscreen's dummy SMTP engine.",
        "COMMAND COUNT LIMIT from [203.0.113.36]:40002 after RCPT",
    ),
    Rule(
        "ps-hangup",
        "postscreen",
        rf"^HANGUP after [\d.]+ from {_PSADDR}",
        LOST_CONNECTION,
        "The client hung up during the tests: a dropped connection, like smtpd's `lost "
        "connection`. Whatever it did wrong first (PREGREET...) has its own line.",
        "HANGUP after 2.5 from [127.0.0.5]:55353 in tests after SMTP handshake",
    ),
    Rule(
        "ps-command-time-limit",
        "postscreen",
        rf"^COMMAND TIME LIMIT from {_PSADDR}",
        LOST_CONNECTION,
        "The client stalled until postscreen gave up: a timeout.",
        "COMMAND TIME LIMIT from [203.0.113.37]:40003 after RCPT",
    ),
    Rule(
        "ps-dnsbl",
        "postscreen",
        rf"^DNSBL rank \d+ for {_PSADDR}",
        DNSBL_LISTED,
        "The combined DNSBL score reached postscreen_dnsbl_threshold (logged once per connection).",
        "DNSBL rank 5 for [203.0.113.38]:40004",
    ),
    Rule(
        "ps-reject",
        "postscreen",
        rf"^NOQUEUE: reject: {_CMD} from {_PSADDR}: ",
        None,
        "postscreen's dummy engine refuses every RCPT of a client that failed a test "
        "(`550 5.5.1 Protocol error`, `blocked using ...`): the test's own line counted "
        "it already.",
        "NOQUEUE: reject: RCPT from [127.0.0.6]:45059: 550 5.5.1 Protocol error; "
        "from=<a@b.example>, to=<root@test.example>, proto=ESMTP, helo=<pipe.example>",
    ),
)

REASONS: tuple[Reason, ...] = (
    Reason(
        "dnsbl",
        r"\bblocked using [\w.-]+",
        DNSBL_LISTED,
        "reject_rbl_client / reject_rhsbl_*: listed in a DNSBL the MX consults.",
        "554 5.7.1 Service unavailable; Client host [203.0.113.39] blocked using zen.spamhaus.org",
    ),
    Reason(
        "unknown-recipient",
        r"Recipient address rejected: (?:User unknown\b|undeliverable address:)",
        UNKNOWN_RECIPIENT,
        "No such mailbox (local, virtual, relay tables, or address verification): "
        "dictionary attacks and stale lists. The reply code does not matter (450 with "
        "soft_bounce is still an unknown user).",
        "550 5.1.1 <user0@test.example>: Recipient address rejected: User unknown in "
        "local recipient table",
    ),
    Reason(
        "relay-denied",
        r"\bRelay access denied\b",
        RELAY_DENIED,
        "Open-relay probing (plain, quoted local part, %-hack).",
        "554 5.7.1 <victim@elsewhere.example>: Relay access denied",
    ),
    Reason(
        "bad-helo",
        r"\bHelo command rejected: ",
        BAD_HELO,
        "reject_invalid_helo_hostname (501), reject_non_fqdn_helo_hostname (504), "
        "reject_unknown_helo_hostname.",
        "501 5.5.2 <bad_helo!!>: Helo command rejected: Invalid name",
    ),
    Reason(
        "sender-rejected",
        r"\bSender address rejected: ",
        SENDER_REJECTED,
        "Unknown sender domain, sender login mismatch, sender access maps.",
        "450 4.1.8 <a@nx.example>: Sender address rejected: Domain not found",
    ),
    Reason(
        "pipelining-consequence",
        r"rejected: Improper use of SMTP command pipelining$",
        None,
        "reject_unauth_pipelining acts on the `improper command pipelining` line logged "
        "just before, which was counted; counting both would count one offence twice. "
        "The reject still accounts for the failed command in the summary.",
        "503 5.5.0 <DATA>: Data command rejected: Improper use of SMTP command pipelining",
    ),
    Reason(
        "syntax-or-sequence",
        r"^50[0-4] ",
        PROTOCOL_VIOLATION,
        "Any other 500-504 reject is a syntax or sequence error (e.g. a non-FQDN recipient).",
        "504 5.5.2 <root>: Recipient address rejected: need fully-qualified address",
    ),
)
"""Checked in order, first match wins. Anything else (greylisting, `Client host
rejected`, access maps, penaltyd's own 450 tempfail) is no error: `reject-unmatched`."""

_BY_PROGRAM: dict[str, tuple[Rule, ...]] = {
    program: tuple(r for r in RULES if r.program == program)
    for program in dict.fromkeys(r.program for r in RULES)
}


@dataclass(frozen=True, slots=True)
class Ignored:
    """A line that reports nothing, and why (the stats count lines per reason)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Parsed:
    """One recognised line: which rule, whose it is, and what it is worth."""

    rule: Rule
    session: tuple[str, str, str]  # host, syslog tag, pid
    ip: str  # normalised (parse_ip); "" for `connect from` lines
    loopback: bool
    outcome: int | None
    label: str  # the rule, or the reject reason, that decided (stats key if no outcome)
    command: str  # the summary counter this line accounts for ("" if none)
    helo: str = ""
    mail_from: str = ""
    queue_id: str = ""
    counters: Mapping[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Report:
    """What to send penaltyd for one line: a client and its outcome counts."""

    ip: str
    counts: Mapping[int, int]
    helo: str = ""
    mail_from: str = ""
    rule: str = ""


def client_address(text: str) -> str | None:
    """The address in `name[...]`, normalised like penaltyd does it; None if unusable.

    Postfix writes `unknown[unknown]` when it never learnt the address; some setups write
    `[IPv6:2001:db8::1]` or add a scope (`fe80::1%eth0`). A report with a bad address
    would make penaltyd refuse its whole batch, so such lines are dropped here.
    """
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    text = text.partition("%")[0]
    try:
        return str(parse_ip(text))
    except InvalidAddress:
        return None


def _number(digits: str) -> int:
    """A count from the log; absurdly long digit runs are just "huge" (int() refuses
    more than 4300 digits, and a count is clamped to MAX_COUNT later anyway)."""
    return int(digits) if len(digits) <= _MAX_COUNTER_DIGITS else 10**_MAX_COUNTER_DIGITS


def parse_counters(text: str) -> dict[str, tuple[int, int]]:
    """`ehlo=2 xclient=0/1 commands=5/12` -> {"ehlo": (2, 2), "xclient": (0, 1), ...}."""
    out: dict[str, tuple[int, int]] = {}
    for name, ok, total in _COUNTER.findall(text):
        out[name.lower()] = (_number(ok), _number(total) if total else _number(ok))
    return out


def split_envelope(reply: str) -> tuple[int, re.Match[str]] | None:
    """Where the envelope of a reject's reply starts (the index of its "; ") and its match.

    The same answer as `^(?P<text>.*); <_ENVELOPE_TAIL>` (the rightmost "; " whose tail
    matches) for one line, in linear time: a backtracking `.*` tries every "; " and
    scans to the end from each, quadratic on a line of `; to=<` repeated. Instead, the
    end of the line pins the tail down. `proto=WORD` or `proto=WORD helo=<NAME>` ends
    it, and a helo holds no `>`, so the `>` that closes `to=<..>` or `from=<..>` (if
    either is there) is the last one before that end (`h`). What can start the
    envelope is then: "; proto=" right at that end part (A), the rightmost "; to=<"
    before `h` (B), the rightmost "; from=<" whose sender ends at `h` (C1) or at a `>`
    followed by ` to=<` (C2). The rightmost of those is the answer, confirmed by one
    match of the tail.
    """
    n = len(reply)
    starts: list[int] = []
    h = -1  # the ">" that ends to=<..> or from=<..>, if the tail allows one
    if reply.endswith(">"):
        q = reply.rfind(">", 0, n - 1)
        end = n - 1
        while (i := reply.rfind("; proto=", q + 1, end)) >= 0:  # (A)
            if _PROTO_HELO.match(reply, i + 2):
                starts.append(i)
                break
            end = i + 7
        if q >= 0 and _PROTO_HELO_END.match(reply, q):
            h = q
    else:
        i = reply.rfind("proto=")
        if i < 0 or _WORDS.fullmatch(reply, i + 6) is None:
            return None
        lead = reply[max(0, i - 3) : i]
        if lead.endswith("; "):  # (A)
            starts.append(i - 2)
        if lead.endswith("> "):
            h = i - 2
        elif lead == ">, ":
            h = i - 3
    if h >= 0:
        starts.append(reply.rfind("; to=<", 0, h))  # (B)
        g = reply.rfind(">", 0, h)
        starts.append(reply.rfind("; from=<", g + 1, h))  # (C1)
        while g >= 0:  # (C2): the rightmost ">" that ends a sender and starts to=<..>
            before = reply.rfind(">", 0, g)
            if (reply.startswith(" to=<", g + 1) and g + 6 <= h) or (
                reply.startswith(", to=<", g + 1) and g + 7 <= h
            ):
                i = reply.rfind("; from=<", before + 1, g)
                if i >= 0:
                    starts.append(i)
                    break
            g = before
    start = max(starts, default=-1)
    if start < 0:
        return None
    m = _ENVELOPE_TAIL.match(reply, start + 2)
    return None if m is None else (start, m)


def classify_reply(reply: str) -> tuple[Reason | None, str, str]:
    """A reject's reply text -> (reason or None, helo, sender) from its envelope."""
    text, helo, sender = reply, "", ""
    env = split_envelope(reply)
    if env is not None:
        start, m = env
        text, helo, sender = reply[:start], m["helo"] or "", m["from"] or ""
    for reason in REASONS:
        if reason.regex.search(text):
            return reason, helo, sender
    return None, helo, sender


def _command_name(cmd: str) -> str:
    """The summary counter a command's failure is counted under."""
    name = cmd.lower()
    return "data" if name == "end-of-message" else name


def parse_line(line: str) -> Parsed | Ignored:
    """Classify one log line. Pure: the same line always gives the same answer.

    Linear in the line's length, which is bounded: a line over `MAX_PARSE_CHARS` is not
    one Postfix wrote and is ignored as `too-long`.
    """
    if len(line) > MAX_PARSE_CHARS:
        return Ignored("too-long")
    header = _HEADER.match(line.rstrip("\r\n"))
    if header is None:
        return Ignored("not-syslog")
    program = header["tag"].rsplit("/", 1)[-1]
    rules = _BY_PROGRAM.get(program)
    if rules is None:
        return Ignored("other-program")
    msg = header["msg"]
    groups: dict[str, str | None] = {}
    for rule in rules:  # Rule.match, inlined: this loop is the watcher's hot path
        m = rule.regex.match(msg)
        if m is None:
            continue
        groups = m.groupdict()
        if rule.tail is None:
            break
        rest = rule.tail(msg, m.end())
        if rest is not None:
            groups |= rest
            break
    else:
        return Ignored("no-pattern")
    session = (header["host"], header["tag"], header["pid"] or "")
    ip, loopback = "", False
    if rule.kind != "session":
        normalised = client_address(groups["ip"] or "")
        if normalised is None:
            return Ignored("bad-address")
        ip, loopback = normalised, ipaddress.ip_address(normalised).is_loopback
    outcome, label = rule.outcome, rule.name
    helo, sender = groups.get("helo") or "", groups.get("from") or ""
    if rule.kind == "reject":
        reason, helo, sender = classify_reply(groups["reply"] or "")
        outcome = reason.outcome if reason is not None else None
        label = reason.name if reason is not None else "reject-unmatched"
    command = ""
    if rule.explains == "{cmd}":
        command = _command_name(groups["cmd"] or "")
    elif rule.explains:
        command = rule.explains
    helo, sender, _ = bound_client(helo, sender)  # as every client bounds them
    return Parsed(
        rule=rule,
        session=session,
        ip=ip,
        loopback=loopback,
        outcome=outcome,
        label=label,
        command=command,
        helo=helo,
        mail_from=sender,
        queue_id=groups.get("qid") or "",
        counters=parse_counters(groups["counters"] or "") if rule.kind == "summary" else {},
    )


def _lru_put(store: OrderedDict[K, V], key: K, value: V, cap: int) -> None:
    """Insert as the newest entry, forgetting the oldest beyond `cap` (bounded memory)."""
    store[key] = value
    store.move_to_end(key)
    while len(store) > cap:
        store.popitem(last=False)


@dataclass(slots=True)
class _Session:
    """What one smtpd connection told us so far: explained failures, HELO, sender."""

    explained: Counter[str] = field(default_factory=Counter)
    helo: str = ""
    mail_from: str = ""


class Tally:
    """Turns lines into reports, counting every line as matched or ignored (per reason).

    Stateful only as far as the summary needs: per smtpd session (host, tag, pid), the
    failed commands other lines accounted for, and the last HELO and sender seen, so the
    summary's ACCEPTED lands in the same sub-identity as the session's errors (penaltyd
    tells clients behind a NAT apart by them). A session whose start was not seen (the
    watcher started mid-session) reports only its ACCEPTED count: its earlier lines are
    unknown, so a failure cannot be called unexplained. State is bounded (LRU).

    `no_rejects`: skip smtpd `reject: RCPT` lines (penalty-milter reports refused RCPTs
    and unknown commands itself); they still account for their failed RCPT, and
    unexplained failed unknown commands are skipped too.
    `no_accepted`: the summary reports no ACCEPTED (another component, penalty-policyd or
    penalty-milter, supplies the denominator; two sources would dilute every ratio).
    `ignore_loopback`: report nothing for 127.0.0.0/8 and ::1.
    """

    def __init__(
        self,
        *,
        no_rejects: bool = False,
        no_accepted: bool = False,
        ignore_loopback: bool = False,
        max_sessions: int = 10_000,
    ) -> None:
        self.no_rejects = no_rejects
        self.no_accepted = no_accepted
        self.ignore_loopback = ignore_loopback
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[tuple[str, str, str], _Session] = OrderedDict()
        # (host, queue id) -> the smtpd session and the client address of its `client=` line
        self._queue_ids: OrderedDict[tuple[str, str], tuple[tuple[str, str, str], str]] = (
            OrderedDict()
        )
        self.lines = 0
        self.reports = 0
        self.outcomes: Counter[str] = Counter()  # outcome name -> events reported
        self.ignored: Counter[str] = Counter()  # reason -> lines that reported nothing

    def _ignore(self, reason: str) -> None:
        self.ignored[reason] += 1

    def feed(self, line: str) -> Report | None:
        """One line in; the report to send for it, if any."""
        self.lines += 1
        parsed = parse_line(line)
        if isinstance(parsed, Ignored):
            self._ignore(parsed.reason)
            return None
        rule = parsed.rule
        if rule.kind == "session":
            _lru_put(self._sessions, parsed.session, _Session(), self.max_sessions)
            self._ignore(rule.name)
            return None
        if rule.kind == "queue":
            _lru_put(
                self._queue_ids,
                (parsed.session[0], parsed.queue_id),
                (parsed.session, parsed.ip),
                self.max_sessions,
            )
            self._ignore(rule.name)
            return None
        session_key, ip, loopback = parsed.session, parsed.ip, parsed.loopback
        if rule.program == "cleanup":
            # cleanup's pid is not the session's: the queue id links them. Its `client=`
            # line is Postfix's own words, while the address in a content rejection
            # follows the client's header text and precedes its sender: trust the former.
            linked = self._queue_ids.get((parsed.session[0], parsed.queue_id))
            if linked is not None:
                session_key, ip = linked
                loopback = ipaddress.ip_address(ip).is_loopback
        session = self._sessions.get(session_key)
        if session is not None:
            if parsed.command and (
                parsed.command in session.explained or len(session.explained) < _MAX_EXPLAINED
            ):
                session.explained[parsed.command] += 1
            session.helo = parsed.helo or session.helo
            session.mail_from = parsed.mail_from or session.mail_from
        if rule.kind == "summary":
            self._sessions.pop(session_key, None)
            counts = self._summary(parsed, session)
        elif parsed.outcome is None:
            counts = {}
        else:
            counts = {parsed.outcome: 1}
        if self.no_rejects and rule.kind == "reject" and parsed.command == "rcpt":
            self._ignore("no-rejects")
            return None
        if not counts:
            self._ignore("nothing-to-report" if rule.kind == "summary" else parsed.label)
            return None
        if self.ignore_loopback and loopback:
            self._ignore("loopback")
            return None
        for outcome, n in counts.items():
            self.outcomes[outcomes.NAMES[outcome]] += n
        self.reports += 1
        return Report(
            ip=ip,
            counts=counts,
            helo=parsed.helo or (session.helo if session else ""),
            mail_from=parsed.mail_from or (session.mail_from if session else ""),
            rule=parsed.label,
        )

    def _summary(self, parsed: Parsed, session: _Session | None) -> dict[int, int]:
        """ACCEPTED = successful commands; PROTOCOL_VIOLATION = failures nothing explained."""
        counters = parsed.counters
        if "commands" in counters:
            ok = counters["commands"][0]
        else:
            ok = sum(good for name, (good, _) in counters.items())
        unexplained = 0
        if session is not None:
            for name, (good, total) in counters.items():
                if name == "commands" or name in NOT_CLIENT_ERRORS:
                    continue
                if name == "unknown" and self.no_rejects:
                    continue  # penalty-milter reports unknown commands itself
                unexplained += max(0, total - good - session.explained[name])
        counts: dict[int, int] = {}  # clamped: penaltyd refuses n > MAX_COUNT
        if ok and not self.no_accepted:
            counts[ACCEPTED] = bound_count(ok)
        if unexplained:
            counts[PROTOCOL_VIOLATION] = bound_count(unexplained)
        return counts


def tally_by_client(
    lines: Iterable[str],
    *,
    no_rejects: bool = False,
    no_accepted: bool = False,
    ignore_loopback: bool = False,
) -> tuple[dict[str, Counter[int]], Tally]:
    """Every report of `lines`, summed per client address (for tests and `--dry-run`)."""
    tally = Tally(no_rejects=no_rejects, no_accepted=no_accepted, ignore_loopback=ignore_loopback)
    clients: dict[str, Counter[int]] = {}
    for line in lines:
        report = tally.feed(line)
        if report is not None:
            clients.setdefault(report.ip, Counter()).update(report.counts)
    return clients, tally


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _outcome_cell(outcome: int | None, kind: str) -> str:
    if kind == "reject":
        return "by reason (next table)"
    if kind == "summary":
        return "ACCEPTED (+ PROTOCOL_VIOLATION)"
    return "—" if outcome is None else outcomes.NAMES[outcome].upper()


def markdown_tables() -> str:
    """The two tables, as `docs/logwatch.md` shows them (a test keeps them equal)."""
    out = [
        "| rule | program | example (message part) | outcome | accounts for | why |",
        "|---|---|---|---|---|---|",
    ]
    for r in RULES:
        explains = "the command" if r.explains == "{cmd}" else r.explains
        out.append(
            f"| `{r.name}` | {r.program} | `{_cell(r.example)}` | "
            f"{_outcome_cell(r.outcome, r.kind)} | {explains or '—'} | {_cell(r.why)} |"
        )
    out += [
        "",
        "| reason | reply text matches | example reply | outcome | why |",
        "|---|---|---|---|---|",
    ]
    for s in REASONS:
        outcome = "—" if s.outcome is None else outcomes.NAMES[s.outcome].upper()
        out.append(
            f"| `{s.name}` | `{_cell(s.pattern)}` | `{_cell(s.example)}` | {outcome} | "
            f"{_cell(s.why)} |"
        )
    return "\n".join(out) + "\n"
