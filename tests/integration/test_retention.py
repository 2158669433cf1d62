"""Retention: superseded updates are pruned, what contributes stays (real Redis)."""

from __future__ import annotations

import pytest

import dmodel
from dmodel.errors import ConfigurationError
from dmodel.retention import Retention
from dmodel.store import redis as redis_store


class Kept(dmodel.DModel):
    name = dmodel.DField()
    items = dmodel.DList()


def test_retention_parses_its_forms() -> None:
    assert Retention.parse("all").keeps_all and not Retention.parse(None).keeps_all
    assert Retention.parse(None) == Retention() and Retention().versions == 10  # bounded
    assert Retention.parse(5).versions == 5 and Retention.parse("5").versions == 5
    assert Retention.parse("7d").seconds == 7 * 86400
    for bad in (0, "soon", True):
        with pytest.raises(ConfigurationError):
            Retention.parse(bad)


def test_overwrites_keep_the_last_versions_only(make_node) -> None:
    a = make_node("a", retention=3)
    p = Kept.create(name="v0", node=a)
    for i in range(1, 50):
        p.name = f"v{i}"
    assert p.name.get() == "v49"
    history = a.history(p.db_id, "name")
    assert [e.ops[0].value for e in history if e.ops[0].op == "set"][-3:] == ["v47", "v48", "v49"]
    assert len(history) <= 4  # the create (pinned) and the last three versions
    assert a.store.pruned_count(p.db_id) >= 46 and a.stats.pruned >= 46
    assert len(a.store.log_range()) <= 5
    assert a.verify_store() == []
    assert p.name.get(verified=True) == "v49"


def test_pruning_never_changes_the_state(make_node) -> None:
    keep_all, pruning = make_node("all", retention="all"), make_node("pruning", retention=1)
    for node in (keep_all, pruning):
        p = Kept.create(name="x", node=node)
        for i in range(20):
            p.name = f"n{i}"
            p.items.append(i)
        for _ in range(5):
            p.items.delete(0)
        assert p.name.get() == "n19" and list(p.items) == list(range(5, 20))
        assert node.verify_store() == []
    assert pruning.stats.pruned > 0 and keep_all.stats.pruned == 0


def test_a_removal_prunes_the_objects_writes(make_node) -> None:
    a = make_node("a", retention=2)
    p = Kept.create(name="x", node=a)
    for i in range(5):
        p.name = f"n{i}"
    p.remove()
    history = a.history(p.db_id)
    assert len(history) == 2  # the create (with its first value) and the removal
    assert history[-1].ops[0].op == "remove"
    assert a.verify_store() == []


def test_a_pass_pruning_more_updates_than_one_command_names_prunes_them_all(
        make_node, monkeypatch) -> None:
    # 1,200 appends, each its own update, all pruned by the removal's one pass. The store
    # deletes them in commands naming at most _ARGS_PER_COMMAND ids (Lua unpacks at most
    # about 8,000 arguments: 8,200 ids in one HDEL failed); 100 here, so 12 commands.
    monkeypatch.setattr(redis_store, "_ARGS_PER_COMMAND", 100)
    a = make_node("a")
    p = Kept.create(name="x", node=a)
    for i in range(1200):
        p.items.append(i)
    p.remove()
    assert [e.ops[0].op for e in a.history(p.db_id)] == ["create", "remove"]
    assert a.store.pruned_count(p.db_id) == 1200 and a.stats.pruned >= 1200
    assert len(a.store.log_range()) <= 3
    assert a.verify_store() == []
