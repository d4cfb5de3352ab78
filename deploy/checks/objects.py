"""One rendered set of objects, and how its objects find each other.

The cross-object rules (a Service reaches a pod, an HPA's target exists, a volume's
ConfigMap is in the set) all need the same few lookups: a workload's pod template and
its labels, a pod's containers, whether a selector picks a set of labels, and an object
by kind and name. They live here so each rule reads as the policy it states.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .config import WORKLOAD_KINDS
from .documents import Obj, as_dict, as_list, metadata, namespace


def pod_spec(obj: Obj) -> dict[str, Any] | None:
    """The pod spec a Pod, workload or CronJob runs; None for other kinds."""
    kind = obj.get("kind")
    spec = as_dict(obj.get("spec"))
    if kind == "Pod":
        return spec
    if kind in WORKLOAD_KINDS:
        return as_dict(as_dict(spec.get("template")).get("spec"))
    if kind == "CronJob":
        job = as_dict(as_dict(spec.get("jobTemplate")).get("spec"))
        return as_dict(as_dict(job.get("template")).get("spec"))
    return None


def pod_labels(obj: Obj) -> dict[str, Any]:
    """The labels of a Pod, or of a workload's pod template."""
    if obj.get("kind") == "Pod":
        return as_dict(metadata(obj).get("labels"))
    template = as_dict(as_dict(obj.get("spec")).get("template"))
    return as_dict(metadata(template).get("labels"))


def containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field, container) for the init containers, then the containers, of a pod spec."""
    for key in ("initContainers", "containers"):
        for i, c in enumerate(as_list(spec.get(key))):
            if isinstance(c, dict):
                yield f"{key}[{i}]", c


def matches(required: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    """A plain label map (a Service's selector) matches labels."""
    return all(labels.get(k) == v for k, v in required.items())


def selects(selector: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) matches labels; {} matches all."""
    if not matches(as_dict(selector.get("matchLabels")), labels):
        return False
    for expr in as_list(selector.get("matchExpressions")):
        expr = as_dict(expr)
        key, op, values = str(expr.get("key")), expr.get("operator"), as_list(expr.get("values"))
        present = key in labels
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and present and labels.get(key) in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


@dataclass
class ObjectSet:
    """One rendered set of objects, with lookups for cross-references."""

    objects: list[Obj]

    def named(self, kind: str, name: str, namespace: str | None) -> Obj | None:
        """The object of that kind and name; a namespace-less one matches any namespace."""
        for obj in self.objects:
            meta = metadata(obj)
            if (
                obj.get("kind") == kind
                and meta.get("name") == name
                and (namespace is None or meta.get("namespace") in (namespace, None))
            ):
                return obj
        return None

    def workloads(self, ns: str | None) -> list[Obj]:
        """The objects in that namespace that run pods."""
        return [o for o in self.objects if pod_spec(o) is not None and namespace(o) == ns]
