"""``python -m bench.mx``: what the MX side costs (issue 4).

1. **Live replica check**: `AsyncPenaltyClient(live_replica=True).check()` answering
   in-process, with 10,000 active penalties in the replica; p50/p99 per call for hits
   (penalized) and misses, measured with `perf_counter_ns` around each awaited call.
   Target: p99 under 50 microseconds.
2. **Propagation**: two penaltyd replicas on one real redis-server; a client's live
   replica follows replica B while penalties start on replica A (one report of 25
   unknown recipients each). Delay = from sending the triggering report to A until B's
   watch event is applied in the client's replica. Target: p99 under 100 ms.
3. **Policy server**: `penalty-policyd` (a child process, live replica on) driven by a
   Python load generator in another process holding 32 Postfix-style connections, one
   request at a time on each (Postfix never pipelines policy requests); requests/s and
   per-request latency. Target: at least 2,000 requests/s.

Everything runs on loopback, bounded in count and time, and stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.stats import latency_summary
from penalty.v1 import penalty_pb2 as pb
from penaltyclient import AsyncPenaltyClient
from penaltyclient.replica import ReplicaState
from tests.harness.ports import free_port, wait_port
from tests.harness.processes import PenaltydProcess
from tests.harness.redis import RedisServer

UNKNOWN = pb.OUTCOME_UNKNOWN_RECIPIENT
RESULTS = Path(__file__).parent / "results"


async def _penalize_many(client: AsyncPenaltyClient, n: int) -> int:
    """Start `n` penalties: 100 clients per Session message, 25 errors each.

    Setup, not a measurement: a batch that timed out under load (fail-open, "in doubt")
    is simply reported again, up to three rounds; returns the active penalty count.
    """
    for _ in range(3):
        reporter = client.reporter(max_batch=100)
        reporter.start()
        for i in range(n):
            reporter.report(f"198.18.{i // 250}.{i % 250}", {UNKNOWN: 25})
        assert await reporter.flush(120), "reports not acknowledged"
        await reporter.close()
        active = (await client.stats()).active_penalties
        if active >= n:
            return active
    return active


async def _until(condition: Any, within: float) -> None:
    """Poll a condition of another task's making (bounded): start-up only, not measured."""
    end = time.monotonic() + within
    while not condition() and time.monotonic() < end:  # noqa: ASYNC110  (no event to await)
        await asyncio.sleep(0.02)


async def replica_latency(address: str, calls: int) -> dict[str, Any]:
    async with AsyncPenaltyClient(address, live_replica=True) as client:
        active = await _penalize_many(client, 10_000)
        assert active >= 10_000, f"only {active} penalties started"
        assert client.replica is not None
        replica = client.replica
        await _until(lambda: len(replica) >= 10_000, 30)
        assert len(replica) >= 10_000, f"replica holds {len(replica)} penalties"
        out: dict[str, Any] = {"penalties_in_replica": len(client.replica)}
        for name, ip in (("hit", "198.18.3.7"), ("miss", "203.0.113.200")):
            v = await client.check(ip)
            assert v.tempfail == (name == "hit"), v
            assert not v.degraded, v
            samples = []
            perf = time.perf_counter_ns
            for _ in range(calls):
                t0 = perf()
                await client.check(ip)
                samples.append((perf() - t0) / 1e6)
            summary = latency_summary(samples)
            out[name] = {
                "p50_us": summary["p50_ms"] * 1000,
                "p99_us": summary["p99_ms"] * 1000,
                "mean_us": summary["mean_ms"] * 1000,
                "max_us": summary["max_ms"] * 1000,
                "calls": calls,
            }
        out["rpcs_made"] = 0 if client.degraded_answers == 0 else client.degraded_answers
        return out


