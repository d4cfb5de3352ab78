"""Where the CPU went during a run: our servers, the load generator, everyone else.

On a two-core box shared by client and server, a calls/s figure alone cannot tell "the
server got slower" from "something else took a core". So every run also records, from
/proc, the CPU seconds of each of our servers and of the load generator, and what the
rest of the machine used meanwhile (`foreign_share`: a test suite running next to the
bench shows up here, and the table flags the run). A server's CPU per call is the
cost figure that noise moves least.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process (all its threads), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _TICK


def _machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    with open("/proc/stat") as fh:
        cols = fh.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(c) for c in cols[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def _own_s() -> float:
    """This process plus its waited-for children (h2load, session_load)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass(frozen=True, slots=True)
class Sample:
    wall: float
    busy: float
    own: float
    servers: dict[str, float]


class CpuMeter:
    """Snapshots before and after a run; `since` turns two of them into shares."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.cores = len(os.sched_getaffinity(0))

    def sample(self) -> Sample:
        return Sample(
            time.monotonic(),
            _machine_busy_s(),
            _own_s(),
            {name: _proc_cpu_s(pid) for name, pid in self.pids.items()},
        )

    def since(self, before: Sample) -> dict[str, float]:
        """CPU used since `before`: cores per server, load generator, the rest of the box."""
        after = self.sample()
        wall = after.wall - before.wall
        if wall <= 0:
            return {}
        out: dict[str, float] = {"wall_s": wall}
        ours = after.own - before.own
        out["load_generator_cores"] = ours / wall  # includes this orchestrator (idle meanwhile)
        for name, cpu in after.servers.items():
            used = cpu - before.servers.get(name, 0.0)
            out[f"{name}_cores"] = used / wall
            ours += used
        foreign = (after.busy - before.busy) - ours
        out["foreign_share"] = max(0.0, foreign / (wall * self.cores))
        return out


def foreign_load(seconds: float = 1.0) -> float:
    """Share of all cores busy over `seconds`, measured while this bench runs nothing."""
    cores = len(os.sched_getaffinity(0))
    busy0, own0, t0 = _machine_busy_s(), _own_s(), time.monotonic()
    time.sleep(seconds)
    busy1, own1, t1 = _machine_busy_s(), _own_s(), time.monotonic()
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * cores))


def wait_quiet(limit_s: float, threshold: float, say: Callable[[str], None]) -> float:
    """Wait up to `limit_s` for 3 quiet seconds in a row; returns the last load seen."""
    deadline = time.monotonic() + limit_s
    quiet = 0
    load = foreign_load()
    while time.monotonic() < deadline:
        quiet = quiet + 1 if load < threshold else 0
        if quiet >= 3:
            break
        if quiet == 0:
            say(f"waiting for a quiet machine: other processes use {load:.0%} of the CPU")
        load = foreign_load()
    return load
