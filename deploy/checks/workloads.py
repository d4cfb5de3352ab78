"""Rules for anything that runs pods: its pod template, volumes and containers.

A workload's selector matches its own pods, a StatefulSet's Service is headless, the
ServiceAccount and the volumes' ConfigMaps and Secrets exist, and each container has a
pinned image, resource requests and a memory limit, probes on ports it exposes and
mounts of volumes the pod has. The environment and the securityContext have their own
modules (env.py, hardening.py); the containers of this repository's gRPC servers
(config.GRPC_SERVICES: penaltyd, relaycheck) also need native gRPC probes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import GRPC_SERVICES
from .documents import Obj, as_dict, as_list, namespace
from .env import check_env_refs, check_service_settings
from .findings import Add
from .hardening import check_hardening
from .images import pinned
from .objects import ObjectSet, containers, pod_labels, selects

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PROBE_HANDLERS = ("grpc", "tcpSocket", "httpGet")
SELECTOR_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
# (section, keys) every container must set under resources.
REQUIRED_RESOURCES = (("requests", ("cpu", "memory")), ("limits", ("memory",)))
# (kind, volume source, the field naming it) for the volumes that reference an object.
VOLUME_SOURCES = (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName"))


def check_workload(
    objs: ObjectSet,
    obj: Obj,
    spec: dict[str, Any],
    add: Add,
    hardened: Callable[[dict[str, Any]], bool],
    redis_scheme: str | None,
) -> None:
    """The rules for one object that runs pods (spec is its pod spec)."""
    ns = namespace(obj)
    prefix = "spec" if obj.get("kind") == "Pod" else "spec.template.spec"
    wspec = as_dict(obj.get("spec"))
    labels = pod_labels(obj)

    selector = wspec.get("selector")
    has_selector = obj.get("kind") in SELECTOR_KINDS
    if has_selector and isinstance(selector, dict) and not selects(selector, labels):
        add(obj, "spec.selector", "does not match the pod template's labels")
    if obj.get("kind") == "StatefulSet":
        svc_name = wspec.get("serviceName")
        svc = objs.named("Service", str(svc_name), ns) if svc_name else None
        if svc_name and svc is None:
            add(obj, "spec.serviceName", f"no Service {svc_name!r} in this set")
        elif svc is not None and as_dict(svc.get("spec")).get("clusterIP") != "None":
            add(obj, "spec.serviceName", f"Service {svc_name!r} must be headless")

    sa = spec.get("serviceAccountName")
    if sa and sa != "default" and objs.named("ServiceAccount", str(sa), ns) is None:
        add(obj, f"{prefix}.serviceAccountName", f"no ServiceAccount {sa!r} in this set")

    volumes = _volumes(objs, obj, spec, wspec, prefix, add)
    pod_sc = as_dict(spec.get("securityContext"))
    service = GRPC_SERVICES.get(str(labels.get("app.kubernetes.io/name")))
    for where, c in containers(spec):
        cwhere = f"{prefix}.{where}"
        _check_container(obj, c, where, cwhere, volumes, add)
        env = check_env_refs(objs, obj, c, cwhere, add)
        if hardened(c):
            check_hardening(obj, c, cwhere, pod_sc, add)
        if service is not None and where.startswith("containers"):
            for probe in PROBES:
                if "grpc" not in as_dict(c.get(probe)):
                    add(obj, f"{cwhere}.{probe}", f"{service.name} needs a native gRPC probe")
            check_service_settings(service, obj, f"{cwhere}.env", env, add, redis_scheme)


def _volumes(
    objs: ObjectSet, obj: Obj, spec: dict[str, Any], wspec: dict[str, Any], prefix: str, add: Add
) -> dict[Any, dict[str, Any]]:
    """The pod's volumes by name (claim templates too); reports dangling references."""
    volumes = {v.get("name"): v for v in as_list(spec.get("volumes")) if isinstance(v, dict)}
    for t in as_list(wspec.get("volumeClaimTemplates")):
        volumes[as_dict(as_dict(t).get("metadata")).get("name")] = {}
    ns = namespace(obj)
    for name, vol in volumes.items():
        for kind, key, ref in VOLUME_SOURCES:
            src = as_dict(vol.get(key))
            if src and not src.get("optional") and objs.named(kind, str(src.get(ref)), ns) is None:
                add(
                    obj,
                    f"{prefix}.volumes[{name}].{key}",
                    f"no {kind} {src.get(ref)!r} in this set",
                )
    return volumes


def _check_container(
    obj: Obj,
    c: dict[str, Any],
    where: str,
    cwhere: str,
    volumes: dict[Any, dict[str, Any]],
    add: Add,
) -> None:
    """Image, resources, probe ports and volume mounts of one container."""
    cname = c.get("name", where)
    image = c.get("image")
    if not isinstance(image, str) or not image:
        add(obj, f"{cwhere}.image", f"container {cname!r} has no image")
    elif why := pinned(image):
        add(obj, f"{cwhere}.image", why)
    resources = as_dict(c.get("resources"))
    for part, keys in REQUIRED_RESOURCES:
        for key in keys:
            if key not in as_dict(resources.get(part)):
                add(obj, f"{cwhere}.resources.{part}.{key}", f"container {cname!r}: required")
    ports = {
        p.get("name"): p.get("containerPort")
        for p in as_list(c.get("ports"))
        if isinstance(p, dict)
    }
    for probe in PROBES:
        pspec = as_dict(c.get(probe))
        for handler in PROBE_HANDLERS:
            port = as_dict(pspec.get(handler)).get("port")
            fld = f"{cwhere}.{probe}.{handler}.port"
            if isinstance(port, str) and port not in ports:
                add(obj, fld, f"no container port named {port!r}")
            if isinstance(port, int) and port not in ports.values():
                add(obj, fld, f"container does not expose {port}")
    for m in as_list(c.get("volumeMounts")):
        if isinstance(m, dict) and m.get("name") not in volumes:
            add(obj, f"{cwhere}.volumeMounts", f"no volume {m.get('name')!r}")
