"""The README's tour runs as written (on a node in a temporary home)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import dmodel

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_tour_runs(tmp_path, monkeypatch) -> None:
    run_tour(tmp_path, monkeypatch)


def run_tour(tmp_path, monkeypatch, redis_url: str | None = None) -> None:
    """Run the README's tour and check what it did (on ``redis_url`` if given)."""
    text = README.read_text()
    tour = text.split("## A tour", 1)[1]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    monkeypatch.setenv("DMODEL_HOME", str(tmp_path / "home"))
    for name in ("DMODEL_LISTEN", "DMODEL_PEERS", "DMODEL_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    if redis_url:
        monkeypatch.setenv("DMODEL_REDIS_URL", redis_url)
    monkeypatch.setenv("DMODEL_DISCOVERY", "0")  # the tour's launch() stays off the LAN
    code = code.replace("q.salary.get()", "_raises(q.salary.get)").replace(
        "dmodel.shutdown()", "")
    scope: dict = {"_raises": _raises_decryption}
    level = logging.getLogger("dmodel").level  # the tour calls set_loglevel('error')
    try:
        exec(compile(code, "README", "exec"), scope)
        person, bob, other = scope["Person"], scope["bob"], scope["other"]
        assert scope["p"].exists() is False  # removed
        assert bob.name.get() == "Robert" and bob.age.get() == 44
        assert bob.tags["team"] == "infra"
        assert person(bob.get_db_id(), other.get_db_id()).salary.get() == "5000"
        worker, chief = scope["worker"], scope["chief"]
        assert person(worker.get_db_id(), chief.get_db_id()).salary.get() is None
        assert bob.get_db_id() in dmodel.object_list("Person:*")
    finally:
        dmodel.shutdown()
        logging.getLogger("dmodel").setLevel(level)


def _raises_decryption(call) -> None:
    try:
        call()
    except dmodel.DecryptionError:
        return
    raise AssertionError("reading an encrypted field anonymously must fail")


def test_the_two_commands_are_the_ones_ci_runs() -> None:
    text = README.read_text()
    assert "# run the main job\npython3 -m venv .venv" in text
    run = (README.parent / ".ci" / "run").read_text()
    assert "# run the tests" in run and "grep -A1" in run
