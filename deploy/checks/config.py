"""Where deploy/ keeps things, and what the checks expect of them.

The facts several checks share live here, so that a new overlay, a newer Kubernetes
version or a newly required series is a one-line change in one place: the paths under
deploy/, the Kubernetes version whose schemas apply, the Redis URL scheme each overlay
stands for, and the series the alerts and the dashboard must look at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = Path(__file__).resolve()  # named by the "unknown overlay" problem
DEPLOY = CONFIG.parents[1]
ROOT = DEPLOY.parent
K8S = DEPLOY / "k8s"
OVERLAYS_DIR = K8S / "overlays"
EXAMPLES_DIR = K8S / "examples"
DASHBOARD = DEPLOY / "grafana" / "penaltyd-dashboard.json"
DOCKERFILE = DEPLOY / "Dockerfile"

# A version whose schemas kubernetes-validate bundles (1.30+ packages do). Native gRPC
# probes are GA since 1.27, autoscaling/v2 since 1.23.
KUBERNETES_VERSION = "1.30"

# What each overlay stands for: the scheme its PENALTYD_REDIS_URL must use.
REDIS_SCHEMES: dict[str, str] = {
    "single": "redis://",
    "sentinel": "redis+sentinel://",
    "cluster": "redis+cluster://",
}

# Kinds whose spec.template is a pod template.
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")
PENALTYD_NAME = "penaltyd"  # app.kubernetes.io/name of the penaltyd server pods
RELAYCHECK_NAME = "relaycheck"  # ... and of relaycheck's (deploy/k8s/components/relaycheck)


@dataclass(frozen=True)
class GrpcService:
    """A gRPC server of this repository, by the app.kubernetes.io/name of its pods: they
    need native gRPC probes, and their <env_prefix>* variables must be real settings of
    `settings_module`.Settings, with a Redis URL of the overlay's topology."""

    name: str
    env_prefix: str
    settings_module: str


GRPC_SERVICES: dict[str, GrpcService] = {
    PENALTYD_NAME: GrpcService(PENALTYD_NAME, "PENALTYD_", "penaltyd.settings"),
    RELAYCHECK_NAME: GrpcService(RELAYCHECK_NAME, "RELAYCHECK_", "relaycheck.settings"),
}
# Where each one's metrics registry is (the series the alerts and dashboard may name).
METRICS_MODULES = ("penaltyd.metrics", "relaycheck.metrics")

# Every series the alerts and the dashboard must look at (issue 6).
REQUIRED_ALERT_SERIES = (
    "penaltyd_degraded",
    "penaltyd_store_latency_seconds_bucket",
    "penaltyd_penalties_started_total",
    "penaltyd_feed_synced",
    "penaltyd_reports_dropped_total",
)
REQUIRED_DASHBOARD_SERIES = (
    "penaltyd_active_penalties",
    "penaltyd_checks_total",
    "penaltyd_reports_total",
    "penaltyd_penalties_started_total",
    "penaltyd_store_latency_seconds_bucket",
    "penaltyd_degraded",
    "penaltyd_feed_synced",
    "penaltyd_reports_buffered",
    "penaltyd_reports_dropped_total",
    "penaltyd_reports_in_doubt_total",
    "penaltyd_shared_addresses",
    # relaycheck's row
    "relaycheck_classifications_total",
    "relaycheck_classify_seconds_bucket",
    "relaycheck_degraded_total",
    "relaycheck_store_up",
    "relaycheck_store_latency_seconds_bucket",
    "relaycheck_penaltyd_reports_total",
    "relaycheck_probes_total",
    "relaycheck_invalid_requests_total",
)
