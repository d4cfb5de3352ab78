"""penalty-policyd under a C load generator: requests/s, latency and CPU per request.

What it runs, all real processes on loopback:

1. `bench/policy_load.c`, built with `cc -O2` into bench/results/ (never committed): N
   persistent connections with one request in flight each (what Postfix's smtpd
   processes do), a ~30-attribute RCPT request per ask, X % of them from a set of P
   penalized addresses (198.18.<i // 250>.<i % 250 + 1>), the rest from 10,000 others.
2. `penaltyd --listen 127.0.0.1:PORT` (the console script, embedded store), and P
   addresses penalized through its gRPC API: 40 OUTCOME_UNKNOWN_RECIPIENT reports each,
   as in the README's quick start, each then checked to be penalized.
3. `penalty-policyd --listen ... --penaltyd ...` with its live replica (default); the
   load starts once its stats line says the replica is synced.

Each round: a short warm-up load, then the measured load; policyd's CPU per request is
its utime+stime delta over the measured load (/proc/<pid>/stat) divided by the answers
the load generator counted. `run()` returns every round and the medians; `fairness()`
runs the attack of docs/reliability.md (8 pipelining connections beside one Postfix-
style client) and returns the well-behaved client's latency.

    .venv/bin/python -m bench.policyd_bench            # 3 rounds of 10 s, medians
    .venv/bin/python -m bench.policyd_bench --fairness # plus the pipelining attack
    .venv/bin/python -m bench.policyd_bench --rate 18000  # a fixed offered rate, not saturation
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from penalty.v1 import penalty_pb2 as pb
from penalty.v1 import penalty_pb2_grpc as pbg
from tests.harness.ports import free_port, wait_port
from tests.harness.processes import terminate

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(__file__).resolve().parent / "policy_load.c"
RESULTS = REPO_ROOT / "bench" / "results"
BIN = Path(sys.executable).parent  # the venv's console scripts
_TICK = os.sysconf("SC_CLK_TCK")


def penalized_address(i: int) -> str:
    """The i-th penalized address, as policy_load.c draws them."""
    return f"198.18.{i // 250}.{i % 250 + 1}"


def build(out_dir: Path | None = None) -> Path:
    """Compile policy_load.c (cc -O2) unless an up-to-date binary is there; its path."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "policy_load"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    cc = os.environ.get("CC") or shutil.which("cc") or "gcc"
    subprocess.run([cc, "-O2", "-pthread", "-o", str(binary), str(SOURCE)], check=True)
    return binary


def proc_cpu(pid: int) -> tuple[float, float]:
    """(utime, stime) of a live process (all its threads), in seconds; 0s if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # the name may contain spaces
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process (all threads), in seconds; 0 if it is gone."""
    return sum(proc_cpu(pid))


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    with open("/proc/stat") as fh:
        cols = fh.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(c) for c in cols[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def children_cpu_s() -> float:
    """CPU of this process's waited-for children (the load generator runs)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


class Child:
    """A console script as a child process, its output in a log file."""

    def __init__(self, name: str, *args: str, port: int) -> None:
        self.port = port
        fd, self.log_path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
        os.close(fd)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / name), *args], stdout=log, stderr=subprocess.STDOUT
            )
        wait_port("127.0.0.1", port, proc=self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> int:
        return terminate(self.proc, 15)


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` (and the threads they start) onto `cpus`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


def penalize(address: str, count: int, reports: int = 40) -> None:
    """Penalize `count` addresses: `reports` unknown-recipient reports each, then check."""
    channel = grpc.insecure_channel(address)
    stub = pbg.PenaltyServiceStub(channel)
    try:
        unknown = [pb.OutcomeCount(outcome=pb.OUTCOME_UNKNOWN_RECIPIENT, n=1)]
        for i in range(count):
            client = pb.Client(ip=penalized_address(i))
            for _ in range(reports):
                stub.Report(pb.ReportRequest(client=client, counts=unknown), timeout=5)
            verdict = stub.Check(pb.CheckRequest(client=client), timeout=5)
            if not verdict.tempfail:
                raise RuntimeError(f"{client.ip} is not penalized after {reports} reports")
    finally:
        channel.close()


def wait_replica(policyd: Child, within: float = 20.0) -> None:
    """Until policyd's stats line says its live replica holds the snapshot."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if '"live_replica": true' in policyd.output():
            return
        if policyd.proc.poll() is not None:
            raise RuntimeError("penalty-policyd exited:\n" + policyd.output()[-2000:])
        time.sleep(0.1)  # another process's state: no event to await
    raise TimeoutError("penalty-policyd's live replica did not sync:\n" + policyd.output()[-2000:])


@contextlib.contextmanager
def stack(
    *,
    penalized_addrs: int,
    report_accepted: bool = True,
    live_replica: bool = True,
    policyd_args: Sequence[str] = (),
) -> Iterator[tuple[Child, Child]]:
    """penaltyd (embedded store) with `penalized_addrs` penalties, and policyd on it."""
    pd_port, pol_port = free_port(), free_port()
    pd = Child("penaltyd", "--listen", f"127.0.0.1:{pd_port}", "--log-level", "warning",
               port=pd_port)  # fmt: skip
    policyd: Child | None = None
    try:
        penalize(f"127.0.0.1:{pd_port}", penalized_addrs)
        args = ["--listen", f"127.0.0.1:{pol_port}", "--penaltyd", f"127.0.0.1:{pd_port}"]
        args += ["--stats-interval", "1"]
        if not report_accepted:
            args.append("--no-report-accepted")
        if not live_replica:
            args.append("--no-live-replica")
        args += policyd_args
        policyd = Child("penalty-policyd", *args, port=pol_port)
        if live_replica:
            wait_replica(policyd)
        yield pd, policyd
    finally:
        if policyd is not None:
            policyd.stop()
            with contextlib.suppress(OSError):
                os.unlink(policyd.log_path)
        pd.stop()
        with contextlib.suppress(OSError):
            os.unlink(pd.log_path)


def load(
    binary: Path, port: int, *args: str, cpus: set[int] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port), *args],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"policy_load exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


