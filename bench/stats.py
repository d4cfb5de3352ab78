"""One result type and one percentile rule for every load generator in the bench.

h2load, the Session client and the Redis floors measure different things, but the table
compares them side by side, so they all report the same fields, computed the same way
(nearest-rank percentiles over every sample, no interpolation, no histogram buckets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..100) of an already sorted sequence; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


@dataclass(frozen=True, slots=True)
class Check:
    """One verification of a run: did the calls really do what we measured?

    A failed "proof" check means the figure cannot be trusted (INVALID): the calls were
    not what we think. A failed "service" check means the figure is real but the service
    misbehaved under the load (FAIL whatever the target says), e.g. it answered some
    calls fail-open because its store deadline expired.
    """

    name: str
    ok: bool
    detail: str = ""
    severity: str = "proof"  # or "service"


@dataclass(slots=True)
class Result:
    """What one measurement produced.

    `rate` is per second in `unit` (calls, outcomes or Redis ops); latencies are per call
    (unary), per message (Session) or per command / pipeline (Redis), in milliseconds.
    """

    key: str  # e.g. "penaltyd/check-c64"
    server: str  # "penaltyd", "echo" or "redis"
    scenario: str  # e.g. "check-c64"
    label: str  # what a reader sees in the table
    concurrency: int  # calls (or messages) in flight
    shape: str  # how the load was generated, e.g. "h2load -c4 -m16"
    unit: str  # "calls/s", "outcomes/s", "ops/s"
    rate: float
    count: int  # calls / items completed in the measured period
    duration_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float = math.nan
    max_ms: float = math.nan
    checks: list[Check] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        """No proof check failed: the figure measures what it claims."""
        return all(c.ok for c in self.checks if c.severity == "proof")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["verified"] = self.verified
        return data


class LatencySummary(TypedDict):
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float


def latency_summary(samples_ms: list[float]) -> LatencySummary:
    """p50, p99, mean and max of latency samples in ms (sorts `samples_ms` in place)."""
    samples_ms.sort()
    if not samples_ms:
        return {"p50_ms": math.nan, "p99_ms": math.nan, "mean_ms": math.nan, "max_ms": math.nan}
    return {
        "p50_ms": percentile(samples_ms, 50),
        "p99_ms": percentile(samples_ms, 99),
        "mean_ms": sum(samples_ms) / len(samples_ms),
        "max_ms": samples_ms[-1],
    }
