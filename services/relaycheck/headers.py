"""Header blocks and `Received:` lines, parsed without trusting them (pure, no I/O).

Everything here reads text written partly by strangers: below the hop where a message
entered the customer's network, every byte may be forged, and even a trusted hop
carries strings the client chose (its HELO name, its reverse DNS name, its envelope
addresses). So the parser is built for hostile input:

- **Bounded work.** At most `Limits.max_bytes` of the block and its first
  `Limits.max_lines` lines are looked at, at most `Limits.max_received` `Received:`
  lines are kept, and each kept value stops growing at `Limits.max_line` characters
  while its (possibly endless) continuation lines are skipped; the walker
  (`relaycheck.chain`) parses a kept line only when it reaches it, and no more than
  `Limits.max_parse` characters of them per message. Beyond a bound the block is
  `truncated` and the walker never concludes from what it did not read.
- **Linear time.** Every regular expression here either is anchored (`match`) with
  nothing after an unbounded repetition that could fail, or, used with `search`/`sub`,
  fails at a start position in bounded steps; the quadratic shapes are spelt out at the
  patterns (tests/unit/relaycheck/test_hostile.py checks each against the old pattern
  and for linear growth). Scanning is done by regular expressions in C over runs of
  ordinary characters, Python steps only at the special ones.
- **Never raises.** Binary junk decodes with replacement characters; a line without a
  colon is counted and skipped; a `Received:` value nobody could parse becomes a `Hop`
  with nothing in it (the walker then answers UNDETERMINED).
- **Client-controlled strings cannot pose as MTA-written ones.** The word after `from`
  is the client's (HELO in Postfix, Sendmail, qmail, Haraka, Exchange) and is taken as
  one whitespace-delimited token whatever parentheses it contains; Exim's `helo=` and
  qmail's `HELO` are removed before looking for the client address; quoted strings and
  `<...>` addresses (envelope-from, for) are atoms, so a local part such as
  `"x) with ESMTPSA ("` cannot open a comment or a `with` clause; authentication is
  recognised only in the `with` protocol (RFC 3848) or in comments whose wording needs a
  space, which no MTA lets into a HELO name or a DNS name.

The formats covered (tests/unit/relaycheck/test_headers.py has one of each)::

    Postfix   from HELO (RDNS [IP]) (Authenticated sender: U) by H (Postfix) with ESMTPSA
              id X for <R>
              by H (Postfix, from userid 33) id X                                  (local pickup)
    Exim      from RDNS ([IP]:PORT helo=HELO) by H with esmtpsa (TLS1.3) ... (Exim 4.96)
              (envelope-from <S>) id X for R
              from [IP] (port=P helo=HELO) ... / from USER by H with local (Exim 4.96)
    Sendmail  from HELO (RDNS [IP]) by H (8.17.1/8.17.1) with ESMTPSA id X (version=...)
              (from USER@localhost) by H (8.17.1/8.17.1/Submit) id X                (local)
    Exchange  from NAME (IP) by NAME (IP) with Microsoft SMTP Server (version=...) id 15.x
              from NAME ([fe80::1%12]) by NAME with mapi id 15.x                    (Outlook)
    qmail     (qmail 123 invoked by uid 89)  /  (qmail 123 invoked from network)
              from RDNS (HELO HELO) (IP) by H with SMTP
    Haraka    from HELO (RDNS [IP]) by H (Haraka/3.0.2) with ESMTPSA id X envelope-from <S>
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_T = TypeVar("_T", bytes, str)


@dataclass(frozen=True, slots=True)
class Limits:
    """How much of a header block is looked at (the service's settings fill these)."""

    max_bytes: int = 1 << 20  # bytes of the block considered; the newest headers come first
    max_received: int = 64  # Received: lines kept; older ones are counted, not parsed
    max_line: int = 2000  # characters kept of one unfolded value
    # Physical lines looked at, folded ones included. Real blocks have a few hundred;
    # a line costs about a microsecond of Python, so a megabyte of one-character lines
    # costs a few milliseconds, not half a second.
    max_lines: int = 5000
    # Characters of kept Received values the walker parses for one message (a line is
    # parsed whole once started, so at most max_parse + MAX_PARSE): a real trusted chain
    # is a few lines of a few hundred characters.
    max_parse: int = 16 * 1024


# Headers the walker reads: the trace, the forwarding marks above the entry hop, and the
# weak (forgeable) identity claims.
_KEPT = frozenset({"received", "delivered-to", "x-original-to", "from", "message-id"})


@dataclass(slots=True)
class Field:
    name: str  # lower-cased
    value: str  # unfolded (continuations joined with one space), cut at max_line
    position: int  # ordinal of the field in the block, 0 = top (newest)
    truncated: bool = False


@dataclass(slots=True)
class HeaderBlock:
    """The fields the walker needs, in order, and what was left out."""

    fields: list[Field] = field(default_factory=list)
    received: list[Field] = field(default_factory=list)  # newest first, <= max_received
    received_total: int = 0  # every Received: seen (in the lines looked at), kept or not
    malformed_lines: int = 0  # lines that are neither a field nor a continuation
    truncated: bool = False  # the headers went on beyond max_bytes or max_lines
    limit: str = ""  # which bound cut them: "max_bytes" or "max_lines" ("" if none)
    lines: int = 0  # physical lines looked at (<= max_lines + 1)

    def first(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext, bounded


def _split(text: _T, n: int, cut: bool) -> tuple[list[_T], bool]:
    """The first `n` lines (CRLF, lone CR and LF end one), and whether text follows."""
    lf, cr = ("\n", "\r") if isinstance(text, str) else (b"\n", b"\r")
    if cr in text:  # as splitting on CRLF|CR|LF, which matches CRLF first
        text = text.replace(cr + lf, lf).replace(cr, lf)
    parts = text.split(lf, n)
    more = len(parts) > n and len(parts[n]) > 0  # text after the n-th line break
    if more:
        del parts[n:]
    elif cut:
        parts.pop()  # cut mid-line (or right after a CR): not a line at all
    return parts, more


def _lines(raw: bytes | str, limits: Limits) -> tuple[list[str], bool, bool]:
    """The first `max_lines` lines of the first `max_bytes` of the block (a line cut by
    `max_bytes` is dropped), whether `max_bytes` cut it and whether lines follow.

    Split in C with `maxsplit`, so the Python work is bounded by the lines looked at,
    not by the size of the block; bytes are decoded line by line (UTF-8 never folds a
    line break into a replacement character, so this is the same as decoding first).
    """
    n = limits.max_lines
    cut = len(raw) > limits.max_bytes
    if isinstance(raw, bytes):
        chunks, more = _split(raw[: limits.max_bytes], n, cut)
        return [c.decode("utf-8", errors="replace") for c in chunks], cut, more
    lines, more = _split(raw[: limits.max_bytes], n, cut)
    return lines, cut, more


def split_header_block(raw: bytes | str, limits: Limits = Limits()) -> HeaderBlock:
    """The fields of a header block (a whole message is fine: the body is ignored).

    Unfolds continuation lines, skips an mbox `From ` line, stops at the first empty
    line, and keeps only the fields the walker reads. Looks at no more than
    `limits.max_bytes` and `limits.max_lines` (then `truncated`, unless the headers
    ended before the cut).
    """
    block = HeaderBlock()
    lines, cut, more = _lines(raw, limits)
    max_line = limits.max_line
    current: Field | None = None
    parts: list[str] = []
    size = 0
    position = 0
    ended = False
    n = -1

    def close() -> None:
        nonlocal current
        if current is not None:
            current.value = " ".join(parts)[:max_line]
            current = None

    for n, line in enumerate(lines):
        first = line[:1]
        if first == " " or first == "\t":
            # A continuation: only grows the field being kept, and only up to max_line.
            if current is not None:
                if size < max_line:
                    piece = line.strip()[:max_line]
                    parts.append(piece)
                    size += len(piece) + 1
                else:
                    current.truncated = True
            elif position == 0 and n == 0:
                block.malformed_lines += 1
            continue
        if not line or line.isspace():  # the same test as `not line.strip()`, no copy
            if position or n:  # a leading empty line is tolerated, the next one ends it
                ended = True
                break
            continue
        close()
        if n == 0 and line.startswith("From "):
            continue  # mbox separator
        colon = line.find(":")
        name = line[:colon].rstrip() if colon > 0 else ""
        if not _FIELD_NAME.fullmatch(name):
            block.malformed_lines += 1
            continue
        lname = name.lower()
        position += 1
        if lname == "received":
            block.received_total += 1
            if len(block.received) >= limits.max_received:
                continue
        if lname not in _KEPT:
            continue
        piece = line[colon + 1 :].strip()[:max_line]
        current = Field(lname, "", position - 1)
        parts = [piece]
        size = len(piece)
        block.fields.append(current)
        if lname == "received":
            block.received.append(current)
    close()
    block.lines = n + 1
    # A cut inside the body is no cut of the headers.
    block.truncated = (cut or more) and not ended
    if block.truncated:
        block.limit = "max_lines" if more else "max_bytes"
    return block


# --- one Received: line

MAX_PARSE = 8192  # characters of one Received value the scanner looks at

# The scanner's runs: one C-level match per run of ordinary characters, so Python steps
# only at the characters that mean something. Each is used with `match` at a position
# and ends with a repetition nothing follows: it cannot fail, so it never backtracks.
_SPACES = re.compile(r"[ \t]*")
_NOT_SPACES = re.compile(r"[^ \t]*")
_WORD_RUN = re.compile(r'[^ \t(;"<]*')
_COMMENT_RUN = re.compile(r'[^()\\"]*')
# A quoted string or <...> from its opening character: quoted pairs honoured, the
# closing character captured (absent: it runs to the end of the value). Unrolled
# (`[^"\\]*(?:\\.[^"\\]*)*`): every step is forced, and nothing after it can fail.
_QUOTED_ATOM = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(")?', re.S)
_ANGLE_ATOM = re.compile(r"<[^>\\]*(?:\\.[^>\\]*)*(>)?", re.S)


def _run_end(run: re.Pattern[str], s: str, i: int) -> int:
    m = run.match(s, i)  # the run patterns match the empty string: never None
    return m.end() if m is not None else i


def _atom_end(s: str, i: int, atom: re.Pattern[str]) -> int:
    """Index just past the quoted string or <...> address starting at s[i]; len(s) if
    it is not closed (a backslash escapes the next character, the closing one too)."""
    m = atom.match(s, i)
    return m.end() if m is not None and m.group(1) is not None else len(s)


@dataclass(slots=True)
class _Tokens:
    words: list[tuple[str, str]]  # (kind, text): kind "w" word, "c" comment
    date: str


def _tokenize(s: str) -> _Tokens:
    """Words and top-level comments up to the top-level `;` (the date follows it).

    Comments nest and honour quoted pairs; quoted strings and <...> are atoms inside
    words. The token after the keyword `from` is one whitespace-delimited run, whatever
    it contains: it is the client's HELO (or Exim's host name or [address]).

    One pass: each character is looked at by one run match or one Python step.
    """
    out: list[tuple[str, str]] = []
    n = len(s)
    i = 0
    raw_next = False
    seen_word = False
    while i < n:
        c = s[i]
        if c == " " or c == "\t":
            i = _run_end(_SPACES, s, i)
            continue
        if raw_next:
            j = _run_end(_NOT_SPACES, s, i)
            # Never a terminator here: a HELO "x;" must not end the line early.
            out.append(("w", s[i:j]))
            i = j
            raw_next = False
            continue
        if c == ";":
            return _Tokens(out, s[i + 1 :].strip())
        if c == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                d = s[j]
                if d == "(":
                    depth += 1
                    j += 1
                elif d == ")":
                    depth -= 1
                    j += 1
                elif d == "\\":
                    j += 2
                elif d == '"':
                    j = _atom_end(s, j, _QUOTED_ATOM)
                else:
                    j = _run_end(_COMMENT_RUN, s, j)
            out.append(("c", s[i + 1 : j - 1] if depth == 0 else s[i + 1 :]))
            i = min(j, n)
            continue
        j = i
        while True:
            j = _run_end(_WORD_RUN, s, j)
            if j >= n:
                break
            d = s[j]
            if d == '"':
                j = _atom_end(s, j, _QUOTED_ATOM)
            elif d == "<":
                j = _atom_end(s, j, _ANGLE_ATOM)
            else:
                break  # whitespace, "(" or ";"
        word = s[i:j]
        out.append(("w", word))
        raw_next = not seen_word and word.lower() == "from"
        seen_word = True
        i = j
    return _Tokens(out, "")


_KEYWORDS = frozenset({"from", "by", "via", "with", "id", "for"})


@dataclass(slots=True)
class _Clause:
    words: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)


def _clauses(tokens: list[tuple[str, str]]) -> tuple[list[str], dict[str, _Clause]]:
    """Leading comments (before any keyword) and the first clause of each keyword."""
    lead: list[str] = []
    clauses: dict[str, _Clause] = {}
    current: _Clause | None = None
    for kind, text in tokens:
        if kind == "w" and text.lower() in _KEYWORDS and (current is None or current.words):
            key = text.lower()
            if key in clauses:  # a repeated keyword: keep the first clause, ignore the rest
                current = _Clause()
                continue
            current = clauses[key] = _Clause()
            continue
        if current is None:
            if kind == "c":
                lead.append(text)
            continue
        (current.words if kind == "w" else current.comments).append(text)
    return lead, clauses


# Patterns used with search/sub fail at a start position in bounded steps: a literal
# opens each alternative, and an unbounded run only ends a pattern (nothing after it to
# fail and backtrack into it) or is bounded ({2,45}: at most ~800 steps per "[").
_BRACKETED = re.compile(r"\[(?:ipv6:)?([0-9a-f:.]{2,45})(?:%[\w.-]{1,16})?\]", re.I)
_EXIM_HELO = re.compile(r"\bhelo=\S*|\bport=\d+|\bident=\S*", re.I)
_QMAIL_HELO = re.compile(r"^HELO\s+\S*", re.I)
_EXIM_HELO_NAME = re.compile(r"\bhelo=(\S+)", re.I)
_QMAIL_HELO_NAME = re.compile(r"^HELO\s+(\S+)", re.I)  # anchored: one attempt, linear


def parse_address(text: str) -> IPAddress | None:
    """An address as MTAs write it: `[IPv6:2001:db8::1]`, `[192.0.2.1]`, `fe80::1%12`,
    `192.0.2.1:25`; IPv4-mapped IPv6 folds to IPv4. None when it is not one."""
    t = text.strip().strip("[]")
    if t[:5].lower() == "ipv6:":
        t = t[5:]
    t = t.partition("%")[0]
    if t.count(":") == 1 and "." in t:  # IPv4 with a port
        t = t.partition(":")[0]
    if not t or len(t) > 45:
        return None
    try:
        addr = ipaddress.ip_address(t)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _address_in(comment: str) -> tuple[IPAddress | None, str]:
    """The client address recorded in a from-clause comment, and the name before it."""
    text = _EXIM_HELO.sub(" ", comment)
    text = _QMAIL_HELO.sub(" ", text.strip())
    m = _BRACKETED.search(text)
    if m:
        addr = parse_address(m.group(1))
        if addr is not None:
            before = text[: m.start()].split()
            return addr, before[-1] if before else ""
    words = text.split()
    if len(words) == 1:  # Exchange "(10.0.0.5)", qmail "(203.0.113.5)" / "(user@203.0.113.5)"
        return parse_address(words[0].rpartition("@")[2]), ""
    return None, ""


_RFC3848 = re.compile(r"^(?:utf8)?(?:e?smtp|lmtp)s?a$", re.I)
# Was `\bauth=\S+ user`: searched, `\S+` ran to the end of the word from every
# "auth=" in it, so "auth=auth=auth=..." cost (n/5) * n steps. The same matches (a
# non-space run holding "auth=" and one more character, then " user"), tried once
# per run: `(?<!\S)` admits only run starts, the lookahead and `\S+` each cross the
# run once, and a failed " user" after a run backs off in one step per character.
_AUTH_COMMENT = re.compile(
    r"\bauthenticated sender:|\bauthenticated bits=|\bauthenticated as\b|\bauthenticated user:|"
    r"^auth: |(?<!\S)(?=\S*?\bauth=\S)\S+ user|\bauthenticated by ",
    re.I,
)
# Was `"(?:[^"\\]|\\.)*"|<[^>]*>` with sub: a quote or "<" that is never closed was
# rescanned to the end from every later quote or "<" ('"\"\"\"...', "<<<<..."):
# quadratic. Closing fails only at the end of the text, and once a quote has failed
# every later one fails too (each is escaped inside the first one's scan), as every
# "<" after a failed one: so the third alternative takes the rest of the text at the
# first failure, and `_strip_atoms` finishes it with the kind still alive.
_ATOMS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|<[^>]*>|(["<].*)', re.S)
_QUOTES_ONLY = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|(".*)', re.S)
_ANGLES_ONLY = re.compile(r"<[^>]*>|(<.*)", re.S)
# Anchored (match or ^): one attempt, so a failed `\d+` backs off at most once.
_SENDMAIL_LOCAL = re.compile(r"^from ([^\s@]{1,64})(?:@localhost)?$", re.I)
_QMAIL = re.compile(r"^qmail \d+ invoked (by uid \d+|by alias|from network|for bounce)", re.I)
_POSTFIX_PICKUP = re.compile(r"\bfrom userid \d+", re.I)
# Was `\d+\.\d+\.\d+/\d+\.\d+`, searched: from every digit of a long run the first
# `\d+` took the rest of the run and gave it back one digit at a time (2,000 digits:
# 2 million steps). A match inside a run is also one from the run's start, so only
# run starts are tried: each run is crossed by at most three attempts.
_SENDMAIL_VERSION = re.compile(r"(?<!\d)\d+\.\d+\.\d+/\d+\.\d+")


def _auth_wording(text: str) -> bool:
    """`_AUTH_COMMENT` in `text`. Every alternative holds "auth", whose letters match
    only ASCII ones under re.I, so "auth" in the lower-cased text is necessary: two C
    passes skip the regular expression (some 150 ns a character) for nearly all text."""
    return "auth" in text.lower() and _AUTH_COMMENT.search(text) is not None


def _strip_atoms(comment: str) -> str:
    """`comment` without its closed quoted strings and <...> (as `re.sub` of the old
    `"(?:[^"\\]|\\.)*"|<[^>]*>` by "", which backtracked quadratically), in linear time.

    The old pattern's `.` matched no line break; there is none here (`parse_received`
    replaces them). With re.S a quoted string fails to close only at the end.
    """
    if '"' not in comment and "<" not in comment:
        return comment
    parts = _ATOMS.split(comment)  # text, group, text, ...: only the last group is set
    kept = "".join(parts[::2])
    rest = parts[-2] if len(parts) > 1 else None
    if not rest:
        return kept
    if rest[0] == '"':  # no quote closes any more: only <...> can still be removed
        return kept + '"' + _ANGLES_ONLY.sub(r"\1", rest[1:])
    return kept + "<" + _QUOTES_ONLY.sub(r"\1", rest[1:])  # no ">" follows


@dataclass(frozen=True, slots=True)
class Hop:
    """One `Received:` line: who handed the message over, to whom, how."""

    index: int  # 0 = newest Received: line of the block
    position: int  # the line's ordinal among all fields (positional trust)
    raw: str
    from_word: str = ""  # the token after `from`, as written (client-controlled)
    from_helo: str = ""
    from_rdns: str = ""
    from_ip: IPAddress | None = None
    by_host: str = ""
    protocol: str = ""
    for_address: str = ""
    authenticated: bool = False
    auth_detail: str = ""
    local_submission: str = ""  # "Postfix, from userid 33", "qmail invoked by uid 89", ...
    forwarded: str = ""  # "qmail invoked by alias": delivered, then forwarded
    neutral: bool = False  # a line with no client at all (qmail "invoked from network")
    mta: str = ""
    truncated: bool = False
    # Exim's "(envelope-from <S>)": the sender as this MTA received it ("" if not written)
    envelope_from: str = ""
    # "(Exim 4.96)" in the by/with part: written by Exim (the `mta` guess also reads the
    # client's strings; this comment is the MTA's own, a HELO cannot put one there)
    exim_written: bool = False

    @property
    def has_client(self) -> bool:
        return bool(self.from_word) or self.from_ip is not None

    @property
    def understood(self) -> bool:
        """Something MTA-written was recognised (a `by` host, a client address, a mark)."""
        return bool(
            self.by_host
            or self.from_ip is not None
            or self.local_submission
            or self.forwarded
            or self.neutral
        )


def _mta(by_comments: list[str], with_words: list[str], raw: str) -> str:
    joined = " ".join(by_comments)
    low = raw.lower()
    if "postfix" in joined.lower():
        return "postfix"
    if "haraka" in joined.lower():
        return "haraka"
    if "exim" in low:
        return "exim"
    if _SENDMAIL_VERSION.search(joined):
        return "sendmail"
    if "microsoft smtp server" in low or (with_words and with_words[0].lower() == "mapi"):
        return "exchange"
    if "qmail" in low:
        return "qmail"
    return ""


def _exim_marks(comments: tuple[str, ...]) -> tuple[str, bool]:
    """Exim's `(envelope-from <S>)` (S, "" if none) and whether an `(Exim 4.x)` comment
    is there, from the by and with comments. String tests only (no pattern). The sender
    is the client's choice, but a quoted local part is an atom of its comment (a
    `"x) (Exim 4.96) (envelope-from <y"@z` stays inside one), so it cannot add either."""
    sender, exim = "", False
    for comment in comments:
        c = comment.strip()
        if not sender and c[:14].lower() == "envelope-from ":
            sender = c[14:].strip()
            if sender[:1] == "<" and sender[-1:] == ">":
                sender = sender[1:-1]
            sender = sender[:320]
        elif c[:5] == "Exim " and c[5:6].isdigit():
            exim = True
    return sender, exim


def parse_received(value: str, index: int = 0, position: int = 0, truncated: bool = False) -> Hop:
    """Parse one unfolded `Received:` value; never raises, unknown parts stay empty.

    At most `MAX_PARSE` characters are looked at (real lines are a few hundred), so the
    work is bounded here, not by callers; it is linear in them. A value is one unfolded
    line: a CR or LF left in it (only a direct caller can) reads as a space.
    """
    if len(value) > MAX_PARSE:
        value, truncated = value[:MAX_PARSE], True
    if "\r" in value or "\n" in value:
        value = value.replace("\r", " ").replace("\n", " ")
    tokens = _tokenize(value)
    lead, clauses = _clauses(tokens.words)
    raw = value[:1000]
    local = forwarded = ""
    neutral = False
    for comment in lead:
        c = comment.strip()
        q = _QMAIL.match(c)
        if q:
            what = q.group(1).lower()
            if what.startswith("by uid"):
                local = f"qmail invoked {what}"
            elif what == "by alias":
                forwarded = "qmail invoked by alias"
            else:
                neutral = True
            continue
        s = _SENDMAIL_LOCAL.match(c)
        if s and "from" not in clauses:
            local = f"Sendmail submission from {s.group(1)}"

    fc = clauses.get("from", _Clause())
    bc = clauses.get("by", _Clause())
    wc = clauses.get("with", _Clause())
    from_word = fc.words[0] if fc.words else ""
    from_ip: IPAddress | None = None
    rdns = ""
    helo = from_word
    for comment in fc.comments:
        addr, name = _address_in(comment)
        if addr is not None:
            from_ip, rdns = addr, name
            break
    exim_helo = _EXIM_HELO_NAME.search(" ".join(fc.comments))
    qmail_helo = _QMAIL_HELO_NAME.search(" ".join(c.strip() for c in fc.comments))
    if exim_helo:
        helo = exim_helo.group(1)
        rdns = "" if from_word.startswith("[") else from_word
    elif qmail_helo:
        helo = qmail_helo.group(1)
        rdns = "" if from_word.lower() == "unknown" else from_word
    if from_ip is None and from_word.startswith("["):
        from_ip = parse_address(from_word.partition("]")[0] + "]")  # Exim: from [IP]
    if from_ip is None and len(fc.words) == 1 and not fc.comments:
        from_ip = parse_address(from_word)  # "from 10.0.0.5 by ..." (bare address)
    if rdns.lower() == "unknown":
        rdns = ""

    protocol = ""
    if wc.words:
        protocol = wc.words[0]
        if protocol.lower() == "microsoft" and len(wc.words) >= 3:
            protocol = " ".join(wc.words[:3])
    auth_detail = ""
    if _RFC3848.match(protocol):
        auth_detail = f"with {protocol}"
    elif protocol.lower() == "mapi":
        auth_detail = "with mapi (Outlook via Exchange)"
    else:
        for comment in (*fc.comments, *bc.comments, *wc.comments):
            cleaned = _strip_atoms(comment)
            if _auth_wording(cleaned.strip()):
                auth_detail = f"({cleaned.strip()[:120]})"
                break
    if not local:
        pickup = next((c for c in bc.comments if _POSTFIX_PICKUP.search(c)), "")
        if pickup and "from" not in clauses:
            local = pickup.strip()[:80]
        elif protocol.lower().startswith("local") and "from" in clauses:
            local = f"Exim local submission by {from_word[:64]}"
    for_address = ""
    fo = clauses.get("for")
    if fo and fo.words:
        for_address = fo.words[0].strip("<>")[:320]
    envelope_from, exim_written = _exim_marks((*bc.comments, *wc.comments))
    return Hop(
        index=index,
        position=position,
        raw=raw,
        from_word=from_word[:255],
        from_helo=helo[:255],
        from_rdns=rdns[:255],
        from_ip=from_ip,
        by_host=bc.words[0][:255] if bc.words else "",
        protocol=protocol[:64],
        for_address=for_address,
        authenticated=bool(auth_detail),
        auth_detail=auth_detail,
        local_submission=local,
        forwarded=forwarded,
        neutral=neutral and not clauses,
        mta="qmail" if qmail_helo else _mta(bc.comments, wc.words, value[:2000]),
        truncated=truncated,
        envelope_from=envelope_from,
        exim_written=exim_written,
    )


def parse_hops(block: HeaderBlock) -> list[Hop]:
    return [
        parse_received(f.value, i, f.position, f.truncated) for i, f in enumerate(block.received)
    ]


# --- addresses in the weak-evidence headers


def address_domain(address: str) -> str:
    """The domain of an address as written in an envelope or a header; "" if none.

    `<a@b.example>`, `Name <a@b.example>`, `"x@y"@b.example` and `<@r:a@b.example>` all
    give `b.example` (the part after the last `@`, lower-cased, without a trailing dot).
    """
    text = address.strip()
    lt = text.rfind("<")
    if lt >= 0:
        text = text[lt + 1 :].partition(">")[0]
    text = text.strip()
    if "@" not in text:
        return ""
    domain = text.rpartition("@")[2].strip().strip("[]").lower().rstrip(".")
    return domain if domain and len(domain) <= 255 and " " not in domain else ""


# SRS (the Sender Rewriting Scheme, libsrs2's and Mail::SRS's address forms):
#   SRS0<sep>HASH=TT=ORIG-DOMAIN=ORIG-LOCAL@FORWARDER            (first forward)
#   SRS1<sep>HASH=FIRST-FORWARDER=<sep0>HASH=TT=ORIG-DOMAIN=ORIG-LOCAL@FORWARDER
# <sep> is one of "=+-" (postsrsd's `separator`), TT two base32 characters (days), HASH
# a truncated HMAC that only the forwarder's secret checks. Fullmatch on bounded
# classes: linear.
_SRS_HASH = re.compile(r"[A-Za-z0-9+/_.-]{1,64}")
_SRS_TIME = re.compile(r"[A-Za-z2-7]{2}")
_SRS_HOST = re.compile(r"[A-Za-z0-9._-]{1,255}")
MAX_SRS = 512  # characters of an envelope sender looked at (validation allows 512)


def bare_address(address: str) -> str:
    """`<a@b.example>` or ` a@b.example ` as `a@b.example` (the first <...> if any)."""
    text = address.strip()
    if text[:1] == "<":
        text = text[1:].partition(">")[0]
    return text.strip()


def srs_original(address: str) -> str | None:
    """The address an SRS0/SRS1 envelope sender says it was rewritten from, or None
    when `address` is not one: `SRS0=HHHH=TT=example.org=alice@fwd.example` gives
    `alice@example.org`, `SRS1=HHHH=first.example==HHHH=TT=example.org=alice@fwd.example`
    gives `SRS0=HHHH=TT=example.org=alice@first.example` (what the first forwarder
    sent). Syntax only: nobody but the forwarder can check the hash."""
    addr = bare_address(address[:MAX_SRS])
    local, at, domain = addr.rpartition("@")
    if not at or len(local) < 6 or not _SRS_HOST.fullmatch(domain):
        return None
    tag = local[:4].upper()
    if local[4] not in "=+-":
        return None
    if tag == "SRS0":
        parts = local[5:].split("=", 3)
        if len(parts) != 4:
            return None
        hash_, stamp, host, orig = parts
        if not (_SRS_HASH.fullmatch(hash_) and _SRS_TIME.fullmatch(stamp)):
            return None
        if not (_SRS_HOST.fullmatch(host) and orig):
            return None
        return f"{orig}@{host}"
    if tag == "SRS1":
        parts = local[5:].split("=", 2)
        if len(parts) != 3:
            return None
        hash_, host, rest = parts
        if not (_SRS_HASH.fullmatch(hash_) and _SRS_HOST.fullmatch(host)):
            return None
        if len(rest) < 2 or rest[0] not in "=+-":
            return None
        return f"SRS0{rest}@{host}"
    return None


def message_id_domain(value: str) -> str:
    """The part after `@` of `<local@domain>`; "" when there is none."""
    return address_domain(value)
