"""Proof that the calls h2load counts were real answers.

h2load sees HTTP/2 only: a gRPC error travels in the trailers of an HTTP 200, so
h2load counts it as a success. Two checks close that gap:

- before each run, the exact request bytes h2load will send go through a real gRPC
  client once and the answer is asserted (right status, right verdict);
- around each penaltyd run, its Prometheus counters are read: the checks or reports it
  answered must have grown by at least the number h2load counted, and no answer may have
  been a fail-open (degraded) one.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable

import grpc

from bench.stats import Check
from penalty.v1 import penalty_pb2 as pb

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) ([^ ]+)$")


class Unary:
    """A gRPC channel that sends already serialised requests and parses Verdicts."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._methods: dict[str, Callable[..., pb.Verdict]] = {}

    def call(self, method: str, request: bytes, timeout: float = 5.0) -> pb.Verdict:
        """Raises `grpc.RpcError` on any non-OK status."""
        if method not in self._methods:
            self._methods[method] = self._channel.unary_unary(
                f"/penalty.v1.PenaltyService/{method}",
                request_serializer=None,
                response_deserializer=pb.Verdict.FromString,
            )
        return self._methods[method](request, timeout=timeout)

    def close(self) -> None:
        self._channel.close()


def preflight(
    unary: Unary, method: str, request: bytes, expect: Callable[[pb.Verdict], str]
) -> Check:
    """Send `request` once; `expect` returns why the verdict is wrong, or ""."""
    try:
        verdict = unary.call(method, request)
    except grpc.RpcError as exc:
        return Check("preflight", False, f"{method} failed: {exc.code()}: {exc.details()}")
    why = expect(verdict)
    shown = str(verdict).replace("\n", " ").strip()
    return Check("preflight", not why, why or f"{method} -> {shown}")


def scrape(url: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value} (no comments, no types)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m[1]] = float(m[2])
    return out


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """How much one sample grew; None when penaltyd does not export it (renamed?)."""
    if name not in after:
        return None
    return after[name] - before.get(name, 0.0)


CHECK_PASS = 'penaltyd_checks_total{result="pass"}'
CHECK_TEMPFAIL = 'penaltyd_checks_total{result="tempfail"}'
CHECK_DEGRADED = 'penaltyd_checks_total{result="degraded"}'
REPORTS = "penaltyd_reports_total"
REPORTS_IN_DOUBT = "penaltyd_reports_in_doubt_total"
REPORT_ROUND_TRIPS = 'penaltyd_store_latency_seconds_count{op="report"}'
REPORT_STORE_SECONDS = 'penaltyd_store_latency_seconds_sum{op="report"}'


def counter_checks(
    before: dict[str, float], after: dict[str, float], served: str, at_least: int
) -> tuple[list[Check], dict[str, float]]:
    """`served` must have grown by `at_least`; no degraded checks, no reports in doubt.

    Also returns the deltas, including reports per store round trip (how well concurrent
    unary reports were coalesced).
    """
    names = (
        CHECK_PASS,
        CHECK_TEMPFAIL,
        CHECK_DEGRADED,
        REPORTS,
        REPORTS_IN_DOUBT,
        REPORT_ROUND_TRIPS,
        REPORT_STORE_SECONDS,
    )
    deltas = {n: d for n in names if (d := delta(before, after, n)) is not None}
    checks: list[Check] = []
    got = deltas.get(served)
    if got is None:
        checks.append(Check("counters", False, f"penaltyd does not export {served}"))
    else:
        detail = f"{served} +{got:.0f} for {at_least} calls counted by the client"
        checks.append(Check("counters", got >= at_least, detail))
    degraded = deltas.get(CHECK_DEGRADED, 0.0) + deltas.get(REPORTS_IN_DOUBT, 0.0)
    detail = f"{degraded:.0f} fail-open (degraded) answers, or reports in doubt"
    checks.append(Check("not degraded", degraded == 0, detail, severity="service"))
    trips = deltas.get(REPORT_ROUND_TRIPS, 0.0)
    if trips and REPORTS in deltas:
        deltas["reports_per_store_round_trip"] = deltas[REPORTS] / trips
        deltas["store_ms_per_round_trip"] = deltas.get(REPORT_STORE_SECONDS, 0.0) * 1000 / trips
    return checks, deltas
