"""Header blocks and `Received:` lines, parsed without trusting them (pure, no I/O).

Everything here reads text written partly by strangers: below the hop where a message
entered the customer's network, every byte may be forged, and even a trusted hop
carries strings the client chose (its HELO name, its reverse DNS name, its envelope
addresses). So the parser is built for hostile input:

- **Bounded work.** At most `Limits.max_bytes` of the block are looked at, at most
  `Limits.max_received` `Received:` lines are kept, and each kept value stops growing
  at `Limits.max_line` characters while its (possibly endless) continuation lines are
  skipped. One pass over the lines, no backtracking regular expressions on unbounded
  text: a megabyte of folded lines costs milliseconds.
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

The formats covered (tests/unit/test_relaycheck_headers.py has one of each)::

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

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Limits:
    """How much of a header block is looked at (the service's settings fill these)."""

    max_bytes: int = 1 << 20  # bytes of the block considered; the newest headers come first
    max_received: int = 64  # Received: lines kept; older ones are counted, not parsed
    max_line: int = 2000  # characters kept of one unfolded value


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
    received_total: int = 0  # every Received: seen, kept or not
    malformed_lines: int = 0  # lines that are neither a field nor a continuation
    truncated: bool = False  # the headers went on beyond max_bytes

    def first(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext, bounded


def split_header_block(raw: bytes | str, limits: Limits = Limits()) -> HeaderBlock:
    """The fields of a header block (a whole message is fine: the body is ignored).

    Unfolds continuation lines, skips an mbox `From ` line, stops at the first empty
    line, and keeps only the fields the walker reads.
    """
    block = HeaderBlock()
    if isinstance(raw, bytes):
        if len(raw) > limits.max_bytes:
            raw, block.truncated = raw[: limits.max_bytes], True
        text = raw.decode("utf-8", errors="replace")
    else:
        text = raw
        if len(text) > limits.max_bytes:
            text, block.truncated = text[: limits.max_bytes], True
    current: Field | None = None
    parts: list[str] = []
    size = 0
    position = 0
    ended = False

    def close() -> None:
        nonlocal current
        if current is not None:
            current.value = " ".join(parts)[: limits.max_line]
            current = None

    lines = _LINE_BREAK.split(text)
    if block.truncated:
        lines.pop()  # cut mid-line (or right after a CR): not a line at all
    for n, line in enumerate(lines):
        if line[:1] in (" ", "\t"):
            # A continuation: only grows the field being kept, and only up to max_line.
            if current is not None:
                if size < limits.max_line:
                    piece = line.strip()
                    parts.append(piece)
                    size += len(piece) + 1
                else:
                    current.truncated = True
            elif position == 0 and n == 0:
                block.malformed_lines += 1
            continue
        if not line.strip():
            if position or n:  # a leading empty line is tolerated, the next one ends it
                ended = True
                break
            continue
        close()
        if n == 0 and line.startswith("From "):
            continue  # mbox separator
        name, colon, value = line.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(name.rstrip()):
            block.malformed_lines += 1
            continue
        lname = name.rstrip().lower()
        position += 1
        if lname == "received":
            block.received_total += 1
            if len(block.received) >= limits.max_received:
                continue
        if lname not in _KEPT:
            continue
        piece = value.strip()
        current = Field(lname, "", position - 1)
        parts = [piece]
        size = len(piece)
        block.fields.append(current)
        if lname == "received":
            block.received.append(current)
    close()
    # A cut inside the body is no cut of the headers.
    block.truncated = block.truncated and not ended
    return block


# --- one Received: line

_WORD_END = frozenset(" \t(;")
MAX_PARSE = 8192  # characters of one Received value the scanner looks at


def _scan_atom(s: str, i: int, close: str) -> int:
    """Index just past a quoted string or <...> address starting at s[i] (bounded by len)."""
    n = len(s)
    j = i + 1
    while j < n:
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == close:
            return j + 1
        j += 1
    return n


@dataclass(slots=True)
class _Tokens:
    words: list[tuple[str, str]]  # (kind, text): kind "w" word, "c" comment
    date: str


def _tokenize(s: str) -> _Tokens:
    """Words and top-level comments up to the top-level `;` (the date follows it).

    Comments nest and honour quoted pairs; quoted strings and <...> are atoms inside
    words. The token after the keyword `from` is one whitespace-delimited run, whatever
    it contains: it is the client's HELO (or Exim's host name or [address]).
    """
    out: list[tuple[str, str]] = []
    n = len(s)
    i = 0
    raw_next = False
    seen_word = False
    while i < n:
        c = s[i]
        if c in " \t":
            i += 1
            continue
        if raw_next:
            j = i
            while j < n and s[j] not in " \t":
                j += 1
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
                if d == "\\":
                    j += 2
                    continue
                if d == '"':
                    j = _scan_atom(s, j, '"')
                    continue
                if d == "(":
                    depth += 1
                elif d == ")":
                    depth -= 1
                j += 1
            out.append(("c", s[i + 1 : j - 1] if depth == 0 else s[i + 1 :]))
            i = min(j, n)
            continue
        j = i
        while j < n and s[j] not in _WORD_END:
            if s[j] == '"':
                j = _scan_atom(s, j, '"')
            elif s[j] == "<":
                j = _scan_atom(s, j, ">")
            else:
                j += 1
        word = s[i:j]
        out.append(("w", word))
        raw_next = word.lower() == "from" and not seen_word
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


_BRACKETED = re.compile(r"\[(?:ipv6:)?([0-9a-f:.]{2,45})(?:%[\w.-]{1,16})?\]", re.I)
_EXIM_HELO = re.compile(r"\bhelo=\S*|\bport=\d+|\bident=\S*", re.I)
_QMAIL_HELO = re.compile(r"^HELO\s+\S*", re.I)


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
_AUTH_COMMENT = re.compile(
    r"\bauthenticated sender:|\bauthenticated bits=|\bauthenticated as\b|\bauthenticated user:|"
    r"^auth: |\bauth=\S+ user|\bauthenticated by ",
    re.I,
)
_ATOMS = re.compile(r'"(?:[^"\\]|\\.)*"|<[^>]*>')
_SENDMAIL_LOCAL = re.compile(r"^from ([^\s@]{1,64})(?:@localhost)?$", re.I)
_QMAIL = re.compile(r"^qmail \d+ invoked (by uid \d+|by alias|from network|for bounce)", re.I)
_POSTFIX_PICKUP = re.compile(r"\bfrom userid \d+", re.I)


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
    if re.search(r"\d+\.\d+\.\d+/\d+\.\d+", joined):
        return "sendmail"
    if "microsoft smtp server" in low or (with_words and with_words[0].lower() == "mapi"):
        return "exchange"
    if "qmail" in low:
        return "qmail"
    return ""


def parse_received(value: str, index: int = 0, position: int = 0, truncated: bool = False) -> Hop:
    """Parse one unfolded `Received:` value; never raises, unknown parts stay empty.

    At most `MAX_PARSE` characters are looked at (real lines are a few hundred): the
    scanner walks characters in Python, so its input is bounded here, not by callers.
    """
    if len(value) > MAX_PARSE:
        value, truncated = value[:MAX_PARSE], True
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
    exim_helo = re.search(r"\bhelo=(\S+)", " ".join(fc.comments), re.I)
    qmail_helo = re.search(r"^HELO\s+(\S+)", " ".join(c.strip() for c in fc.comments), re.I)
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
            cleaned = _ATOMS.sub("", comment)
            if _AUTH_COMMENT.search(cleaned.strip()):
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


def message_id_domain(value: str) -> str:
    """The part after `@` of `<local@domain>`; "" when there is none."""
    return address_domain(value)
