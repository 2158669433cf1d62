"""The signed root in the home: rollbacks, deleted and injected updates, a replaced store
(real embedded Redis; the tampering is done to Redis directly, as an intruder would)."""

from __future__ import annotations

import shutil

import pytest

import dmodel
from dmodel import merge
from dmodel.cli import main
from dmodel.node.root import ROOT_FILE, LiveDigest, Root
from dmodel.store.embedded import EmbeddedRedis
from dmodel.update import decode


class Ledger(dmodel.DModel):
    balance = dmodel.DField()


def reopen(make_node, home):
    """The node of ``home`` again (a fresh process would do the same)."""
    return make_node(home.name)


def test_a_clean_stop_and_reopen_verifies(make_node) -> None:
    a = make_node("a")
    doc = Ledger.create(balance=1, node=a)
    for i in range(30):
        doc.balance = i
    a.shutdown()
    assert (a.home / ROOT_FILE).stat().st_mode & 0o777 == 0o600
    b = reopen(make_node, a.home)
    assert b.verify_store() == []
    assert b.root.recorded is not None and b.root.recorded.seq == b.log_length()


def test_a_restore_from_an_older_snapshot_is_a_rollback(make_node, tmp_path, capsys) -> None:
    a = make_node("a")
    doc = Ledger.create(balance=100, node=a)
    a.shutdown()
    saved = tmp_path / "saved-redis"
    shutil.copytree(a.home / "redis", saved, ignore=shutil.ignore_patterns("*.sock", "*.pid",
                                                                           "socket-dir"))
    b = reopen(make_node, a.home)
    Ledger(doc.db_id, node=b).balance = 0  # spent
    b.shutdown()
    shutil.rmtree(a.home / "redis")
    shutil.copytree(saved, a.home / "redis")  # the intruder restores the old balance
    c = reopen(make_node, a.home)
    assert Ledger(doc.db_id, node=c).balance.get() == 100
    problems = c.verify_store()
    assert any("rolled back" in p for p in problems), problems
    c.shutdown()
    assert main(["verify", "--home", str(a.home)]) == 1
    assert "rolled back" in capsys.readouterr().err


def test_a_deleted_update_is_found_while_running_and_after_a_restart(make_node) -> None:
    a = make_node("a")
    doc = Ledger.create(balance=1, node=a)
    doc.balance = 2
    victim = a.store.log_range(-1)[0]
    client = a.store.client
    client.hdel(a.store.k_updates, victim)  # gone from the update store, log untouched
    assert any("deleted or injected while it runs" in p for p in a.verify_store())
    a.shutdown()  # its root records what it committed, not what Redis holds now
    b = reopen(make_node, a.home)
    assert any("deleted or injected" in p for p in b.verify_store())
    assert b.root.frozen  # a store found tampered is never blessed
    before = (a.home / ROOT_FILE).read_bytes()
    b.shutdown()
    assert (a.home / ROOT_FILE).read_bytes() == before


def test_an_injected_update_is_found(make_node) -> None:
    a, other = make_node("a"), make_node("other")
    Ledger.create(balance=1, node=a)
    stranger = Ledger.create(balance=5, node=other)  # validly signed, never sent to a
    uid, raw = other.store.log_range(0, 0)[0], other.updates_since(0)[0]
    assert stranger.exists()
    a.store.client.hset(a.store.k_updates, uid, raw)
    problems = a.verify_store()
    assert any("deleted or injected" in p for p in problems), problems


def test_a_replaced_store_is_found(make_node) -> None:
    a = make_node("a")
    Ledger.create(balance=1, node=a)
    a.shutdown()
    server = EmbeddedRedis(a.home)
    try:
        server.client().flushall()  # an empty Redis in its place
    finally:
        server.stop()
    b = reopen(make_node, a.home)
    assert any("not the one this home recorded" in p for p in b.verify_store())


def test_a_root_not_signed_by_the_node_is_refused(make_node) -> None:
    a = make_node("a")
    Ledger.create(balance=1, node=a)
    a.shutdown()
    path = a.home / ROOT_FILE
    data = bytearray(path.read_bytes())
    data[70] ^= 1
    path.write_bytes(bytes(data))
    b = reopen(make_node, a.home)
    assert any("not signed by this node" in p for p in b.verify_store())


def test_the_digest_depends_on_the_set_only() -> None:
    ids = [bytes([i]) * 32 for i in range(20)]
    one = LiveDigest.of(ids)
    two = LiveDigest.of(reversed(ids))
    assert one.same(two)
    two.remove(ids[:5])
    two.add(ids[:5])
    assert one.same(two)
    two.remove(ids[:1])
    assert not one.same(two)


def test_a_root_round_trips(tmp_path) -> None:
    import nacl.signing

    key = nacl.signing.SigningKey.generate()
    root = Root(b"e" * 16, 7, 3, 12345, 2)
    body = root.body()
    (tmp_path / "root").write_bytes(key.sign(body).signature + body)
    assert Root.load(tmp_path / "root", bytes(key.verify_key)) == root
    other = nacl.signing.SigningKey.generate()
    with pytest.raises(ValueError):
        Root.load(tmp_path / "root", bytes(other.verify_key))


