"""`workers`: two penaltyd processes on one port and one Redis answer as one replica set."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import grpc

from penalty.v1 import penalty_pb2_grpc as pbg
from tests.harness.builders import UNKNOWN, check, eventually, report
from tests.harness.ports import free_ports
from tests.harness.processes import PenaltydProcess


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _checks_served(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read().decode()
    except OSError:  # not listening yet
        return -1.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("penaltyd_checks_total{")
    )


async def test_two_workers_share_the_port_and_the_store(redis_url: str) -> None:
    grpc_port, metrics = free_ports(2)
    with PenaltydProcess(
        "--redis-url", redis_url, "--metrics-listen", f"127.0.0.1:{metrics}",
        port=grpc_port, env={"PENALTYD_WORKERS": "2"},
    ) as pd:  # fmt: skip
        assert pd.proc is not None
        parent = pd.proc.pid

        async def workers() -> list[int]:
            return _children(parent)

        await eventually(workers, lambda c: len(c) == 1)

        async def child_serving() -> float:  # its /metrics is up once it serves gRPC too
            return _checks_served(metrics + 1)

        await eventually(child_serving, lambda n: n >= 0)
        # Many connections: the kernel spreads them over both workers; all agree (Redis).
        own = [("grpc.use_local_subchannel_pool", 1)]  # a TCP connection per channel
        channels = [grpc.aio.insecure_channel(pd.address, options=own) for _ in range(16)]
        stubs = [pbg.PenaltyServiceStub(ch) for ch in channels]
        for i in range(40):
            await stubs[i % 16].Report(report("203.0.113.7", UNKNOWN))

        async def all_tempfail() -> list[bool]:
            return [(await s.Check(check("203.0.113.7"))).tempfail for s in stubs]

        await eventually(all_tempfail, all)
        for ch in channels:
            await ch.close()

        async def served() -> list[float]:  # worker i serves /metrics on the port + i
            return [_checks_served(metrics), _checks_served(metrics + 1)]

        await eventually(served, lambda both: all(n > 0 for n in both))
    assert pd.proc.returncode == 0
    assert not _children(parent)


def test_workers_need_the_redis_store() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "penaltyd", "--listen", "127.0.0.1:0"],
        env={**os.environ, "PENALTYD_WORKERS": "2"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert "workers=2 needs the Redis store (redis_url)" in out.stderr
