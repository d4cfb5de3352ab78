"""Checking what gets deployed: each kustomize overlay, and the plain example manifests.

An overlay is rendered (render.py), its objects go through the per-kind rules
(policy.py) with each problem traced to the file that defined the object, and its
PrometheusRule must alert on every series penaltyd's operators rely on. The examples are
multi-document files applied as they are: the same rules, without kustomize.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from .config import KUBERNETES_VERSION, OVERLAYS_DIR, REDIS_SCHEMES, REQUIRED_ALERT_SERIES
from .documents import Obj
from .findings import Problem, obj_id, rel
from .monitoring import alert_series
from .policy import check_objects
from .render import kustomization_files, render, source_index, source_of


def overlay_dirs() -> list[Path]:
    """The overlay directories: the known topologies in order, then any others."""
    order = list(REDIS_SCHEMES)
    found = [p for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").exists()]
    return sorted(found, key=lambda p: (order.index(p.name) if p.name in order else 99, p.name))


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
        return source_of(obj, index, where)

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
