"""Who sends what in `make simulate`: the client population, drawn from one seed.

A scenario is a handful of counts and rates; `population` turns it into concrete
senders (address, HELO, sender domains, rate, error mix, active period) with one
`random.Random`, so the same seed always yields the same traffic. Every address comes
from a documentation or shared-address range (RFC 5737, RFC 3849, RFC 6598): they are
only strings handed to the in-process engine, nothing is ever sent anywhere.

The rates and error ratios are the issue's, not measurements of a real MX: see
docs/detection.md for what the model leaves out.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from dataclasses import dataclass
from typing import Any

from penalty.v1 import penalty_pb2 as pb

ACCEPTED = pb.OUTCOME_ACCEPTED
UNKNOWN = pb.OUTCOME_UNKNOWN_RECIPIENT
RELAY = pb.OUTCOME_RELAY_DENIED
BAD_HELO = pb.OUTCOME_BAD_HELO
LOST = pb.OUTCOME_LOST_CONNECTION

# Classes, in table order. Legitimate classes send *messages* (one session, several
# RCPTs, retried after a deferral); attacker classes send single RCPT attempts at a
# steady rate and ignore tempfails, as ratware does.
HOURLY = "legit ~1/hour"
MINUTELY = "legit ~1/minute"
BULK = "legit bulk ~5/s"
STALE = "legit stale list"
CGNAT_USER = "CGNAT user"
DICTIONARY = "dictionary attack"
SLOW = "slow spammer"
CGNAT_SPAMMER = "CGNAT spammer"
ROTATOR = "IPv6 /64 rotator"
ROTATOR_HELO = "IPv6 rotator, random HELO"

# Issue 15's populations (scenario "reputation").
NEWSLETTER = "newsletter 8-12 % stale"
BIG = "big sender, bounce bursts"
NEIGHBOUR = "legit in the botnet /24"
COLD_USER = "CGNAT user, cold start"
COMEBACK = "dictionary, comes back"
MODERATE = "moderate spammer"
BOTNET = "/24 botnet"
COLD_SPAMMER = "CGNAT spammer, cold start"

LEGIT_CLASSES = (HOURLY, MINUTELY, BULK, STALE, NEWSLETTER, BIG, NEIGHBOUR, CGNAT_USER, COLD_USER)
ATTACK_CLASSES = (
    DICTIONARY,
    COMEBACK,
    SLOW,
    MODERATE,
    BOTNET,
    CGNAT_SPAMMER,
    COLD_SPAMMER,
    ROTATOR,
    ROTATOR_HELO,
)
ROTATOR_CLASSES = (ROTATOR, ROTATOR_HELO)

CGNAT_ADDRESS = "100.64.7.9"  # RFC 6598 shared address space: one carrier-grade NAT
COLD_CGNAT_ADDRESS = "100.64.8.1"  # another, whose spammer speaks before any of its users
BOTNET_NET = "198.18.7.0/24"  # RFC 2544 benchmarking space: the botnet's /24

MINUTE = 60.0
HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """How many clients of each class, and for how long (the rates are fixed below)."""

    name: str
    hours: float
    hourly: int  # legitimate senders at ~1 message/hour
    minutely: int  # legitimate senders at ~1 message/minute
    bulk: int  # bulk senders (an ESP's outbound host) at ~5 messages/s
    stale_lists: int  # mailing lists with 5-20 % unknown recipients
    dictionary: int  # fresh addresses guessing recipients
    slow: int  # low-rate spammers with 60-80 % errors
    cgnat_users: int  # legitimate users behind the one CGNAT address
    cgnat_spammers: int  # dictionary attackers behind the same address
    rotators: int  # IPv6 spammers, new address in their /64 per attempt, stable HELO
    rotators_random_helo: int  # the same, with a fresh random HELO per attempt
    attack_minutes: tuple[float, float] = (10.0, 40.0)  # how long one attack lasts
    dictionary_rate: tuple[float, float] = (2.0, 8.0)  # RCPT attempts/s of one attacker
    # No attack starts in the first minutes: a real MX never starts from empty windows,
    # and an attacker that is the only client an address has shown is judged alone (see
    # docs/detection.md, "Cold start"). `--warmup 0` measures exactly that case.
    warmup_minutes: float = 10.0
    # Issue 15 (scenario "reputation"); 0 elsewhere.
    newsletters: int = 0  # mailing lists with 8-12 % stale addresses
    big_senders: int = 0  # ~0.5 message/s, and a campaign with 35 % bounces every ~30 min
    comeback: int = 0  # dictionary attackers that come back 20-40 min after their first run
    moderate: int = 0  # 30-45 % unknown recipients at ~10 RCPT/min, from warm-up to the end
    botnet: int = 0  # addresses in BOTNET_NET, 2 RCPT/min each at 90 % unknown recipients
    botnet_neighbours: int = 0  # legitimate senders in the same /24
    cold_cgnat_users: int = 0  # users behind COLD_CGNAT_ADDRESS (its spammer comes first)

    @property
    def seconds(self) -> float:
        return self.hours * HOUR

    @property
    def legit_senders(self) -> int:
        return self.hourly + self.minutely + self.bulk + self.stale_lists


DEFAULT = Scenario(
    name="default",
    hours=2.0,
    hourly=190,
    minutely=95,
    bulk=3,
    stale_lists=12,
    dictionary=10,
    slow=10,
    cgnat_users=200,
    cgnat_spammers=2,
    rotators=3,
    rotators_random_helo=2,
)

# Small enough for a unit test (a few seconds), large enough that every mechanism the
# headline figures depend on happens: several penalty cycles per attacker, the CGNAT
# address marked shared (more than 20 fingerprints in a window), rotators caught.
QUICK = Scenario(
    name="quick",
    hours=0.5,
    hourly=40,
    minutely=20,
    bulk=1,
    stale_lists=3,
    dictionary=3,
    slow=2,
    cgnat_users=60,
    cgnat_spammers=2,
    rotators=1,
    rotators_random_helo=1,
    attack_minutes=(10.0, 20.0),
)

# Issue 15: the populations its replay used, for two hours.
REPUTATION = Scenario(
    name="reputation",
    hours=2.0,
    hourly=100,
    minutely=40,
    bulk=1,
    stale_lists=0,
    dictionary=0,
    slow=0,
    cgnat_users=100,
    cgnat_spammers=2,
    rotators=2,
    rotators_random_helo=1,
    newsletters=8,
    big_senders=2,
    comeback=6,
    moderate=10,
    botnet=40,
    botnet_neighbours=10,
    cold_cgnat_users=40,
)

SCENARIOS = {s.name: s for s in (DEFAULT, QUICK, REPUTATION)}


@dataclass(frozen=True, slots=True)
class Sender:
    """One client: where it connects from, how it introduces itself, how it behaves."""

    name: str  # unique, e.g. "dictionary attack #3"
    cls: str  # its class (a row of the table)
    legit: bool
    ip: str  # the address; for rotators the /64 they draw addresses from
    helo: str
    domains: tuple[str, ...]  # envelope-sender domains; one is picked per message
    rate: float  # per second: messages (legitimate) or RCPT attempts (attackers)
    rcpts: tuple[int, int]  # recipients per message, inclusive range (legitimate)
    error_ratio: float  # share of RCPTs that fail
    errors: tuple[int, ...]  # the outcomes a failing RCPT is drawn from, uniformly
    lost_ratio: float  # sessions that lose the connection before the first RCPT
    start_s: float
    stop_s: float
    rotate: bool = False  # a fresh address inside `ip` (a /64) for every attempt
    random_helo: bool = False  # a fresh HELO name for every attempt
    again: tuple[float, float] | None = None  # a second attack period (comes back)

    @property
    def attacker(self) -> bool:
        return not self.legit


class _Addresses:
    """Hands out distinct addresses per range, so no two senders share an identity."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def v4(self, net: str) -> str:
        n = self._next.get(net, 1)
        network = ipaddress.IPv4Network(net)
        if n >= network.num_addresses - 1:
            raise ValueError(f"{net} is exhausted: lower the scenario's counts")
        self._next[net] = n + 1
        return str(network.network_address + n)

    def v6_64(self, base: str) -> str:
        """The n-th /64 under `base` (a /48), as a host address inside it."""
        n = self._next.get(base, 1)
        self._next[base] = n + 1
        net = ipaddress.IPv6Network(base)
        return str(net.network_address + (n << 64) + 0x25)


