"""``python -m bench.hostile``: what hostile clients cost penaltyd (docs/reliability.md).

1. **Session flood**: 8 Session streams (another process) send 1,000-report messages
   back to back while a prober process sends one unary Check every 2 ms; check latency
   p50/p99/max beside the same prober without the flood. Target: p99 <= 20 ms.
2. **Stalled watchers**: 30,000 active penalties; 200 WatchPenalties readers (another
   process) that never read; penaltyd's RSS before and after. Target: <= +50 MB.
3. **Re-subscription storm**: 65,000 active penalties; 100 live replicas watch at once
   (chunked snapshots, read to SNAPSHOT_DONE); time until all have their snapshot, and
   the prober's check p99 meanwhile.

penaltyd runs as its real CLI on the embedded store (`--store redis` for Redis); every
load is bounded in time and count and every child is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import uvloop

from bench.stats import latency_summary
from penalty.v1 import penalty_pb2 as pb
from penalty.v1 import penalty_pb2_grpc as pbg
from tests.harness.processes import PenaltydProcess
from tests.harness.redis import RedisServer

UNKNOWN = pb.OUTCOME_UNKNOWN_RECIPIENT
ACCEPTED = pb.OUTCOME_ACCEPTED
PENALIZED = "203.0.113.7"
RESULTS = Path(__file__).parent / "results"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _report(ip: str, outcome: int, n: int = 1) -> pb.ReportRequest:
    return pb.ReportRequest(client=pb.Client(ip=ip), counts=[pb.OutcomeCount(outcome=outcome, n=n)])  # type: ignore[arg-type]  # enum int


async def _penalize(address: str, n: int, net: int = 10) -> None:
    """`n` active penalties (40 unknown recipients each), 1,000 per Session message."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pbg.PenaltyServiceStub(ch)
        await stub.Report(_report(PENALIZED, UNKNOWN, 40))
        call = stub.Session()
        for start in range(0, n, 1000):
            reports = [
                _report(f"{net}.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", UNKNOWN, 40)
                for i in range(start, min(n, start + 1000))
            ]
            await call.write(pb.SessionRequest(id=start, reports=reports))
            resp = await call.read()
            if resp.HasField("error"):
                raise RuntimeError(resp.error.message)
        await call.done_writing()


# --- child processes (spawned: their own interpreter, their own core share)


def _prober(address: str, seconds: float, out: Any) -> None:
    async def run() -> dict[str, Any]:
        lat: list[float] = []
        degraded = errors = passes = 0
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pbg.PenaltyServiceStub(ch)
            req = pb.CheckRequest(client=pb.Client(ip=PENALIZED))
            await stub.Check(req)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    v = await stub.Check(req, timeout=1.0)
                    lat.append((time.perf_counter() - t0) * 1000)
                    degraded += v.degraded
                    passes += not v.tempfail
                except grpc.aio.AioRpcError:
                    errors += 1
                await asyncio.sleep(0.002)
        return {
            **latency_summary(lat),
            "checks": len(lat),
            "degraded": degraded,
            "errors": errors,
            "wrong": passes,
        }

    out.put(uvloop.run(run()))


def _flooder(address: str, streams: int, seconds: float, out: Any) -> None:
    async def stream(stub: pbg.PenaltyServiceStub, k: int, end: float) -> int:
        msg = pb.SessionRequest(
            reports=[_report(f"172.{16 + k}.{i // 250}.{i % 250}", ACCEPTED) for i in range(1000)]
        )
        call = stub.Session()
        sent = 0
        while time.monotonic() < end:
            msg.id = sent
            await call.write(msg)
            await call.read()
            sent += 1000
        await call.done_writing()
        return sent

    async def run() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pbg.PenaltyServiceStub(ch)
            t0 = time.monotonic()
            end = t0 + seconds
            sent = await asyncio.gather(*(stream(stub, k, end) for k in range(streams)))
            return {"reports": sum(sent), "reports_per_s": sum(sent) / (time.monotonic() - t0)}

    out.put(uvloop.run(run()))


def _stalled_watchers(address: str, n: int, hold: float, ready: Any, out: Any) -> None:
    async def run() -> None:
        channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
            for _ in range(n)
        ]
        calls = [pbg.PenaltyServiceStub(c).WatchPenalties(pb.WatchRequest()) for c in channels]
        for c in calls:
            await c.wait_for_connection()
        ready.put(n)
        await asyncio.sleep(hold)  # never read: that is the attack
        codes: dict[str, int] = {}
        for c in calls:
            c.cancel()
        for ch in channels:
            await ch.close()
        out.put(codes)

    uvloop.run(run())