# ------------------------------------------------------------- one case per tampering


def tampered(make_node):
    a = make_node("t", retention="all")
    doc = Ledger.create(balance=100, node=a)
    doc.balance = 50
    return a, doc


def test_a_register_rolled_back_to_an_older_signed_value(make_node) -> None:
    a, doc = tampered(make_node)
    # The intruder puts back the register as the first write made it (genuine bytes).
    first = decode(a.store.raw_update(bytes.fromhex(a.history(doc.db_id, "balance")[0]
                                                    .update_id)))
    index = next(i for i, op in enumerate(first.ops) if op.field == "balance")
    assert first.ops[index].value == 100
    ver = merge.version(first.timestamp, first.caller_oid, first.id, index)
    a.store.client.hset(a.store.k_reg(doc.db_id), "balance", merge.Register(ver, 100).pack())
    assert doc.balance.get() == 100
    with pytest.raises(dmodel.errors.IntegrityError, match="rolled back"):
        doc.balance.get(verified=True)
    assert any("rolled back" in p for p in a.verify_store())


def test_an_undone_delete(make_node) -> None:
    a, doc = tampered(make_node)
    before = a.store.client.hget(a.store.k_reg(doc.db_id), "balance")
    doc.delete("balance")
    a.store.client.hset(a.store.k_reg(doc.db_id), "balance", before)
    assert doc.balance.get() == 50
    with pytest.raises(dmodel.errors.IntegrityError, match="rolled back"):
        doc.balance.get(verified=True)
    assert any("rolled back" in p for p in a.verify_store())


def test_a_deleted_register(make_node) -> None:
    a, doc = tampered(make_node)
    a.store.client.hdel(a.store.k_reg(doc.db_id), "balance")
    assert any("balance: missing" in p for p in a.verify_store())


def test_deleted_log_and_history_entries(make_node) -> None:
    a, doc = tampered(make_node)
    uid = a.store.log_range(-1)[0]
    a.store.client.zrem(a.store.k_log, uid)
    a.store.client.lrem(a.store.k_hist(doc.db_id), 0, uid)
    problems = a.verify_store()
    assert problems, "a deleted log and history entry went unnoticed"


def test_an_injected_grant(make_node) -> None:
    a, doc = tampered(make_node)
    intruder = Ledger.create(node=a).db_id
    other = Ledger.create(node=a)
    other.append_update_authorized(intruder)  # a genuine grant, on another object
    events = a.store.auth_events(other.db_id, "u")[intruder]
    a.store.client.hset(a.store.k_auth(doc.db_id), f"u:{intruder}", merge.pack_auth(events))
    problems = a.verify_store()
    assert any("injected" in p and intruder in p for p in problems), problems


def test_a_reordered_list(make_node) -> None:
    class Queue(dmodel.DModel):
        items = dmodel.DList()

    a = make_node("q")
    q = Queue.create(node=a)
    for v in ("first", "second", "third"):
        q.items.append(v)
    assert a.verify_store() == []
    key = a.store.k_list(q.db_id, "items")
    first, *_ = a.store.list_keys_range(q.db_id, "items", 0, 0)
    a.store.client.zrem(key, first)
    a.store.client.zadd(key, {b"\xff" + first[1:]: 0})  # "first" moved to the end
    assert q.items.to_list() == ["second", "third", "first"]
    assert any("list order differs" in p for p in a.verify_store())


# ---------------------------------------------------------------- chain heads and links


def chained(make_node):
    """A store holding a chain of three updates by its own node."""
    a = make_node("c", retention="all")
    doc = Ledger.create(balance=1, node=a)
    doc.balance = 2
    doc.balance = 3
    chain = f"{doc.db_id}|{a.node_id.hex()}"
    return a, doc, chain


def test_chain_heads_and_links_verify_clean(make_node) -> None:
    a, _, chain = chained(make_node)
    assert a.verify_store() == []
    assert a.store.chain_heads()[chain][:32] == a.store.log_range(-1)[0]


def test_a_chain_head_rolled_back_to_an_older_update(make_node) -> None:
    a, _, chain = chained(make_node)
    older = decode(a.store.raw_update(a.store.log_range(-2)[0]))
    a.store.client.hset(a.store.k_head, chain, older.id + older.timestamp.to_bytes(8, "big"))
    problems = a.verify_store()
    assert any("rolled back" in p and chain in p for p in problems), problems


def test_a_forged_chain_head_and_its_forged_link(make_node) -> None:
    a, doc, chain = chained(make_node)
    bogus = bytes(range(32))
    a.store.client.hset(a.store.k_head, chain, bogus + (2 ** 62).to_bytes(8, "big"))
    problems = a.verify_store()
    assert any("neither a stored update nor a pruned one" in p for p in problems), problems
    # With a link made up to match, the head passes for a pruned one: the one case
    # only the link vouches for (see chain_problems).
    a.store.client.hset(a.store.k_chain, bogus, a.node_id + doc.db_id.encode())
    assert a.verify_store() == []


