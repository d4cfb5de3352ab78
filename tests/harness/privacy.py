"""Every feature that stores something about a client, exercised once: the privacy tests'
workload, and the byte strings that must never be found in a keyed store.

`exercise` drives a penaltyd (in process or a child process, any store) through reports,
penalties on IPv4 and IPv6 clients, a NAT-shared address with many clients (shared mark,
a client's own penalty), escalation, a lift, allowlist entries and a watcher, while
`PRIVACY_SETTINGS` makes each of them happen within a few dozen requests.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field

import grpc

from penalty.v1 import penalty_pb2 as pb
from penalty.v1 import penalty_pb2_grpc as pbg

KEY = "test-identity-key-0123456789abcdefghijklmnop"  # >= 32 characters
KEY2 = "rotated-identity-key-zyxwvutsrqponmlkjihgfedcba"

#: Settings under which every kind of key appears within the exercise.
PRIVACY_SETTINGS: dict[str, object] = {
    "shared_min_sub_identities": 3,
    "escalation_multiplier": 2.0,
}

ATTACKER_V4 = "203.0.113.77"
ATTACKER_V6 = "2001:db8:77:1::25"
LIFTED = "198.51.100.66"
NAT = "100.64.33.44"
QUIET = "198.51.100.123"  # reports, no penalty
ALLOWED = "192.0.2.10"  # inside the allowlisted 192.0.2.0/24: nothing of it is stored
ADDRESSES = (ATTACKER_V4, ATTACKER_V6, LIFTED, NAT, QUIET, ALLOWED)
NAT_CLIENTS = [(f"mx{i}.nat-customer-{i}.example", f"user@sender-{i}.example") for i in range(6)]
BAD_CLIENT = NAT_CLIENTS[0]
HELOS = [h for h, _ in NAT_CLIENTS] + ["ratware.attacker-helo.example"]
SENDER_DOMAINS = [m.split("@")[1] for _, m in NAT_CLIENTS] + ["attacker-sender.example"]


def needles() -> list[bytes]:
    """Everything of the run that must not appear in a keyed store: each address in text
    (compressed, exploded, its identity prefix) and packed, each HELO name and domain."""
    out: list[bytes] = []
    for text in ADDRESSES:
        addr = ipaddress.ip_address(text)
        out += [str(addr).encode(), addr.packed]
        if addr.version == 6:
            out += [addr.exploded.encode(), str(ipaddress.ip_network(f"{addr}/64", False)).encode()]
            out.append(str(addr).rsplit("::", 1)[0].encode())  # the /64 identity's text
    out += [h.encode() for h in HELOS] + [d.encode() for d in SENDER_DOMAINS]
    return out


def address_needles() -> list[str]:
    """The addresses as they would be written in a log line."""
    out: list[str] = []
    for text in ADDRESSES:
        addr = ipaddress.ip_address(text)
        out.append(str(addr))
        if addr.version == 6:
            out += [addr.exploded, str(ipaddress.ip_network(f"{addr}/64", False))]
    return out


def _client(ip: str, helo: str = "", mail_from: str = "") -> pb.Client:
    return pb.Client(ip=ip, helo=helo, mail_from=mail_from)


def _report(c: pb.Client, outcome: int, n: int = 1) -> pb.ReportRequest:
    return pb.ReportRequest(client=c, counts=[pb.OutcomeCount(outcome=outcome, n=n)])  # type: ignore[arg-type]


UNKNOWN = pb.OUTCOME_UNKNOWN_RECIPIENT
ACCEPTED = pb.OUTCOME_ACCEPTED


@dataclass
class Ran:
    """What the exercise saw: the watcher's events and the verdicts that matter."""

    events: list[pb.PenaltyEvent] = field(default_factory=list)
    penalized: dict[str, pb.Verdict] = field(default_factory=dict)


async def attack(service: pbg.PenaltyServiceStub, c: pb.Client, errors: int = 40) -> pb.Verdict:
    await service.Report(_report(c, ACCEPTED, 2))
    verdict = pb.Verdict()
    for _ in range(errors):
        verdict = await service.Report(_report(c, UNKNOWN))
        if verdict.tempfail:
            break
    return verdict


async def exercise(service: pbg.PenaltyServiceStub, admin: pbg.PenaltyAdminStub) -> Ran:
    ran = Ran()
    nat_seen = asyncio.Event()
    allow_seen = asyncio.Event()

    async def follow() -> None:
        while True:  # a replica refuses watchers (UNAVAILABLE) until its feed is synced
            watch = service.WatchPenalties(pb.WatchRequest())
            try:
                async for event in watch:
                    on(event)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                ran.events.clear()  # the next snapshot says it all again
            finally:
                watch.cancel()
            await asyncio.sleep(0.02)

    def on(event: pb.PenaltyEvent) -> None:
        ran.events.append(event)
        if event.kind == pb.PenaltyEvent.Kind.KIND_ALLOW_ADDED:
            allow_seen.set()  # on Redis, the feed has reached this replica's view
        if event.kind == pb.PenaltyEvent.Kind.KIND_PENALTY_STARTED and (
            event.penalty.identity.startswith(NAT + "#")
        ):
            nat_seen.set()

    follower = asyncio.create_task(follow())
    who = {"actor": "abuse-desk", "note": "TICKET-1"}
    await admin.Allow(
        pb.AllowRequest(cidr="192.0.2.0/24", ttl_seconds=3600, actor="abuse-desk", note="T-1")
    )
    await asyncio.wait_for(allow_seen.wait(), 10)
    for _ in range(30):
        assert (await service.Report(_report(_client(ALLOWED), UNKNOWN))).allowlisted
    helo = "ratware.attacker-helo.example"
    ran.penalized[ATTACKER_V4] = await attack(
        service, _client(ATTACKER_V4, helo, "x@attacker-sender.example")
    )
    ran.penalized[ATTACKER_V6] = await attack(service, _client(ATTACKER_V6))
    ran.penalized[LIFTED] = await attack(service, _client(LIFTED))
    # With escalation on, every penalty also counts an offence (the `o` keys).
    await admin.Lift(pb.LiftRequest(client=_client(LIFTED), **who))
    for _ in range(5):
        await service.Report(_report(_client(QUIET), ACCEPTED))
    # A NAT: six clients on one address (shared), one of them a dictionary attacker.
    for h, m in NAT_CLIENTS:
        for _ in range(3):
            await service.Report(_report(_client(NAT, h, m), ACCEPTED))
    ran.penalized[NAT] = await attack(service, _client(NAT, *BAD_CLIENT))
    for ip in ADDRESSES:
        await service.Check(pb.CheckRequest(client=_client(ip)))
    await admin.Explain(pb.ExplainRequest(client=_client(NAT, *BAD_CLIENT), **who))
    await admin.ListPenalties(pb.ListPenaltiesRequest(actor="abuse-desk", note="TICKET-1"))
    # The watcher has seen every change once the last penalty has reached it.
    await asyncio.wait_for(nat_seen.wait(), 10)
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    return ran
