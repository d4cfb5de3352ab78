"""relaycheck's Kubernetes assets (deploy/k8s/components/relaycheck) and the checks that
now hold them to penaltyd's rules: native gRPC probes, real RELAYCHECK_* settings, a
Redis URL of the overlay's topology, and PromQL that names only exported series."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from deploy import check


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {o: check.render(check.OVERLAYS_DIR / o) for o in check.REDIS_SCHEMES}


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [
        o
        for o in objects
        if o["kind"] == kind
        and (o["metadata"]["name"] == name or o["metadata"]["name"].startswith(f"{name}-"))
    ]
    assert len(found) == 1, f"{kind}/{name}: {len(found)}"
    return found[0]


@pytest.mark.parametrize("overlay", list(check.REDIS_SCHEMES))
def test_every_overlay_runs_relaycheck_beside_penaltyd(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objects = rendered[overlay]
    relaycheck = _one(objects, "Deployment", "relaycheck")
    penaltyd = _one(objects, "Deployment", "penaltyd")
    (rc,) = relaycheck["spec"]["template"]["spec"]["containers"]
    (pd,) = penaltyd["spec"]["template"]["spec"]["containers"]
    assert rc["image"] == pd["image"]  # one image, pinned once
    assert rc["command"] == ["relaycheck"]
    assert rc["args"] == ["serve"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert rc[probe]["grpc"] == {"port": 50061, "service": ""}
    config = _one(objects, "ConfigMap", "relaycheck-config")["data"]
    penaltyd_config = _one(objects, "ConfigMap", "penaltyd-config")["data"]
    assert config["RELAYCHECK_REDIS_URL"] == penaltyd_config["PENALTYD_REDIS_URL"]
    assert config["RELAYCHECK_REDIS_URL"].startswith(check.REDIS_SCHEMES[overlay])
    labels = relaycheck["spec"]["template"]["metadata"]["labels"]
    assert labels["penaltyd/client"] == "true"  # penaltyd's NetworkPolicy admits its reports
    redis_policy = next(
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] in ("redis", "redis-cluster")
    )
    sources = [
        f.get("podSelector", {}).get("matchLabels", {})
        for f in redis_policy["spec"]["ingress"][0]["from"]
    ]
    assert {
        "app.kubernetes.io/name": "relaycheck",
        "app.kubernetes.io/component": "server",
    } in sources
    monitor = _one(objects, "ServiceMonitor", "relaycheck")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert _one(objects, "PodDisruptionBudget", "relaycheck")["spec"]["maxUnavailable"] == 1


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def test_relaycheck_is_held_to_the_grpc_service_rules(tmp_path: Path) -> None:
    overlay = _write(
        tmp_path / "rc",
        {
            "kustomization.yaml": "namespace: t\nresources: [deployment.yaml]\n",
            "deployment.yaml": """\
                apiVersion: apps/v1
                kind: Deployment
                metadata: {name: relaycheck}
                spec:
                  replicas: 2
                  selector:
                    matchLabels: {app.kubernetes.io/name: relaycheck}
                  template:
                    metadata:
                      labels: {app.kubernetes.io/name: relaycheck}
                    spec:
                      containers:
                        - name: relaycheck
                          image: registry.example.com/penaltyd:0.1.0
                          ports: [{name: grpc, containerPort: 50061}]
                          readinessProbe: {tcpSocket: {port: grpc}}
                          env:
                            - {name: RELAYCHECK_PROBE_HELO, value: "x"}
                            - {name: RELAYCHECK_NO_SUCH_THING, value: "1"}
                            - {name: RELAYCHECK_MAX_RCPT, value: "0"}
                          resources:
                            requests: {cpu: 100m, memory: 64Mi}
                            limits: {memory: 128Mi}
                """,
        },
    )
    _, problems = check.check_overlay(overlay)
    messages = [p.message for p in problems if p.obj == "Deployment/t/relaycheck"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert any(
            p.field.endswith(probe) and p.message == "relaycheck needs a native gRPC probe"
            for p in problems
        ), probe
    assert any("RELAYCHECK_NO_SUCH_THING: relaycheck has no setting" in m for m in messages)
    assert any(m.startswith("RELAYCHECK_MAX_RCPT:") for m in messages)
    assert any("RELAYCHECK_REDIS_URL is not set" in m for m in messages)


def test_promql_knows_relaycheck_series() -> None:
    assert check.promql_problems("sum(rate(relaycheck_probes_total[5m]))") == []
    assert check.promql_problems("relaycheck_store_up == 0") == []
    assert any(
        "relaycheck exports no series 'relaycheck_nope_total'" in p
        for p in check.promql_problems("rate(relaycheck_nope_total[1m])")
    )
