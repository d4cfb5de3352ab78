"""deploy/prometheus/: the plain-host rules follow the Kubernetes alerts, and Prometheus
accepts them.

rules.yml is generated from deploy/k8s/base/prometheusrule.yaml with the Kubernetes
labels renamed (deploy/prometheus/generate.py). The promtool checks need Debian's
`prometheus` package (`make fleet` installs it); without it they are skipped, and the
generated file is still compared and inspected.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from deploy.checks.config import ROOT
from deploy.prometheus import generate

PROMETHEUS = ROOT / "deploy" / "prometheus"
K8S_LABELS = re.compile(r"\b(namespace|pod)\b")


def _k8s_rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(generate.SOURCE.read_text())
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def _host_rules() -> list[dict[str, object]]:
    doc = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "promtool not installed (Debian's prometheus package; `make fleet` installs it)"
        )
    return found


def test_rules_yml_is_what_the_generator_writes() -> None:
    done = subprocess.run(
        [sys.executable, str(PROMETHEUS / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_same_alerts_with_host_labels() -> None:
    k8s, host = _k8s_rules(), _host_rules()
    assert [r["alert"] for r in host] == [r["alert"] for r in k8s]
    for a, b in zip(k8s, host, strict=True):
        assert (b["for"], b["labels"]) == (a["for"], a["labels"])
        expr = str(b["expr"])
        assert not K8S_LABELS.search(expr), f"{b['alert']}: {expr}"
        # Only label names change: the same series, functions and thresholds.
        assert re.findall(r"[a-z_]+\(|\d+(?:\.\d+)?|penaltyd_\w+", expr) == re.findall(
            r"[a-z_]+\(|\d+(?:\.\d+)?|penaltyd_\w+", str(a["expr"])
        )
        for text in dict(b.get("annotations", {})).values():  # type: ignore[call-overload]
            assert "$labels.pod" not in text
            assert "$labels.namespace" not in text


def test_rewrite_renames_labels_in_clauses_and_selectors() -> None:
    assert generate.rewrite_expr("max by (namespace, pod) (x{namespace='a', op=\"b\"})") == (
        "max by (job, instance) (x{job='a', op=\"b\"})"
    )
    assert generate.rewrite_expr('a unless on (namespace,pod) b{pod=~"p.*"}') == (
        'a unless on (job, instance) b{instance=~"p.*"}'
    )
    assert generate.rewrite_expr('up{job="penaltyd"} == 0') == 'up{job="penaltyd"} == 0'


def test_promtool_accepts_the_rules_and_the_config(promtool: str, tmp_path: Path) -> None:
    rules = tmp_path / "penaltyd-rules.yml"
    shutil.copy(PROMETHEUS / "rules.yml", rules)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        (PROMETHEUS / "prometheus.yml")
        .read_text()
        .replace("/etc/prometheus/penaltyd-rules.yml", str(rules))
    )
    for args in (["check", "rules", str(rules)], ["check", "config", str(config)]):
        done = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_fire_on_static_targets(promtool: str, tmp_path: Path) -> None:
    """promtool's rule unit tests: a degraded replica and an unreachable one, as a static
    scrape config labels them (job, instance)."""
    shutil.copy(PROMETHEUS / "rules.yml", tmp_path / "rules.yml")
    (tmp_path / "test.yml").write_text(
        textwrap.dedent(
            """\
            rule_files: [rules.yml]
            evaluation_interval: 1m
            tests:
              - interval: 1m
                input_series:
                  - series: 'penaltyd_degraded{job="penaltyd", instance="127.0.0.1:9150"}'
                    values: '1x10'
                  - series: 'penaltyd_degraded{job="penaltyd", instance="127.0.0.1:9152"}'
                    values: '0x10'
                  - series: 'up{job="penaltyd", instance="127.0.0.1:9152"}'
                    values: '0x10'
                alert_rule_test:
                  - eval_time: 5m
                    alertname: PenaltydDegraded
                    exp_alerts:
                      - exp_labels: {severity: warning, job: penaltyd, instance: 127.0.0.1:9150}
                        exp_annotations:
                          summary: >-
                            penaltyd 127.0.0.1:9150 is failing open (store unreachable or slow)
                          description: >-
                            penaltyd/127.0.0.1:9150 has answered degraded for 2 minutes: no
                            penalties are enforced through it and reports are being buffered.
                            Check Redis reachability and latency from that replica
                            (penaltyd.store health, logs `store_unavailable_fail_open`).
                  - eval_time: 5m
                    alertname: PenaltydFleetDegraded
                    exp_alerts: []
                  - eval_time: 6m
                    alertname: PenaltydTargetDown
                    exp_alerts:
                      - exp_labels: {severity: warning, job: penaltyd, instance: 127.0.0.1:9152}
                        exp_annotations:
                          summary: penaltyd 127.0.0.1:9152 cannot be scraped
                          description: >-
                            Prometheus has not reached penaltyd/127.0.0.1:9152 on its metrics
                            port for 5 minutes: the replica is down, or a firewall blocks it.
            """
        )
    )
    done = subprocess.run(
        [promtool, "test", "rules", "test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
