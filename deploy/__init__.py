"""Deployment assets (Dockerfile, kustomize manifests, Grafana dashboard).

`deploy/check.py` is `make deploy-check`; it is a module here so the tests can import it,
and the checks it runs are the `deploy.checks` package.
"""
