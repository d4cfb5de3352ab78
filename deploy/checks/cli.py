"""`make deploy-check` itself: run every check, print the report, set the exit status.

`run` renders the overlays in parallel (kustomize is the slow part), checks them, the
example manifests, the dashboard and the Dockerfile, and collects a Report: summary
lines of what was checked, and the problems found. `main` prints it; the exit status is
0 when there is no problem, 1 otherwise, 2 when the manifests cannot be rendered.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information

from .config import CONFIG, DASHBOARD, DOCKERFILE, EXAMPLES_DIR, KUBERNETES_VERSION, REDIS_SCHEMES
from .dashboard import check_dashboard
from .dockerfile import check_dockerfile
from .documents import Obj
from .findings import Problem, RenderError, format_problems, rel
from .overlays import check_manifest_file, check_rendered, overlay_dirs
from .render import render, renderer
from .schema import supported

CUSTOM_KINDS = ("ServiceMonitor", "PrometheusRule")  # checked structurally (monitoring.py)

# (label, path, check) for the files checked on their own.
FILE_CHECKS: tuple[tuple[str, Path, Callable[[Path], tuple[str, list[Problem]]]], ...] = (
    ("dashboard", DASHBOARD, check_dashboard),
    ("Dockerfile", DOCKERFILE, check_dockerfile),
)


@dataclass
class Report:
    """What was checked (summary lines) and what was found (problems)."""

    lines: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    objects: dict[str, int] = field(default_factory=dict)  # overlay/example -> object count

    @property
    def ok(self) -> bool:
        return not self.problems


def run(version: str = KUBERNETES_VERSION) -> Report:
    """Check everything under deploy/. RenderError when kustomize cannot run at all."""
    supported(version)
    report = Report()
    command = renderer()
    dirs = overlay_dirs()
    with ThreadPoolExecutor(max_workers=max(1, len(dirs))) as pool:
        rendered = list(pool.map(lambda d: _render_or_error(d, command), dirs))
    report.lines.append(
        f"Kubernetes {version} schemas (kubernetes-validate {kubernetes_validate.__version__}, "
        f"strict), rendered with `{Path(command[0]).name} {command[1]}`"
    )
    custom: Counter[str] = Counter()
    for directory, result in zip(dirs, rendered, strict=True):
        if isinstance(result, RenderError):
            message = str(result).removeprefix(f"{rel(directory)}: ")
            report.problems.append(Problem(rel(directory), "", "", message))
            continue
        scheme = REDIS_SCHEMES.get(directory.name)
        if scheme is None:
            report.problems.append(
                Problem(
                    rel(directory),
                    "",
                    "",
                    f"unknown overlay: add its Redis URL scheme to REDIS_SCHEMES in {rel(CONFIG)}",
                )
            )
        found = check_rendered(directory, result, redis_scheme=scheme, version=version)
        report.problems += [replace(p, context=f"overlay {directory.name}") for p in found]
        report.objects[f"overlay {directory.name}"] = len(result)
        kinds = Counter(str(o.get("kind")) for o in result)
        custom.update(k for k in kinds.elements() if k in CUSTOM_KINDS)
        report.lines.append(
            f"overlay {directory.name:<9} {len(result):>3} objects  "
            + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        )
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        objects, problems = check_manifest_file(path, version)
        report.problems += problems
        report.objects[f"example {path.name}"] = len(objects)
        report.lines.append(f"example {path.name}  {len(objects)} objects")
    if custom:
        report.lines.append(
            "custom resources checked structurally (not in the Kubernetes schemas): "
            + ", ".join(f"{k} x{n}" for k, n in sorted(custom.items()))
        )
    for label, path, check_file in FILE_CHECKS:
        summary, problems = check_file(path)
        report.problems += problems
        report.lines.append(f"{label} {rel(path)}: {summary}")
    return report


def _render_or_error(directory: Path, command: Sequence[str]) -> list[Obj] | RenderError:
    try:
        return render(directory, command)
    except RenderError as exc:
        return exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deploy/check.py",
        description="Render the kustomize overlays and validate everything under deploy/, offline.",
    )
    parser.add_argument(
        "--kubernetes-version",
        default=KUBERNETES_VERSION,
        help=f"schema version to validate against (default {KUBERNETES_VERSION})",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        report = run(args.kubernetes_version)
    except RenderError as exc:
        print(f"deploy-check: {exc}", file=sys.stderr)
        return 2
    print("deploy-check:")
    for line in report.lines:
        print(f"  {line}")
    elapsed = time.monotonic() - started
    if report.problems:
        lines = format_problems(report.problems)
        print(f"\n{len(lines)} problem(s):", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        print(f"deploy-check: FAILED ({elapsed:.1f} s)", file=sys.stderr)
        return 1
    print(f"deploy-check: OK ({elapsed:.1f} s)")
    return 0
