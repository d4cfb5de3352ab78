"""Prometheus metrics (DESIGN.md section 11), served on their own port.

Metric objects live in one registry per process so tests can build several servers
without "duplicated timeseries" errors; `penaltyd.server` exposes it on
`metrics_listen` when configured.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from serving.metrics import MetricsServer, store_latency


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.checks = Counter(
            "penaltyd_checks", "Checks answered, by result", ["result"], registry=r
        )
        self.check_pass = self.checks.labels("pass")
        self.check_tempfail = self.checks.labels("tempfail")
        self.check_degraded = self.checks.labels("degraded")
        self.reports = Counter("penaltyd_reports", "Reports applied (one per client)", registry=r)
        self.penalties_started = Counter(
            "penaltyd_penalties_started", "Penalties started, by rule", ["rule"], registry=r
        )
        self.store_latency = store_latency("penaltyd", "Store", r)
        self.degraded = Gauge(
            "penaltyd_degraded", "1 while the store is failing and answers fail open", registry=r
        )
        self.active_penalties = Gauge(
            "penaltyd_active_penalties", "Active penalties fleet-wide (sharded index)", registry=r
        )
        self.shared_addresses = Gauge(
            "penaltyd_shared_addresses", "Addresses handled as shared (NAT/CGNAT)", registry=r
        )
        self.feed_synced = Gauge(
            "penaltyd_feed_synced", "1 while the in-process penalty view is exact", registry=r
        )
        self.reports_buffered = Gauge(
            "penaltyd_reports_buffered", "Reports waiting for the store to come back", registry=r
        )
        self.reports_dropped = Counter(
            "penaltyd_reports_dropped", "Reports dropped because the buffer was full", registry=r
        )
        self.reports_in_doubt = Counter(
            "penaltyd_reports_in_doubt",
            "Reports whose store deadline expired (a slow store may still apply them)",
            registry=r,
        )
        self.penalties_refused = Counter(
            "penaltyd_penalties_refused",
            "Penalties not started because the embedded store's penalty table was full",
            registry=r,
        )
        self.stats_flush_failures = Counter(
            "penaltyd_stats_flush_failures",
            "Fleet statistics flushes or reads the store did not take (retried next time)",
            registry=r,
        )
        self.invalid_requests = Counter(
            "penaltyd_invalid_requests", "Requests refused with INVALID_ARGUMENT", registry=r
        )

    async def serve(self, listen: str) -> MetricsServer:
        """`/metrics` on `listen`, on the event loop (`penalty.metrics_http`)."""
        server = MetricsServer(self.registry, listen)
        await server.start()
        return server
