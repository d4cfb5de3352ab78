"""`make deploy-check`: render and validate everything under deploy/, offline.

Run it as `.venv/bin/python deploy/check.py` (or `make deploy-check`). It needs no
cluster and no network, and takes a few seconds:

- every kustomize overlay (deploy/k8s/overlays/*) is rendered with `kubectl kustomize`
  (kubectl's built-in kustomize; a standalone `kustomize build` works too), and every
  object is validated against the Kubernetes JSON schemas bundled with the
  `kubernetes-validate` package, in strict mode (unknown fields are errors), for the
  Kubernetes version `KUBERNETES_VERSION`. The example manifests (deploy/k8s/examples)
  are validated the same way, without kustomize;
- the Prometheus Operator's custom resources (ServiceMonitor, PrometheusRule) are not in
  those schemas: they are checked structurally (apiVersion, kind, metadata, the
  spec keys the operator needs, non-empty PromQL with balanced brackets that names only
  metrics penaltyd or relaycheck exports);
- the objects are checked against each other: Service selectors and target ports reach
  a pod template, HPA/PDB/NetworkPolicy/ServiceMonitor targets exist, ConfigMap, Secret
  and ServiceAccount references resolve, every image has a pinned tag, containers are
  hardened (non-root, read-only root filesystem, no capabilities) and have resources,
  penaltyd and relaycheck have native gRPC probes, and their PENALTYD_* / RELAYCHECK_*
  variables are real settings with the Redis URL scheme the overlay stands for;
- the Grafana dashboard parses and every panel has queries with an expression;
- the Dockerfile is multi-stage, pins its base images (no `latest`), runs as a numeric
  non-root USER, installs nothing in the runtime stage, and has the expected ENTRYPOINT
  and ports.

The checks are the deploy.checks package, one module per concern (its docstring maps
them); this file is the entry point, and the names the tests use.

Every problem names the file, the object (Kind/namespace/name) and the field. The exit
status is 0 when there is none, 1 otherwise, 2 when the manifests cannot be rendered.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python deploy/check.py` puts deploy/ on sys.path, not the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.checks.cli import Report, main, run
from deploy.checks.config import DASHBOARD, KUBERNETES_VERSION, OVERLAYS_DIR, REDIS_SCHEMES
from deploy.checks.dashboard import check_dashboard
from deploy.checks.dockerfile import check_dockerfile
from deploy.checks.findings import Problem, RenderError, format_problems
from deploy.checks.overlays import check_manifest_file, check_overlay
from deploy.checks.promql import promql_problems
from deploy.checks.render import render, renderer
from deploy.checks.schema import validate_schema

__all__ = [
    "DASHBOARD",
    "KUBERNETES_VERSION",
    "OVERLAYS_DIR",
    "REDIS_SCHEMES",
    "Problem",
    "RenderError",
    "Report",
    "check_dashboard",
    "check_dockerfile",
    "check_manifest_file",
    "check_overlay",
    "format_problems",
    "main",
    "promql_problems",
    "render",
    "renderer",
    "run",
    "validate_schema",
]

if __name__ == "__main__":
    sys.exit(main())
