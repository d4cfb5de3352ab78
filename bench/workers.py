"""``python -m bench.workers``: penaltyd with `workers=2` against `workers=1` on Redis.

Same Redis, same h2load load (8 connections x 8 streams, so the kernel can spread
connections over the workers), unary Check of a penalized client and unary Report,
rounds alternating; req/s and the CPU each configuration used (every penaltyd process
and Redis), from /proc. On this 2-core machine the load generator shares the cores, so
the figure says what a second process buys here, not on a 16-core MX host.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench import h2load
from bench.cpu import CpuMeter
from penalty.v1 import penalty_pb2 as pb
from penalty.v1 import penalty_pb2_grpc as pbg
from tests.harness.processes import PenaltydProcess
from tests.harness.redis import RedisServer

RESULTS = Path(__file__).parent / "results"
SHAPE = h2load.Shape(8, 8)
PENALIZED = "203.0.113.7"


def _frames() -> dict[str, bytes]:
    check = pb.CheckRequest(client=pb.Client(ip=PENALIZED)).SerializeToString()
    report = pb.ReportRequest(
        client=pb.Client(ip="198.51.100.20"),
        counts=[pb.OutcomeCount(outcome=pb.OUTCOME_ACCEPTED, n=1)],
    ).SerializeToString()
    return {"Check": h2load.grpc_frame(check), "Report": h2load.grpc_frame(report)}


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def penalize(address: str) -> None:
    """Start a penalty for PENALIZED through `address` (40 unknown recipients)."""
    with grpc.insecure_channel(address) as ch:
        stub = pbg.PenaltyServiceStub(ch)
        for _ in range(40):
            stub.Report(
                pb.ReportRequest(
                    client=pb.Client(ip=PENALIZED),
                    counts=[pb.OutcomeCount(outcome=pb.OUTCOME_UNKNOWN_RECIPIENT, n=1)],
                )
            )


def one(redis: RedisServer, workers: int, seconds: float, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"workers": workers}
    with PenaltydProcess("--redis-url", redis.url, env={"PENALTYD_WORKERS": str(workers)}) as pd:
        assert pd.proc is not None
        assert redis.proc is not None
        end = time.monotonic() + 30
        while len(_children(pd.proc.pid)) < workers - 1 and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(2.0)  # the children bind after they import: let every worker listen
        pids = {"penaltyd": pd.proc.pid, "redis": redis.proc.pid}
        for i, child in enumerate(_children(pd.proc.pid), 1):
            pids[f"worker{i}"] = child
        penalize(pd.address)
        for method, frame in _frames().items():
            meter = CpuMeter(pids)
            before = meter.sample()
            run = h2load.run(
                f"http://{pd.address}/penalty.v1.PenaltyService/{method}",
                frame,
                SHAPE,
                duration_s=seconds,
                warmup_s=1.0,
                workdir=workdir,
            )
            cpu = meter.since(before)
            servers = sum(v for k, v in cpu.items() if k.startswith(("penaltyd", "worker")))
            out[method] = {
                "req_per_s": run.req_per_s,
                "p99_ms": run.summary()["p99_ms"],
                "penaltyd_cores": servers,
                "redis_cores": cpu.get("redis_cores", 0.0),
                "cpu_us_per_call": servers * 1e6 / run.req_per_s if run.req_per_s else 0.0,
                "failed": run.failed + run.errored,
            }
    return out


def run(rounds: int = 2, seconds: float = 5.0) -> dict[str, Any]:
    with RedisServer() as redis, tempfile.TemporaryDirectory() as tmp:
        results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for _ in range(rounds):
            for workers in (1, 2):
                results[workers].append(one(redis, workers, seconds, Path(tmp)))
    summary: dict[str, Any] = {}
    for workers, runs in results.items():
        for method in ("Check", "Report"):
            rates = sorted(r[method]["req_per_s"] for r in runs)
            cores = sorted(r[method]["penaltyd_cores"] for r in runs)
            summary[f"workers{workers}_{method}"] = {
                "req_per_s": rates[len(rates) // 2],
                "penaltyd_cores": cores[len(cores) // 2],
            }
    return {"runs": results, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    result = run(args.rounds, args.seconds)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"workers-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    s = result["summary"]
    for method in ("Check", "Report"):
        one_, two = s[f"workers1_{method}"], s[f"workers2_{method}"]
        ratio = two["req_per_s"] / one_["req_per_s"] if one_["req_per_s"] else float("nan")
        print(
            f"{method:6}  workers=1 {one_['req_per_s']:8.0f} req/s on {one_['penaltyd_cores']:.2f}"
            f" cores   workers=2 {two['req_per_s']:8.0f} req/s on {two['penaltyd_cores']:.2f}"
            f" cores   ratio {ratio:.2f}x"
        )
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
