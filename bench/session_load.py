"""Session (bidirectional stream) load: a few streams, many items per message.

h2load cannot keep a gRPC stream open and interleave messages on it, so this is a
grpc.aio client on uvloop, run by `bench` as a child process (its CPU shows up apart from
the orchestrator's, and a crash cannot take the orchestrator down).

To spend as little client CPU as possible on the two shared cores, every message is
serialised once before the clock starts and sent as raw bytes (a `None` serializer);
responses are parsed, because verifying them is the point: each must carry one verdict
per item and echo its request's id (responses come back in order on a stream); against
penaltyd, only the penalized address may answer tempfail, and fail-open (degraded)
verdicts are counted apart, never as outcomes served.

Identities are spread over 198.18.0.0/15, the range set aside for benchmarks
(RFC 2544); they are strings to the service, no traffic goes there. The penalized one is
a documentation address (203.0.113.0/24) that `bench` penalized beforehand.

``python -m bench.session_load --target HOST:PORT --kind report|check ...`` prints one
JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import grpc
import uvloop

from bench.stats import latency_summary
from penalty.v1 import penalty_pb2 as pb

BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")
SESSION_METHOD = "/penalty.v1.PenaltyService/Session"


@dataclass(frozen=True, slots=True)
class Config:
    target: str
    kind: str  # "report" or "check"
    streams: int  # concurrent Session streams, one connection each
    depth: int  # messages in flight per stream
    batch: int  # reports or checks per message
    duration_s: float
    warmup_s: float
    penalized: str = ""  # an address expected to answer tempfail (checks only)
    semantic: bool = False  # verify penaltyd's answers, not just their shape


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    payload: bytes
    penalized_at: int  # index of the penalized check in the message, -1 if none


def build_messages(cfg: Config, count: int) -> list[Message]:
    """`count` pre-serialised messages walking 198.18.0.0/15 (distinct identities)."""
    base = int(BENCH_NET.network_address)
    size = BENCH_NET.num_addresses
    accepted = [pb.OutcomeCount(outcome=pb.OUTCOME_ACCEPTED, n=1)]
    out: list[Message] = []
    for j in range(count):
        ips = [
            str(ipaddress.IPv4Address(base + (j * cfg.batch + k) % size)) for k in range(cfg.batch)
        ]
        penalized_at = -1
        if cfg.kind == "report":
            req = pb.SessionRequest(
                id=j + 1,
                reports=[pb.ReportRequest(client=pb.Client(ip=ip), counts=accepted) for ip in ips],
            )
        else:
            if cfg.penalized:
                penalized_at = j % cfg.batch
                ips[penalized_at] = cfg.penalized
            req = pb.SessionRequest(
                id=j + 1, checks=[pb.CheckRequest(client=pb.Client(ip=ip)) for ip in ips]
            )
        out.append(Message(j + 1, req.SerializeToString(), penalized_at))
    return out


class Tally:
    """Counts and latencies of the responses that completed inside the measured period."""

    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = end
        self.items = 0
        self.messages = 0
        self.responses = 0  # all of them, warm-up and drain included
        self.latencies_ms: list[float] = []
        self.failures = 0
        self.examples: list[str] = []
        self.degraded = 0  # fail-open verdicts (penaltyd's store deadline expired)
        self.degraded_messages = 0

    def fail(self, why: str) -> None:
        self.failures += 1
        if len(self.examples) < 5:
            self.examples.append(why)


def verify(resp: pb.SessionResponse, msg: Message, cfg: Config) -> tuple[str, int]:
    """(why this response is wrong or "", how many of its verdicts were fail-open).

    A fail-open (degraded) verdict is a real answer of an overloaded or cut-off service,
    not a wrong one: it is counted apart, and never as an outcome served.
    """
    if resp.id != msg.id:
        return f"response id {resp.id} for request {msg.id}", 0
    if resp.HasField("error"):
        return f"message {msg.id} rejected: {resp.error.field}: {resp.error.message}", 0
    verdicts = resp.reports if cfg.kind == "report" else resp.checks
    if len(verdicts) != cfg.batch:
        return f"message {msg.id}: {len(verdicts)} verdicts for {cfg.batch} items", 0
    if not cfg.semantic:
        return "", 0
    degraded = 0
    for i, v in enumerate(verdicts):
        if v.degraded:
            degraded += 1
        elif v.tempfail != (i == msg.penalized_at):
            return f"message {msg.id} item {i} ({v.identity}): tempfail={v.tempfail}", degraded
    return "", degraded


async def _stream(
    cfg: Config, msgs: list[Message], offset: int, tally: Tally, stop: asyncio.Event
) -> None:
    """One Session stream keeping `cfg.depth` messages in flight until `stop`."""
    async with grpc.aio.insecure_channel(
        cfg.target, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        call = channel.stream_stream(
            SESSION_METHOD, request_serializer=None, response_deserializer=None
        )()
        window = asyncio.Semaphore(cfg.depth)
        in_flight: collections.deque[tuple[Message, float]] = collections.deque()

        async def writer() -> None:
            i = offset
            while True:
                await window.acquire()
                if stop.is_set():
                    break
                msg = msgs[i % len(msgs)]
                i += 1
                in_flight.append((msg, time.perf_counter()))
                await call.write(msg.payload)
            await call.done_writing()

        async def reader() -> None:
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                now = time.perf_counter()
                msg, sent = in_flight.popleft()
                window.release()
                tally.responses += 1
                why, degraded = verify(pb.SessionResponse.FromString(raw), msg, cfg)
                if why:
                    tally.fail(why)
                elif tally.start <= now <= tally.end:
                    tally.messages += 1
                    tally.items += cfg.batch - degraded
                    tally.degraded += degraded
                    tally.degraded_messages += 1 if degraded else 0
                    tally.latencies_ms.append((now - sent) * 1000)

        await asyncio.gather(writer(), reader())
        code = await call.code()
        if code != grpc.StatusCode.OK:
            tally.fail(f"stream ended with {code}: {await call.details()}")


async def run(cfg: Config) -> dict[str, Any]:
    """Warm up, measure for `cfg.duration_s`, drain; bounded by a timeout."""
    count = max(1, math.ceil(BENCH_NET.num_addresses / cfg.batch)) if cfg.kind == "report" else 256
    msgs = build_messages(cfg, count)
    t0 = time.perf_counter()
    tally = Tally(t0 + cfg.warmup_s, t0 + cfg.warmup_s + cfg.duration_s)
    stop = asyncio.Event()

    async def stopper() -> None:
        await asyncio.sleep(tally.end - time.perf_counter())
        stop.set()

    async with asyncio.timeout(cfg.warmup_s + cfg.duration_s + 30):
        await asyncio.gather(
            stopper(),
            *(
                _stream(cfg, msgs, s * (len(msgs) // cfg.streams), tally, stop)
                for s in range(cfg.streams)
            ),
        )
    return {
        "items": tally.items,
        "messages": tally.messages,
        "responses": tally.responses,
        "duration_s": cfg.duration_s,
        "rate": tally.items / cfg.duration_s,
        "messages_per_s": tally.messages / cfg.duration_s,
        "failures": tally.failures,
        "failure_examples": tally.examples,
        "degraded": tally.degraded,
        "degraded_messages": tally.degraded_messages,
        **latency_summary(tally.latencies_ms),
        # raw, so that several runs can be pooled into one percentile
        "latencies_ms": [round(ms, 4) for ms in tally.latencies_ms],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.session_load", description=__doc__)
    p.add_argument("--target", required=True, metavar="HOST:PORT")
    p.add_argument("--kind", choices=["report", "check"], required=True)
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--penalized", default="")
    p.add_argument("--semantic", action="store_true", help="verify penaltyd's verdicts")
    a = p.parse_args(argv)
    cfg = Config(
        a.target, a.kind, a.streams, a.depth, a.batch, a.duration, a.warmup, a.penalized, a.semantic
    )
    try:
        result = uvloop.run(run(cfg))
    except KeyboardInterrupt:
        return 130
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
