"""The checks behind `make deploy-check` (deploy/check.py), one module per concern.

deploy/check.py is the entry point and the names the tests use; the work is here:

- config: the paths under deploy/ and what the checks expect (versions, schemes, series);
- documents, findings: reading untrusted YAML/JSON; the Problem a check reports;
- render: `kubectl kustomize` an overlay, and trace each rendered object to its file;
- schema, monitoring: each object against the Kubernetes schemas, or structurally for
  the Prometheus Operator's ServiceMonitor and PrometheusRule; promql: their expressions;
- policy: which rules apply to which kind, over objects (one rendered set and its
  lookups): workloads (pod templates, containers, probes, resources), env (ConfigMap and
  Secret references, penaltyd's and relaycheck's settings), hardening (securityContext),
  images (pinned tags), targets (Service, HPA, PodDisruptionBudget, NetworkPolicy,
  ServiceMonitor);
- overlays: an overlay or example manifest through all of the above;
- dashboard, dockerfile: the Grafana dashboard and the Dockerfile;
- cli: run everything, print the report, set the exit status.
"""
