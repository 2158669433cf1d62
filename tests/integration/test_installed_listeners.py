"""The ready-made listeners as an installed package: ``dmodel.listeners``, and no
top-level ``listeners``.

The development venv's editable install puts the repository itself on the path, so
here the project is installed for real (a regular, non-editable ``pip install
--target``, offline, from a copy of the sources so that the build leaves nothing in the
repository) and a fresh interpreter, run outside the repository without the venv's
``.pth`` files (``-S``; its site-packages are given by ``PYTHONPATH`` for the
dependencies), imports dmodel from that directory only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "dmodel")

PROBE = r"""
import importlib.util, json, sys
import dmodel
import dmodel.listeners
from dmodel.listeners import AuditLog, LogChanges, ReadOnlyFields, RejectUnauthorized, RunScript
out = {
    "dmodel": dmodel.__file__,
    "listeners": dmodel.listeners.__file__,
    "classes": [c.__module__ + "." + c.__name__ for c in
                (AuditLog, LogChanges, ReadOnlyFields, RejectUnauthorized, RunScript)],
    "daction": all(issubclass(c, dmodel.DAction) for c in
                   (AuditLog, LogChanges, ReadOnlyFields, RejectUnauthorized, RunScript)),
    "top_level_spec": importlib.util.find_spec("listeners") is not None,
    "path": sys.path,
}
try:
    import listeners  # noqa: F401
except ModuleNotFoundError as exc:
    out["import_listeners"] = "ModuleNotFoundError: " + str(exc)
else:
    out["import_listeners"] = "imported from " + str(listeners.__file__)
print(json.dumps(out))
"""

USE = r"""
import sys
import dmodel
from dmodel.listeners import ReadOnlyFields

class Person(dmodel.DModel):
    name = dmodel.DField("name")

node = dmodel.Node(sys.argv[1], listen="", peers=[], discovery=False, redis_url="")
try:
    ReadOnlyFields(["name"]).apply("Person:[id]:*", node=node)
    p = Person.create(name="Bob", node=node)
    try:
        p.name.set("Robert")
    except dmodel.VetoedError as exc:
        print("vetoed:", type(exc.__cause__).__name__, p.name.get())
finally:
    node.shutdown()
"""


def _copy_sources(dst: Path) -> None:
    dst.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A regular install of the project into a directory; its path."""
    tmp = tmp_path_factory.mktemp("installed")
    src, site = tmp / "src", tmp / "site"
    _copy_sources(src)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_NO_INPUT": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--no-cache-dir", "--target", str(site), str(src)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        pytest.skip("pip cannot build and install the project offline here "
                    f"(no setuptools/wheel in the venv?): {proc.stderr.strip()[-600:]}")
    return site


def _run(site: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DMODEL_"))}
    paths = sysconfig.get_paths()
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
        [str(site), paths["purelib"], paths["platlib"]]))
    return subprocess.run([sys.executable, "-S", "-c", code, *args], cwd=site.parent, env=env,
                          capture_output=True, text=True, timeout=120)


def test_installed_package_provides_dmodel_listeners_only(installed: Path) -> None:
    proc = _run(installed, PROBE)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert Path(out["dmodel"]).is_relative_to(installed), out
    assert Path(out["listeners"]) == installed / "dmodel" / "listeners" / "__init__.py"
    assert out["classes"] == [
        "dmodel.listeners.audit.AuditLog",
        "dmodel.listeners.log.LogChanges",
        "dmodel.listeners.security.ReadOnlyFields",
        "dmodel.listeners.security.RejectUnauthorized",
        "dmodel.listeners.script.RunScript",
    ]
    assert out["daction"]
    # the generic top-level name is not claimed
    assert out["import_listeners"].startswith("ModuleNotFoundError"), out["import_listeners"]
    assert not out["top_level_spec"]
    assert str(REPO) not in out["path"]
    assert not (installed / "listeners").exists()
    assert sorted(p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")) \
        == ["bin", "dmodel"]


def test_installed_listener_runs(installed: Path, tmp_path: Path) -> None:
    proc = _run(installed, USE, str(tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "vetoed: RejectedError Bob"
