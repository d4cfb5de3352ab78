"""The Received-chain walker: whose mail is this? (DESIGN.md section 9; pure, no I/O)

The smart relay knows one fact for certain: which customer relay connected (its
address, `client_ip`). Every `Received:` line that relay wrote is the customer's word,
and so is every line written by a machine the customer's own lines say handed the
message over from inside its networks. The walk goes from the newest line down through
those, to the **entry hop**: the line where the message came into the customer's
network. Everything below it was written by whoever sent the message and proves
nothing. The entry hop is judged by the first rule that applies:

======================== ============================================== ===============
rule                     the entry hop says                             verdict
======================== ============================================== ===============
authenticated_submission ESMTPA/ESMTPSA/LMTPA (RFC 3848), Exim esmtpsa,  ORIGINATED
                         Postfix "(Authenticated sender: ...)",
                         Sendmail "(authenticated bits=...)", Exchange
                         "with mapi"
local_submission         Postfix pickup "(Postfix, from userid N)",     ORIGINATED
                         Sendmail "(from user@localhost)", Exim "with
                         local", qmail "invoked by uid N"
forwarded                qmail "invoked by alias"                       ORIGINATED
internal_client          the oldest trusted line's client is inside     ORIGINATED
                         the customer's networks or a private range
own_recipient            external client, "for <x@customer-domain>"     ORIGINATED
delivered_to_own         external client, a Delivered-To/X-Original-To  ORIGINATED
                         of a customer domain *above* the entry line
foreign_recipient        external client, "for <x@foreign>"             RELAYED
own_recipient_above      external client, no "for"; a customer line     ORIGINATED
                         *above* the entry says "for <x@customer-
                         domain>" (a customer machine accepted it for
                         its own user, then sent it on)
srs_rewritten            external client, no "for"; Exim recorded the   ORIGINATED
                         envelope sender S on the entry line (or above)
                         and the customer's Exim sent the message on as
                         an SRS0/SRS1 of S at a customer domain, every
                         line from that one up written by Exim
foreign_envelope         external client, no "for", every envelope      RELAYED
                         recipient at the smart relay is foreign
======================== ============================================== ===============

Why the last two ORIGINATED rules hold against a sender relaying through an open relay.
MTAs write `for` only with one recipient (Postfix smtpd: `rcpt_count == 1`; Exim's
`$received_for`; Sendmail's `$u`), so forwarding a message that arrived for several of
the customer's users leaves the entry line without one. Everything below the entry is
the sender's, and so is the envelope sender: an SRS0 address of a customer domain proves
nothing by itself (a spammer writes one, its hash cannot be checked without the
customer's secret, and postsrsd, Postfix's usual SRS, rewrites every foreign sender in
cleanup, relayed mail included). `own_recipient_above` reads only lines the walk has
already trusted (above the entry, written by customer machines about hand-overs between
them): the sender's RCPT list reaches them only through the customer's own routing, and
a copy routed to a customer user and then sent out is the customer's forward.
`srs_rewritten` needs a rewrite done by the customer: the recorded S is what the sender
sent, and a server that passes the sender through sends S, never SRS(S). Exim applies
SRS in its forwarding transport (`return_path = ${srs_encode ...{$original_domain}}`,
selected when the address was redirected), so the rewrite marks a redirect; the rule is
kept to lines Exim wrote because Postfix with postsrsd rewrites relayed mail as well.

Anything else (no Received line from the relay, a line without a client address, an
unreadable line in the trusted part, more lines than the limit) is UNDETERMINED: the
chain does not say, and mail flows. The envelope sender, From and Message-ID domains are
forgeable: they are listed as weak evidence and only set `leaning` on an UNDETERMINED
answer; they never decide.

Bounded work on forged chains. The lines below the entry hop are the sender's, so the
walk parses a Received line only when it reaches it (never one below the entry), and
at most `Limits.max_parse` characters of them per message. When a bound ends the walk
before the entry hop (more Received lines than `max_received`, a block cut at
`max_bytes` or `max_lines`, the parse budget spent) the answer is UNDETERMINED, rule
`too_many_hops`, never ORIGINATED (`internal_client`): every line read was the
customer's and where the message entered is not known. Padding cannot bring this
about: the sender writes below the entry, which stays where the trusted lines put it;
padding only lengthens the part that is never read.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from relaycheck.customers import Customer, PrivateNetworks
from relaycheck.headers import (
    MAX_PARSE,
    HeaderBlock,
    Hop,
    IPAddress,
    Limits,
    address_domain,
    bare_address,
    parse_address,
    parse_received,
    split_header_block,
    srs_original,
)


class Verdict(enum.IntEnum):
    """Mirrors relaycheck.v1.Verdict (same numbers)."""

    UNSPECIFIED = 0
    ORIGINATED_BY_CUSTOMER = 1
    RELAYED_THIRD_PARTY = 2
    NOT_A_CUSTOMER = 3
    UNDETERMINED = 4


@dataclass(frozen=True, slots=True)
class Evidence:
    hop: int  # Hop.index, -1 for none
    rule: str
    detail: str
    weak: bool = False


@dataclass
class Judgement:
    verdict: Verdict
    origin_ip: IPAddress | None = None
    entry_hop: Hop | None = None
    evidence: list[Evidence] = field(default_factory=list)
    leaning: Verdict = Verdict.UNSPECIFIED
    hops: int = 0  # Received lines read (kept by the splitter)
    rule: str = ""  # the deciding rule (metrics label)
    parsed: int = 0  # Received lines the walk parsed (it stops at the entry hop)
    parsed_chars: int = 0  # characters of them parsed (<= max_parse + MAX_PARSE)


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the smart relay saw of the connection and the envelope."""

    client_ip: IPAddress | None = None
    helo: str = ""
    mail_from: str = ""
    rcpt_to: Sequence[str] = ()


