"""Objects that point at other objects must reach something in the same rendered set.

A Service's selector picks a pod template and its target ports are ports those pods
expose; an HPA scales a workload that exists (minReplicas <= maxReplicas); a
PodDisruptionBudget or NetworkPolicy selects some pod template; a ServiceMonitor selects
a Service and scrapes a port it has. A typo in a label otherwise fails only in a cluster.
"""

from __future__ import annotations

from .documents import Obj, as_dict, as_list, metadata, namespace
from .findings import Add
from .objects import ObjectSet, containers, matches, pod_labels, pod_spec, selects


def check_service(objs: ObjectSet, obj: Obj, add: Add) -> None:
    spec = as_dict(obj.get("spec"))
    selector = as_dict(spec.get("selector"))
    if not selector:
        return  # selector-less Services (manual Endpoints) are fine
    matching = [w for w in objs.workloads(namespace(obj)) if matches(selector, pod_labels(w))]
    if not matching:
        add(obj, "spec.selector", f"matches no pod template in this set: {selector}")
        return
    named: set[str] = set()
    numbers: set[int] = set()
    for w in matching:
        for _, c in containers(pod_spec(w) or {}):
            for p in as_list(c.get("ports")):
                named.add(as_dict(p).get("name", ""))
                numbers.add(as_dict(p).get("containerPort", -1))
    for i, port in enumerate(as_list(spec.get("ports"))):
        target = as_dict(port).get("targetPort", as_dict(port).get("port"))
        if isinstance(target, str) and target not in named:
            add(
                obj,
                f"spec.ports[{i}].targetPort",
                f"no selected container has a port named {target!r}",
            )
        elif isinstance(target, int) and target not in numbers:
            add(obj, f"spec.ports[{i}].targetPort", f"no selected container exposes port {target}")


def check_hpa(objs: ObjectSet, obj: Obj, add: Add) -> None:
    spec = as_dict(obj.get("spec"))
    ref = as_dict(spec.get("scaleTargetRef"))
    if objs.named(str(ref.get("kind")), str(ref.get("name")), namespace(obj)) is None:
        add(obj, "spec.scaleTargetRef", f"no {ref.get('kind')} {ref.get('name')!r} in this set")
    lo, hi = spec.get("minReplicas", 1), spec.get("maxReplicas")
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        add(obj, "spec.minReplicas", f"{lo} is above maxReplicas {hi}")


def check_selects_workload(objs: ObjectSet, obj: Obj, add: Add) -> None:
    """A PodDisruptionBudget's selector or a NetworkPolicy's podSelector picks some pods."""
    key = "podSelector" if obj.get("kind") == "NetworkPolicy" else "selector"
    selector = as_dict(as_dict(obj.get("spec")).get(key))
    if not any(selects(selector, pod_labels(w)) for w in objs.workloads(namespace(obj))):
        add(obj, f"spec.{key}", f"selects no pod template in this set: {selector}")


def check_service_monitor_target(objs: ObjectSet, obj: Obj, add: Add) -> None:
    spec = as_dict(obj.get("spec"))
    selector = as_dict(spec.get("selector"))
    ns = namespace(obj)
    services = [
        s
        for s in objs.objects
        if s.get("kind") == "Service"
        and namespace(s) == ns
        and selects(selector, as_dict(metadata(s).get("labels")))
    ]
    if not services:
        add(obj, "spec.selector", f"selects no Service in this set: {selector}")
        return
    names = {
        as_dict(p).get("name")
        for s in services
        for p in as_list(as_dict(s.get("spec")).get("ports"))
    }
    for i, ep in enumerate(as_list(spec.get("endpoints"))):
        port = as_dict(ep).get("port")
        if port and port not in names:
            add(obj, f"spec.endpoints[{i}].port", f"the selected Services have no port {port!r}")
