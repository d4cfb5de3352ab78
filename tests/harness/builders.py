"""Small builders shared by the tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from penalty.v1 import penalty_pb2 as pb

T = TypeVar("T")

UNKNOWN = pb.OUTCOME_UNKNOWN_RECIPIENT
ACCEPTED = pb.OUTCOME_ACCEPTED


def client(ip: str, **kw: str) -> pb.Client:
    return pb.Client(ip=ip, **kw)


def report(ip: str, outcome: int, n: int = 1) -> pb.ReportRequest:
    return pb.ReportRequest(client=client(ip), counts=[pb.OutcomeCount(outcome=outcome, n=n)])  # type: ignore[arg-type]  # enum int


def check(ip: str) -> pb.CheckRequest:
    return pb.CheckRequest(client=client(ip))


async def eventually(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], within: float = 10.0
) -> T:
    """Poll `probe` until `ok(result)`; for conditions with no event to await
    (another process's state). Fails with the last result after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if ok(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s; last: {result!r}")
        await asyncio.sleep(0.02)


#: A moment on a window boundary (generation arithmetic in tests is exact).
T0 = 1_800_000_000_000


class Clock:
    """A store clock (unix ms) that tests move instead of sleeping."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now
