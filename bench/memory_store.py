"""The embedded store under hostile load: memory per identity, sweep stalls, paging.

    python -m bench.memory_store                      # this tree vs git HEAD, 1M identities
    python -m bench.memory_store --identities 200000 --penalties 50000 --no-baseline
    python -m bench.memory_store --impl HEAD --json   # one implementation, JSON on stdout

What it measures, each in a fresh process (RSS is per process):

- RSS per identity: `identities` distinct clients (half IPv4, half IPv6 /64), each
  reported once through `record` as the engine does (batches of 500, a fingerprint per
  client, accepted + unknown-recipient counts: one bucket of counts), RSS delta / count.
- The longest event-loop stall while the sweep drops all of them: a ticker task asks to
  wake every 1 ms and records the largest gap between wake-ups.
- Paging `penalties` active penalties (10 % escalated, longer) in pages of 1,000, and
  the p99 latency of checks meanwhile: a task that wants to run a check (allowlist +
  `local_penalty` for the address and its client, the engine's check path) every 1 ms,
  measured from when it wanted to run to when the check was answered.

The clock is injected, so expiry is a jump rather than a wait. Start-up objects are
frozen out of the garbage collector first, as `penaltyd.server` does, so the full-GC
figure is what the store's own objects cost every full collection. The "before" column
is `services/penaltyd/store/memory.py` as of a git ref, loaded from `git show`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from penalty.identity import parse_ip
from penaltyd.store.base import ReportItem
from penaltyd.store.memory import MemoryStore
from serving.cli import tune_gc

ACCEPTED, UNKNOWN = 1, 2
START_MS = 1_800_000_000_000
ROOT = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def identity(i: int) -> str:
    if i % 2:
        return f"2001:db8:{i >> 16 & 0xFFFF:x}:{i & 0xFFFF:x}::/64"
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def load_store_class(impl: str) -> Any:
    """MemoryStore from this tree ("worktree") or from a git ref."""
    if impl == "worktree":
        return MemoryStore
    source = subprocess.run(
        ["git", "show", f"{impl}:services/penaltyd/store/memory.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "memory_at_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("penaltyd.store._memory_at_ref", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.MemoryStore


class Ticker:
    """Wakes every `period` s; `max_gap` is the longest wall time between two wake-ups,
    `max_cpu` the most CPU this thread used in one gap (the stall without preemption by
    other processes, which a loaded 2-core machine adds to wall time)."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.max_gap = 0.0
        self.max_cpu = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last, last_cpu = time.perf_counter(), time.thread_time()
        while True:
            await asyncio.sleep(self.period)
            now, cpu = time.perf_counter(), time.thread_time()
            self.max_gap = max(self.max_gap, now - last)
            self.max_cpu = max(self.max_cpu, cpu - last_cpu)
            last, last_cpu = now, cpu

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.005)
        self.max_gap = self.max_cpu = 0.0
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await asyncio.sleep(3 * self.period)  # one more wake-up: it measures the last gap
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _sweep(store: Any) -> None:
    incremental = getattr(store, "sweep_incrementally", None)
    if incremental is not None:
        await incremental()
    else:
        await asyncio.sleep(0)
        store.sweep()


async def _checks(store: Any, ids: list[str], stop: asyncio.Event, lat: list[float]) -> None:
    """Checks arrive every 1 ms; each is answered at the first wake-up after it arrived
    (all overdue ones at once, as a server answers the requests queued behind a stall);
    latency is from arrival to answer."""
    period = 0.001
    arrival = time.perf_counter()
    addr = parse_ip("192.0.2.1")
    k = 0
    while not stop.is_set():
        now = time.perf_counter()
        if now < arrival:
            await asyncio.sleep(arrival - now)
            continue
        while arrival <= time.perf_counter():
            ident = ids[k % len(ids)]
            k += 1
            store.allowed(addr)
            _, penalty = store.local_penalty(ident)
            if penalty is None:
                store.local_penalty(ident + "#00c0ffee00")
            lat.append(time.perf_counter() - arrival)
            arrival += period
        await asyncio.sleep(0)


