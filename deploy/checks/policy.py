"""Which rules apply to which object: the per-kind dispatch over one rendered set.

Every object is validated against its schema; an object defined twice is reported once;
then each kind gets its own rules: anything that runs pods (workloads.py), a Service,
HPA, PodDisruptionBudget, NetworkPolicy or ServiceMonitor (targets.py). Overlays and the
plain example manifests both come through here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from .config import KUBERNETES_VERSION
from .documents import Obj
from .findings import Add, Problem, obj_id
from .objects import ObjectSet, pod_spec
from .schema import validate_schema
from .targets import check_hpa, check_selects_workload, check_service, check_service_monitor_target
from .workloads import check_workload

# The rules for the kinds that point at other objects.
TARGET_RULES: dict[str, Callable[[ObjectSet, Obj, Add], None]] = {
    "Service": check_service,
    "HorizontalPodAutoscaler": check_hpa,
    "PodDisruptionBudget": check_selects_workload,
    "NetworkPolicy": check_selects_workload,
    "ServiceMonitor": check_service_monitor_target,
}


def check_objects(
    objects: list[Obj],
    source: Callable[[Obj], str],
    *,
    hardened: Callable[[dict[str, Any]], bool] = lambda c: True,
    redis_scheme: str | None = None,
    version: str = KUBERNETES_VERSION,
) -> list[Problem]:
    """Schema validation plus the cross-object rules, for one rendered set of objects."""
    objs = ObjectSet(objects)
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
            check_workload(objs, obj, spec, add, hardened, redis_scheme)
        if rule := TARGET_RULES.get(str(obj.get("kind"))):
            rule(objs, obj, add)
    return problems
