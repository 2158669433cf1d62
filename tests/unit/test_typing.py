"""What a type checker sees of a model: mypy (its API, in-process) checks a user file
outside the repository that imports dmodel from this checkout (``mypy_path``, so that
the checks do not depend on how the package is installed). A second check runs the
venv's mypy as a user would, with no configuration: the installed package (the README's
editable install included: a plain path entry, not an import hook) is found.

Each line of ``USER`` that must fail ends in ``# E: <error code>`` (``# P:`` where only
dmodel's mypy plugin, which the first check enables, finds it), each ``reveal_type``
in ``# R: <type>``; every other line must pass. One mypy run, cached in tmp_path.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api")

pytestmark = pytest.mark.timeout(300)

USER = '''\
from typing import Any

import dmodel


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)        # no type: Any, as in PyDinemic
    age = dmodel.DField(type=int)              # None until set
    score = dmodel.DField(type=int, default=0)
    nick = dmodel.DField[str]()
    tags = dmodel.DDict[int]()
    notes = dmodel.DList[str]()
    misc = dmodel.DDict()


def on(node: dmodel.Node) -> Person:
    return Person([], node=node)


p = Person.create(name="Bob", age=42)
reveal_type(p)  # R: Person
reveal_type(p.age.get())  # R: int | None
reveal_type(p.score.get())  # R: int
reveal_type(p.nick.get())  # R: str
reveal_type(p.name.get())  # R: Any
reveal_type(p.tags["k"])  # R: int
reveal_type(p.notes.at(0))  # R: str
reveal_type(Person.age)  # R: DField[int | None]
p.age.set(43)
p.age = 44
p.age.set(None)
p.score.set(1)
p.name.set(["anything", 1])
p.misc["k"] = {"a": 1}
p.tags["k"] = 1
p.notes.append("x")
p.age.set("x")  # E: arg-type
p.age = "x"  # E: assignment
p.score.set(None)  # E: arg-type
p.nick.set(1)  # E: arg-type
p.tags["k"] = "x"  # E: assignment
p.notes.append(1)  # E: arg-type
p.nosuch.get()  # E: attr-defined
Person.create(nosuch=1)  # P: call-arg
Person.create(tags={"k": 1})  # P: call-arg
Person.create(age="x")  # P: arg-type
Person.create(score=1, nick="n", name=object())
extra: dict[str, Any] = {"score": 1}
Person.create(**extra)  # passed on: not checked
'''

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<kind>error|note): (?P<text>.*)$")


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[tuple[str, str]]]:
    """mypy's messages on USER, by line: (kind, text); run from outside the repository,
    dmodel's own errors not reported (it is checked by ``mypy`` in the repository)."""
    tmp = tmp_path_factory.mktemp("typing")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        return _check(tmp)


def _check(tmp: Path) -> dict[int, list[tuple[str, str]]]:
    user = tmp / "user.py"
    user.write_text(USER)
    config = tmp / "mypy.ini"
    config.write_text(f"[mypy]\nstrict = True\nmypy_path = {REPO}\n"
                      "plugins = dmodel.mypy_plugin\n\n"
                      "[mypy-dmodel.*]\nfollow_imports = silent\n")
    stdout, stderr, _ = api.run([
        "--config-file", str(config), "--cache-dir", str(tmp / "cache"),
        "--no-error-summary", "--show-error-codes", "--no-pretty", str(user)])
    assert not stderr, stderr
    messages: dict[int, list[tuple[str, str]]] = {}
    for raw in stdout.splitlines():
        match = LINE.match(raw)
        assert match, f"unexpected mypy output: {raw}"
        assert Path(match["file"]).name == "user.py", raw
        messages.setdefault(int(match["line"]), []).append((match["kind"], match["text"]))
    return messages


def _marked(marker: str) -> dict[int, str]:
    out = {}
    for number, line in enumerate(USER.splitlines(), 1):
        if f"# {marker}: " in line:
            out[number] = line.rsplit(f"# {marker}: ", 1)[1].strip()
    return out


def test_the_package_is_found(checked: dict[int, list[tuple[str, str]]]) -> None:
    assert not any("import" in text for found in checked.values() for _, text in found), \
        checked


