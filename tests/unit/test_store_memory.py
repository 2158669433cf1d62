"""MemoryStore: the in-memory Store the applier's pure tests run on.

Both stores implement every method of the Store protocol with the same parameters, and
the memory store keeps the Redis store's reply shapes (inclusive ranges, log positions).
"""

from __future__ import annotations

import inspect

import pytest

from dmodel import merge
from dmodel.crypto import Identity
from dmodel.store.base import HELD_CAP, MemoryStore, Store, _inclusive
from dmodel.store.redis import RedisStore
from dmodel.update import Op, Update

PROTOCOL_METHODS = sorted(
    name for name, member in vars(Store).items()
    if callable(member) and not name.startswith("_"))


def _params(fn: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("name", PROTOCOL_METHODS)
@pytest.mark.parametrize("store_class", [RedisStore, MemoryStore])
def test_store_implements_the_protocol(store_class: type, name: str) -> None:
    assert _params(getattr(store_class, name)) == _params(getattr(Store, name))


def test_memory_store_is_a_store() -> None:
    assert isinstance(MemoryStore(), Store)
    assert "snapshots" in PROTOCOL_METHODS and "commit_many" in PROTOCOL_METHODS


@pytest.mark.parametrize(("start", "stop", "expected"), [
    (0, -1, b"abcde"), (0, 0, b"a"), (1, 2, b"bc"), (-1, -1, b"e"), (-2, -1, b"de"),
    (3, 10, b"de"), (5, 9, b""), (3, 1, b""), (-10, 1, b"ab"), (0, -6, b""),
])
def test_ranges_are_inclusive_like_lrange(start: int, stop: int, expected: bytes) -> None:
    items = [bytes([c]) for c in b"abcde"]
    assert b"".join(_inclusive(items, start, stop)) == expected


def _create(seed: int, ts: int = 1 << 20) -> Update:
    identity = Identity.from_seed(seed.to_bytes(32, "big"))
    db_id = f"Thing:{identity.oid}"
    keys = identity.public
    return Update.create(identity, node=bytes(16), caller=db_id, timestamp=ts, prev=b"",
                         ops=[Op(db_id, "create", "", {"sign": keys.verify_key,
                                                      "box": keys.box_key, "read": [],
                                                      "update": []})])


def test_commit_log_chain_and_reads() -> None:
    store = MemoryStore()
    update = _create(1)
    db_id = update.caller
    meta = merge.ObjectMeta(update.creates(), b"v", None)  # type: ignore[arg-type]
    reg = merge.Register(b"v1", "Bob", False)
    writes = [merge.Write("object", db_id, None, meta), merge.Write("register", db_id, "n", reg)]
    assert store.commit_many([(update, writes)], hlc=42) == [1]
    assert store.log_range() == [update.id] and store.log_length() == 1
    assert store.raw_update(update.id) == update.raw and store.has_update(update.id)
    assert store.missing([update.id, b"x" * 32]) == [b"x" * 32]
    assert store.chain_head(db_id, bytes(16)) == update.id
    assert store.object_ids() == [db_id] and store.models() == ["Thing"]
    assert store.register(db_id, "n") == reg and store.registers(db_id) == {"n": reg}
    assert store.history(db_id) == [update.id] and store.last_hlc() == 42
    snap = store.snapshots([update])[0]
    assert snap.seen and snap.state.objects[db_id] == meta
    assert not store.snapshots([update], local=True)[0].seen


@pytest.mark.parametrize("order", ["oldest first", "newest first"])
def test_a_chain_head_only_moves_forward_and_a_pruned_head_keeps_its_link(order: str) -> None:
    identity = Identity.from_seed(bytes(31) + b"\x07")
    db_id = f"Thing:{identity.oid}"
    first, second, third = (
        Update.create(identity, node=bytes(16), caller=db_id, timestamp=ts, prev=b"",
                      ops=[Op(db_id, "set", "n", ts)]) for ts in (10, 20, 30))
    store = MemoryStore()
    chain = f"{db_id}|{bytes(16).hex()}"
    for update in ([first, second] if order == "oldest first" else [second, first]):
        store.commit_many([(update, [])], hlc=99)
    assert store.chain_heads()[chain] == second.id + (20).to_bytes(8, "big")
    store.prune({}, [first, second], {second.id})  # the head keeps its link
    assert set(store.chain_links()) == {second.id}
    store.commit_many([(third, [])], hlc=99)  # a newer head: the pruned one's link goes
    assert set(store.chain_links()) == {third.id}
    assert store.chain_heads()[chain][:32] == third.id


def test_held_updates_are_capped_and_replace_object_rewrites() -> None:
    store = MemoryStore()
    updates = [_create(2, ts=(1 << 20) + i) for i in range(HELD_CAP + 3)]
    db_id = updates[0].caller
    store.commit_many([(u, None) for u in updates], hlc=1)
    assert len(store.history(db_id, held=True)) == HELD_CAP
    assert store.history(db_id) == []
    keys = {b"p1\0" + b"e" * 34, b"p0\0" + b"f" * 34}
    store.replace_object(db_id, None, {"n": merge.Register(b"v", 1, False)},
                         {b"r" * 34 + b"oid": b"wrapped"}, {"xs": keys},
                         [updates[0].id], [updates[1].id])
    assert store.history(db_id) == [updates[0].id]
    assert store.history(db_id, held=True) == [updates[1].id]
    assert store.list_range(db_id, "xs") == [b"f" * 34, b"e" * 34]
    assert store.list_length(db_id, "xs") == 2
    assert store.list_key_below(db_id, "xs", b"p1") == b"p0\0" + b"f" * 34
    assert store.list_key_below(db_id, "xs", b"p0") is None
    assert store.wrapped_key(db_id, b"r" * 34, "oid") == b"wrapped"
    assert store.wraps(db_id) == {b"r" * 34 + b"oid": b"wrapped"}


def test_node_metadata() -> None:
    store = MemoryStore()
    assert store.meta("epoch") is None
    store.set_meta("epoch", "abc")
    assert store.meta("epoch") == b"abc"
    store.close()
    assert store.closed
