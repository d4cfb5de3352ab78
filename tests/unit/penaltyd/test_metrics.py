"""What /metrics exports: every series from the start, timeouts seen, per-RPC codes."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import generate_latest

from penalty.v1 import penalty_pb2 as pb
from penaltyd.metrics import STORE_OPS, Metrics
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import UNKNOWN, check, eventually, report
from tests.harness.inprocess import ServeFactory


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {series}")


async def test_series_exist_before_their_first_event(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    text = exposition(pd.engine.metrics)
    assert "_created" not in text
    assert "process_cpu_seconds_total" in text
    assert "python_gc_collections_total" in text
    assert 'penaltyd_build_info{grpc="' in text
    for op in STORE_OPS:
        assert f'penaltyd_store_timeouts_total{{op="{op}"}} 0.0' in text
    assert 'penaltyd_store_latency_seconds_bucket{le="5.0",op="report"} 0.0' in text
    for method in ("PenaltyService/Check", "PenaltyService/Session", "PenaltyAdmin/Explain"):
        assert f'penaltyd_grpc_requests_total{{code="OK",method="{method}"}} 0.0' in text
    assert 'penaltyd_penalties_started_total{rule="burst"} 0.0' in text


async def test_rpcs_are_counted_by_method_and_code(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    await pd.service.Check(check("192.0.2.1"))
    with pytest.raises(grpc.aio.AioRpcError):
        await pd.service.Check(check("not-an-address"))
    for _ in range(40):
        await pd.service.Report(report("203.0.113.7", UNKNOWN))
    stream = pd.service.WatchPenalties(pb.WatchRequest())
    await stream.read()
    stream.cancel()

    async def seen() -> str:
        return exposition(pd.engine.metrics)

    text = await seen()
    ok = 'penaltyd_grpc_requests_total{code="OK",method="PenaltyService/Check"}'
    bad = 'penaltyd_grpc_requests_total{code="INVALID_ARGUMENT",method="PenaltyService/Check"}'
    assert value(text, ok) == 1
    assert value(text, bad) == 1
    assert (
        value(text, 'penaltyd_grpc_requests_total{code="OK",method="PenaltyService/Report"}') == 40
    )
    # The cancelled stream is counted once the server's handler sees the cancel.
    cancelled = 'code="CANCELLED",method="PenaltyService/WatchPenalties"'
    text = await eventually(seen, lambda t: cancelled in t, within=5)
    assert value(text, 'penaltyd_check_latency_seconds_count{path="view"}') == 1
    assert value(text, 'penaltyd_store_latency_seconds_count{op="report"}') == 40
    assert value(text, 'penaltyd_penalties_started_total{rule="significance"}') == 1


def test_a_timeout_is_observed_at_its_deadline() -> None:
    metrics = Metrics()
    with pytest.raises(TimeoutError), metrics.store_call("check", 0.02):
        raise TimeoutError
    text = exposition(metrics)
    assert value(text, 'penaltyd_store_timeouts_total{op="check"}') == 1
    assert value(text, 'penaltyd_store_latency_seconds_bucket{le="0.01",op="check"}') == 0
    assert value(text, 'penaltyd_store_latency_seconds_bucket{le="0.02",op="check"}') == 1
