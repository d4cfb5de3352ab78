"""A wrong Redis URL, an unreachable Sentinel, a Cluster without its slots: a clear
start-up error, or a degraded (fail-open) state with a log line naming the problem;
never a crash loop without explanation."""

from __future__ import annotations

import subprocess
import sys

import grpc

from penalty.v1 import penalty_pb2_grpc as pbg
from tests.harness.builders import check, eventually
from tests.harness.ports import free_port, free_ports
from tests.harness.processes import PenaltydProcess
from tests.harness.redis import RedisServer


def test_malformed_url_is_refused_at_startup_naming_the_setting() -> None:
    for url, words in [
        ("redis+sentinel://127.0.0.1:26379", "service name is missing"),
        ("redis+cluster://127.0.0.1:7000/0", "no database number"),
        ("http://127.0.0.1:6379", "unknown redis URL scheme"),
    ]:
        cmd = [sys.executable, "-m", "penaltyd", "--redis-url", url]
        cmd += ["--listen", f"127.0.0.1:{free_port()}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert out.returncode == 2
        assert "redis_url" in out.stderr
        assert words in out.stderr


async def degraded_but_serving(pd: PenaltydProcess, words: str) -> None:
    async with grpc.aio.insecure_channel(pd.address) as ch:
        stub = pbg.PenaltyServiceStub(ch)
        v = await stub.Check(check("203.0.113.7"), timeout=5)
        assert v.degraded
        assert not v.tempfail
    assert pd.proc is not None
    assert pd.proc.poll() is None  # up, not crash-looping

    async def logged() -> str:
        return pd.output()

    out = await eventually(logged, lambda text: '"store_unreachable_at_startup"' in text)
    assert words in out


async def test_unreachable_sentinel_is_degraded_with_a_log_line() -> None:
    ports = free_ports(2)
    url = f"redis+sentinel://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/penaltyd/0"
    with PenaltydProcess("--redis-url", url) as pd:
        await degraded_but_serving(pd, "penaltyd")  # the error names the master service


async def test_cluster_without_slots_is_degraded_with_a_log_line() -> None:
    node = RedisServer(
        extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    ).start()
    try:
        with PenaltydProcess("--redis-url", f"redis+cluster://127.0.0.1:{node.port}") as pd:
            await degraded_but_serving(pd, "slot")
    finally:
        node.stop()
