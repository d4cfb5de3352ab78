"""Event-loop lag monitor for a console script, loaded as `sitecustomize`.

    LAGMON=penalty-policyd PYTHONPATH=bench/lagmon python -m bench.policyd_bench --rate 15500

In every process whose command line holds `$LAGMON`, a daemon thread asks the asyncio loop
to run a no-op (`call_soon_threadsafe`) about every millisecond and times how long it
waits; while it waits, it samples the loop thread's Python stack every 0.3 ms. Every 2 s
it writes `/tmp/lagmon.<pid>.txt`: the lag's p50/p99/max and the stacks seen during lags
over 1.5 ms. A stack that is only the runner's frame means the loop thread was in C
(uvloop, epoll, grpc's Cython/C-core) with the GIL released. A diagnostic for
docs/performance.md, never loaded by the services themselves.
"""

from __future__ import annotations

import asyncio.runners
import collections
import os
import sys
import threading
import time
import traceback
from typing import Any


def _install(tag: str) -> None:
    holder: dict[str, Any] = {}
    lazy_init = asyncio.runners.Runner._lazy_init  # type: ignore[attr-defined]

    def capture(self: Any) -> None:
        lazy_init(self)
        holder["loop"] = self._loop

    asyncio.runners.Runner._lazy_init = capture  # type: ignore[attr-defined]
    main = threading.get_ident()
    stalls: collections.Counter[str] = collections.Counter()
    lags: list[float] = []

    def stack() -> str:
        frame = sys._current_frames().get(main)
        if frame is None:
            return "?"
        frames = traceback.extract_stack(frame)[-6:]
        return " <- ".join(
            f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed(frames)
        )

    def dump() -> None:
        ls = sorted(lags)
        n = len(ls)
        with open(f"/tmp/lagmon.{os.getpid()}.txt", "w") as out:
            out.write(
                f"{tag}: {n} samples, lag p50 {ls[n // 2] * 1e3:.3f} p99 "
                f"{ls[int(n * 0.99)] * 1e3:.3f} max {ls[-1] * 1e3:.3f} ms; "
                f"over 1.5 ms: {sum(1 for x in ls if x > 0.0015)}\n"
            )
            for where, count in stalls.most_common(25):
                out.write(f"{count:7d} {where}\n")

    def watch() -> None:
        while "loop" not in holder:
            time.sleep(0.01)
        loop = holder["loop"]
        last = time.monotonic()
        while True:
            done = threading.Event()
            t0 = time.perf_counter()
            try:
                loop.call_soon_threadsafe(done.set)
            except RuntimeError:  # the loop closed
                return
            seen: collections.Counter[str] = collections.Counter()
            while not done.wait(0.0003):
                seen[stack()] += 1
            lag = time.perf_counter() - t0
            lags.append(lag)
            if lag > 0.0015:
                stalls.update(seen)
            time.sleep(0.001)
            if time.monotonic() - last > 2 and lags:
                last = time.monotonic()
                dump()

    threading.Thread(target=watch, name="lagmon", daemon=True).start()


_TAG = os.environ.get("LAGMON", "")
if _TAG:
    with open("/proc/self/cmdline", "rb") as _cmd:
        if _TAG.encode() in _cmd.read():
            _install(_TAG)
