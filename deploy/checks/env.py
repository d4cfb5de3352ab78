"""A container's environment: its references resolve, and the services' settings are real.

envFrom and valueFrom must name a ConfigMap or Secret (and key) in the same rendered set
unless marked optional. The variables that result are collected so the PENALTYD_* ones
can be checked against the service's own Settings model (penaltyd's PENALTYD_*,
relaycheck's RELAYCHECK_*): each names a real setting with a valid value, and the Redis
URL uses the scheme of the Redis topology the overlay stands for (a fleet of replicas
without one would each keep a private store).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from .config import GRPC_SERVICES, PENALTYD_NAME, GrpcService
from .documents import Obj, as_dict, as_list, namespace
from .findings import Add
from .objects import ObjectSet

# (kind, field) of the references envFrom and env[].valueFrom can make.
ENV_FROM_REFS = (("ConfigMap", "configMapRef"), ("Secret", "secretRef"))
VALUE_FROM_REFS = (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef"))


def check_env_refs(
    objs: ObjectSet, obj: Obj, c: dict[str, Any], cwhere: str, add: Add
) -> dict[str, str]:
    """ConfigMap/Secret references resolve; returns the container's environment.

    A variable set from a ConfigMap or Secret key, or from a whole Secret, maps to "":
    known to be set, not to what.
    """
    ns = namespace(obj)
    out: dict[str, str] = {}

    def resolve(kind: str, ref: dict[str, Any], fld: str) -> Obj | None:
        target = objs.named(kind, str(ref.get("name")), ns)
        if target is None and not ref.get("optional"):
            add(obj, fld, f"no {kind} {ref.get('name')!r}")
        return target

    for i, ef in enumerate(as_list(c.get("envFrom"))):
        for kind, key, ref in _refs(ef, ENV_FROM_REFS):
            target = resolve(kind, ref, f"{cwhere}.envFrom[{i}].{key}")
            if target is None:
                continue
            prefix = str(as_dict(ef).get("prefix", ""))
            out.update(
                {
                    prefix + str(k): "" if kind == "Secret" else str(v)
                    for k, v in _data(target).items()
                }
            )
    for i, ev in enumerate(as_list(c.get("env"))):
        ev = as_dict(ev)
        name = str(ev.get("name", ""))
        if "value" in ev:
            out[name] = str(ev["value"])
        for kind, key, ref in _refs(ev.get("valueFrom"), VALUE_FROM_REFS):
            out[name] = ""
            fld = f"{cwhere}.env[{i}].valueFrom.{key}"
            target = resolve(kind, ref, fld)
            if (
                target is not None
                and ref.get("key") not in _data(target)
                and not ref.get("optional")
            ):
                add(obj, f"{fld}.key", f"{kind} {ref.get('name')!r} has no key {ref.get('key')!r}")
    return out


def _refs(
    holder: Any, kinds: tuple[tuple[str, str], ...]
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(kind, field, reference) for each reference holder makes."""
    for kind, key in kinds:
        ref = as_dict(as_dict(holder).get(key))
        if ref:
            yield kind, key, ref


def _data(target: Obj) -> dict[str, Any]:
    """A ConfigMap's or Secret's keys and values (data and stringData)."""
    return {**as_dict(target.get("data")), **as_dict(target.get("stringData"))}


def check_penaltyd_settings(
    obj: Obj, fld: str, env: dict[str, str], add: Add, redis_scheme: str | None
) -> None:
    """PENALTYD_* names are real settings with valid values; the Redis URL fits the overlay."""
    check_service_settings(GRPC_SERVICES[PENALTYD_NAME], obj, fld, env, add, redis_scheme)


def check_service_settings(
    service: GrpcService,
    obj: Obj,
    fld: str,
    env: dict[str, str],
    add: Add,
    redis_scheme: str | None,
) -> None:
    """<PREFIX>_* names are real settings of the service with valid values; its Redis URL
    is set when replicas share a store, with the scheme of the overlay's topology."""
    prefix = service.env_prefix
    try:
        settings_cls = importlib.import_module(service.settings_module).Settings
    except ImportError:
        fields: set[str] | None = None
    else:
        fields = set(settings_cls.model_fields)
    values: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(prefix) or name == f"{prefix}CONFIG":
            continue
        key = name.removeprefix(prefix).lower()
        top = key.split("__", 1)[0]
        if fields is not None and top not in fields:
            add(obj, fld, f"{name}: {service.name} has no setting {top!r}")
            continue
        if "__" in key:
            values.setdefault(top, {})[key.split("__", 1)[1]] = value
        elif value and key != "redis_url":  # URL schemes: checked below
            values[key] = value
    if fields is not None and values:
        from pydantic import ValidationError

        try:
            settings_cls.model_validate(values)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                add(obj, fld, f"{prefix}{loc.upper().replace('.', '__')}: {err['msg']}")
    url = env.get(f"{prefix}REDIS_URL", "")
    replicas = as_dict(obj.get("spec")).get("replicas", 1)
    if not url and (redis_scheme or (isinstance(replicas, int) and replicas > 1)):
        add(obj, fld, f"{prefix}REDIS_URL is not set: each replica would keep its own store")
    elif redis_scheme and not url.startswith(redis_scheme):
        add(obj, fld, f"{prefix}REDIS_URL {url!r} should start with {redis_scheme}")
