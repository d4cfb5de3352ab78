"""``python -m bench.fleet``: what the fleet costs in Redis, at scale (issue 6).

1. **Memory** on a fresh redis-server (INFO used_memory before/after, default window):
   per tracked identity (one report of two outcomes; with and without a client
   fingerprint, which adds its HyperLogLog) and per active penalty (what starting one
   adds to an identity already tracked: its fields in the window hash and its index
   entry). Targets: under 400 bytes per identity, under 200 per penalty.
2. **One million active penalties** in one Redis, loaded with `redis-cli --pipe` in the
   store's own key scheme, then a penaltyd started on it: time to its first complete
   snapshot, `Stats` latency (target under 10 ms), `ListPenalties` paging through all of
   them (pages/s), and unary `Check` latency alone vs while paging.
3. **Single node vs a 3-master Cluster**: penaltyd on each, Session reports (outcomes/s)
   and Session checks (checks/s), with `bench.session_load` as the client.

Loopback only; everything started is stopped; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import redis
import uvloop

from bench.stats import latency_summary
from penalty.v1 import penalty_pb2 as pb
from penaltyclient import AsyncPenaltyClient
from penaltyd.store.base import ReportItem
from penaltyd.store.redis import RedisStore
from tests.harness.processes import PenaltydProcess
from tests.harness.redis import RedisClusterServers, RedisServer

RESULTS = Path(__file__).parent / "results"
SHARDS = 16  # penaltyd's default index_shards
REASON = "significance;20;20;0.690;0.500;2=20"


def used_memory(port: int) -> int:
    r = redis.Redis(port=port)
    try:
        return int(r.info("memory")["used_memory"])
    finally:
        r.close()


def ip(i: int) -> str:
    return f"198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


async def _fill_identities(url: str, n: int, fingerprint: bool) -> None:
    store = RedisStore(url, use_view=False)
    try:
        for start in range(0, n, 1000):
            counts = [(pb.OUTCOME_ACCEPTED, 3), (pb.OUTCOME_UNKNOWN_RECIPIENT, 1)]
            fp = "ab12cd34ef" if fingerprint else ""
            items = [ReportItem(ip(i), counts, fp) for i in range(start, min(n, start + 1000))]
            await store.record(items)
    finally:
        await store.close()


async def _fill_penalties(url: str, n: int) -> None:
    store = RedisStore(url, use_view=False)
    try:
        for start in range(0, n, 1000):
            await store.start_penalties(
                [(ip(i), 600_000, REASON) for i in range(start, min(n, start + 1000))]
            )
    finally:
        await store.close()


def memory(n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n}
    for name in ("identity", "identity_with_fingerprint", "penalty"):
        with RedisServer() as r:
            if name == "penalty":
                # A penalty exists because its identity's window fired: what it costs is
                # what it adds to an identity already tracked.
                uvloop.run(_fill_identities(r.url, n, False))
                before = used_memory(r.port)
                uvloop.run(_fill_penalties(r.url, n))
            else:
                before = used_memory(r.port)
                uvloop.run(_fill_identities(r.url, n, name.endswith("fingerprint")))
            out[f"bytes_per_{name}"] = (used_memory(r.port) - before) / n
    return out


def _resp(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def load_million(port: int, n: int) -> float:
    """Penalties in the store's key scheme, via redis-cli --pipe (fast, C); seconds taken."""
    r = redis.Redis(port=port)
    sec, usec = r.time()
    r.close()
    now = sec * 1000 + usec // 1000
    t0 = time.perf_counter()
    proto = bytearray()
    latest: dict[int, int] = {}
    for i in range(n):
        identity = ip(i)
        ttl = 1_800_000 + (i % 600_000)  # 30-40 minutes, spread like real traffic
        expires = now + ttl
        shard = zlib.crc32(identity.encode()) % SHARDS
        latest[shard] = max(latest.get(shard, 0), expires)
        key = f"pd:{{{identity}}}:w"  # a penalty is two fields of its identity's window hash
        proto += _resp("HSET", key, "p", REASON, "x", str(expires))
        proto += _resp("PEXPIREAT", key, str(expires))
        proto += _resp("ZADD", f"pd:{{idx{shard}}}:active", str(expires), identity)
    for shard, expires in latest.items():
        proto += _resp("PEXPIREAT", f"pd:{{idx{shard}}}:active", str(expires + 1000))
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "--pipe"],
        input=bytes(proto),
        capture_output=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-300:]
    assert b"errors: 0" in out.stdout, out.stdout[-300:]
    return time.perf_counter() - t0