def one_round(
    binary: Path,
    pd: Child,
    policyd: Child,
    *,
    connections: int,
    seconds: float,
    penalized_pct: float,
    penalized_addrs: int,
    pinned: bool = False,
    rate: float = 0.0,
    good_addrs: int = 0,
) -> dict[str, Any]:
    mix = ["-x", str(penalized_pct), "-P", str(penalized_addrs), "-c", str(connections)]
    if good_addrs:  # 0: the generator's 10,000
        mix += ["-G", str(good_addrs)]
    if rate:  # a fixed offered rate instead of saturation (policy_load.c -R)
        mix += ["-R", f"{rate:.0f}"]
    if pinned:  # policyd alone on CPU 0; penaltyd and the load generator share CPU 1
        pin(policyd.pid, {0})
        pin(pd.pid, {1})
    cpus = {1} if pinned else None
    finish(load(binary, policyd.port, *mix, "-d", "2", "-w", "0", "-s", "7", cpus=cpus), 60)
    (u0, s0), pd0, t0 = proc_cpu(policyd.pid), proc_cpu_s(pd.pid), time.monotonic()
    busy0, kids0, me0 = machine_busy_s(), children_cpu_s(), time.process_time()
    measured = load(binary, policyd.port, *mix, "-d", str(seconds), "-w", "0", cpus=cpus)
    result = finish(measured, seconds + 60)
    wall = time.monotonic() - t0
    (u1, s1), busy = proc_cpu(policyd.pid), machine_busy_s() - busy0
    cpu, pd_cpu = (u1 - u0) + (s1 - s0), proc_cpu_s(pd.pid) - pd0
    loadgen = children_cpu_s() - kids0
    requests = max(result["requests"], 1)
    result["policyd_cpu_s"] = round(cpu, 3)
    result["policyd_cpu_share"] = round(cpu / wall, 3)
    result["penaltyd_cpu_share"] = round(pd_cpu / wall, 3)
    result["loadgen_cpu_share"] = round(loadgen / wall, 3)
    # what the rest of the machine used meanwhile (another test suite, say), in cores
    ours = cpu + pd_cpu + loadgen + (time.process_time() - me0)
    result["foreign_cores"] = round(max(busy - ours, 0.0) / wall, 3)
    result["cpu_us_per_request"] = round(cpu / requests * 1e6, 2)
    result["user_us_per_request"] = round((u1 - u0) / requests * 1e6, 2)
    result["kernel_us_per_request"] = round((s1 - s0) / requests * 1e6, 2)
    return result


def _median(rounds: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rounds))


def run(
    *,
    connections: int = 32,
    seconds: float = 10.0,
    rounds: int = 3,
    penalized_pct: float = 10.0,
    penalized_addrs: int = 50,
    report_accepted: bool = True,
    live_replica: bool = True,
    pinned: bool = False,
    build_dir: Path | None = None,
    rate: float = 0.0,
    good_addrs: int = 0,
    policyd_args: Sequence[str] = (),
) -> dict[str, Any]:
    """`rounds` measured loads on one penaltyd + policyd; every round and the medians.
    `pinned`: policyd gets CPU 0 to itself (its capacity when nothing else competes)."""
    if pinned and len(os.sched_getaffinity(0)) < 2:
        raise ValueError("pinned runs need two CPUs")
    binary = build(build_dir)
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "connections": connections,
        "seconds": seconds,
        "penalized_pct": penalized_pct,
        "penalized_addrs": penalized_addrs,
        "report_accepted": report_accepted,
        "live_replica": live_replica,
        "pinned": pinned,
        "offered_rate": rate,
        "good_addrs": good_addrs or 10_000,
        "policyd_args": list(policyd_args),
        "rounds": [],
    }
    with stack(
        penalized_addrs=penalized_addrs,
        report_accepted=report_accepted,
        live_replica=live_replica,
        policyd_args=policyd_args,
    ) as (pd, policyd):
        for _ in range(rounds):
            out["rounds"].append(
                one_round(
                    binary,
                    pd,
                    policyd,
                    connections=connections,
                    seconds=seconds,
                    penalized_pct=penalized_pct,
                    penalized_addrs=penalized_addrs,
                    pinned=pinned,
                    rate=rate,
                    good_addrs=good_addrs,
                )
            )
        out["policyd_tracebacks"] = policyd.output().count("Traceback")
    rs = out["rounds"]
    keys = ("req_per_s", "p50_us", "p99_us", "p999_us", "max_us", "cpu_us_per_request")
    out["median"] = {k: _median(rs, k) for k in keys}
    out["errors"] = sum(r["errors"] for r in rs)
    out["tempfail_share"] = sum(r["tempfail"] for r in rs) / max(sum(r["requests"] for r in rs), 1)
    return out


