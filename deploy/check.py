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
  those schemas: they are checked structurally here (apiVersion, kind, metadata, the
  spec keys the operator needs, non-empty PromQL with balanced brackets that names only
  metrics penaltyd exports);
- the objects are checked against each other: Service selectors and target ports reach
  a pod template, HPA/PDB/NetworkPolicy/ServiceMonitor targets exist, ConfigMap, Secret
  and ServiceAccount references resolve, every image has a pinned tag, containers are
  hardened (non-root, read-only root filesystem, no capabilities) and have resources,
  penaltyd has native gRPC probes, and its PENALTYD_* variables are real settings with
  the Redis URL scheme the overlay stands for;
- the Grafana dashboard parses and every panel has queries with an expression;
- the Dockerfile is multi-stage, pins its base images (no `latest`), runs as a numeric
  non-root USER, installs nothing in the runtime stage, and has the expected ENTRYPOINT
  and ports.

Every problem names the file, the object (Kind/namespace/name) and the field. The exit
status is 0 when there is none, 1 otherwise, 2 when the manifests cannot be rendered.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import yaml

DEPLOY = Path(__file__).resolve().parent
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
REDIS_SCHEMES = {
    "single": "redis://",
    "sentinel": "redis+sentinel://",
    "cluster": "redis+cluster://",
}

# Kinds whose spec.template is a pod template.
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")
PENALTYD_NAME = "penaltyd"  # app.kubernetes.io/name of the penaltyd server pods

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
)

Obj = dict[str, Any]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Problem:
    """One finding: where (a file), which object, which field, and what is wrong."""

    where: str
    obj: str
    field: str
    message: str
    context: str = ""  # e.g. "overlay single": where a shared file was rendered

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Identity without the context: a base file's problem shows once per overlay."""
        return (self.where, self.obj, self.field, self.message)

    def __str__(self) -> str:
        parts = [self.where]
        if self.obj:
            parts.append(self.obj)
        if self.field:
            parts.append(self.field)
        text = ": ".join(parts) + f": {self.message}"
        return f"{text} [{self.context}]" if self.context else text


@dataclass
class Report:
    """What was checked (summary lines) and what was found (problems)."""

    lines: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    objects: dict[str, int] = field(default_factory=dict)  # overlay/example -> object count

    @property
    def ok(self) -> bool:
        return not self.problems


class RenderError(Exception):
    """The check cannot run: no kubectl or kustomize, kustomize failed, or no schemas."""


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def obj_id(obj: Mapping[str, Any]) -> str:
    """Kind/namespace/name (Kind/name for cluster-scoped objects)."""
    meta = _dict(obj.get("metadata"))
    ns = meta.get("namespace")
    name = meta.get("name", "<no name>")
    kind = obj.get("kind", "<no kind>")
    return f"{kind}/{ns}/{name}" if ns else f"{kind}/{name}"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------- rendering


def renderer() -> list[str]:
    """The command that renders a kustomization directory given as its last argument.

    $KUBECTL, else kubectl on PATH or beside this interpreter (a venv), else a standalone
    kustomize.
    """
    for kubectl in (
        os.environ.get("KUBECTL"),
        shutil.which("kubectl"),
        shutil.which("kubectl", path=str(Path(sys.executable).parent)),
    ):
        if kubectl:
            return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    raise RenderError(
        "neither kubectl nor kustomize was found on PATH (or $KUBECTL): install kubectl "
        "(its built-in `kubectl kustomize` renders offline) to run the deploy check"
    )


def render(directory: Path, command: Sequence[str] | None = None) -> list[Obj]:
    """`kubectl kustomize DIR`, parsed: the objects kustomize would apply."""
    cmd = [*(command or renderer()), str(directory)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RenderError(f"{rel(directory)}: `{' '.join(cmd)}` failed: {exc}") from exc
    if done.returncode != 0:
        raise RenderError(
            f"{rel(directory)}: `{' '.join(cmd)}` exited {done.returncode}:\n" + done.stderr.strip()
        )
    try:
        docs = list(yaml.safe_load_all(done.stdout))
    except yaml.YAMLError as exc:
        raise RenderError(f"{rel(directory)}: kustomize output is not YAML: {exc}") from exc
    return [d for d in docs if d is not None]


def kustomization_files(directory: Path, seen: set[Path] | None = None) -> list[Path]:
    """The resource files a kustomization pulls in, following directory resources."""
    seen = set() if seen is None else seen
    directory = directory.resolve()
    if directory in seen:
        return []
    seen.add(directory)
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).exists():
            kfile = directory / name
            break
    else:
        return []
    files = [kfile]
    try:
        spec = _dict(yaml.safe_load(kfile.read_text()))
    except yaml.YAMLError:
        return files
    for entry in [*_list(spec.get("resources")), *_list(spec.get("components"))]:
        if not isinstance(entry, str) or "://" in entry:
            continue
        target = directory / entry
        if target.is_dir():
            files += kustomization_files(target, seen)
        elif target.is_file():
            files.append(target)
    return files


