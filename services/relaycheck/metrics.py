"""Prometheus metrics, in one registry per server so tests can run several at once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relaycheck import __version__
from serving.metrics import ServiceMetrics

#: Customer-store operations, each a label value of the store latency and timeout metrics.
STORE_OPS = ("get", "find", "upsert", "delete", "ping")


class Metrics(ServiceMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(
            "relaycheck",
            __version__,
            store_what="Customer store",
            store_ops=STORE_OPS,
            registry=registry,
        )
        r = self.registry
        self.classifications = Counter(
            "relaycheck_classifications",
            "Classify answers, by verdict and deciding rule",
            ["verdict", "rule"],
            registry=r,
        )
        self.classify_seconds = Histogram(
            "relaycheck_classify_seconds",
            "Time to answer Classify (store lookup and walk)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
            registry=r,
        )
        self.degraded = Counter(
            "relaycheck_degraded",
            "Classify answers that failed open because the customer store did not answer",
            registry=r,
        )
        self.store_up = Gauge(
            "relaycheck_store_up", "1 while the customer store answers its pings", registry=r
        )
        self.reports = Counter(
            "relaycheck_penaltyd_reports",
            "Relayed origins reported to penaltyd, by result (queued, dropped, off)",
            ["result"],
            registry=r,
        )
        self.probes = Counter(
            "relaycheck_probes",
            "Probe batteries run, by result (relaying, closed, error)",
            ["result"],
            registry=r,
        )
        self.invalid_requests = Counter(
            "relaycheck_invalid_requests", "Requests refused with INVALID_ARGUMENT", registry=r
        )