def _storm(address: str, n: int, out: Any) -> None:
    async def one(stub: pbg.PenaltyServiceStub) -> tuple[float, int]:
        t0 = time.perf_counter()
        got = 0
        call = stub.WatchPenalties(pb.WatchRequest(chunked_snapshot=True))
        async for event in call:
            if event.kind == pb.PenaltyEvent.Kind.KIND_SNAPSHOT_DONE:
                call.cancel()
                return time.perf_counter() - t0, got
            got += len(event.penalties)
        return time.perf_counter() - t0, got

    async def run() -> dict[str, Any]:
        channels = [grpc.aio.insecure_channel(address) for _ in range(n)]
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(pbg.PenaltyServiceStub(c)) for c in channels))
        total = time.perf_counter() - t0
        for c in channels:
            await c.close()
        return {
            "watchers": n,
            "all_snapshots_s": total,
            "slowest_s": max(d for d, _ in done),
            "penalties_each": min(g for _, g in done),
        }

    out.put(uvloop.run(run()))


# --- scenarios


def _spawn(target: Any, *args: Any) -> tuple[Any, Any]:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q), daemon=True)
    p.start()
    return p, q


def _collect(p: multiprocessing.Process, q: Any, timeout: float) -> Any:
    try:
        return q.get(timeout=timeout)
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()


def flood(pd: PenaltydProcess, seconds: float) -> dict[str, Any]:
    uvloop.run(_penalize(pd.address, 0))
    p, q = _spawn(_prober, pd.address, seconds)
    idle = _collect(p, q, seconds + 30)
    pr, qr = _spawn(_prober, pd.address, seconds)
    pf, qf = _spawn(_flooder, pd.address, 8, seconds + 1)
    probed = _collect(pr, qr, seconds + 30)
    flooded = _collect(pf, qf, seconds + 60)
    return {"idle": idle, "flood": probed, "flooder": flooded}


def stalled(pd: PenaltydProcess, penalties: int, watchers: int) -> dict[str, Any]:
    assert pd.proc is not None
    uvloop.run(_penalize(pd.address, penalties))
    time.sleep(1)
    before = rss_mb(pd.proc.pid)
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    hold = 10.0
    p = ctx.Process(
        target=_stalled_watchers, args=(pd.address, watchers, hold, ready, out), daemon=True
    )
    p.start()
    ready.get(timeout=60)
    peak = before
    end = time.monotonic() + hold - 1
    while time.monotonic() < end:
        peak = max(peak, rss_mb(pd.proc.pid))
        time.sleep(0.2)
    out.get(timeout=60)
    p.join(10)
    time.sleep(2)
    return {
        "penalties": penalties,
        "watchers": watchers,
        "rss_before_mb": before,
        "rss_peak_mb": peak,
        "rss_delta_mb": peak - before,
        "rss_after_mb": rss_mb(pd.proc.pid),
    }


def storm(pd: PenaltydProcess, penalties: int, watchers: int) -> dict[str, Any]:
    uvloop.run(_penalize(pd.address, penalties, net=11))
    pr, qr = _spawn(_prober, pd.address, 8.0)
    time.sleep(1)
    ps, qs = _spawn(_storm, pd.address, watchers)
    result: dict[str, Any] = _collect(ps, qs, 120)
    result["checks_meanwhile"] = _collect(pr, qr, 60)
    return result


def run(store: str = "memory", quick: bool = False) -> dict[str, Any]:
    seconds = 3.0 if quick else 10.0
    out: dict[str, Any] = {"store": store}
    scenarios: list[tuple[str, Callable[[PenaltydProcess], dict[str, Any]]]] = [
        ("session_flood", lambda pd: flood(pd, seconds)),
        ("stalled_watchers", lambda pd: stalled(pd, 30_000, 200)),
        ("resubscribe_storm", lambda pd: storm(pd, 65_000, 100)),
    ]
    for name, fn in scenarios:
        if store == "redis":
            with RedisServer() as r, PenaltydProcess("--redis-url", r.url) as pd:
                out[name] = fn(pd)
        else:
            with PenaltydProcess() as pd:
                out[name] = fn(pd)
        print(f"{name}: {json.dumps(out[name])}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    p.add_argument("--store", choices=["memory", "redis"], default="memory")
    p.add_argument("--quick", action="store_true", help="shorter runs")
    args = p.parse_args(argv)
    result = run(args.store, args.quick)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"hostile-{args.store}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    f, s, st = result["session_flood"], result["stalled_watchers"], result["resubscribe_storm"]
    print(f"store: {args.store}")
    print(
        f"check p99 idle {f['idle']['p99_ms']:.2f} ms, under 8-stream flood "
        f"{f['flood']['p99_ms']:.2f} ms (max {f['flood']['max_ms']:.1f} ms; degraded "
        f"{f['flood']['degraded']}, errors {f['flood']['errors']}); flood "
        f"{f['flooder']['reports_per_s']:.0f} reports/s   [target p99 <= 20 ms]"
    )
    print(
        f"200 stalled watchers over {s['penalties']} penalties: RSS {s['rss_before_mb']:.0f}"
        f" -> {s['rss_peak_mb']:.0f} MB (+{s['rss_delta_mb']:.1f} MB)   [target <= +50 MB]"
    )
    print(
        f"{st['watchers']} watchers re-subscribing over 65k penalties: all snapshots in "
        f"{st['all_snapshots_s']:.2f} s; check p99 meanwhile "
        f"{st['checks_meanwhile']['p99_ms']:.2f} ms"
    )
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