async def run_async(
    identities: int = 1_000_000,
    penalties: int = 100_000,
    impl: str = "worktree",
    max_identities: int | None = None,
) -> dict[str, float]:
    cls = load_store_class(impl)
    now = [START_MS]
    bounds = {} if max_identities is None else {"max_identities": max_identities}
    store = cls(clock=lambda: now[0], **bounds)
    out: dict[str, float] = {"identities": identities, "penalties": penalties}

    # --- RSS per identity
    # As penaltyd does after start-up (`serving.cli.tune_gc`): start-up objects frozen and
    # the young generations collected less often. With CPython's default thresholds
    # instead, a collection over the 100,000 penalties made while paging stalled one page
    # call for 15-18 ms (check p99 10-16 ms); penaltyd itself never runs with those.
    tune_gc()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    batch = 500
    counts = [(ACCEPTED, 3), (UNKNOWN, 1)]
    for start in range(0, identities, batch):
        items = [
            ReportItem(identity(i), counts, f"{i * 2654435761 % (1 << 40):010x}")
            for i in range(start, min(start + batch, identities))
        ]
        await store.record(items)
    out["record_s"] = time.perf_counter() - t0
    out["reports_per_s"] = identities / out["record_s"]
    gc.collect()
    t0 = time.perf_counter()
    gc.collect()  # a full collection: what the garbage collector's pauses cost now
    out["full_gc_ms"] = (time.perf_counter() - t0) * 1000
    rss1 = rss_bytes()
    out["rss_mb"] = rss1 / 2**20
    out["rss_per_identity_b"] = (rss1 - rss0) / identities
    if hasattr(store, "evicted"):
        out["evicted"] = store.evicted
        out["held"] = store.tracked_windows
        out["rss_per_held_b"] = (rss1 - rss0) / max(1, store.tracked_windows)

    # --- the sweep of all of them, with a ticker watching the loop
    now[0] += 2 * 3600 * 1000  # everything has expired (windows, fingerprints)
    async with Ticker() as ticker:
        t0 = time.perf_counter()
        await _sweep(store)
        out["sweep_s"] = time.perf_counter() - t0
    out["sweep_max_stall_ms"] = ticker.max_gap * 1000
    out["sweep_max_stall_cpu_ms"] = ticker.max_cpu * 1000
    out["sweep_slices"] = getattr(store, "sweep_slices", 1)
    gc.collect()
    out["rss_after_sweep_mb"] = rss_bytes() / 2**20

    # --- paging active penalties while checks run
    ids = [identity(i) for i in range(penalties)]
    for start in range(0, penalties, 1000):
        now[0] += 1
        starts = [
            (i, 600_000 if n % 10 == 0 else 300_000, "b")
            for n, i in enumerate(ids[start : start + 1000])
        ]
        await store.start_penalties(starts)
    out["count_penalties"] = await store.count_penalties()
    stop = asyncio.Event()
    lat: list[float] = []
    checker = asyncio.create_task(_checks(store, ids, stop, lat))
    await asyncio.sleep(0.02)
    lat.clear()
    passes: list[float] = []
    page_max = page_max_cpu = 0.0
    started = time.perf_counter()
    while len(passes) < 5 and time.perf_counter() - started < 10:  # more check samples
        seen = 0
        cursor = None
        t0 = time.perf_counter()
        while True:
            tc, tp = time.thread_time(), time.perf_counter()
            page, cursor = await store.list_penalties(cursor, 1000)
            page_max = max(page_max, time.perf_counter() - tp)
            page_max_cpu = max(page_max_cpu, time.thread_time() - tc)
            seen += len(page)
            if cursor is None:
                break
            await asyncio.sleep(0)  # the RPC boundary between two pages
        passes.append(time.perf_counter() - t0)
    out["paging_s"] = statistics.median(passes)
    out["paging_passes"] = len(passes)
    await asyncio.sleep(0.02)
    stop.set()
    await checker
    out["paged"] = seen
    out["page_call_max_ms"] = page_max * 1000
    out["page_call_max_cpu_ms"] = page_max_cpu * 1000
    lat.sort()
    out["check_p50_ms"] = statistics.median(lat) * 1000
    out["check_p99_ms"] = lat[int(len(lat) * 0.99)] * 1000
    out["checks_while_paging"] = len(lat)
    return out


