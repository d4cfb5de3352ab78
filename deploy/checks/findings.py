"""What a check reports: a Problem that names its place, or that the check cannot run.

Every check returns Problems (file, object, field, message); the report groups the ones a
shared base file causes in each overlay into one line. RenderError is the other outcome:
nothing could be checked (no renderer, kustomize failed, no schemas for the version).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import ROOT
from .documents import Obj, metadata


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


# Reports a problem with an object's field: add(obj, field, message).
Add = Callable[[Obj, str, str], None]


class RenderError(Exception):
    """The check cannot run: no kubectl or kustomize, kustomize failed, or no schemas."""


def rel(path: Path) -> str:
    """The path relative to the repository root, as problems name files."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def obj_id(obj: Mapping[str, Any]) -> str:
    """Kind/namespace/name (Kind/name for cluster-scoped objects)."""
    meta = metadata(obj)
    ns = meta.get("namespace")
    name = meta.get("name", "<no name>")
    kind = obj.get("kind", "<no kind>")
    return f"{kind}/{ns}/{name}" if ns else f"{kind}/{name}"


def format_problems(problems: Iterable[Problem]) -> list[str]:
    """One line per distinct problem; a shared (base) file's lists every overlay it hit."""
    grouped: dict[tuple[str, str, str, str], list[str]] = {}
    for problem in problems:
        grouped.setdefault(problem.key, []).append(problem.context)
    return [
        str(replace(Problem(*key), context=", ".join(c for c in contexts if c)))
        for key, contexts in grouped.items()
    ]