class _Timed(ReplicaState):
    """A replica state that records when each penalty arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: dict[str, float] = {}
        self.changed = asyncio.Event()

    def apply(self, event: pb.PenaltyEvent) -> None:
        super().apply(event)
        if event.kind == pb.PenaltyEvent.Kind.KIND_PENALTY_STARTED:
            self.arrived.setdefault(event.penalty.identity, time.perf_counter())
            self.changed.set()


async def propagation(a: str, b: str, samples: int) -> dict[str, Any]:
    async with (
        AsyncPenaltyClient(a, deadline=2) as on_a,
        AsyncPenaltyClient(b, live_replica=True) as on_b,
    ):
        timed = _Timed()
        on_b.replica = timed
        on_b._follower.cancel() if on_b._follower else None  # restart the follower on our state
        on_b._follower = None
        on_b.start()
        await _until(lambda: timed.synced, 10)
        assert timed.synced, "replica on B never synced"
        delays = []
        for i in range(samples):
            ip = f"198.19.{i // 250}.{i % 250}"
            t0 = time.perf_counter()
            verdict = await on_a.report(ip, {UNKNOWN: 25})
            assert verdict.tempfail, verdict
            while ip not in timed.arrived:
                timed.changed.clear()
                try:
                    async with asyncio.timeout(2):
                        await timed.changed.wait()
                except TimeoutError as exc:
                    raise AssertionError(
                        f"penalty for {ip} never reached the replica on B"
                    ) from exc
            delays.append((timed.arrived[ip] - t0) * 1000)
            await asyncio.sleep(0.005)  # one at a time: measure delay, not queueing
        return latency_summary(delays) | {"samples": samples}


def _policy_load(port: int, connections: int, seconds: float, queue: Any) -> None:
    """Load generator (own process): `connections` Postfix-like clients, back to back."""

    async def one(i: int, stop_at: float, lat: list[float]) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        req = (
            "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
            f"client_address=198.51.{i % 256}.{(i * 7) % 250}\nclient_name=unknown\n"
            f"helo_name=mx{i}.example\nsender=a@example{i}.net\nrecipient=b@example.org\n\n"
        ).encode()
        done = 0
        perf = time.perf_counter
        while perf() < stop_at:
            t0 = perf()
            writer.write(req)
            await reader.readuntil(b"\n\n")
            lat.append((perf() - t0) * 1000)
            done += 1
        writer.close()
        return done

    async def main() -> None:
        lat: list[float] = []
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, t0 + seconds, lat) for i in range(connections)))
        elapsed = time.perf_counter() - t0
        queue.put({"requests": sum(counts), "seconds": elapsed, **latency_summary(lat)})

    uvloop.run(main())


def policy_throughput(penaltyd: str, seconds: float, connections: int) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "penaltyclient.policyd", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--penaltyd", penaltyd, "--stats-interval", "3600"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        time.sleep(1.0)  # let its live replica take the snapshot before load starts
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        warm = ctx.Process(target=_policy_load, args=(port, connections, 1.0, q))
        warm.start()
        warm.join(30)
        q.get(timeout=5)
        load = ctx.Process(target=_policy_load, args=(port, connections, seconds, q))
        load.start()
        load.join(seconds + 30)
        result: dict[str, Any] = q.get(timeout=5)
        result["requests_per_s"] = result["requests"] / result["seconds"]
        result["connections"] = connections
        return result
    finally:
        proc.terminate()
        proc.wait(10)


def _latency_row(
    name: str, d: dict[str, Any], unit: str, limit: float
) -> tuple[str, str, str, str, bool]:
    sym = "µs" if unit == "us" else "ms"
    p50, p99 = d[f"p50_{unit}"], d[f"p99_{unit}"]
    return (
        name,
        f"p50 {p50:.1f} {sym}",
        f"p99 {p99:.1f} {sym}",
        f"p99 < {limit:g} {sym}",
        p99 < limit,
    )


def main(argv: list[str] | None = None) -> int:
    summary = (__doc__ or "").split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m bench.mx", description=summary)
    p.add_argument("--quick", action="store_true", help="fewer samples (smoke test)")
    p.add_argument(
        "--json", type=Path, default=RESULTS / "mx-latest.json", help="where to write the JSON"
    )
    args = p.parse_args(argv)
    calls, samples, seconds = (20_000, 50, 3.0) if args.quick else (200_000, 300, 10.0)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with (
        RedisServer() as redis,
        PenaltydProcess("--redis-url", redis.url) as a,
        PenaltydProcess("--redis-url", redis.url) as b,
    ):
        time.sleep(1.0)
        print("live replica check latency ...", flush=True)
        out["replica_check"] = uvloop.run(replica_latency(b.address, calls))
        print("propagation A -> replica following B ...", flush=True)
        out["propagation"] = uvloop.run(propagation(a.address, b.address, samples))
        print("penalty-policyd throughput ...", flush=True)
        out["policyd"] = policy_throughput(b.address, seconds, 32)
    hit, miss = out["replica_check"]["hit"], out["replica_check"]["miss"]
    prop, pol = out["propagation"], out["policyd"]
    rows = [
        _latency_row("live replica check, penalized (in-process)", hit, "us", 50),
        _latency_row("live replica check, not penalized", miss, "us", 50),
        _latency_row("penalty start on A -> replica via B", prop, "ms", 100),
        (
            "penalty-policyd, 32 connections",
            f"{pol['requests_per_s']:,.0f} req/s",
            f"p99 {pol['p99_ms']:.2f} ms",
            ">= 2,000 req/s",
            pol["requests_per_s"] >= 2000,
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    for name, a_, b_, target, ok in rows:
        print(f"{name:<{width}}  {a_:>16}  {b_:>16}  {target:>15}  {'PASS' if ok else 'FAIL'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\nJSON: {args.json}")
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
