"""Reading parsed YAML and JSON without trusting its shape.

Manifests, kustomizations and the dashboard are input under test: any field may be
missing or of the wrong type. These accessors turn a wrong shape into an empty value, so
each check reads what it needs and reports what is wrong instead of raising.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]  # one parsed Kubernetes object (or any YAML/JSON mapping)


def as_dict(value: Any) -> dict[str, Any]:
    """The value if it is a mapping, else an empty one."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """The value if it is a list, else an empty one."""
    return value if isinstance(value, list) else []


def metadata(obj: Mapping[str, Any]) -> dict[str, Any]:
    return as_dict(obj.get("metadata"))


def namespace(obj: Mapping[str, Any]) -> Any:
    """metadata.namespace as written (None when absent)."""
    return metadata(obj).get("namespace")


def field_path(parts: Iterable[Any]) -> str:
    """A schema error's path as a field name: spec.template.spec.containers[0].image."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def safe_load(path: Path) -> Any:
    """One YAML document, or None when the file cannot be read or parsed."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