def source_index(files: Iterable[Path]) -> dict[tuple[str, str], str]:
    """(kind, name) -> the file that defines it, so problems can name a file."""
    index: dict[tuple[str, str], str] = {}
    for path in files:
        if path.name.startswith("kustomization") or path.name == "Kustomization":
            spec = _dict(_safe_load(path))
            for gen, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
                for item in _list(spec.get(gen)):
                    if isinstance(item, dict) and isinstance(item.get("name"), str):
                        index.setdefault((kind, item["name"]), rel(path))
            continue
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError):
            continue
        for doc in docs:
            if isinstance(doc, dict):
                name = _dict(doc.get("metadata")).get("name")
                if isinstance(name, str):
                    index[(str(doc.get("kind")), name)] = rel(path)
    return index


def _safe_load(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _source(obj: Obj, index: Mapping[tuple[str, str], str], default: str) -> str:
    kind = str(obj.get("kind"))
    name = str(_dict(obj.get("metadata")).get("name", ""))
    if (kind, name) in index:
        return index[(kind, name)]
    # configMapGenerator/secretGenerator names carry a content hash suffix.
    base = re.sub(r"-[a-z0-9]{10}$", "", name)
    return index.get((kind, base), default)


# --------------------------------------------------------------------------- schemas


def validate_schema(obj: Obj, version: str = KUBERNETES_VERSION) -> list[tuple[str, str]]:
    """(field, message) pairs; Kubernetes schemas, or our own for known custom resources."""
    api = str(obj.get("apiVersion", ""))
    if not api or not obj.get("kind"):
        return [("", "apiVersion and kind are required")]
    if api.startswith("monitoring.coreos.com/"):
        return check_monitoring_resource(obj)
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [(_path(exc.absolute_path), str(exc.message))]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [("apiVersion", str(exc.message))]
    return []


def check_monitoring_resource(obj: Obj) -> list[tuple[str, str]]:
    """ServiceMonitor and PrometheusRule (monitoring.coreos.com/v1), structurally."""
    out: list[tuple[str, str]] = []
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


def _check_service_monitor_spec(spec: Obj) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    known = {
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
    out += [(f"spec.{k}", "unknown ServiceMonitor field") for k in spec if k not in known]
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (
        selector.get("matchLabels") or selector.get("matchExpressions")
    ):
        out.append(("spec.selector", "needs matchLabels or matchExpressions"))
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        out.append(("spec.endpoints", "needs at least one endpoint"))
    for i, ep in enumerate(_list(endpoints)):
        where = f"spec.endpoints[{i}]"
        if not isinstance(ep, dict) or not (ep.get("port") or ep.get("targetPort")):
            out.append((where, "needs a port (a Service port name) or targetPort"))
            continue
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not _is_duration(ep[key]):
                out.append((f"{where}.{key}", f"not a Prometheus duration: {ep[key]!r}"))
    return out


def _check_prometheus_rule_spec(spec: Obj) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
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
        if "interval" in group and not _is_duration(group["interval"]):
            out.append((f"{gwhere}.interval", f"not a Prometheus duration: {group['interval']!r}"))
        rules = group.get("rules")
        if not isinstance(rules, list) or not rules:
            out.append((f"{gwhere}.rules", "needs at least one rule"))
            continue
        for r, rule in enumerate(rules):
            out += _check_rule(rule, f"{gwhere}.rules[{r}]")
    return out


def _check_rule(rule: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(rule, dict):
        return [(where, "must be a mapping")]
    out: list[tuple[str, str]] = []
    known = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
    out += [(f"{where}.{k}", "unknown rule field") for k in rule if k not in known]
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
        if "for" in rule and not _is_duration(rule["for"]):
            out.append((f"{where}.for", f"not a Prometheus duration: {rule['for']!r}"))
        severity = _dict(rule.get("labels")).get("severity")
        if severity not in ("critical", "warning", "info"):
            out.append((f"{where}.labels.severity", "critical, warning or info required"))
        summary = _dict(rule.get("annotations")).get("summary")
        if not isinstance(summary, str) or not summary.strip():
            out.append((f"{where}.annotations.summary", "required"))
    return out


def _is_duration(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", value) is not None


# --------------------------------------------------------------------------- PromQL


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def promql_problems(expr: str) -> list[str]:
    """Cheap offline sanity checks of a PromQL expression (no parser is bundled)."""
    problems: list[str] = []
    bare = _strip_strings(expr)
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in bare:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            problems.append(f"unbalanced {ch!r} in {expr.strip()!r}")
            break
    else:
        if stack:
            problems.append(f"unclosed {stack[-1]!r} in {expr.strip()!r}")
    known = known_series()
    if known:
        for name in sorted(set(re.findall(r"\bpenaltyd_[a-z0-9_]+\b", bare))):
            if name not in known:
                problems.append(f"penaltyd exports no series {name!r}")
    return problems


_KNOWN_SERIES: set[str] | None = None


def known_series() -> set[str]:
    """Series names penaltyd exports, read from its metrics registry (empty if unknown)."""
    global _KNOWN_SERIES
    if _KNOWN_SERIES is None:
        try:
            from penaltyd.metrics import Metrics
        except ImportError:  # the check runs outside penaltyd's venv: skip this part
            _KNOWN_SERIES = set()
            return _KNOWN_SERIES
        suffixes = {
            "counter": ("_total", "_created"),
            "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"),
        }
        names: set[str] = set()
        for family in Metrics().registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        _KNOWN_SERIES = names
    return _KNOWN_SERIES


def series_in(expr: str) -> set[str]:
    return set(re.findall(r"\bpenaltyd_[a-z0-9_]+\b", _strip_strings(expr)))


# --------------------------------------------------------------------------- objects


def pod_spec(obj: Obj) -> dict[str, Any] | None:
    kind = obj.get("kind")
    spec = _dict(obj.get("spec"))
    if kind == "Pod":
        return spec
    if kind in WORKLOAD_KINDS:
        return _dict(_dict(spec.get("template")).get("spec"))
    if kind == "CronJob":
        job = _dict(_dict(spec.get("jobTemplate")).get("spec"))
        return _dict(_dict(job.get("template")).get("spec"))
    return None


def pod_labels(obj: Obj) -> dict[str, Any]:
    if obj.get("kind") == "Pod":
        return _dict(_dict(obj.get("metadata")).get("labels"))
    return _dict(_dict(_dict(_dict(obj.get("spec")).get("template")).get("metadata")).get("labels"))


def containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for key in ("initContainers", "containers"):
        for i, c in enumerate(_list(spec.get(key))):
            if isinstance(c, dict):
                yield f"{key}[{i}]", c


def _matches(required: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    """A plain label map (a Service's selector) matches labels."""
    return all(labels.get(k) == v for k, v in required.items())


def _selects(selector: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) matches labels; {} matches all."""
    if not _matches(_dict(selector.get("matchLabels")), labels):
        return False
    for expr in _list(selector.get("matchExpressions")):
        expr = _dict(expr)
        key, op, values = str(expr.get("key")), expr.get("operator"), _list(expr.get("values"))
        present = key in labels
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and present and labels.get(key) in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def _pinned(image: str) -> str | None:
    """None when the image names a tag other than latest (or a digest), else why not."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag (an implicit :latest)"
    if last.rsplit(":", 1)[1] == "latest":
        return f"image {image!r} uses the latest tag; pin a version"
    return None


@dataclass
class Context:
    """One rendered set of objects, with lookups for cross-references."""

    objects: list[Obj]

    def named(self, kind: str, name: str, namespace: str | None) -> Obj | None:
        for obj in self.objects:
            meta = _dict(obj.get("metadata"))
            if (
                obj.get("kind") == kind
                and meta.get("name") == name
                and (namespace is None or meta.get("namespace") in (namespace, None))
            ):
                return obj
        return None

    def workloads(self, namespace: str | None) -> list[Obj]:
        return [
            o
            for o in self.objects
            if pod_spec(o) is not None and _dict(o.get("metadata")).get("namespace") == namespace
        ]


def check_objects(
    objects: list[Obj],
    source: Callable[[Obj], str],
    *,
    hardened: Callable[[dict[str, Any]], bool] = lambda c: True,
    redis_scheme: str | None = None,
    version: str = KUBERNETES_VERSION,
) -> list[Problem]:
    """Schema validation plus the cross-object rules, for one rendered set of objects."""
    ctx = Context(objects)
    problems: list[Problem] = []

    def add(obj: Obj, fld: str, message: str) -> None:
        problems.append(Problem(source(obj), obj_id(obj), fld, message))

    seen: Counter[str] = Counter(obj_id(o) for o in objects if isinstance(o, dict))
    for oid, n in seen.items():
        if n > 1:
            problems.append(Problem("(rendered)", oid, "", f"defined {n} times"))

    for obj in objects:
        if not isinstance(obj, dict):
            problems.append(Problem("(rendered)", "<document>", "", "not a mapping"))
            continue
        for fld, message in validate_schema(obj, version):
            add(obj, fld, message)
        spec = pod_spec(obj)
        if spec is not None:
            _check_workload(ctx, obj, spec, add, hardened, redis_scheme)
        kind = obj.get("kind")
        if kind == "Service":
            _check_service(ctx, obj, add)
        elif kind == "HorizontalPodAutoscaler":
            _check_hpa(ctx, obj, add)
        elif kind in ("PodDisruptionBudget", "NetworkPolicy"):
            _check_selects_workload(ctx, obj, add)
        elif kind == "ServiceMonitor":
            _check_service_monitor_target(ctx, obj, add)
    return problems


Add = Callable[[Obj, str, str], None]


def _check_workload(
    ctx: Context,
    obj: Obj,
    spec: dict[str, Any],
    add: Add,
    hardened: Callable[[dict[str, Any]], bool],
    redis_scheme: str | None,
) -> None:
    meta = _dict(obj.get("metadata"))
    ns = meta.get("namespace")
    prefix = "spec" if obj.get("kind") == "Pod" else "spec.template.spec"
    wspec = _dict(obj.get("spec"))
    labels = pod_labels(obj)

    selector = wspec.get("selector")
    has_selector = obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
    if has_selector and isinstance(selector, dict) and not _selects(selector, labels):
        add(obj, "spec.selector", "does not match the pod template's labels")
    if obj.get("kind") == "StatefulSet":
        svc_name = wspec.get("serviceName")
        svc = ctx.named("Service", str(svc_name), ns) if svc_name else None
        if svc_name and svc is None:
            add(obj, "spec.serviceName", f"no Service {svc_name!r} in this set")
        elif svc is not None and _dict(svc.get("spec")).get("clusterIP") != "None":
            add(obj, "spec.serviceName", f"Service {svc_name!r} must be headless")

    sa = spec.get("serviceAccountName")
    if sa and sa != "default" and ctx.named("ServiceAccount", str(sa), ns) is None:
        add(obj, f"{prefix}.serviceAccountName", f"no ServiceAccount {sa!r} in this set")

    volumes = {v.get("name"): v for v in _list(spec.get("volumes")) if isinstance(v, dict)}
    for t in _list(wspec.get("volumeClaimTemplates")):
        volumes[_dict(_dict(t).get("metadata")).get("name")] = {}
    for name, vol in volumes.items():
        for kind, key, ref in (
            ("ConfigMap", "configMap", "name"),
            ("Secret", "secret", "secretName"),
        ):
            src = _dict(vol.get(key))
            if src and not src.get("optional") and ctx.named(kind, str(src.get(ref)), ns) is None:
                add(
                    obj,
                    f"{prefix}.volumes[{name}].{key}",
                    f"no {kind} {src.get(ref)!r} in this set",
                )

    pod_sc = _dict(spec.get("securityContext"))
    is_penaltyd = labels.get("app.kubernetes.io/name") == PENALTYD_NAME
    for where, c in containers(spec):
        cwhere = f"{prefix}.{where}"
        cname = c.get("name", where)
        image = c.get("image")
        if not isinstance(image, str) or not image:
            add(obj, f"{cwhere}.image", f"container {cname!r} has no image")
        elif why := _pinned(image):
            add(obj, f"{cwhere}.image", why)
        resources = _dict(c.get("resources"))
        for part, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
            for key in keys:
                if key not in _dict(resources.get(part)):
                    add(obj, f"{cwhere}.resources.{part}.{key}", f"container {cname!r}: required")
        ports = {
            p.get("name"): p.get("containerPort")
            for p in _list(c.get("ports"))
            if isinstance(p, dict)
        }
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            pspec = _dict(c.get(probe))
            for handler in ("grpc", "tcpSocket", "httpGet"):
                port = _dict(pspec.get(handler)).get("port")
                if isinstance(port, str) and port not in ports:
                    add(
                        obj, f"{cwhere}.{probe}.{handler}.port", f"no container port named {port!r}"
                    )
                if isinstance(port, int) and port not in ports.values():
                    add(
                        obj, f"{cwhere}.{probe}.{handler}.port", f"container does not expose {port}"
                    )
        for m in _list(c.get("volumeMounts")):
            if isinstance(m, dict) and m.get("name") not in volumes:
                add(obj, f"{cwhere}.volumeMounts", f"no volume {m.get('name')!r}")
        env_settings: dict[str, str] = {}
        _check_env_refs(ctx, obj, c, cwhere, ns, add, env_settings)
        if hardened(c):
            _check_hardening(obj, c, cwhere, pod_sc, add)
        if is_penaltyd and where.startswith("containers"):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "grpc" not in _dict(c.get(probe)):
                    add(obj, f"{cwhere}.{probe}", "penaltyd needs a native gRPC probe")
            _check_penaltyd_settings(obj, f"{cwhere}.env", env_settings, add, redis_scheme)


def _check_env_refs(
    ctx: Context, obj: Obj, c: dict[str, Any], cwhere: str, ns: Any, add: Add, out: dict[str, str]
) -> None:
    """ConfigMap/Secret references resolve; collects the container's PENALTYD_* settings."""
    for i, ef in enumerate(_list(c.get("envFrom"))):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = _dict(_dict(ef).get(key))
            if not ref:
                continue
            target = ctx.named(kind, str(ref.get("name")), ns)
            if target is None:
                if not ref.get("optional"):
                    add(obj, f"{cwhere}.envFrom[{i}].{key}", f"no {kind} {ref.get('name')!r}")
                continue
            data = {**_dict(target.get("data")), **_dict(target.get("stringData"))}
            prefix = str(_dict(ef).get("prefix", ""))
            out.update(
                {prefix + str(k): "" if kind == "Secret" else str(v) for k, v in data.items()}
            )
    for i, ev in enumerate(_list(c.get("env"))):
        ev = _dict(ev)
        name = str(ev.get("name", ""))
        if "value" in ev:
            out[name] = str(ev["value"])
        source = _dict(ev.get("valueFrom"))
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            ref = _dict(source.get(key))
            if not ref:
                continue
            out[name] = ""
            target = ctx.named(kind, str(ref.get("name")), ns)
            if target is None:
                if not ref.get("optional"):
                    add(obj, f"{cwhere}.env[{i}].valueFrom.{key}", f"no {kind} {ref.get('name')!r}")
                continue
            keys = {**_dict(target.get("data")), **_dict(target.get("stringData"))}
            if ref.get("key") not in keys and not ref.get("optional"):
                add(
                    obj,
                    f"{cwhere}.env[{i}].valueFrom.{key}.key",
                    f"{kind} {ref.get('name')!r} has no key {ref.get('key')!r}",
                )


def _check_hardening(
    obj: Obj, c: dict[str, Any], cwhere: str, pod_sc: dict[str, Any], add: Add
) -> None:
    sc = _dict(c.get("securityContext"))
    name = c.get("name")
    run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    run_as_user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if run_as_non_root is not True:
        add(obj, f"{cwhere}.securityContext.runAsNonRoot", f"container {name!r}: must be true")
    if run_as_user == 0:
        add(obj, f"{cwhere}.securityContext.runAsUser", f"container {name!r}: runs as root")
    if sc.get("readOnlyRootFilesystem") is not True:
        add(
            obj,
            f"{cwhere}.securityContext.readOnlyRootFilesystem",
            f"container {name!r}: must be true",
        )
    if sc.get("allowPrivilegeEscalation") is not False:
        add(
            obj,
            f"{cwhere}.securityContext.allowPrivilegeEscalation",
            f"container {name!r}: must be false",
        )
    if "ALL" not in _list(_dict(sc.get("capabilities")).get("drop")):
        add(
            obj, f"{cwhere}.securityContext.capabilities.drop", f"container {name!r}: must drop ALL"
        )


def _check_penaltyd_settings(
    obj: Obj, fld: str, env: dict[str, str], add: Add, redis_scheme: str | None
) -> None:
    """PENALTYD_* names are real settings with valid values; the Redis URL fits the overlay."""
    try:
        from penaltyd.settings import Settings
    except ImportError:
        fields: set[str] | None = None
    else:
        fields = set(Settings.model_fields)
    values: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith("PENALTYD_") or name == "PENALTYD_CONFIG":
            continue
        key = name.removeprefix("PENALTYD_").lower()
        top = key.split("__", 1)[0]
        if fields is not None and top not in fields:
            add(obj, fld, f"{name}: penaltyd has no setting {top!r}")
            continue
        if "__" in key:
            values.setdefault(top, {})[key.split("__", 1)[1]] = value
        elif value and key != "redis_url":  # URL schemes: checked below
            values[key] = value
    if fields is not None and values:
        from pydantic import ValidationError

        try:
            Settings.model_validate(values)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                add(obj, fld, f"PENALTYD_{loc.upper().replace('.', '__')}: {err['msg']}")
    url = env.get("PENALTYD_REDIS_URL", "")
    replicas = _dict(obj.get("spec")).get("replicas", 1)
    if not url and (redis_scheme or (isinstance(replicas, int) and replicas > 1)):
        add(obj, fld, "PENALTYD_REDIS_URL is not set: each replica would keep its own store")
    elif redis_scheme and not url.startswith(redis_scheme):
        add(obj, fld, f"PENALTYD_REDIS_URL {url!r} should start with {redis_scheme}")


def _check_service(ctx: Context, obj: Obj, add: Add) -> None:
    spec = _dict(obj.get("spec"))
    selector = _dict(spec.get("selector"))
    if not selector:
        return  # selector-less Services (manual Endpoints) are fine
    ns = _dict(obj.get("metadata")).get("namespace")
    matching = [w for w in ctx.workloads(ns) if _matches(selector, pod_labels(w))]
    if not matching:
        add(obj, "spec.selector", f"matches no pod template in this set: {selector}")
        return
    named: set[str] = set()
    numbers: set[int] = set()
    for w in matching:
        for _, c in containers(pod_spec(w) or {}):
            for p in _list(c.get("ports")):
                named.add(_dict(p).get("name", ""))
                numbers.add(_dict(p).get("containerPort", -1))
    for i, port in enumerate(_list(spec.get("ports"))):
        target = _dict(port).get("targetPort", _dict(port).get("port"))
        if isinstance(target, str) and target not in named:
            add(
                obj,
                f"spec.ports[{i}].targetPort",
                f"no selected container has a port named {target!r}",
            )
        elif isinstance(target, int) and target not in numbers:
            add(obj, f"spec.ports[{i}].targetPort", f"no selected container exposes port {target}")


def _check_hpa(ctx: Context, obj: Obj, add: Add) -> None:
    spec = _dict(obj.get("spec"))
    ref = _dict(spec.get("scaleTargetRef"))
    ns = _dict(obj.get("metadata")).get("namespace")
    if ctx.named(str(ref.get("kind")), str(ref.get("name")), ns) is None:
        add(obj, "spec.scaleTargetRef", f"no {ref.get('kind')} {ref.get('name')!r} in this set")
    lo, hi = spec.get("minReplicas", 1), spec.get("maxReplicas")
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        add(obj, "spec.minReplicas", f"{lo} is above maxReplicas {hi}")


def _check_selects_workload(ctx: Context, obj: Obj, add: Add) -> None:
    key = "podSelector" if obj.get("kind") == "NetworkPolicy" else "selector"
    selector = _dict(_dict(obj.get("spec")).get(key))
    ns = _dict(obj.get("metadata")).get("namespace")
    if not any(_selects(selector, pod_labels(w)) for w in ctx.workloads(ns)):
        add(obj, f"spec.{key}", f"selects no pod template in this set: {selector}")


def _check_service_monitor_target(ctx: Context, obj: Obj, add: Add) -> None:
    spec = _dict(obj.get("spec"))
    selector = _dict(spec.get("selector"))
    ns = _dict(obj.get("metadata")).get("namespace")
    services = [
        s
        for s in ctx.objects
        if s.get("kind") == "Service"
        and _dict(s.get("metadata")).get("namespace") == ns
        and _selects(selector, _dict(_dict(s.get("metadata")).get("labels")))
    ]
    if not services:
        add(obj, "spec.selector", f"selects no Service in this set: {selector}")
        return
    names = {
        _dict(p).get("name") for s in services for p in _list(_dict(s.get("spec")).get("ports"))
    }
    for i, ep in enumerate(_list(spec.get("endpoints"))):
        port = _dict(ep).get("port")
        if port and port not in names:
            add(obj, f"spec.endpoints[{i}].port", f"the selected Services have no port {port!r}")


def alert_series(objects: Iterable[Obj]) -> set[str]:
    series: set[str] = set()
    for obj in objects:
        if obj.get("kind") != "PrometheusRule":
            continue
        for group in _list(_dict(obj.get("spec")).get("groups")):
            for rule in _list(_dict(group).get("rules")):
                if isinstance(rule, dict) and "alert" in rule and isinstance(rule.get("expr"), str):
                    series |= series_in(rule["expr"])
    return series


# --------------------------------------------------------------------------- overlays


def check_overlay(
    directory: Path,
    *,
    command: Sequence[str] | None = None,
    redis_scheme: str | None = None,
    version: str = KUBERNETES_VERSION,
) -> tuple[list[Obj], list[Problem]]:
    """Render one kustomization and check its objects. RenderError if it cannot render."""
    objects = render(directory, command)
    return objects, check_rendered(directory, objects, redis_scheme=redis_scheme, version=version)


def check_rendered(
    directory: Path,
    objects: list[Obj],
    *,
    redis_scheme: str | None = None,
    version: str = KUBERNETES_VERSION,
) -> list[Problem]:
    """Check the objects a kustomization rendered; problems name their source files."""
    index = source_index(kustomization_files(directory))
    where = rel(directory)

    def source(obj: Obj) -> str:
        return _source(obj, index, where)

    problems = check_objects(objects, source, redis_scheme=redis_scheme, version=version)
    if not objects:
        problems.append(Problem(where, "", "", "renders no objects"))
    rules = [o for o in objects if o.get("kind") == "PrometheusRule"]
    if rules:
        covered = alert_series(rules)
        for s in REQUIRED_ALERT_SERIES:
            if s not in covered:
                problems.append(
                    Problem(
                        source(rules[0]), obj_id(rules[0]), "spec.groups", f"no alert looks at {s}"
                    )
                )
    return problems


def check_manifest_file(
    path: Path, version: str = KUBERNETES_VERSION
) -> tuple[list[Obj], list[Problem]]:
    """A plain multi-document manifest (the examples): schemas and the same rules.

    Hardening is required of the containers that run penaltyd's image; the others (the
    MTA in the MX example) are the user's own.
    """
    where = rel(path)
    try:
        objects = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        return [], [Problem(where, "", "", f"not YAML: {exc}")]
    problems = check_objects(
        objects,
        lambda o: where,
        hardened=lambda c: "penaltyd" in str(c.get("image", "")),
        version=version,
    )
    return objects, problems


# --------------------------------------------------------------------------- dashboard


def check_dashboard(path: Path = DASHBOARD) -> tuple[str, list[Problem]]:
    """The Grafana dashboard JSON: structure, datasource variable, queries on every panel."""
    where = rel(path)
    problems: list[Problem] = []

    def add(obj: str, fld: str, message: str) -> None:
        problems.append(Problem(where, obj, fld, message))

    try:
        dash = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return "", [Problem(where, "", "", f"not valid JSON: {exc}")]
    if not isinstance(dash, dict):
        return "", [Problem(where, "", "", "the dashboard must be a JSON object")]
    for key in ("title", "uid"):
        if not isinstance(dash.get(key), str) or not dash[key]:
            add("dashboard", key, "required (non-empty string)")
    schema = dash.get("schemaVersion")
    if not isinstance(schema, int) or schema < 36:
        add("dashboard", "schemaVersion", f"expected an integer >= 36, got {schema!r}")
    variables = _list(_dict(dash.get("templating")).get("list"))
    if not any(
        _dict(v).get("name") == "DS_PROMETHEUS" and _dict(v).get("type") == "datasource"
        for v in variables
    ):
        add("dashboard", "templating.list", "needs a datasource variable named DS_PROMETHEUS")
    panels = _list(dash.get("panels"))
    if not panels:
        add("dashboard", "panels", "no panels")
    flat: list[tuple[str, dict[str, Any]]] = []
    for i, p in enumerate(panels):
        if isinstance(p, dict):
            flat.append((f"panels[{i}]", p))
            flat += [(f"panels[{i}].panels[{j}]", q) for j, q in enumerate(_list(p.get("panels")))]
    ids: Counter[Any] = Counter()
    exprs: list[str] = []
    queries = 0
    for fld, p in flat:
        title = p.get("title") or "<untitled>"
        label = f"panel {title!r}"
        ids[p.get("id")] += 1
        grid = _dict(p.get("gridPos"))
        if not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")):
            add(label, f"{fld}.gridPos", "needs integer h, w, x and y")
        elif grid["x"] + grid["w"] > 24:
            add(label, f"{fld}.gridPos", "wider than the 24-column grid")
        if p.get("type") == "row":
            continue
        if _dict(p.get("datasource")).get("uid") != "${DS_PROMETHEUS}":
            add(label, f"{fld}.datasource", "must use the ${DS_PROMETHEUS} variable")
        targets = _list(p.get("targets"))
        if not targets:
            add(label, f"{fld}.targets", "no queries")
        refs: set[Any] = set()
        for t, target in enumerate(targets):
            expr = _dict(target).get("expr")
            if not isinstance(expr, str) or not expr.strip():
                add(label, f"{fld}.targets[{t}].expr", "empty PromQL expression")
                continue
            queries += 1
            exprs.append(expr)
            for message in promql_problems(expr):
                add(label, f"{fld}.targets[{t}].expr", message)
            ref = _dict(target).get("refId")
            if ref in refs:
                add(label, f"{fld}.targets[{t}].refId", f"duplicate refId {ref!r}")
            refs.add(ref)
    for pid, n in ids.items():
        if n > 1:
            add("dashboard", "panels", f"panel id {pid!r} used {n} times")
    shown = set().union(*(series_in(e) for e in exprs)) if exprs else set()
    for s in REQUIRED_DASHBOARD_SERIES:
        if s not in shown:
            add("dashboard", "panels", f"no panel shows {s}")
    graphs = sum(1 for _, p in flat if p.get("type") != "row")
    return f"{graphs} panels, {queries} queries, schemaVersion {schema}", problems


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    out: list[Instruction] = []
    buf = ""
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are skipped by Docker too
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    if buf:
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    return out


def check_dockerfile(path: Path = DOCKERFILE, context: Path = ROOT) -> tuple[str, list[Problem]]:
    """Multi-stage, pinned bases, non-root numeric USER, a lean runtime stage."""
    where = rel(path)
    problems: list[Problem] = []

    def add(line: int, message: str) -> None:
        problems.append(Problem(where, f"line {line}" if line else "", "", message))

    try:
        instructions = parse_dockerfile(path.read_text())
    except OSError as exc:
        return "", [Problem(where, "", "", f"cannot read: {exc}")]
    args: dict[str, str] = {}
    stages: list[tuple[Instruction, str, str | None]] = []  # (FROM, image, alias)
    body: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "ARG" and not stages:
            name, _, default = ins.args.partition("=")
            args[name.strip()] = default.strip().strip("\"'")
        elif ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            image = re.sub(
                r"\$\{?(\w+)\}?",
                lambda m: args.get(m.group(1), m.group(0)),
                words[0] if words else "",
            )
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append((ins, image, alias))
            body.append([])
        elif body:
            body[-1].append(ins)
    if len(stages) < 2:
        add(
            0,
            "expected a multi-stage build (a builder and a runtime stage), "
            f"found {len(stages)} FROM",
        )
    aliases: set[str] = set()
    for ins, image, alias in stages:
        if image in aliases:
            pass  # FROM an earlier stage
        elif "$" in image:
            add(ins.line, f"base image {image!r} uses an ARG without a default")
        elif why := _pinned(image):
            add(ins.line, why)
        if alias:
            aliases.add(alias)
    if not stages:
        return "", problems
    final_from, final_image, _ = stages[-1]
    final = body[-1]
    if not final_image.startswith("python:3.11-slim"):
        add(final_from.line, f"runtime stage should be python:3.11-slim*, got {final_image!r}")
    users = [i for i in final if i.keyword == "USER"]
    if not users:
        add(final_from.line, "the runtime stage has no USER line: it would run as root")
    else:
        user = users[-1].args.split(":", 1)[0]
        if user in ("root", "0"):
            add(users[-1].line, "USER is root")
        elif not user.isdigit():
            add(users[-1].line, f"USER {user!r}: use a numeric uid so runAsNonRoot can verify it")
    if not any(i.keyword == "COPY" and "--from=" in i.args for i in final):
        add(final_from.line, "the runtime stage copies nothing from the builder (COPY --from=)")
    for ins in final:
        if ins.keyword == "RUN" and re.search(
            r"\b(apt-get|apt|yum|dnf|microdnf)\b[^;&|]*\binstall\b|\bapk\s+add\b|\bpip\d*\s+install\b"
            r"|\bpip\s+(\S+\s+)*install\b",
            ins.args,
        ):
            add(ins.line, "the runtime stage installs packages: build in the builder stage")
        if ins.keyword == "HEALTHCHECK" and ins.args.upper() != "NONE":
            add(ins.line, "no HEALTHCHECK: Kubernetes probes gRPC health natively")
    for ins in instructions:
        if ins.keyword == "ADD" and re.search(r"https?://", ins.args):
            add(ins.line, "ADD from a URL: download in a RUN step with a checksum, or COPY")
        if ins.keyword == "COPY" and "--from=" not in ins.args:
            sources = [w for w in ins.args.split() if not w.startswith("--")][:-1]
            for src in sources:
                if not any(ch in src for ch in "*?[") and not (context / src).exists():
                    add(ins.line, f"COPY source {src!r} does not exist in the build context")
    entry = [i for i in final if i.keyword == "ENTRYPOINT"]
    if not entry:
        add(final_from.line, "the runtime stage has no ENTRYPOINT")
    else:
        try:
            value = json.loads(entry[-1].args)
        except json.JSONDecodeError:
            value = None
        if value != ["penaltyd"]:
            add(
                entry[-1].line,
                f'expected ENTRYPOINT ["penaltyd"] (exec form), got {entry[-1].args}',
            )
    exposed = {p.split("/")[0] for i in final if i.keyword == "EXPOSE" for p in i.args.split()}
    for port in ("50051", "9150"):
        if port not in exposed:
            add(final_from.line, f"the runtime stage does not EXPOSE {port}")
    user_line = users[-1].args if users else "-"
    return f"{len(stages)} stages, runtime FROM {final_image}, USER {user_line}", problems


# --------------------------------------------------------------------------- driver


def overlays() -> list[Path]:
    """The overlay directories: the known topologies in order, then any others."""
    order = list(REDIS_SCHEMES)
    found = [p for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").exists()]
    return sorted(found, key=lambda p: (order.index(p.name) if p.name in order else 99, p.name))


def supported(version: str) -> None:
    """RenderError unless kubernetes-validate bundles schemas for this version."""
    try:
        wanted = tuple(int(x) for x in version.removeprefix("v").split(".")[:2])
        bundled = sorted(
            tuple(int(x) for x in v.split(".")[:2])
            for v in kubernetes_validate.utils.all_versions()
        )
    except ValueError as exc:
        raise RenderError(f"not a Kubernetes version: {version!r}") from exc
    if not bundled or not bundled[0] <= wanted <= bundled[-1]:
        span = f"{'.'.join(map(str, bundled[0]))} to {'.'.join(map(str, bundled[-1]))}"
        raise RenderError(
            f"kubernetes-validate {kubernetes_validate.__version__} bundles schemas for "
            f"Kubernetes {span}, not {version}: upgrade it (pip install -U "
            "kubernetes-validate) or pass another --kubernetes-version"
        )


def run(version: str = KUBERNETES_VERSION) -> Report:
    """Check everything under deploy/. RenderError when kustomize cannot run at all."""
    supported(version)
    report = Report()
    command = renderer()
    dirs = overlays()
    with ThreadPoolExecutor(max_workers=max(1, len(dirs))) as pool:
        rendered = list(pool.map(lambda d: _render_or_error(d, command), dirs))
    report.lines.append(
        f"Kubernetes {version} schemas (kubernetes-validate {kubernetes_validate.__version__}, "
        f"strict), rendered with `{Path(command[0]).name} {command[1]}`"
    )
    custom: Counter[str] = Counter()
    for directory, result in zip(dirs, rendered, strict=True):
        if isinstance(result, RenderError):
            message = str(result).removeprefix(f"{rel(directory)}: ")
            report.problems.append(Problem(rel(directory), "", "", message))
            continue
        scheme = REDIS_SCHEMES.get(directory.name)
        if scheme is None:
            report.problems.append(
                Problem(
                    rel(directory),
                    "",
                    "",
                    "unknown overlay: add its Redis URL scheme to "
                    f"REDIS_SCHEMES in {rel(DEPLOY / 'check.py')}",
                )
            )
        found = check_rendered(directory, result, redis_scheme=scheme, version=version)
        report.problems += [replace(p, context=f"overlay {directory.name}") for p in found]
        report.objects[f"overlay {directory.name}"] = len(result)
        kinds = Counter(str(o.get("kind")) for o in result)
        custom.update(k for k in kinds.elements() if k in ("ServiceMonitor", "PrometheusRule"))
        report.lines.append(
            f"overlay {directory.name:<9} {len(result):>3} objects  "
            + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        )
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        objects, problems = check_manifest_file(path, version)
        report.problems += problems
        report.objects[f"example {path.name}"] = len(objects)
        report.lines.append(f"example {path.name}  {len(objects)} objects")
    if custom:
        report.lines.append(
            "custom resources checked structurally (not in the Kubernetes schemas): "
            + ", ".join(f"{k} x{n}" for k, n in sorted(custom.items()))
        )
    summary, problems = check_dashboard()
    report.problems += problems
    report.lines.append(f"dashboard {rel(DASHBOARD)}: {summary}")
    summary, problems = check_dockerfile()
    report.problems += problems
    report.lines.append(f"Dockerfile {rel(DOCKERFILE)}: {summary}")
    return report


def _render_or_error(directory: Path, command: Sequence[str]) -> list[Obj] | RenderError:
    try:
        return render(directory, command)
    except RenderError as exc:
        return exc


def format_problems(problems: Iterable[Problem]) -> list[str]:
    """One line per distinct problem; a shared (base) file's lists every overlay it hit."""
    grouped: dict[tuple[str, str, str, str], list[str]] = {}
    for problem in problems:
        grouped.setdefault(problem.key, []).append(problem.context)
    lines = []
    for key, contexts in grouped.items():
        text = str(Problem(*key))
        named = [c for c in contexts if c]
        lines.append(f"{text} [{', '.join(named)}]" if named else text)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deploy/check.py",
        description="Render the kustomize overlays and validate everything under deploy/, offline.",
    )
    parser.add_argument(
        "--kubernetes-version",
        default=KUBERNETES_VERSION,
        help=f"schema version to validate against (default {KUBERNETES_VERSION})",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        report = run(args.kubernetes_version)
    except RenderError as exc:
        print(f"deploy-check: {exc}", file=sys.stderr)
        return 2
    print("deploy-check:")
    for line in report.lines:
        print(f"  {line}")
    elapsed = time.monotonic() - started
    if report.problems:
        lines = format_problems(report.problems)
        print(f"\n{len(lines)} problem(s):", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        print(f"deploy-check: FAILED ({elapsed:.1f} s)", file=sys.stderr)
        return 1
    print(f"deploy-check: OK ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
