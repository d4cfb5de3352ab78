"""Prometheus metrics (DESIGN.md section 11), served on their own port.

Metric objects live in one registry per process so tests can build several servers
without "duplicated timeseries" errors; `penaltyd.server` exposes it on
`metrics_listen` when configured.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from penaltyd import __version__
from penaltyd.detector import RULES
from serving.metrics import RPC_BUCKETS, ServiceMetrics

#: Store operations, each a label value of the store latency and timeout metrics.
STORE_OPS = (
    "check",
    "report",
    "replay",
    "explain",
    "lift",
    "allow",
    "list",
    "disclose",
    "stats_flush",
    "stats_read",
    "ping",
)

#: Admin calls that read or change data about an address: each logs one audit event.
AUDITED = ("Explain", "Disclose", "Lift", "Allow", "RemoveAllow", "ListPenalties")


class Metrics(ServiceMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(
            "penaltyd", __version__, store_what="Store", store_ops=STORE_OPS, registry=registry
        )
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
        for rule in RULES:
            self.penalties_started.labels(rule)
        # Reputation (issue 15): the long-horizon bar and what it adapts to.
        self.reputation_threshold = Gauge(
            "penaltyd_reputation_threshold",
            "The long-horizon bar addresses and neighbourhoods are judged against",
            registry=r,
        )
        self.reputation_typical_ratio = Gauge(
            "penaltyd_reputation_typical_ratio",
            "The first-quartile address's long-horizon error ratio (the bar adapts to it)",
            registry=r,
        )
        self.bad_neighbourhoods = Gauge(
            "penaltyd_bad_neighbourhoods",
            "Misbehaving neighbourhoods among those this replica flushed last",
            registry=r,
        )
        self.check_latency = Histogram(
            "penaltyd_check_latency_seconds",
            "Checks answered, by path: the in-process view (no I/O) or the store",
            ["path"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.check_view = self.check_latency.labels("view")
        self.check_store = self.check_latency.labels("store")
        self.degraded = Gauge(
            "penaltyd_degraded",
            "1 while store calls are failing (reports buffered or in doubt, checks not "
            "answered from the in-process view fail open)",
            registry=r,
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
            "penaltyd_reports_dropped",
            "Buffered reports dropped: the buffer was full, or they waited longer than the window",
            registry=r,
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
        self.audit_events = Counter(
            "penaltyd_audit_events",
            "Admin calls that read or changed data about an address (the audit log), by method",
            ["method"],
            registry=r,
        )
        for method in AUDITED:
            self.audit_events.labels(method)
        self.invalid_requests = Counter(
            "penaltyd_invalid_requests", "Requests refused with INVALID_ARGUMENT", registry=r
        )
