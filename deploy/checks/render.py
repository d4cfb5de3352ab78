"""Rendering a kustomization into the objects it would apply, and tracing them to files.

`kubectl kustomize` (or a standalone `kustomize build`) does the rendering; this module
finds the binary, runs it and parses its output. Rendered objects no longer say which
file defined them, so it also indexes the files a kustomization pulls in: a problem can
then name deploy/k8s/base/deployment.yaml rather than the overlay directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

from .documents import Obj, as_dict, as_list, metadata, safe_load
from .findings import RenderError, rel

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
GENERATED_KINDS = (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret"))


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
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).exists():
            kfile = directory / name
            break
    else:
        return []
    files = [kfile]
    try:
        spec = as_dict(yaml.safe_load(kfile.read_text()))
    except yaml.YAMLError:
        return files
    for entry in [*as_list(spec.get("resources")), *as_list(spec.get("components"))]:
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
            spec = as_dict(safe_load(path))
            for gen, kind in GENERATED_KINDS:
                for item in as_list(spec.get(gen)):
                    if isinstance(item, dict) and isinstance(item.get("name"), str):
                        index.setdefault((kind, item["name"]), rel(path))
            continue
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError):
            continue
        for doc in docs:
            if isinstance(doc, dict):
                name = metadata(doc).get("name")
                if isinstance(name, str):
                    index[(str(doc.get("kind")), name)] = rel(path)
    return index


def source_of(obj: Obj, index: Mapping[tuple[str, str], str], default: str) -> str:
    """The file that defined a rendered object (default when the index has no entry)."""
    kind = str(obj.get("kind"))
    name = str(metadata(obj).get("name", ""))
    if (kind, name) in index:
        return index[(kind, name)]
    # configMapGenerator/secretGenerator names carry a content hash suffix.
    base = re.sub(r"-[a-z0-9]{10}$", "", name)
    return index.get((kind, base), default)
