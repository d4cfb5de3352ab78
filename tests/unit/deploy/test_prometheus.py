"""deploy/prometheus/: the plain-host rules follow the Kubernetes alerts, Prometheus
accepts them, and every alert passes its promtool unit tests.

rules.yml is generated from deploy/k8s/base/prometheusrule.yaml with the Kubernetes
labels renamed (deploy/prometheus/generate.py). rules_test.yml holds the alerts' unit
tests (`promtool test rules`): every alert fires in at least one case and stays quiet in
at least one other, and the spike rule is tested on a Prometheus holding less than a day
of data. promtool comes with Debian's `prometheus` package, which `make test` installs
(`make deps`); without it these tests fail and say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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
        pytest.fail("promtool not found: `make deps` installs Debian's prometheus package")
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


def _promtool(promtool: str, *args: str, cwd: Path = PROMETHEUS) -> str:
    done = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_accepts_the_kubernetes_rules(promtool: str, tmp_path: Path) -> None:
    """The PrometheusRule's groups, as the Prometheus Operator hands them to Prometheus."""
    doc = yaml.safe_load(generate.SOURCE.read_text())
    rules = tmp_path / "penaltyd-k8s-rules.yml"
    rules.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    assert "SUCCESS" in _promtool(promtool, "check", "rules", str(rules))


def test_alert_unit_tests_pass(promtool: str) -> None:
    """`promtool test rules deploy/prometheus/rules_test.yml`: each case evaluates the
    shipped rules.yml on series as a static scrape config labels them (job, instance)."""
    out = _promtool(promtool, "test", "rules", "rules_test.yml")
    assert "SUCCESS" in out, out
    assert "FAILED" not in out, out


def _cases() -> list[tuple[str, dict[str, Any]]]:
    """(test group name, alert_rule_test case) for every case of rules_test.yml."""
    doc = yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())
    assert doc["rule_files"] == ["rules.yml"]
    return [(group["name"], case) for group in doc["tests"] for case in group["alert_rule_test"]]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    alerts = {str(r["alert"]) for r in _host_rules()}
    cases = _cases()
    tested = {case["alertname"] for _, case in cases}
    assert tested <= alerts, f"cases for alerts that do not exist: {tested - alerts}"
    for alert in sorted(alerts):
        mine = [case for _, case in cases if case["alertname"] == alert]
        assert any(c.get("exp_alerts") for c in mine), f"{alert}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{alert}: no case where it is quiet"
        for case in mine:
            for exp in case.get("exp_alerts") or []:  # the rendered text is checked too
                assert set(exp["exp_annotations"]) == {"summary", "description"}, alert


def _minutes(duration: str) -> float:
    units = {"s": 1 / 60, "m": 1, "h": 60, "d": 1440}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)([smhd])", duration))


def test_the_spike_rule_is_tested_on_a_new_prometheus() -> None:
    """With less than a day of samples the spike rule neither fires on an ordinary rate
    (the old rate(...[1d]) baseline divided a few hours by a full day) nor misses a real
    spike or the absolute ceiling."""
    day = 24 * 60
    young: dict[str, list[bool]] = {}
    for group, case in _cases():
        if case["alertname"] == "PenaltydPenaltySpike" and _minutes(case["eval_time"]) < day:
            young.setdefault(group, []).append(bool(case.get("exp_alerts")))
    assert any(not any(fired) for fired in young.values()), "no quiet new-Prometheus group"
    assert sum(any(fired) for fired in young.values()) >= 2, "real spike and ceiling cases"
