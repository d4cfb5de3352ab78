"""Offline sanity checks of PromQL, shared by the alert rules and the dashboard.

No PromQL parser is bundled, so this is deliberately cheap: brackets balance, and every
penaltyd_* or relaycheck_* series an expression names is one that service really exports
(read from its metrics registry, so a renamed metric breaks the check rather than a
dashboard).
"""

from __future__ import annotations

import importlib
import re
from functools import cache

from .config import METRICS_MODULES

_SERIES = re.compile(r"\b(?:penaltyd|relaycheck)_[a-z0-9_]+\b")
_BRACKETS = {")": "(", "]": "[", "}": "{"}

# The series a metric family exports, by its type.
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def _strip_strings(expr: str) -> str:
    """The expression with string literals emptied: label values are not series names."""
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def promql_problems(expr: str) -> list[str]:
    """Cheap offline sanity checks of a PromQL expression (no parser is bundled)."""
    problems: list[str] = []
    bare = _strip_strings(expr)
    stack: list[str] = []
    for ch in bare:
        if ch in "([{":
            stack.append(ch)
        elif ch in _BRACKETS and (not stack or stack.pop() != _BRACKETS[ch]):
            problems.append(f"unbalanced {ch!r} in {expr.strip()!r}")
            break
    else:
        if stack:
            problems.append(f"unclosed {stack[-1]!r} in {expr.strip()!r}")
    known = known_series()
    if known:
        for name in sorted(set(_SERIES.findall(bare))):
            if name not in known:
                service = name.split("_", 1)[0]
                problems.append(f"{service} exports no series {name!r}")
    return problems


@cache
def known_series() -> frozenset[str]:
    """Series names penaltyd and relaycheck export, read from their metrics registries
    (empty if they cannot be imported)."""
    names: set[str] = set()
    for module in METRICS_MODULES:
        try:
            metrics = importlib.import_module(module).Metrics()
        except ImportError:  # the check runs outside the project's venv: skip this part
            return frozenset()
        names |= {
            family.name + suffix
            for family in metrics.registry.collect()
            for suffix in _SUFFIXES.get(family.type, ("",))
        }
    return frozenset(names)


def series_in(expr: str) -> set[str]:
    """The penaltyd_* and relaycheck_* series an expression names (outside strings)."""
    return set(_SERIES.findall(_strip_strings(expr)))