def test_a_deleted_head_and_deleted_or_injected_links(make_node) -> None:
    a, _, chain = chained(make_node)
    first = a.store.log_range(0, 0)[0]
    a.store.client.hdel(a.store.k_head, chain)
    a.store.client.hdel(a.store.k_chain, first)
    a.store.client.hset(a.store.k_chain, b"\x01" * 32, b"\x02" * 16 + b"Ledger:x")
    problems = a.verify_store()
    assert any("stored updates but no head" in p for p in problems), problems
    assert any(first.hex()[:12] in p and "link is missing" in p for p in problems), problems
    assert any("01010101" in p and "injected" in p for p in problems), problems
    a.store.client.hset(a.store.k_head, chain, b"short")
    assert any("head is damaged" in p for p in a.verify_store())


def test_an_older_update_never_moves_a_head_back(make_node) -> None:
    """Received newest first, with the node's cache of heads emptied in between (as
    after a restart): the head stays the newest update (HEADMAX in the commit)."""
    a, _, chain = chained(make_node)
    raws = a.updates_since(0)
    b = make_node("b", retention="all")
    b.ingest(raws[0])  # the create
    b.ingest(raws[2])  # the newest: parked for its link...
    b.release_gaps()  # ...and decided without it, as when no peer has the link
    assert b.pending_count == 0
    b.store.cache.heads.clear()
    b.ingest(raws[1])
    assert b.pending_count == 0
    assert b.store.chain_heads()[chain][:32] == decode(raws[2]).id
    assert b.verify_store() == []


def test_a_pruned_head_keeps_its_link_until_the_chain_moves_on(make_node) -> None:
    """A prunes B's newest update once the owner's own write supersedes it (an owner's
    write cannot be retracted, so nothing older is kept): the link stays while that
    update is the head of B's chain, and goes when B's next update becomes the head."""
    a = make_node("a", retention=1)
    b = make_node("b", retention="all")
    doc = Ledger.create(balance=1, node=a)
    writer = Ledger.create(node=b).db_id
    a.ingest(b.updates_since(0)[0])
    doc.append_update_authorized(writer)
    for raw in a.updates_since(0):
        b.ingest(raw)
    Ledger(doc.db_id, writer, node=b).balance = 2  # the head of B's chain
    head = decode(b.updates_since(b.log_length() - 1)[0])
    chain = f"{writer}|{b.node_id.hex()}"
    a.ingest(head.raw)
    doc.balance = 3  # supersedes it on A
    a.settle()
    assert not a.store.has_update(head.id), "retention 1 pruned the superseded head"
    assert a.store.chain_heads()[chain][:32] == head.id
    assert head.id in a.store.chain_links()
    assert a.verify_store() == []
    for raw in a.updates_since(0):
        b.ingest(raw)
    Ledger(doc.db_id, writer, node=b).balance = 4  # chained to the pruned head
    following = decode(b.updates_since(b.log_length() - 1)[0])
    assert following.prev == head.id
    a.ingest(following.raw)
    a.settle()
    assert a.pending_count == 0
    assert a.store.chain_heads()[chain][:32] == following.id
    assert head.id not in a.store.chain_links()
    assert a.verify_store() == []


def test_a_removed_authorization_event(make_node) -> None:
    a, doc = tampered(make_node)
    member = Ledger.create(node=a).db_id
    doc.append_update_authorized(member)
    doc.revoke_update_authorized(member)
    assert a.verify_store() == []
    events = a.store.member_events(doc.db_id, "u", member)
    assert len(events) == 2
    # The intruder takes the revoke back: the member looks granted again.
    a.store.client.hset(a.store.k_auth(doc.db_id), f"u:{member}",
                        merge.pack_auth(events[:1]))
    problems = a.verify_store()
    assert any("update revoke of" in p and member in p and "missing" in p
               for p in problems), problems
    a.store.client.hdel(a.store.k_auth(doc.db_id), f"u:{member}")
    problems = a.verify_store()
    assert any("update grant of" in p and member in p for p in problems), problems


def test_links_left_by_an_older_version_are_dropped_once_on_open(make_node) -> None:
    """Before HEADMAX, the link of a pruned head stayed after its chain moved on: a store
    written then is cleaned once when opened, so verify does not report those links."""
    a, _, chain = chained(make_node)
    home = a.home
    left = bytes(range(1, 33))
    a.store.client.hset(a.store.k_chain, left, a.node_id + b"Ledger:old")
    a.store.client.hdel(a.store.k_meta, "links")  # as a store of the older version
    a.shutdown()
    b = reopen(make_node, home)
    assert left not in b.store.chain_links()
    assert b.store.chain_heads()[chain][:32] in b.store.chain_links()  # heads keep theirs
    assert b.verify_store() == []
    # Once only: a link injected later is not cleaned away but reported.
    b.store.client.hset(b.store.k_chain, left, b.node_id + b"Ledger:old")
    b.shutdown()
    c = reopen(make_node, home)
    assert any("injected" in p for p in c.verify_store())