def test_revealed_types(checked: dict[int, list[tuple[str, str]]]) -> None:
    expected = _marked("R")
    assert expected
    for number, want in expected.items():
        notes = [text for kind, text in checked.get(number, []) if kind == "note"]
        got = [re.sub(r"\b(builtins|user|dmodel\.model)\.", "", n) for n in notes]
        assert got == [f'Revealed type is "{want}"'], (number, USER.splitlines()[number - 1])


def test_wrong_types_are_errors_and_right_ones_are_not(
        checked: dict[int, list[tuple[str, str]]]) -> None:
    expected = _marked("E") | _marked("P")  # P: found by dmodel's mypy plugin
    errors = {number: [text for kind, text in found if kind == "error"]
              for number, found in checked.items()}
    errors = {number: texts for number, texts in errors.items() if texts}
    assert sorted(errors) == sorted(expected), errors
    for number, code in expected.items():
        assert len(errors[number]) == 1 and errors[number][0].endswith(f"[{code}]"), \
            (number, errors[number])
    assert 'incompatible type "str"; expected "int | None"' in errors[_line('p.age.set("x")')][0]


def _line(prefix: str) -> int:
    return next(n for n, line in enumerate(USER.splitlines(), 1) if line.startswith(prefix))


FOUND = """\
import dmodel
import dmodel.listeners

reveal_type(dmodel.launch)
reveal_type(dmodel.listeners.AuditLog)
"""


def test_the_installed_package_is_found_without_configuration(tmp_path: Path) -> None:
    """mypy in a subprocess, outside the repository, without ``mypy_path``/``MYPYPATH``:
    it finds dmodel where pip put it (for an editable install, this checkout)."""
    try:
        importlib.metadata.distribution("dmodel")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("dmodel is not installed in this interpreter (pip install -e .)")
    user = tmp_path / "found.py"
    user.write_text(FOUND)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config),
         "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", "--show-error-codes",
         "--no-pretty", str(user)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert not proc.stderr, proc.stderr
    assert "import-not-found" not in proc.stdout, proc.stdout
    assert "import-untyped" not in proc.stdout, proc.stdout
    revealed = [m["text"] for raw in proc.stdout.splitlines() if (m := LINE.match(raw))
                and m["kind"] == "note" and m["text"].startswith("Revealed type is")]
    assert len(revealed) == 2, proc.stdout
    assert revealed[0].startswith('Revealed type is "def (') \
        and revealed[0].endswith('-> dmodel.node.core.Node"'), revealed[0]
    assert revealed[1].endswith('-> dmodel.listeners.audit.AuditLog"'), revealed[1]
    assert proc.returncode == 0, proc.stdout


def _pyright() -> list[str] | None:
    """The command that runs pyright (the PyPI wrapper of the test extra), or None."""
    import shutil
    found = shutil.which("pyright", path=str(Path(sys.executable).parent)) \
        or shutil.which("pyright")
    return [found] if found else None


def test_pyright_sees_the_same_types(tmp_path: Path) -> None:
    """pyright, outside the repository, on the same user file: the same revealed types,
    and errors on exactly the lines mypy flags (its messages and codes are its own)."""
    import json
    command = _pyright()
    if command is None:
        pytest.skip("pyright is not installed (it is in the test extra)")
    user = tmp_path / "user.py"
    user.write_text(USER)
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    proc = subprocess.run(
        [*command, "--outputjson", "--pythonpath", sys.executable, str(user)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        # The wrapper fetches pyright from the npm registry on first use; without it
        # there is no checker to run (and nothing printed as JSON).
        pytest.skip(f"pyright could not start: {(proc.stderr or proc.stdout)[-300:]}")
    found = report["generalDiagnostics"]
    revealed = {d["range"]["start"]["line"] + 1: d["message"] for d in found
                if d["severity"] == "information" and d["message"].startswith("Type of")}
    for number, want in _marked("R").items():
        assert revealed.get(number, "").endswith(f' is "{want}"'), \
            (number, USER.splitlines()[number - 1], revealed.get(number))
    errors = sorted({d["range"]["start"]["line"] + 1 for d in found
                     if d["severity"] == "error"})
    assert errors == sorted(_marked("E")), [d["message"] for d in found
                                            if d["severity"] == "error"]