@dataclass(frozen=True)
class WalkOptions:
    private: PrivateNetworks = field(default_factory=PrivateNetworks)
    own_hostnames: tuple[str, ...] = ()  # our smart relays; ".example.net" matches subdomains
    limits: Limits = field(default_factory=Limits)


def _is_own(hop: Hop, names: tuple[str, ...]) -> bool:
    host = hop.by_host.lower().rstrip(".")
    if not host:
        return False
    for name in names:
        n = name.lower().rstrip(".")
        if (n.startswith(".") and host.endswith(n)) or host == n:
            return True
    return False


def _describe(hop: Hop) -> str:
    client = hop.from_word or "?"
    if hop.from_ip is not None:
        client += f" [{hop.from_ip}]"
    return f"Received line {hop.index} (by {hop.by_host or '?'} from {client})"


class _Walk:
    def __init__(
        self,
        customer: Customer,
        block: HeaderBlock,
        envelope: Envelope,
        options: WalkOptions,
    ) -> None:
        self.customer = customer
        self.block = block
        self.envelope = envelope
        self.options = options
        self.evidence: list[Evidence] = []
        self.parsed: list[Hop] = []
        # Lines the customer wrote that the walk passed on its way down (newest first):
        # everything above the entry hop except our own lines.
        self.trusted: list[Hop] = []
        self.parsed_chars = 0
        self.out_of_budget = False

    def hop(self, i: int) -> Hop | None:
        """Received line `i` (0 = newest), parsed when the walk first needs it; None
        beyond the lines read, or once `max_parse` characters have been parsed."""
        parsed = self.parsed
        while len(parsed) <= i:
            k = len(parsed)
            if k >= len(self.block.received):
                return None
            if self.parsed_chars >= self.options.limits.max_parse:
                self.out_of_budget = True
                return None
            f = self.block.received[k]
            self.parsed_chars += min(len(f.value), MAX_PARSE)
            parsed.append(parse_received(f.value, k, f.position, f.truncated))
        return parsed[i]

    def note(self, hop: Hop | None, rule: str, detail: str, weak: bool = False) -> None:
        self.evidence.append(Evidence(hop.index if hop else -1, rule, detail, weak))

    def done(
        self, verdict: Verdict, rule: str, entry: Hop | None, origin: IPAddress | None = None
    ) -> Judgement:
        return Judgement(
            verdict,
            origin if origin is not None else (entry.from_ip if entry else None),
            entry,
            self.evidence,
            hops=len(self.block.received),
            rule=rule,
            parsed=len(self.parsed),
            parsed_chars=self.parsed_chars,
        )

    def inside(self, addr: IPAddress) -> str | None:
        """Why `addr` is the customer's ("relay network 192.0.2.0/24"), or None."""
        hit = self.customer.networks.match(addr)
        if hit is not None:
            return f"{hit[1]} network {hit[0]}"
        private = self.options.private.match(addr)
        return f"private range {private}" if private else None

    def cut(self) -> str:
        limits = self.options.limits
        if self.block.limit == "max_lines":
            return f"max_lines: {limits.max_lines} lines"
        return f"max_bytes: {limits.max_bytes} bytes"

    def beyond(self) -> Judgement:
        """The walk ran out of lines read before it found the entry hop."""
        limits = self.options.limits
        if self.out_of_budget:
            why = f"the parse budget of {limits.max_parse} characters is spent"
        elif self.block.truncated:
            why = f"the header block was looked at only up to {self.cut()}"
        else:
            why = f"only the newest {len(self.block.received)} (max_received) are read"
        self.note(None, "too_many_hops", f"the entry lies beyond the Received lines read: {why}")
        return self.done(Verdict.UNDETERMINED, "too_many_hops", None)

    def run(self) -> Judgement:
        if self.block.truncated:
            self.note(
                None, "truncated", f"the header block was cut at the size limit ({self.cut()})"
            )
        i = 0
        last_own: Hop | None = None
        while (hop := self.hop(i)) is not None and _is_own(hop, self.options.own_hostnames):
            last_own = hop
            self.note(hop, "own_hop", f"{_describe(hop)} was written by our smart relay")
            i += 1
        client = self.envelope.client_ip
        if client is None and last_own is not None:
            client = last_own.from_ip
        if client is not None and (hop := self.hop(i)) is not None and hop.from_ip == client:
            # Our own line, recorded with the customer relay as its client.
            self.note(hop, "own_hop", f"{_describe(hop)} records the customer relay {client}: ours")
            i += 1
        if client is not None:
            self.note(
                None,
                "customer_relay",
                f"the message came from customer {self.customer.id}'s relay {client}",
            )
        else:
            self.note(
                None,
                "customer_relay",
                f"the newest Received line is taken as customer {self.customer.id}'s relay's",
            )
        if self.hop(i) is None:
            if self.out_of_budget:
                return self.beyond()
            self.note(None, "no_received", "no Received line written by the customer's relay")
            return self.done(Verdict.UNDETERMINED, "no_received", None)
        last_inside: Hop | None = None
        while (hop := self.hop(i)) is not None:
            i += 1
            if hop.authenticated:
                self.note(
                    hop,
                    "authenticated_submission",
                    f"{_describe(hop)}: authenticated submission ({hop.auth_detail})",
                )
                return self.done(Verdict.ORIGINATED_BY_CUSTOMER, "authenticated_submission", hop)
            if hop.local_submission:
                self.note(
                    hop,
                    "local_submission",
                    f"{_describe(hop)}: local submission ({hop.local_submission})",
                )
                return self.done(Verdict.ORIGINATED_BY_CUSTOMER, "local_submission", hop)
            if hop.forwarded:
                self.note(
                    hop,
                    "forwarded",
                    f"{_describe(hop)}: delivered to a local alias and forwarded ({hop.forwarded})",
                )
                return self.done(Verdict.ORIGINATED_BY_CUSTOMER, "forwarded", hop)
            if hop.neutral:
                self.note(
                    hop,
                    "neutral_hop",
                    f"Received line {hop.index} names no client (a hand-over on one machine)",
                )
                self.trusted.append(hop)
                continue
            if not hop.understood:
                self.note(
                    hop,
                    "unreadable_hop",
                    f"customer-written Received line {hop.index} is unreadable: {hop.raw[:120]!r}",
                )
                return self.done(Verdict.UNDETERMINED, "unreadable_hop", hop)
            if hop.from_ip is None:
                if not hop.has_client:
                    # "by host ... id ..." with no client: an internal hand-over.
                    self.note(hop, "neutral_hop", f"Received line {hop.index} names no client")
                    self.trusted.append(hop)
                    continue
                self.note(hop, "no_client_address", f"{_describe(hop)} records no client address")
                return self.done(Verdict.UNDETERMINED, "no_client_address", hop)
            why = self.inside(hop.from_ip)
            if why is not None:
                self.note(
                    hop,
                    "customer_hop",
                    f"{_describe(hop)}: client inside the customer ({why}); trusting the next",
                )
                last_inside = hop
                self.trusted.append(hop)
                continue
            return self.judge_external(hop)
        block = self.block
        if self.out_of_budget or block.received_total > len(block.received) or block.truncated:
            return self.beyond()
        if last_inside is not None:
            self.note(
                last_inside,
                "internal_client",
                f"the message started at {last_inside.from_ip}, inside the customer",
            )
            return self.done(Verdict.ORIGINATED_BY_CUSTOMER, "internal_client", last_inside)
        self.note(None, "no_entry", "no line says where the message came from")
        return self.done(Verdict.UNDETERMINED, "no_entry", None)

    def trusted_recipients(self, entry: Hop) -> list[tuple[str, str]]:
        """Delivered-To / X-Original-To written above the entry line (by the customer)."""
        return [
            (f.name, f.value)
            for f in self.block.fields
            if f.name in ("delivered-to", "x-original-to") and f.position < entry.position
        ]

    def own_recipient_above(self) -> Hop | None:
        """The newest customer line above the entry whose `for` is a customer address."""
        for line in self.trusted:
            domain = address_domain(line.for_address) if line.for_address else ""
            if domain and self.customer.owns_domain(domain):
                return line
        return None

    def srs_rewrite(self, entry: Hop) -> tuple[Hop, str] | None:
        """(the line, S) when the customer's Exim rewrote the sender S it recorded into
        the SRS0/SRS1 of S at a customer domain that the smart relay received.

        Walked newest first, the lines from the customer relay's down to the entry: the
        first one not written by Exim ends the search (it may be the rewriter, and only
        Exim's SRS is known to be per forward). A line whose recorded sender is S names
        the rewrite; the sender sent S, so without a rewrite the smart relay gets S."""
        mail_from = self.envelope.mail_from
        original = srs_original(mail_from)
        if original is None or not self.customer.owns_domain(address_domain(mail_from)):
            return None
        want = original.lower()
        for line in (*self.trusted, entry):
            if not line.exim_written:
                return None
            if line.envelope_from and line.envelope_from.lower() == want:
                return line, line.envelope_from
        return None

    def judge_external(self, hop: Hop) -> Judgement:
        c = self.customer
        self.note(
            hop,
            "entry_hop",
            f"{_describe(hop)}: entered the customer here from {hop.from_ip}, unauthenticated",
        )
        if hop.for_address:
            domain = address_domain(hop.for_address)
            if domain and c.owns_domain(domain):
                self.note(
                    hop,
                    "own_recipient",
                    f"accepted for the customer's own {hop.for_address[:120]}, then forwarded",
                )
                return self.done(Verdict.ORIGINATED_BY_CUSTOMER, "own_recipient", hop)
        for name, value in self.trusted_recipients(hop):
            domain = address_domain(value)
            if domain and c.owns_domain(domain):
                self.note(
                    hop,
                    "delivered_to_own",
                    f"{name.title()} {value[:120]} above the entry line: delivered, then forwarded",
                )
                return self.done(Verdict.ORIGINATED_BY_CUSTOMER, "delivered_to_own", hop)
        if hop.for_address:
            self.note(
                hop,
                "foreign_recipient",
                f"handed over for the foreign recipient {hop.for_address[:120]}: relayed",
            )
            return self.done(Verdict.RELAYED_THIRD_PARTY, "foreign_recipient", hop)
        # No recipient at the entry (several of them: MTAs name one only). What the
        # customer's own lines above it say, or what the customer did to the sender.
        above = self.own_recipient_above()
        if above is not None:
            self.note(
                above,
                "own_recipient_above",
                f"{_describe(above)}, above the entry: a customer machine accepted it for "
                f"the customer's own {above.for_address[:120]}, then sent it on (forwarded "
                "or expanded)",
            )
            return self.done(Verdict.ORIGINATED_BY_CUSTOMER, "own_recipient_above", hop)
        rewrite = self.srs_rewrite(hop)
        if rewrite is not None:
            line, original = rewrite
            self.note(
                line,
                "srs_rewritten",
                f"{_describe(line)} recorded the envelope sender {original[:120]}; the "
                f"customer's Exim sent the message on as "
                f"{bare_address(self.envelope.mail_from)[:160]}: an SRS rewrite into its "
                "own domain, which Exim does for redirected addresses",
            )
            return self.done(Verdict.ORIGINATED_BY_CUSTOMER, "srs_rewritten", hop)
        rcpts = list(self.envelope.rcpt_to)
        if rcpts and not any(c.owns_domain(address_domain(r)) for r in rcpts):
            self.note(
                hop,
                "foreign_envelope",
                f"no recipient at the entry; all {len(rcpts)} envelope recipients foreign: relayed",
            )
            return self.done(Verdict.RELAYED_THIRD_PARTY, "foreign_envelope", hop)
        if rcpts:
            self.note(
                hop,
                "own_envelope_recipient",
                "an envelope recipient is the customer's own: no relaying, and not its mail either",
            )
        else:
            self.note(
                hop, "no_recipients", "neither the entry line nor the envelope names a recipient"
            )
        return self.done(Verdict.UNDETERMINED, "external_unknown_recipient", hop)


