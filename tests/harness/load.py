"""Load from another process: a flood of Session reports that does not share the test's
event loop (or its share of the CPU), so what a test measures is the server's."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import grpc

from penalty.v1 import penalty_pb2 as pb
from penalty.v1 import penalty_pb2_grpc as pbg


def _flood(address: str, streams: int, messages: int, size: int, out: Any) -> None:
    async def stream(stub: pbg.PenaltyServiceStub, k: int) -> int:
        msg = pb.SessionRequest(
            reports=[
                pb.ReportRequest(
                    client=pb.Client(ip=f"172.{16 + k}.{i // 250}.{i % 250}"),
                    counts=[pb.OutcomeCount(outcome=pb.OUTCOME_ACCEPTED, n=1)],
                )
                for i in range(size)
            ]
        )
        call = stub.Session()
        answered = 0
        for n in range(messages):
            msg.id = n
            await call.write(msg)
            answered += len((await call.read()).reports)
        await call.done_writing()
        return answered

    async def run() -> int:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pbg.PenaltyServiceStub(ch)
            return sum(await asyncio.gather(*(stream(stub, k) for k in range(streams))))

    out.put(asyncio.run(run()))


class Flood:
    """`streams` Session streams sending `messages` messages of `size` reports each, from
    a child process; `result()` waits for the number of report verdicts answered."""

    def __init__(self, address: str, *, streams: int = 8, messages: int = 15, size: int = 1000):
        ctx = multiprocessing.get_context("spawn")
        self._queue: Any = ctx.Queue()
        self._proc = ctx.Process(
            target=_flood, args=(address, streams, messages, size, self._queue), daemon=True
        )
        self._proc.start()

    def done(self) -> bool:
        return not self._proc.is_alive()

    async def result(self, within: float = 120.0) -> int:
        loop = asyncio.get_running_loop()
        try:
            answered: int = await loop.run_in_executor(None, self._queue.get, True, within)
            return answered
        finally:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
