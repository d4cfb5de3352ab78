"""``python -m bench.reputation``: what reputation (issue 15) costs, in Redis and in CPU.

- *Memory*: Redis bytes per tracked identity with its reputation (the window and the
  `{A}:r` hash one report leaves), the reputation hash alone, and per tracked
  neighbourhood (its `{nb:N}:r` hash and its entry in the worst-neighbourhoods index),
  plain and with `identity_key` (tokens are longer than addresses). Target: under 400
  bytes per identity.
- *CPU*: the engine's CPU per Check and per Report, in process (no gRPC, no load
  generator: less noise on two shared cores), on the embedded store and on a real Redis,
  for this tree and for the commit before reputation (`--before`, default the parent of
  the commit that added it), extracted with `git archive` into a temporary directory
  and run in a child process with that tree first on `sys.path`. Rounds alternate; the
  figure is the median. Target: within 15 % of before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
BEFORE = "34bd94d~1"  # the tree before reputation (issue 15, part 1)
IDENTITIES = 20_000
NEIGHBOURHOODS = 5_000
CALLS = 4000
KEY = "bench-identity-key-0123456789abcdefghijkl"
TARGET_BYTES = 400
TARGET_RATIO = 1.15


# --- memory


def memory() -> dict[str, float]:
    from bench.fleet import ip, used_memory
    from tests.harness.redis import RedisServer

    out: dict[str, float] = {}
    for mode in ("plain", "keyed"):
        with RedisServer() as r:
            base = used_memory(r.port)
            asyncio.run(_fill(r.url, mode == "keyed", ip))
            filled = used_memory(r.port)
            out[f"{mode}_identity_with_reputation"] = (filled - base) / IDENTITIES
            asyncio.run(_drop(r.url, ":w"))
            out[f"{mode}_reputation_alone"] = (used_memory(r.port) - base) / IDENTITIES
        with RedisServer() as r:
            base = used_memory(r.port)
            asyncio.run(_fill_neighbourhoods(r.url, mode == "keyed"))
            out[f"{mode}_neighbourhood"] = (used_memory(r.port) - base) / NEIGHBOURHOODS
    return out


async def _fill(url: str, keyed: bool, ip: Any) -> None:
    from penalty.v1 import penalty_pb2 as pb
    from penaltyd.keying import Keying
    from penaltyd.store.base import ReportItem
    from penaltyd.store.redis import RedisStore

    keying = Keying(KEY.encode() if keyed else None)
    store = RedisStore(url, use_view=False)
    counts = [(pb.OUTCOME_ACCEPTED, 3), (pb.OUTCOME_UNKNOWN_RECIPIENT, 1)]
    try:
        for start in range(0, IDENTITIES, 1000):
            items = [
                ReportItem(keying.store_identity(ip(i)), counts, weighted=1.0)
                for i in range(start, min(IDENTITIES, start + 1000))
            ]
            await store.record(items)
    finally:
        await store.close()


async def _drop(url: str, suffix: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    try:
        batch = [k async for k in r.scan_iter(match=f"*{suffix}", count=1000)]
        for start in range(0, len(batch), 1000):
            await r.delete(*batch[start : start + 1000])
    finally:
        await r.aclose()


async def _fill_neighbourhoods(url: str, keyed: bool) -> None:
    from penaltyd.keying import Keying
    from penaltyd.store.base import NeighbourhoodDelta
    from penaltyd.store.redis import RedisStore

    keying = Keying(KEY.encode() if keyed else None)
    # Every neighbourhood indexed (worst_keep large enough), the worst case.
    store = RedisStore(url, use_view=False, worst_keep=NEIGHBOURHOODS)
    try:
        for start in range(0, NEIGHBOURHOODS, 1000):
            deltas = []
            for i in range(start, min(NEIGHBOURHOODS, start + 1000)):
                net = f"10.{i >> 8}.{i & 255}.0/24"
                label = keying.label(net) if keyed else net
                deltas.append(NeighbourhoodDelta(keying.neighbourhood_name(net), label, 5, 2.0, 0))
            await store.flush_neighbourhoods(deltas)
    finally:
        await store.close()


# --- CPU (runs in a child process: this tree's code or the tree before)


async def _measure(eng: Any, v: Any, calls: int) -> dict[str, float]:
    """CPU µs per engine Check (of a client not penalized) and Report (one accepted RCPT
    from one of 256 addresses in one /24)."""
    from penalty.v1 import penalty_pb2 as pb

    passing = v.client(pb.Client(ip="198.51.100.10"), "client")
    reporting = [v.client(pb.Client(ip=f"198.51.100.{i}"), "client") for i in range(256)]
    accepted = [(pb.OUTCOME_ACCEPTED, 1)]

    async def check(n: int) -> object:
        return await eng.check(passing)

    async def report(n: int) -> object:
        return await eng.report_many([(reporting[n & 255], accepted)])

    out = {}
    for name, call in (("Check", check), ("Report", report)):
        for n in range(50):  # warm caches and scripts
            await call(n)
        start = time.process_time()
        for n in range(calls):
            await call(n)
        out[name] = (time.process_time() - start) / calls * 1e6
    return out


async def _engine_round(url: str) -> dict[str, float]:
    from penaltyd.engine import Engine
    from penaltyd.metrics import Metrics
    from penaltyd.settings import Settings
    from penaltyd.store.memory import MemoryStore
    from penaltyd.store.redis import RedisStore
    from penaltyd.validation import Validator

    settings = Settings(stats_flush_seconds=300)
    v = Validator(settings)
    out: dict[str, float] = {}
    for kind in ("memory", "redis"):
        store: Any = MemoryStore() if kind == "memory" else RedisStore(url, use_view=False)
        eng = Engine(settings, store, Metrics())
        if kind == "redis":
            await store.ping()
        calls = CALLS if kind == "memory" else CALLS // 4
        for name, us in (await _measure(eng, v, calls)).items():
            out[f"{kind} {name}"] = us
        if kind == "redis":
            await store.close()
    return out


def _child(url: str) -> None:
    print(json.dumps(asyncio.run(_engine_round(url))))


def _run_child(tree: Path | None, url: str) -> dict[str, float]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(tree / "services"), str(tree / "proto"), str(ROOT)]
        )
    else:
        env["PYTHONPATH"] = str(ROOT)
    code = "import sys; from bench.reputation import _child; _child(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", code, url], env=env, check=True, capture_output=True, text=True
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def cpu(rounds: int, before: str) -> dict[str, dict[str, float]]:
    from tests.harness.redis import RedisServer

    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as r:
        tree = Path(tmp)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", before, "services", "proto"],
            check=True,
            capture_output=True,
        )
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        for _ in range(rounds):
            runs["before"].append(_run_child(tree, r.url))
            runs["after"].append(_run_child(None, r.url))
    out = {}
    for name in runs["after"][0]:
        b = sorted(x[name] for x in runs["before"])[len(runs["before"]) // 2]
        a = sorted(x[name] for x in runs["after"])[len(runs["after"]) // 2]
        out[name] = {"before_us": b, "after_us": a, "ratio": a / b if b else float("nan")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reputation", description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--before", default=BEFORE, help="the commit to compare CPU with")
    args = p.parse_args(argv)
    mem = memory()
    costs = cpu(args.rounds, args.before)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"reputation-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"memory_bytes": mem, "cpu": costs}, indent=2) + "\n")
    print("reputation: Redis bytes (used_memory delta)")
    for name, value in mem.items():
        print(f"  {name:34s} {value:8.1f}")
    worst = max(mem["plain_identity_with_reputation"], mem["keyed_identity_with_reputation"])
    print(f"  [{'met' if worst < TARGET_BYTES else 'MISSED'}] per identity < {TARGET_BYTES}")
    print(f"reputation: engine CPU per call, before ({args.before}) vs now (median of rounds)")
    ok = True
    for name, c in costs.items():
        ok &= c["ratio"] <= TARGET_RATIO
        print(f"  {name:16s} {c['before_us']:8.1f} us  {c['after_us']:8.1f} us  x{c['ratio']:.3f}")
    print(f"  [{'met' if ok else 'MISSED'}] within {TARGET_RATIO - 1:.0%} of before")
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