def _weak(customer: Customer, block: HeaderBlock, envelope: Envelope) -> list[Evidence]:
    """Forgeable claims: envelope sender, From, Message-ID. Listed, never deciding."""
    out: list[Evidence] = []
    claims: list[tuple[str, str]] = []
    if envelope.mail_from:
        claims.append(("envelope sender", envelope.mail_from))
    for name, label in (("from", "From"), ("message-id", "Message-ID")):
        f = block.first(name)
        if f is not None:
            claims.append((label, f.value))
    for label, value in claims:
        domain = address_domain(value)
        if not domain:
            continue
        own = customer.owns_domain(domain)
        detail = f"{label} claims {domain}: {'' if own else 'not '}a customer domain (forgeable)"
        srs = srs_original(value) if label == "envelope sender" else None
        if srs is not None:
            detail += (
                f"; an SRS rewrite of {srs[:120]} (its hash cannot be checked here, and "
                "postsrsd rewrites relayed mail too)"
            )
        out.append(
            Evidence(
                -1,
                "weak_own_domain" if own else "weak_foreign_domain",
                detail,
                weak=True,
            )
        )
    return out


def _leaning(weak: list[Evidence]) -> Verdict:
    rules = {e.rule for e in weak}
    if rules == {"weak_own_domain"}:
        return Verdict.ORIGINATED_BY_CUSTOMER
    if rules == {"weak_foreign_domain"}:
        return Verdict.RELAYED_THIRD_PARTY
    return Verdict.UNSPECIFIED


def classify_headers(
    customer: Customer,
    headers: bytes | str,
    envelope: Envelope = Envelope(),
    options: WalkOptions = WalkOptions(),
) -> Judgement:
    """Judge one message for `customer`. Bounded work, never raises on any input."""
    block = split_header_block(headers, options.limits)
    judgement = _Walk(customer, block, envelope, options).run()
    weak = _weak(customer, block, envelope)
    judgement.evidence.extend(weak)
    if judgement.verdict == Verdict.UNDETERMINED:
        judgement.leaning = _leaning(weak)
    return judgement


def parse_client_ip(text: str) -> IPAddress | None:
    return parse_address(text) if text else None
