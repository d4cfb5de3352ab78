"""The Prometheus Operator's resources (ServiceMonitor, PrometheusRule), structurally.

Their CRDs are not among the Kubernetes schemas kubernetes-validate bundles, so the
fields the operator needs are checked here instead: known keys only, a selector and
endpoints for a ServiceMonitor, and for a PrometheusRule named groups of rules with valid
names, durations, severities, summaries and PromQL. Also: which series the alerts watch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .documents import Obj, as_dict, as_list
from .promql import promql_problems, series_in

Found = list[tuple[str, str]]  # (field, message) pairs, as schema validation returns

SERVICE_MONITOR_FIELDS = frozenset(
    {
        "selector",
        "endpoints",
        "jobLabel",
        "namespaceSelector",
        "podTargetLabels",
        "targetLabels",
        "sampleLimit",
        "targetLimit",
        "attachMetadata",
        "scrapeProtocols",
        "labelLimit",
        "labelNameLengthLimit",
        "labelValueLengthLimit",
        "keepDroppedTargets",
        "bodySizeLimit",
        "scrapeClass",
        "fallbackScrapeProtocol",
    }
)
RULE_FIELDS = frozenset(
    {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
)
SEVERITIES = ("critical", "warning", "info")


def check_monitoring_resource(obj: Obj) -> Found:
    """ServiceMonitor and PrometheusRule (monitoring.coreos.com/v1), structurally."""
    out: Found = []
    kind = obj.get("kind")
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        out.append(("apiVersion", f"expected monitoring.coreos.com/v1, got {obj['apiVersion']}"))
    if kind not in ("ServiceMonitor", "PrometheusRule"):
        return [*out, ("kind", f"no schema for monitoring.coreos.com kind {kind!r}")]
    allowed_top = {"apiVersion", "kind", "metadata", "spec"}
    out += [(key, "unknown top-level field") for key in obj if key not in allowed_top]
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        out.append(("metadata.name", "required"))
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [*out, ("spec", "required (a mapping)")]
    if kind == "ServiceMonitor":
        out += _check_service_monitor_spec(spec)
    else:
        out += _check_prometheus_rule_spec(spec)
    return out


def _check_service_monitor_spec(spec: Obj) -> Found:
    out: Found = []
    out += [
        (f"spec.{k}", "unknown ServiceMonitor field")
        for k in spec
        if k not in SERVICE_MONITOR_FIELDS
    ]
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (
        selector.get("matchLabels") or selector.get("matchExpressions")
    ):
        out.append(("spec.selector", "needs matchLabels or matchExpressions"))
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        out.append(("spec.endpoints", "needs at least one endpoint"))
    for i, ep in enumerate(as_list(endpoints)):
        where = f"spec.endpoints[{i}]"
        if not isinstance(ep, dict) or not (ep.get("port") or ep.get("targetPort")):
            out.append((where, "needs a port (a Service port name) or targetPort"))
            continue
        out += _durations(ep, ("interval", "scrapeTimeout"), where)
    return out


def _check_prometheus_rule_spec(spec: Obj) -> Found:
    out: Found = []
    out += [(f"spec.{k}", "unknown PrometheusRule field") for k in spec if k != "groups"]
    groups = spec.get("groups")
    if not isinstance(groups, list) or not groups:
        return [*out, ("spec.groups", "needs at least one group")]
    names: set[str] = set()
    for g, group in enumerate(groups):
        gwhere = f"spec.groups[{g}]"
        if not isinstance(group, dict):
            out.append((gwhere, "must be a mapping"))
            continue
        name = group.get("name")
        if not isinstance(name, str) or not name:
            out.append((f"{gwhere}.name", "required"))
        elif name in names:
            out.append((f"{gwhere}.name", f"duplicate group name {name!r}"))
        else:
            names.add(name)
        out += _durations(group, ("interval",), gwhere)
        rules = group.get("rules")
        if not isinstance(rules, list) or not rules:
            out.append((f"{gwhere}.rules", "needs at least one rule"))
            continue
        for r, rule in enumerate(rules):
            out += _check_rule(rule, f"{gwhere}.rules[{r}]")
    return out


def _check_rule(rule: Any, where: str) -> Found:
    if not isinstance(rule, dict):
        return [(where, "must be a mapping")]
    out: Found = []
    out += [(f"{where}.{k}", "unknown rule field") for k in rule if k not in RULE_FIELDS]
    if ("alert" in rule) == ("record" in rule):
        out.append((where, "needs exactly one of alert and record"))
    expr = rule.get("expr")
    if not isinstance(expr, str) or not expr.strip():
        out.append((f"{where}.expr", "PromQL expression required (non-empty string)"))
    else:
        out += [(f"{where}.expr", msg) for msg in promql_problems(expr)]
    if "alert" in rule:
        if not isinstance(rule["alert"], str) or not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]
        ):
            out.append((f"{where}.alert", f"not a valid alert name: {rule['alert']!r}"))
        out += _durations(rule, ("for",), where)
        severity = as_dict(rule.get("labels")).get("severity")
        if severity not in SEVERITIES:
            out.append((f"{where}.labels.severity", "critical, warning or info required"))
        summary = as_dict(rule.get("annotations")).get("summary")
        if not isinstance(summary, str) or not summary.strip():
            out.append((f"{where}.annotations.summary", "required"))
    return out


def _durations(mapping: Mapping[str, Any], keys: Iterable[str], where: str) -> Found:
    """The keys present in mapping whose value is not a Prometheus duration."""
    return [
        (f"{where}.{key}", f"not a Prometheus duration: {mapping[key]!r}")
        for key in keys
        if key in mapping and not is_duration(mapping[key])
    ]


def is_duration(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", value) is not None


def alert_series(objects: Iterable[Obj]) -> set[str]:
    """The series the alerting rules of these PrometheusRules look at."""
    series: set[str] = set()
    for obj in objects:
        if obj.get("kind") != "PrometheusRule":
            continue
        for group in as_list(as_dict(obj.get("spec")).get("groups")):
            for rule in as_list(as_dict(group).get("rules")):
                if isinstance(rule, dict) and "alert" in rule and isinstance(rule.get("expr"), str):
                    series |= series_in(rule["expr"])
    return series