def population(s: Scenario, rng: random.Random) -> list[Sender]:
    """Every sender of the scenario, in a fixed order (the seed decides the details)."""
    end = s.seconds
    addrs = _Addresses()
    out: list[Sender] = []

    def legit_v4() -> str:
        try:
            return addrs.v4("198.51.100.0/24")
        except ValueError:
            return addrs.v4("192.0.2.0/25")

    def legit_ip(i: int) -> str:
        # One legitimate sender in ten is on IPv6, each in its own /64.
        return addrs.v6_64("2001:db8:100::/48") if i % 10 == 9 else legit_v4()

    def legit(
        cls: str, tag: str, i: int, rate: float, rcpts: tuple[int, int], errors: float
    ) -> Sender:
        domain = f"{tag}{i}.example.org"
        return Sender(
            name=f"{cls} #{i}",
            cls=cls,
            legit=True,
            ip=legit_ip(len(out)),
            helo=f"mail.{domain}",
            domains=(domain,),
            rate=rate * rng.uniform(0.5, 2.0),
            rcpts=rcpts,
            error_ratio=errors,
            errors=(UNKNOWN,),
            lost_ratio=0.005,
            start_s=rng.uniform(0, 60),
            stop_s=end,
        )

    for i in range(s.hourly):
        out.append(legit(HOURLY, "hourly", i, 1 / HOUR, (1, 3), 0.01))
    for i in range(s.minutely):
        out.append(legit(MINUTELY, "minutely", i, 1 / MINUTE, (1, 5), 0.01))
    for i in range(s.bulk):
        # An ESP's outbound host: many customers' sender domains on one address, so the
        # address is also told apart into sub-identities (a legitimate "shared" address).
        out.append(
            Sender(
                name=f"{BULK} #{i}",
                cls=BULK,
                legit=True,
                ip=legit_v4(),
                helo=f"out{i}.esp.example.net",
                domains=tuple(f"customer{k}.example.com" for k in range(30)),
                rate=5.0 * rng.uniform(0.8, 1.2),
                rcpts=(1, 2),
                error_ratio=0.01,
                errors=(UNKNOWN,),
                lost_ratio=0.002,
                start_s=rng.uniform(0, 60),
                stop_s=end,
            )
        )
    for i in range(s.stale_lists):
        domain = f"lists{i}.example.org"
        out.append(
            Sender(
                name=f"{STALE} #{i}",
                cls=STALE,
                legit=True,
                ip=legit_v4(),
                helo=f"lists.{domain}",
                domains=(domain,),
                rate=1 / (rng.uniform(10, 40) * MINUTE),  # a post every 10-40 minutes
                rcpts=(20, 200),
                error_ratio=rng.uniform(0.05, 0.20),
                errors=(UNKNOWN,),
                lost_ratio=0.005,
                start_s=rng.uniform(0, 600),
                stop_s=end,
            )
        )
    for i in range(s.cgnat_users):
        # Home users behind the carrier's NAT: each its own HELO and sender domain.
        domain = f"user{i}.example.net"
        out.append(
            Sender(
                name=f"{CGNAT_USER} #{i}",
                cls=CGNAT_USER,
                legit=True,
                ip=CGNAT_ADDRESS,
                helo=f"pc-{i}.{domain}",
                domains=(domain,),
                rate=1 / (rng.uniform(15, 120) * MINUTE),
                rcpts=(1, 3),
                error_ratio=0.01,
                errors=(UNKNOWN,),
                lost_ratio=0.005,
                start_s=rng.uniform(0, 300),
                stop_s=end,
            )
        )

    warmup = min(s.warmup_minutes * MINUTE, end)

    def attack_period() -> tuple[float, float]:
        lo, hi = (m * MINUTE for m in s.attack_minutes)
        length = min(rng.uniform(lo, hi), end - warmup)
        start = rng.uniform(warmup, max(warmup, end - length))
        return start, start + length

    def attacker(
        cls: str,
        i: int,
        ip: str,
        rate: float,
        error_ratio: float,
        errors: tuple[int, ...],
        period: tuple[float, float],
        rotate: bool = False,
        random_helo: bool = False,
    ) -> Sender:
        return Sender(
            name=f"{cls} #{i}",
            cls=cls,
            legit=False,
            ip=ip,
            helo=f"{'bot' if cls != SLOW else 'mx'}{i}.{cls.split()[0].lower()}.example",
            domains=(f"spam{i}.{cls.split()[0].lower()}.example",),
            rate=rate,
            rcpts=(1, 1),
            error_ratio=error_ratio,
            errors=errors,
            lost_ratio=0.0,
            start_s=period[0],
            stop_s=period[1],
            rotate=rotate,
            random_helo=random_helo,
        )

    for i in range(s.dictionary):
        ip = addrs.v4("203.0.113.0/24")
        out.append(
            attacker(
                DICTIONARY,
                i,
                ip,
                rng.uniform(*s.dictionary_rate),
                0.95,
                (UNKNOWN,),
                attack_period(),
            )
        )
    for i in range(s.slow):
        ip = addrs.v4("192.0.2.128/25")
        start = rng.uniform(warmup, max(warmup, end / 2))
        rate = rng.uniform(2, 6) / MINUTE
        ratio = rng.uniform(0.6, 0.8)
        out.append(attacker(SLOW, i, ip, rate, ratio, (UNKNOWN, RELAY, BAD_HELO), (start, end)))
    for i in range(s.cgnat_spammers):
        period = attack_period()
        out.append(
            attacker(CGNAT_SPAMMER, i, CGNAT_ADDRESS, rng.uniform(2, 5), 0.95, (UNKNOWN,), period)
        )
    # --- issue 15's populations
    for i in range(s.newsletters):
        domain = f"news{i}.example.org"
        out.append(
            Sender(
                name=f"{NEWSLETTER} #{i}",
                cls=NEWSLETTER,
                legit=True,
                ip=legit_v4(),
                helo=f"news.{domain}",
                domains=(domain,),
                rate=1 / (rng.uniform(10, 40) * MINUTE),
                rcpts=(20, 200),
                error_ratio=rng.uniform(0.08, 0.12),
                errors=(UNKNOWN,),
                lost_ratio=0.005,
                start_s=rng.uniform(0, 600),
                stop_s=end,
            )
        )
    for i in range(s.big_senders):
        ip, domain = addrs.v4("198.18.30.0/24"), f"big{i}.example.com"
        common: dict[str, Any] = {
            "cls": BIG,
            "legit": True,
            "ip": ip,
            "helo": f"out.{domain}",
            "domains": (domain,),
        }
        out.append(
            Sender(
                name=f"{BIG} #{i}",
                rate=0.5 * rng.uniform(0.8, 1.2),
                rcpts=(1, 3),
                error_ratio=0.01,
                errors=(UNKNOWN,),
                lost_ratio=0.002,
                start_s=rng.uniform(0, 60),
                stop_s=end,
                **common,
            )
        )
        out.append(  # the same host's campaigns to an old list: a burst of bounces
            Sender(
                name=f"{BIG} #{i} campaign",
                rate=1 / (30 * MINUTE),
                rcpts=(150, 300),
                error_ratio=0.35,
                errors=(UNKNOWN,),
                lost_ratio=0.0,
                start_s=rng.uniform(0, 600),
                stop_s=end,
                **common,
            )
        )
    for i in range(s.botnet_neighbours):
        domain = f"hosted{i}.example.net"
        out.append(
            Sender(
                name=f"{NEIGHBOUR} #{i}",
                cls=NEIGHBOUR,
                legit=True,
                ip=addrs.v4(BOTNET_NET),
                helo=f"mail.{domain}",
                domains=(domain,),
                rate=rng.uniform(0.5, 2.0) / (5 * MINUTE),
                rcpts=(1, 5),
                error_ratio=0.02,
                errors=(UNKNOWN,),
                lost_ratio=0.005,
                start_s=rng.uniform(0, 60),
                stop_s=end,
            )
        )
    for i in range(s.cold_cgnat_users):
        domain = f"home{i}.example.net"
        out.append(
            Sender(
                name=f"{COLD_USER} #{i}",
                cls=COLD_USER,
                legit=True,
                ip=COLD_CGNAT_ADDRESS,
                helo=f"pc-{i}.{domain}",
                domains=(domain,),
                rate=1 / (rng.uniform(15, 120) * MINUTE),
                rcpts=(1, 3),
                error_ratio=0.01,
                errors=(UNKNOWN,),
                lost_ratio=0.005,
                start_s=rng.uniform(60, 300),
                stop_s=end,
            )
        )
    if s.cold_cgnat_users:
        start = rng.uniform(5, 30)  # before any user has spoken: the cold start
        out.append(
            attacker(
                COLD_SPAMMER,
                0,
                COLD_CGNAT_ADDRESS,
                rng.uniform(2, 5),
                0.95,
                (UNKNOWN,),
                (start, start + rng.uniform(10, 20) * MINUTE),
            )
        )
    for i in range(s.comeback):
        first = attack_period()
        gap = rng.uniform(20, 40) * MINUTE
        length = first[1] - first[0]
        again = (first[1] + gap, first[1] + gap + length)
        out.append(
            dataclasses.replace(
                attacker(
                    COMEBACK,
                    i,
                    addrs.v4("203.0.113.0/24"),
                    rng.uniform(*s.dictionary_rate),
                    rng.uniform(0.70, 0.95),
                    (UNKNOWN,),
                    first,
                ),
                again=again if again[0] < end else None,
            )
        )
    for i in range(s.moderate):
        ip = addrs.v4(f"198.18.{40 + i}.0/24")  # each in its own /24
        out.append(
            attacker(
                MODERATE,
                i,
                ip,
                rng.uniform(8, 12) / MINUTE,
                rng.uniform(0.30, 0.45),
                (UNKNOWN,),
                (rng.uniform(warmup, warmup + 60), end),
            )
        )
    for i in range(s.botnet):
        start = rng.uniform(warmup, warmup + 120)
        out.append(
            attacker(BOTNET, i, addrs.v4(BOTNET_NET), 2 / MINUTE, 0.9, (UNKNOWN,), (start, end))
        )
    for cls, count, random_helo in (
        (ROTATOR, s.rotators, False),
        (ROTATOR_HELO, s.rotators_random_helo, True),
    ):
        for i in range(count):
            net = f"2001:db8:bad:{len(out):x}::/64"
            errors = (UNKNOWN, UNKNOWN, RELAY)
            period = attack_period()
            out.append(
                attacker(
                    cls,
                    i,
                    net,
                    rng.uniform(1, 4),
                    0.9,
                    errors,
                    period,
                    rotate=True,
                    random_helo=random_helo,
                )
            )
    return out
