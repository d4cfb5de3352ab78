"""The engine on the embedded store with an injected clock, as the simulator drives it:
reports and checks without gRPC, time moved by hand (unit tests of detection rules)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from penalty.v1 import penalty_pb2 as pb
from penaltyd.engine import Answer, Engine
from penaltyd.settings import Settings
from penaltyd.store.base import Store
from penaltyd.store.memory import MemoryStore
from penaltyd.validation import ClientRef, Validator

T0 = 1_767_225_600_000


class Clock:
    """Unix ms, moved by the test (`clock.ms += 60_000`)."""

    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


def engine(
    store: Callable[[Clock], Store] = lambda clock: MemoryStore(clock=clock), **settings: object
) -> tuple[Engine, Clock, Validator]:
    """The engine on `store` (made with the test's clock; the embedded store by default)."""
    clock = Clock()
    s = Settings(**settings)  # type: ignore[arg-type]  # keyword settings, validated
    e = Engine(s, store(clock), clock=lambda: clock.ms / 1000, wall_ms=clock)
    return e, clock, Validator(s)


def ref(v: Validator, ip: str, helo: str = "", mail_from: str = "") -> ClientRef:
    return v.client(pb.Client(ip=ip, helo=helo, mail_from=mail_from), "client")


async def send(e: Engine, r: ClientRef, outcomes: Sequence[int]) -> list[Answer]:
    """One report per outcome, each answered on its own (as an MX reports RCPTs)."""
    return [(await e.report_many([(r, [(o, 1)])]))[0] for o in outcomes]
