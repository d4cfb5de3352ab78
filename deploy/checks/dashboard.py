"""The Grafana dashboard (deploy/grafana/penaltyd-dashboard.json), checked as JSON.

It must import anywhere (a title, a uid, schemaVersion 36+, a DS_PROMETHEUS datasource
variable that every panel uses), lay out on Grafana's 24-column grid, give every panel
queries with sane PromQL and distinct ids and refIds, and between its panels show every
series penaltyd's operators need (config.REQUIRED_DASHBOARD_SERIES).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import DASHBOARD, REQUIRED_DASHBOARD_SERIES
from .documents import as_dict, as_list
from .findings import Problem, rel
from .promql import promql_problems, series_in

DATASOURCE = "${DS_PROMETHEUS}"
GRID_COLUMNS = 24

# Reports a problem: add(what (the dashboard or a panel), field, message).
AddTo = Callable[[str, str, str], None]


def check_dashboard(path: Path = DASHBOARD) -> tuple[str, list[Problem]]:
    """The Grafana dashboard JSON: structure, datasource variable, queries on every panel."""
    where = rel(path)
    problems: list[Problem] = []

    def add(obj: str, fld: str, message: str) -> None:
        problems.append(Problem(where, obj, fld, message))

    try:
        dash = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return "", [Problem(where, "", "", f"not valid JSON: {exc}")]
    if not isinstance(dash, dict):
        return "", [Problem(where, "", "", "the dashboard must be a JSON object")]
    _check_header(dash, add)
    flat = _flatten(as_list(dash.get("panels")))
    ids: Counter[Any] = Counter()
    exprs: list[str] = []
    for fld, p in flat:
        ids[p.get("id")] += 1
        exprs += _check_panel(fld, p, add)
    for pid, n in ids.items():
        if n > 1:
            add("dashboard", "panels", f"panel id {pid!r} used {n} times")
    shown = set().union(*(series_in(e) for e in exprs)) if exprs else set()
    for s in REQUIRED_DASHBOARD_SERIES:
        if s not in shown:
            add("dashboard", "panels", f"no panel shows {s}")
    graphs = sum(1 for _, p in flat if p.get("type") != "row")
    schema = dash.get("schemaVersion")
    return f"{graphs} panels, {len(exprs)} queries, schemaVersion {schema}", problems


def _check_header(dash: dict[str, Any], add: AddTo) -> None:
    """What the dashboard needs to import: title, uid, schemaVersion, variable, panels."""
    for key in ("title", "uid"):
        if not isinstance(dash.get(key), str) or not dash[key]:
            add("dashboard", key, "required (non-empty string)")
    schema = dash.get("schemaVersion")
    if not isinstance(schema, int) or schema < 36:
        add("dashboard", "schemaVersion", f"expected an integer >= 36, got {schema!r}")
    variables = as_list(as_dict(dash.get("templating")).get("list"))
    if not any(
        as_dict(v).get("name") == "DS_PROMETHEUS" and as_dict(v).get("type") == "datasource"
        for v in variables
    ):
        add("dashboard", "templating.list", "needs a datasource variable named DS_PROMETHEUS")
    if not as_list(dash.get("panels")):
        add("dashboard", "panels", "no panels")


def _flatten(panels: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """(field, panel) for each panel, and for the panels inside a collapsed row."""
    flat: list[tuple[str, dict[str, Any]]] = []
    for i, p in enumerate(panels):
        if isinstance(p, dict):
            flat.append((f"panels[{i}]", p))
            flat += [
                (f"panels[{i}].panels[{j}]", q) for j, q in enumerate(as_list(p.get("panels")))
            ]
    return flat


def _check_panel(fld: str, p: dict[str, Any], add: AddTo) -> list[str]:
    """One panel's layout, datasource and queries; returns its non-empty expressions."""
    title = p.get("title") or "<untitled>"
    label = f"panel {title!r}"
    grid = as_dict(p.get("gridPos"))
    if not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")):
        add(label, f"{fld}.gridPos", "needs integer h, w, x and y")
    elif grid["x"] + grid["w"] > GRID_COLUMNS:
        add(label, f"{fld}.gridPos", "wider than the 24-column grid")
    if p.get("type") == "row":
        return []
    if as_dict(p.get("datasource")).get("uid") != DATASOURCE:
        add(label, f"{fld}.datasource", "must use the ${DS_PROMETHEUS} variable")
    targets = as_list(p.get("targets"))
    if not targets:
        add(label, f"{fld}.targets", "no queries")
    exprs: list[str] = []
    refs: set[Any] = set()
    for t, target in enumerate(targets):
        expr = as_dict(target).get("expr")
        if not isinstance(expr, str) or not expr.strip():
            add(label, f"{fld}.targets[{t}].expr", "empty PromQL expression")
            continue
        exprs.append(expr)
        for message in promql_problems(expr):
            add(label, f"{fld}.targets[{t}].expr", message)
        ref = as_dict(target).get("refId")
        if ref in refs:
            add(label, f"{fld}.targets[{t}].refId", f"duplicate refId {ref!r}")
        refs.add(ref)
    return exprs