def run(
    identities: int = 1_000_000, penalties: int = 100_000, max_identities: int | None = None
) -> dict[str, float]:
    """This tree's MemoryStore, in this process (`max_identities`: its bound, if not the
    default; offer more identities than that to see eviction)."""
    return asyncio.run(run_async(identities, penalties, max_identities=max_identities))


def _in_subprocess(
    impl: str, identities: int, penalties: int, max_identities: int | None = None
) -> dict[str, float]:
    cmd = [sys.executable, "-m", "bench.memory_store", "--impl", impl, "--json"]
    cmd += ["--identities", str(identities), "--penalties", str(penalties)]
    if max_identities is not None:
        cmd += ["--max-identities", str(max_identities)]
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
    result: dict[str, float] = json.loads(done.stdout)
    return result


ROWS = [
    ("rss_per_identity_b", "RSS per identity (bytes)", "{:.0f}"),
    ("rss_mb", "RSS with all identities (MB)", "{:.0f}"),
    ("evicted", "windows evicted (bound reached)", "{:,.0f}"),
    ("rss_per_held_b", "RSS per window held (bytes)", "{:.0f}"),
    ("reports_per_s", "record: reports/s", "{:,.0f}"),
    ("full_gc_ms", "full GC pause, identities held (ms)", "{:.1f}"),
    ("sweep_max_stall_ms", "sweep: longest loop stall (ms)", "{:.1f}"),
    ("sweep_max_stall_cpu_ms", "  CPU used in that stall (ms)", "{:.1f}"),
    ("sweep_s", "sweep: wall time (s)", "{:.2f}"),
    ("sweep_slices", "sweep: slices", "{:.0f}"),
    ("rss_after_sweep_mb", "RSS after the sweep (MB)", "{:.0f}"),
    ("paging_s", "page all penalties by 1,000 (s)", "{:.2f}"),
    ("page_call_max_ms", "longest page call (ms)", "{:.1f}"),
    ("page_call_max_cpu_ms", "  CPU of the longest (ms)", "{:.1f}"),
    ("check_p50_ms", "check p50 while paging (ms)", "{:.2f}"),
    ("check_p99_ms", "check p99 while paging (ms)", "{:.2f}"),
    ("paged", "penalties paged per pass", "{:,.0f}"),
    ("paging_passes", "paging passes (median shown)", "{:.0f}"),
    ("checks_while_paging", "checks answered while paging", "{:,.0f}"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=1_000_000)
    ap.add_argument("--penalties", type=int, default=100_000)
    ap.add_argument("--impl", default=None, help='"worktree" or a git ref (one run, this process)')
    ap.add_argument(
        "--baseline",
        default="",
        help="git ref of a before column, e.g. 446637d (the store before it was bounded; "
        "it imports today's modules, so refs far back may not load)",
    )
    ap.add_argument("--no-baseline", action="store_true", help="(the default) no before column")
    ap.add_argument("--max-identities", type=int, default=None, help="this tree's bound")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.impl is not None:
        bound = args.max_identities if args.impl == "worktree" else None
        result = asyncio.run(run_async(args.identities, args.penalties, args.impl, bound))
        print(json.dumps(result) if args.json else result)
        return
    after = _in_subprocess("worktree", args.identities, args.penalties, args.max_identities)
    before = (
        None
        if args.no_baseline or not args.baseline
        else _in_subprocess(args.baseline, args.identities, args.penalties)
    )
    print(f"embedded store: {args.identities:,} identities, {args.penalties:,} penalties")
    head = f"{'':34} {'after':>12}" + (
        "" if before is None else f" {'before (' + args.baseline + ')':>14}"
    )
    print(head)
    for key, label, fmt in ROWS:
        line = f"{label:34} {fmt.format(after[key]):>12}"
        if before is not None:
            line += f" {fmt.format(before.get(key, float('nan'))):>14}"
        print(line)
    if args.json:
        print(json.dumps({"after": after, "before": before}))


if __name__ == "__main__":
    main()
