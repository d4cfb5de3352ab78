"""``python -m bench.keyed``: what `identity_key` costs, Check and Report, on Redis.

penaltyd (the real CLI, Redis store) without and with `identity_key`, rounds alternating,
the same h2load load on each (4 connections x 16 streams): unary Check of a client that
is not penalized and of one that is, unary Report of an accepted message, and a Report
with a HELO name and sender (the fingerprint path: a keyed fingerprint and a sealed
address as well). The figure is penaltyd's CPU per call, from /proc (the load generator
shares the two cores, so calls/s moves with it more than CPU per call does); the ratio
keyed / plain is the cost. h2load repeats one request, so every token here comes from
the cache: the cost of an address seen for the first time is measured apart, in
process (`cold_us`), and paid once per address per 131,072 others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import timeit
from pathlib import Path
from statistics import median
from typing import Any

import redis as redis_py

from bench import h2load
from bench.cpu import CpuMeter
from bench.fleet import ip, used_memory
from bench.workers import PENALIZED, penalize
from penalty.v1 import penalty_pb2 as pb
from penaltyd.engine import Engine
from penaltyd.keying import Keying
from penaltyd.metrics import Metrics
from penaltyd.settings import Settings
from penaltyd.store.base import ReportItem
from penaltyd.store.memory import MemoryStore
from penaltyd.store.redis import RedisStore
from penaltyd.validation import Validator
from tests.harness.processes import PenaltydProcess
from tests.harness.redis import RedisServer

RESULTS = Path(__file__).parent / "results"
SHAPE = h2load.Shape(4, 16)
KEY = "bench-identity-key-0123456789abcdefghijkl"
TARGET = 1.10  # the bound: keyed within 10 % of plain


def _frames() -> dict[str, tuple[str, bytes]]:
    def accepted(c: pb.Client) -> bytes:
        return pb.ReportRequest(
            client=c, counts=[pb.OutcomeCount(outcome=pb.OUTCOME_ACCEPTED, n=1)]
        ).SerializeToString()

    return {
        "Check (pass)": (
            "Check",
            pb.CheckRequest(client=pb.Client(ip="198.51.100.10")).SerializeToString(),
        ),
        "Check (penalized)": (
            "Check",
            pb.CheckRequest(client=pb.Client(ip=PENALIZED)).SerializeToString(),
        ),
        "Report": ("Report", accepted(pb.Client(ip="198.51.100.20"))),
        "Report (helo, sender)": (
            "Report",
            accepted(
                pb.Client(ip="198.51.100.21", helo="mail.example.net", mail_from="a@example.net")
            ),
        ),
    }


def one(redis: RedisServer, keyed: bool, seconds: float, workdir: Path) -> dict[str, Any]:
    env = {"PENALTYD_IDENTITY_KEY": KEY} if keyed else {}
    out: dict[str, Any] = {}
    redis_py.Redis.from_url(redis.url).flushall()
    with PenaltydProcess("--redis-url", redis.url, env=env) as pd:
        assert pd.proc is not None
        penalize(pd.address)
        for name, (method, body) in _frames().items():
            meter = CpuMeter({"penaltyd": pd.proc.pid})
            before = meter.sample()
            run = h2load.run(
                f"http://{pd.address}/penalty.v1.PenaltyService/{method}",
                h2load.grpc_frame(body),
                SHAPE,
                duration_s=seconds,
                warmup_s=1.0,
                workdir=workdir,
            )
            cores = meter.since(before).get("penaltyd_cores", 0.0)
            out[name] = {
                "req_per_s": run.req_per_s,
                "p99_ms": run.summary()["p99_ms"],
                "cpu_us_per_call": cores * 1e6 / run.req_per_s if run.req_per_s else 0.0,
                "failed": run.failed + run.errored,
            }
    return out


def cold_us() -> float:
    """µs a first-seen address costs with a key: its token, fingerprint token and seal."""
    keying = Keying(KEY.encode())
    n = 20_000
    ips = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]
    it = iter(ips)

    def first_seen() -> None:
        ip = next(it)
        keying.store_identity(ip)
        keying.store_fingerprint(ip[::-1])
        keying.label(ip)

    return timeit.timeit(first_seen, number=n) / n * 1e6


ENGINE_CALLS = 20_000


async def _engine_round(keyed: bool) -> dict[str, float]:
    """CPU µs per engine call, in process on the embedded store (no gRPC, no load
    generator): what keying adds to the code it changes, with less noise than the
    whole server shares with h2load on two cores."""
    settings = Settings(identity_key=KEY if keyed else "", stats_flush_seconds=300)
    eng = Engine(settings, MemoryStore(), Metrics())
    v = Validator(settings)
    passing = v.client(pb.Client(ip="198.51.100.10"), "client")
    penalized = v.client(pb.Client(ip=PENALIZED), "client")
    reporting = v.client(pb.Client(ip="198.51.100.20"), "client")
    fingerprinted = v.client(
        pb.Client(ip="198.51.100.21", helo="mail.example.net", mail_from="a@example.net"),
        "client",
    )
    for _ in range(40):
        await eng.report_many([(penalized, [(pb.OUTCOME_UNKNOWN_RECIPIENT, 1)])])
    accepted = [(pb.OUTCOME_ACCEPTED, 1)]
    out: dict[str, float] = {}
    for name, call in (
        ("Check (pass)", lambda: eng.check(passing)),
        ("Check (penalized)", lambda: eng.check(penalized)),
        ("Report", lambda: eng.report_many([(reporting, accepted)])),
        ("Report (helo, sender)", lambda: eng.report_many([(fingerprinted, accepted)])),
    ):
        start = time.process_time()
        for _ in range(ENGINE_CALLS):
            await call()
        out[name] = (time.process_time() - start) / ENGINE_CALLS * 1e6
    return out


def engine_costs(rounds: int) -> dict[str, dict[str, float]]:
    """Median engine CPU per call, plain and keyed, over interleaved rounds."""
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "keyed": []}
    for _ in range(rounds):
        for mode in ("plain", "keyed"):
            runs[mode].append(asyncio.run(_engine_round(mode == "keyed")))
    return {
        name: {
            "plain_us": median([r[name] for r in runs["plain"]]),
            "keyed_us": median([r[name] for r in runs["keyed"]]),
        }
        for name in runs["plain"][0]
    }


MEMORY_IDENTITIES = 20_000


async def _fill(url: str, keying: Keying, fingerprint: bool) -> None:
    """One report (two outcomes) for each of MEMORY_IDENTITIES addresses, as the engine
    names them in the store: keyed tokens with a key, addresses without."""
    store = RedisStore(url, use_view=False)
    counts = [(pb.OUTCOME_ACCEPTED, 3), (pb.OUTCOME_UNKNOWN_RECIPIENT, 1)]
    fp = keying.store_fingerprint("ab12cd34ef") if fingerprint else ""
    try:
        for start in range(0, MEMORY_IDENTITIES, 1000):
            stop = min(MEMORY_IDENTITIES, start + 1000)
            items = [
                ReportItem(keying.store_identity(ip(i)), counts, fp) for i in range(start, stop)
            ]
            await store.record(items)
    finally:
        await store.close()


def memory() -> dict[str, float]:
    """Redis bytes per tracked identity (and with a client fingerprint), plain vs keyed:
    a token is 23 characters where an IPv4 address is 7 to 15."""
    out: dict[str, float] = {}
    for mode in ("plain", "keyed"):
        keying = Keying(KEY.encode() if mode == "keyed" else None)
        for fingerprint in (False, True):
            with RedisServer() as r:
                before = used_memory(r.port)
                asyncio.run(_fill(r.url, keying, fingerprint))
                name = f"{mode}{'_fingerprint' if fingerprint else ''}"
                out[name] = (used_memory(r.port) - before) / MEMORY_IDENTITIES
    return out


def run(rounds: int = 3, seconds: float = 4.0) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "keyed": []}
    with RedisServer() as redis, tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for mode in ("plain", "keyed"):
                runs[mode].append(one(redis, mode == "keyed", seconds, Path(tmp)))
    summary: dict[str, Any] = {}
    for name in _frames():
        plain = median([r[name]["cpu_us_per_call"] for r in runs["plain"]])
        keyed = median([r[name]["cpu_us_per_call"] for r in runs["keyed"]])
        summary[name] = {
            "plain_cpu_us": plain,
            "keyed_cpu_us": keyed,
            "ratio": keyed / plain if plain else float("nan"),
            "plain_req_per_s": median([r[name]["req_per_s"] for r in runs["plain"]]),
            "keyed_req_per_s": median([r[name]["req_per_s"] for r in runs["keyed"]]),
            "failed": sum(r[name]["failed"] for rs in runs.values() for r in rs),
        }
    engine = engine_costs(max(rounds, 5))
    return {
        "runs": runs,
        "summary": summary,
        "cold_us": cold_us(),
        "engine": engine,
        "memory": memory(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.keyed", description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args(argv)
    result = run(args.rounds, args.seconds)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"keyed-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print("identity_key: penaltyd CPU per call, plain vs keyed (median of rounds)")
    worst = 0.0
    mem = result["memory"]
    print(
        f"Redis bytes per tracked identity: plain {mem['plain']:.0f}, keyed {mem['keyed']:.0f}; "
        f"with a client fingerprint: plain {mem['plain_fingerprint']:.0f}, "
        f"keyed {mem['keyed_fingerprint']:.0f}"
    )
    for name, s in result["summary"].items():
        worst = max(worst, s["ratio"])
        print(
            f"  {name:22} plain {s['plain_cpu_us']:6.1f} us  keyed {s['keyed_cpu_us']:6.1f} us"
            f"  ratio {s['ratio']:.2f}x   ({s['plain_req_per_s']:.0f} / "
            f"{s['keyed_req_per_s']:.0f} req/s, {s['failed']} failed)"
        )
    print(f"  first-seen address with a key: +{result['cold_us']:.1f} us (once per address)")
    print("in process, the engine alone on the embedded store (CPU per call, median):")
    for name, e in result["engine"].items():
        print(
            f"  {name:22} plain {e['plain_us']:6.1f} us  keyed {e['keyed_us']:6.1f} us"
            f"  +{e['keyed_us'] - e['plain_us']:5.1f} us"
        )
    verdict = "within" if worst <= TARGET else "OVER"
    print(f"  worst ratio {worst:.2f}x: {verdict} the {TARGET:.2f}x target")
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
