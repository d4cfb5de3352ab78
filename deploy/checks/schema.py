"""Validating each object against its schema, offline.

Built-in kinds are validated with the Kubernetes JSON schemas kubernetes-validate
bundles, in strict mode (an unknown field is an error); the Prometheus Operator's kinds,
which those schemas lack, go to the structural checks in monitoring.py. `supported`
refuses a Kubernetes version the installed package has no schemas for.
"""

from __future__ import annotations

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information

from .config import KUBERNETES_VERSION
from .documents import Obj, field_path
from .findings import RenderError
from .monitoring import Found, check_monitoring_resource


def validate_schema(obj: Obj, version: str = KUBERNETES_VERSION) -> Found:
    """(field, message) pairs; Kubernetes schemas, or our own for known custom resources."""
    api = str(obj.get("apiVersion", ""))
    if not api or not obj.get("kind"):
        return [("", "apiVersion and kind are required")]
    if api.startswith("monitoring.coreos.com/"):
        return check_monitoring_resource(obj)
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [(field_path(exc.absolute_path), str(exc.message))]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [("apiVersion", str(exc.message))]
    return []


def _minor(version: str) -> tuple[int, ...]:
    """'1.30.2' -> (1, 30). ValueError when it is not a version."""
    return tuple(int(x) for x in version.split(".")[:2])


def supported(version: str) -> None:
    """RenderError unless kubernetes-validate bundles schemas for this version."""
    try:
        wanted = _minor(version.removeprefix("v"))
        bundled = sorted(_minor(v) for v in kubernetes_validate.utils.all_versions())
    except ValueError as exc:
        raise RenderError(f"not a Kubernetes version: {version!r}") from exc
    if not bundled or not bundled[0] <= wanted <= bundled[-1]:
        span = f"{'.'.join(map(str, bundled[0]))} to {'.'.join(map(str, bundled[-1]))}"
        raise RenderError(
            f"kubernetes-validate {kubernetes_validate.__version__} bundles schemas for "
            f"Kubernetes {span}, not {version}: upgrade it (pip install -U "
            "kubernetes-validate) or pass another --kubernetes-version"
        )
