"""The floor: what a bare redis-py asyncio client gets from the same Redis.

Every penaltyd figure that involves Redis is shown beside what the client library alone
achieves against the same redis-server in the same run, so the table separates "Redis is
slow" (never, DESIGN.md s. 12a) from "our Python around it is slow". The client is set up
as penaltyd's is: hiredis parser, ``socket_timeout=None`` (the default wraps every read
in ``wait_for`` and halves throughput), uvloop.

Measured:

- GET at 1 in flight: one bare round trip (p50/p99/ops/s);
- EVALSHA of a trivial script (``return 1``) at 1 in flight: the cost of the scripting
  path itself;
- EVALSHA of a window update at 1 in flight: `WINDOW`, the work of penaltyd's
  ``record.lua`` for one ACCEPTED outcome (increment, expiry, read back, penalty TTL), on
  keys of its own prefix so penaltyd's data is untouched. A copy, not penaltyd's file:
  the floor must not break (or silently change meaning) when the service's script and
  its arguments evolve; if record.lua grows, this floor becomes an underestimate;
- GET and trivial EVALSHA at 64 concurrent (one connection each): Redis's throughput
  when nobody batches;
- a pipeline of 100 `WINDOW` EVALSHAs on distinct keys: what one Session message of
  100 reports costs at least.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from bench.cpu import CpuMeter
from bench.stats import Result, latency_summary

TRIVIAL = "return 1"
WINDOW = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bucket_ms = tonumber(ARGV[1])
local bucket = math.floor(now_ms / bucket_ms)
redis.call('HINCRBY', KEYS[1], bucket * 16 + tonumber(ARGV[3]), ARGV[4])
redis.call('PEXPIREAT', KEYS[1], (bucket + 1 + tonumber(ARGV[2])) * bucket_ms)
local all = redis.call('HGETALL', KEYS[1])
local totals = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
for i = 1, #all, 2 do
  local o = tonumber(all[i]) % 16 + 1
  totals[o] = totals[o] + tonumber(all[i + 1])
end
local out = {redis.call('PTTL', KEYS[2]), false, now_ms}
for i = 1, 16 do out[#out + 1] = totals[i] end
return out
"""
KEY_PREFIX = "bench-floor"
BUCKET_MS = 60_000  # penaltyd's defaults: 60 s buckets, 10 per window
NBUCKETS = 10
OUTCOME_ACCEPTED = 1


async def _timed_loop(
    op: Callable[[int], Awaitable[object]], workers: int, duration_s: float, warmup_s: float
) -> tuple[int, int, list[float]]:
    """Run `op` back to back in `workers` tasks: (measured ops, all ops, latencies in ms)."""
    start = time.perf_counter() + warmup_s
    end = start + duration_s
    latencies: list[float] = []
    done = 0
    total = 0

    async def worker(w: int) -> None:
        nonlocal done, total
        i = w
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            await op(i)
            t1 = time.perf_counter()
            i += workers
            total += 1
            if t0 >= start:
                latencies.append((t1 - t0) * 1000)
                done += 1

    async with asyncio.timeout(warmup_s + duration_s + 30):
        await asyncio.gather(*(worker(w) for w in range(workers)))
    return done, total, latencies


def _result(
    scenario: str,
    label: str,
    concurrency: int,
    ops: int,
    per_op: int,
    latencies: list[float],
    seconds: float,
) -> Result:
    return Result(
        key=f"redis/{scenario}",
        server="redis",
        scenario=scenario,
        label=label,
        concurrency=concurrency,
        shape="redis-py asyncio, hiredis, socket_timeout=None",
        unit="ops/s",
        rate=ops * per_op / seconds,
        count=ops * per_op,
        duration_s=seconds,
        **latency_summary(latencies),
    )


async def measure(
    url: str, duration_s: float, warmup_s: float, meter: CpuMeter | None = None
) -> list[Result]:
    """All floors, one after the other, on a client configured as penaltyd's.

    With a `meter`, each also records Redis's own CPU per operation.
    """
    client = aioredis.Redis.from_url(
        url, socket_timeout=None, health_check_interval=0, max_connections=128
    )
    trivial_sha = hashlib.sha1(TRIVIAL.encode()).hexdigest()
    window_sha = hashlib.sha1(WINDOW.encode()).hexdigest()
    results: list[Result] = []
    try:
        await client.script_load(TRIVIAL)
        await client.script_load(WINDOW)
        await client.set(f"{KEY_PREFIX}:get", b"x" * 16)

        async def get(i: int) -> object:
            return await client.get(f"{KEY_PREFIX}:get")

        async def trivial(i: int) -> object:
            return await client.evalsha(trivial_sha, 0)

        def window_keys(i: int) -> tuple[str, str]:
            ident = f"198.19.{(i >> 8) & 255}.{i & 255}"
            return f"{KEY_PREFIX}:{{{ident}}}:w", f"{KEY_PREFIX}:{{{ident}}}:p"

        async def window(i: int) -> object:
            return await client.evalsha(
                window_sha, 2, *window_keys(i), BUCKET_MS, NBUCKETS, OUTCOME_ACCEPTED, 1
            )

        async def pipeline100(i: int) -> object:
            pipe = client.pipeline(transaction=False)
            for k in range(i * 100, i * 100 + 100):
                pipe.evalsha(
                    window_sha, 2, *window_keys(k), BUCKET_MS, NBUCKETS, OUTCOME_ACCEPTED, 1
                )
            return await pipe.execute()

        plan: list[tuple[str, str, Callable[[int], Awaitable[object]], int, int]] = [
            ("get-c1", "GET", get, 1, 1),
            ("evalsha-c1", "EVALSHA return 1", trivial, 1, 1),
            ("window-c1", "EVALSHA window update", window, 1, 1),
            ("get-c64", "GET", get, 64, 1),
            ("evalsha-c64", "EVALSHA return 1", trivial, 64, 1),
            ("pipeline100", "pipeline of 100 window updates", pipeline100, 1, 100),
        ]
        for scenario, label, op, workers, per_op in plan:
            before = meter.sample() if meter else None
            ops, total, lat = await _timed_loop(op, workers, duration_s, warmup_s)
            result = _result(scenario, label, workers, ops, per_op, lat, duration_s)
            if meter and before:
                cpu = meter.since(before)
                redis_s = cpu.get("redis_cores", 0.0) * cpu.get("wall_s", 0.0)
                result.extra["cpu"] = cpu
                result.extra["server_cpu_us_per_call"] = redis_s * 1e6 / (total * per_op)
                result.extra["foreign_share"] = cpu.get("foreign_share", 0.0)
            results.append(result)
    finally:
        keys = [k async for k in client.scan_iter(match=f"{KEY_PREFIX}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
        await client.aclose()
    return results
