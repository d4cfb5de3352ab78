"""The architecture, checked: the import graph of every first-party module.

- no import cycle anywhere (every import counts, module-level or inside a function);
- the contract package (`penalty`) imports no grpc.aio, redis, pydantic or structlog,
  and nothing of ours but itself;
- services never import each other, and nothing under services/ imports the clients
  (`penaltyclient`) except relaycheck's reporting to penaltyd (`relaycheck.report`);
- the foundation (`serving`) imports no service and no client;
- no shipped package imports the test harness.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.harness.paths import REPO

ROOTS = {"proto": REPO / "proto", "services": REPO / "services", "clients": REPO / "clients"}
FIRST_PARTY = {"penalty", "serving", "penaltyd", "relaycheck", "penaltyclient", "milterkit"}
FIRST_PARTY |= {"relaycheckclient", "tests", "bench", "deploy"}
SERVICES = {"penaltyd", "relaycheck"}
CLIENTS = {"penaltyclient", "milterkit", "relaycheckclient"}


def _modules() -> Iterator[tuple[str, Path]]:
    for base in [*ROOTS.values(), REPO]:
        for path in base.rglob("*.py"):
            rel = path.relative_to(base)
            if base == REPO and rel.parts[0] not in ("tests", "bench", "deploy"):
                continue
            if ".venv" in rel.parts or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts and parts[0] in FIRST_PARTY:
                yield ".".join(parts), path


MODULES = dict(_modules())


def _imports(name: str, path: Path) -> set[str]:
    """First-party modules `name` imports (resolved to modules we have), and others raw."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _resolve(target: str) -> str | None:
    """The first-party module `target` names (a module, or an attribute of one)."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


GRAPH = {
    name: {r for t in _imports(name, path) if (r := _resolve(t)) and r != name}
    for name, path in MODULES.items()
}
RAW = {name: _imports(name, path) for name, path in MODULES.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_graph_covers_every_package() -> None:
    tops = {_top(m) for m in MODULES}
    assert tops | {"deploy"} >= FIRST_PARTY
    assert len(MODULES) > 100


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components: any component of two or more is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            # A package importing its own submodules (re-exports) is not a cycle of
            # architecture; a submodule importing its package's __init__ is.
            if w.startswith(v + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_contract_holds_only_the_contract() -> None:
    forbidden = ("grpc.aio", "redis", "pydantic", "pydantic_settings", "structlog", "grpc_health")
    for name in (m for m in MODULES if _top(m) == "penalty"):
        for target in RAW[name]:
            assert not target.startswith(forbidden), f"{name} imports {target}"
        for target in GRAPH[name]:
            assert _top(target) == "penalty", f"{name} imports {target}"


def test_services_never_import_each_other_or_the_clients() -> None:
    allowed = {("relaycheck.report", "penaltyclient")}  # relayed origins go to penaltyd
    for name in (m for m in MODULES if _top(m) in SERVICES):
        for target in GRAPH[name]:
            top = _top(target)
            assert top not in SERVICES - {_top(name)}, f"{name} imports {target}"
            if top in CLIENTS:
                assert (name, top) in allowed, f"{name} imports {target}"


def test_the_foundation_stands_alone() -> None:
    for name in (m for m in MODULES if _top(m) == "serving"):
        for target in GRAPH[name]:
            assert _top(target) in ("serving", "penalty"), f"{name} imports {target}"


def test_shipped_packages_never_import_the_test_harness() -> None:
    shipped = {"penalty", "serving", *SERVICES, *CLIENTS}
    for name in (m for m in MODULES if _top(m) in shipped):
        for target in GRAPH[name]:
            assert _top(target) not in ("tests", "bench"), f"{name} imports {target}"