async def _timed(coro_factory: Any, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        await coro_factory()
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


async def at_scale(address: str, n: int, pages_limit: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with AsyncPenaltyClient(address, deadline=2, admin_deadline=30) as client:
        stats = await client.stats()
        assert stats.active_penalties >= n * 0.99, stats
        out["stats_ms"] = latency_summary(await _timed(client.stats, 100))
        check = pb.CheckRequest(client=pb.Client(ip="203.0.113.250"))
        out["check_idle_ms"] = latency_summary(
            await _timed(lambda: client.service.Check(check), 500)
        )
        during: list[float] = []
        stop = asyncio.Event()

        async def probe() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                await client.service.Check(check)
                during.append((time.perf_counter() - t0) * 1000)
                await asyncio.sleep(0.002)

        prober = asyncio.create_task(probe())
        page_ms: list[float] = []
        rows = 0
        token = ""
        t_all = time.perf_counter()
        for _ in range(pages_limit):
            t0 = time.perf_counter()
            page = await client.admin.ListPenalties(
                pb.ListPenaltiesRequest(page_size=1000, page_token=token), timeout=30
            )
            page_ms.append((time.perf_counter() - t0) * 1000)
            rows += len(page.penalties)
            token = page.next_page_token
            if not token:
                break
        elapsed = time.perf_counter() - t_all
        stop.set()
        await prober
        out["list_pages"] = len(page_ms)
        out["list_rows"] = rows
        out["list_rows_per_s"] = rows / elapsed
        out["list_page_ms"] = latency_summary(page_ms)
        out["check_while_paging_ms"] = latency_summary(during)
    return out


def session_load(address: str, kind: str, seconds: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.session_load", "--target", address, "--kind", kind]
    cmd += ["--duration", str(seconds), "--streams", "2", "--depth", "4", "--batch", "100"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    assert out.returncode == 0, out.stderr[-500:]
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def topologies(seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with RedisServer() as single, PenaltydProcess("--redis-url", single.url) as pd:
        time.sleep(1)
        out["single"] = {k: session_load(pd.address, k, seconds) for k in ("report", "check")}
    with RedisClusterServers() as cluster, PenaltydProcess("--redis-url", cluster.url) as pd:
        time.sleep(1)
        out["cluster"] = {k: session_load(pd.address, k, seconds) for k in ("report", "check")}
    return out


def main(argv: list[str] | None = None) -> int:
    summary = (__doc__ or "").split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=summary)
    p.add_argument("--quick", action="store_true", help="smaller figures (smoke test)")
    p.add_argument("--only", default="memory,scale,topologies", help="comma-separated parts")
    p.add_argument("--json", type=Path, default=RESULTS / "fleet-latest.json")
    args = p.parse_args(argv)
    parts = set(args.only.split(","))
    n_mem, n_scale, seconds = (20_000, 100_000, 3.0) if args.quick else (100_000, 1_000_000, 8.0)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "memory" in parts:
        print(f"memory per identity / penalty ({n_mem:,} each) ...", flush=True)
        out["memory"] = memory(n_mem)
    if "scale" in parts:
        print(f"{n_scale:,} active penalties ...", flush=True)
        with RedisServer() as r:
            out["load_seconds"] = load_million(r.port, n_scale)
            out["redis_used_memory_mb"] = used_memory(r.port) / 2**20
            t0 = time.perf_counter()
            with PenaltydProcess("--redis-url", r.url) as pd:
                deadline = time.time() + 300
                while '"feed_synced"' not in pd.output() and time.time() < deadline:
                    time.sleep(0.1)
                out["snapshot_seconds"] = time.perf_counter() - t0
                out["scale"] = uvloop.run(
                    at_scale(pd.address, n_scale, pages_limit=n_scale // 1000 + 1)
                )
    if "topologies" in parts:
        print("single node vs 3-master cluster ...", flush=True)
        out["topologies"] = topologies(seconds)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2)[:4000])
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