def fairness(
    *, seconds: float = 10.0, pipeliners: int = 8, depth: int = 64, build_dir: Path | None = None
) -> dict[str, Any]:
    """One Postfix-style client's latency while `pipeliners` connections each keep
    `depth` requests in flight (writing without waiting for answers)."""
    binary = build(build_dir)
    with stack(penalized_addrs=50) as (_pd, policyd):
        attack = load(binary, policyd.port, "-c", str(pipeliners), "-k", str(depth),
                      "-d", str(seconds + 2), "-w", "0")  # fmt: skip
        try:
            good = finish(load(binary, policyd.port, "-c", "1", "-d", str(seconds), "-w", "1",
                               "-s", "3"), seconds + 60)  # fmt: skip
        finally:
            attacker = finish(attack, seconds + 60)
    return {"good_client": good, "pipeliners": attacker}


def main(argv: list[str] | None = None) -> int:
    summary = (__doc__ or "").split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m bench.policyd_bench", description=summary)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--penalized-pct", type=float, default=10.0)
    p.add_argument("--penalized-addrs", type=int, default=50)
    p.add_argument("--no-report-accepted", action="store_true")
    p.add_argument("--no-live-replica", action="store_true")
    p.add_argument("--pin", action="store_true", help="policyd alone on CPU 0, the others on CPU 1")
    p.add_argument("--fairness", action="store_true", help="also run the pipelining attack")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="a fixed offered rate in requests/s (latency from when each was due) "
        "instead of 32 connections at saturation",
    )
    p.add_argument(
        "--good-addrs",
        type=int,
        default=0,
        help="distinct well-behaved client addresses (default 10,000; bench.peers uses 255)",
    )
    p.add_argument(
        "--policyd-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more penalty-policyd argument (repeatable), e.g. --policyd-arg=--coalesce-us=0",
    )
    p.add_argument("--json", type=Path, default=RESULTS / "policyd-latest.json")
    args = p.parse_args(argv)
    out = run(
        connections=args.connections,
        seconds=args.seconds,
        rounds=args.rounds,
        penalized_pct=args.penalized_pct,
        penalized_addrs=args.penalized_addrs,
        report_accepted=not args.no_report_accepted,
        live_replica=not args.no_live_replica,
        pinned=args.pin,
        rate=args.rate,
        good_addrs=args.good_addrs,
        policyd_args=args.policyd_arg,
    )
    for i, r in enumerate(out["rounds"], 1):
        print(
            f"round {i}: {r['req_per_s']:>9,.0f} req/s  p50 {r['p50_us']:>6} µs  "
            f"p99 {r['p99_us']:>6} µs  max {r['max_us']:>7} µs  "
            f"{r['cpu_us_per_request']:>5.1f} µs CPU/req ({r['user_us_per_request']:.1f} user "
            f"+ {r['kernel_us_per_request']:.1f} kernel)  cores: policyd "
            f"{r['policyd_cpu_share']:.2f} penaltyd {r['penaltyd_cpu_share']:.2f} load "
            f"{r['loadgen_cpu_share']:.2f} foreign {r['foreign_cores']:.2f}  "
            f"dunno {r['dunno']} 4xx {r['tempfail']} other {r['other']} errors {r['errors']}"
            + (f" late {r['late']}" if args.rate else "")
        )
    m = out["median"]
    print(
        f"median:  {m['req_per_s']:>9,.0f} req/s  p50 {m['p50_us']:>6.0f} µs  "
        f"p99 {m['p99_us']:>6.0f} µs  max {m['max_us']:>7.0f} µs  "
        f"{m['cpu_us_per_request']:>6.1f} µs CPU/req  ({out['tempfail_share']:.1%} answered 4xx)"
    )
    if args.fairness:
        out["fairness"] = fairness(seconds=args.seconds)
        g = out["fairness"]["good_client"]
        a = out["fairness"]["pipeliners"]
        print(
            f"fairness: good client p50 {g['p50_us']} µs p99 {g['p99_us']} µs max {g['max_us']} "
            f"µs ({g['requests']} requests) beside 8 pipeliners at {a['req_per_s']:,.0f} req/s"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
