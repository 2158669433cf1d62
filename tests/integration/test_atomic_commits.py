"""A commit happens whole or not at all, even when Redis rejects a command midway; a
re-sent commit step changes nothing; a store of the layout before hash tags is renamed
into the new one when opened (real embedded Redis)."""

from __future__ import annotations

from typing import Any

import pytest
import redis

import dmodel
from dmodel import DField, DList, DModel
from dmodel.errors import ConfigurationError, StoreError
from dmodel.store.redis import RedisStore


class APerson(DModel):
    name = DField(index=True)
    tags = DList()


def _node(make_node) -> dmodel.Node:
    return make_node(listen="", peers=[], discovery=False)


def dump(client: redis.Redis) -> dict[bytes, Any]:
    """Every key with its type and full content (sorted, so that a hash's internal order,
    which a mere read may change in hashtable encoding, does not count)."""
    out: dict[bytes, Any] = {}
    for key in client.keys("*"):
        kind = client.type(key)
        if kind == b"string":
            out[key] = client.get(key)
        elif kind == b"hash":
            out[key] = sorted(client.hgetall(key).items())
        elif kind == b"list":
            out[key] = client.lrange(key, 0, -1)
        elif kind == b"set":
            out[key] = sorted(client.smembers(key))
        elif kind == b"zset":
            out[key] = client.zrange(key, 0, -1, withscores=True)
        else:  # pragma: no cover - the store writes no other type
            out[key] = (kind, client.dump(key))
    return out


def test_a_key_of_the_wrong_type_fails_the_commit_and_writes_nothing(make_node):
    node = _node(make_node)
    p = APerson(node=node)
    p.name.set("before")
    p.tags.append("t1")
    client, store = node.store.client, node.store
    history = store.k_hist(p.db_id)  # written after the log, the chain and the raw update
    client.delete(history)
    client.set(history, b"hand-edited")
    before = dump(client)
    log_before = store.log_length()
    with pytest.raises(StoreError, match="WRONGTYPE.*nothing was written"):
        p.name.set("after")
    assert dump(client) == before
    assert store.log_length() == log_before
    assert p.name.get() == "before"
    client.delete(history)  # repaired by hand: the next commit goes through whole
    p.name.set("after")
    assert p.name.get() == "after" and store.log_length() == log_before + 1
    assert client.lrange(history, 0, -1) == [store.log_range(-1)[0]]
    # The history deleted by hand lacks the list insert, and verify says so (only that).
    problems = node.verify_store()
    assert problems and all("not in the object's history" in p for p in problems), problems


def test_maxmemory_reached_fails_the_commit_and_writes_nothing(make_node):
    node = _node(make_node)
    p = APerson(node=node)
    p.name.set("before")
    client = node.store.client
    before = dump(client)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        with pytest.raises(StoreError, match="OOM"):
            p.name.set("after")
        with pytest.raises(StoreError, match="OOM"):
            with p.transaction():
                p.name.set("a")
                p.tags.append("b")
    finally:
        client.config_set("maxmemory", 0)
    assert dump(client) == before
    p.name.set("after")
    assert p.name.get() == "after"
    assert node.verify_store() == []


def test_a_commit_step_sent_twice_is_applied_once(make_node, monkeypatch):
    """As when a client re-sends a step whose reply was lost."""
    node = _node(make_node)
    p = APerson(node=node)
    p.name.set("one")
    store = node.store
    sent = []
    apply = store._apply

    def twice(step, commit_id):
        apply(step, commit_id)
        sent.append(dump(store.client))
        apply(step, commit_id)
        sent.append(dump(store.client))

    monkeypatch.setattr(store, "_apply", twice)
    p.tags.append("x")
    p.name.set("two")
    assert len(sent) >= 4
    assert all(sent[i] == sent[i + 1] for i in range(0, len(sent), 2))
    assert store.history(p.db_id) == store.log_range()  # each id once
    assert list(p.tags) == ["x"]


def _old_name(store: RedisStore, key: str) -> str | None:
    """The name a key had before hash tags (None: a key that did not exist then)."""
    if key in (store.k_done, store.k_journal, store.k_lock):
        return None
    if key.startswith(store.k_global):
        return store.prefix + key[len(store.k_global):]
    return key.replace("{", "").replace("}", "")


def test_a_store_of_the_old_layout_is_migrated_on_open(make_node, tmp_path):
    node = make_node("old", listen="", peers=[], discovery=False)
    p = APerson(node=node)
    p.name.set("kept")
    p.tags.extend(["a", "b"])
    q = APerson(node=node)
    q.name.set("other")
    assert [o.db_id for o in APerson.find(name="kept", node=node)] == [p.db_id]  # an index
    db_id, qid = p.db_id, q.db_id
    expected = {k: v for k, v in dump(node.store.client).items() if k != b"dm:{dm:}done"}
    client = node.store.client
    for raw in client.keys("*"):
        old = _old_name(node.store, raw.decode())
        if old is None:
            client.delete(raw)
        else:
            client.rename(raw, old)
    assert not any(b"{" in k for k in client.keys("*"))
    client.set("dm:x:u", b"another prefix's key")  # left alone
    node.shutdown()

    again = dmodel.Node(tmp_path / "old", listen="", peers=[], discovery=False)
    try:
        got = dump(again.store.client)
        assert got.pop(b"dm:x:u") == b"another prefix's key"
        assert got == expected
        moved = APerson.get(db_id, node=again)
        assert moved.name.get() == "kept" and list(moved.tags) == ["a", "b"]
        assert APerson.get(qid, node=again).name.get() == "other"
        assert [o.db_id for o in APerson.find(name="other", node=again)] == [qid]
        assert again.verify_store() == []
        moved.name.set("new")
        assert moved.name.get() == "new"
        assert [o.db_id for o in APerson.find(name="new", node=again)] == [db_id]
    finally:
        again.shutdown()


def test_a_prefix_with_braces_is_refused():
    with pytest.raises(ConfigurationError, match="braces"):
        RedisStore(redis.Redis(), prefix="dm{x}:")


def test_an_object_rewritten_with_more_than_lua_unpacks_in_one_command_is_whole(
        make_node) -> None:
    # Re-deciding rewrites a whole object: 5,000 registers (a long DList's elements) and
    # 9,000 accepted updates exceed what Lua unpacks into one command (about 8,000
    # arguments), so the store splits them.
    node = _node(make_node)
    person = APerson.create(name="x", node=node)
    registers = {f"tags#{i:068x}": dmodel.merge.Register(b"v%05d" % i, [b"p", i])
                 for i in range(5000)}
    accepted = [i.to_bytes(32, "big") for i in range(9000)]
    meta = node.store.object_meta(person.db_id)
    node.store.replace_object(person.db_id, meta, registers, {}, {}, accepted, [])
    assert node.store.registers(person.db_id) == registers
    assert node.store.history(person.db_id) == accepted
