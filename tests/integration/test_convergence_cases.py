"""Convergence, case by case: concrete races on real nodes (embedded Redis each).

Every test builds a small history on writer nodes whose physical clocks it drives
(``now=``), hands the updates to nodes in more than one order, and checks the
concrete final values on all of them.
"""

from __future__ import annotations

import pytest
from helpers import T0_MS, Clock, wait_until

import dmodel
from dmodel import merge
from dmodel.update import Op, Update, decode


class CaseDoc(dmodel.DModel):
    title = dmodel.DField()
    secret = dmodel.DField(encrypted=True)
    tags = dmodel.DDict()
    items = dmodel.DList()
    sealed = dmodel.DList(encrypted=True)


def ship(src: dmodel.Node, dst: dmodel.Node) -> None:
    for raw in src.updates_since(0):
        dst.ingest(raw)


def signed_here(node: dmodel.Node) -> list[bytes]:
    """Raw updates this node signed itself, in the order it stored them."""
    return [raw for raw in node.updates_since(0) if decode(raw).node == node.node_id]


def deliver(node: dmodel.Node, raws: list[bytes]) -> dmodel.Node:
    for raw in raws:
        node.ingest(raw)
    node.release_gaps()  # links the writers' retention pruned: nothing more will come
    assert node.pending_count == 0
    return node


def last(node: dmodel.Node) -> bytes:
    """The raw update ``node`` stored last."""
    return node.updates_since(node.log_length() - 1)[0]


@pytest.fixture
def later(make_node):
    """``later(name)``: a receiver node whose clock is well past every writer's."""
    return lambda name, **kw: make_node(name, now=Clock(T0_MS + 3_600_000), **kw)


# ---------------------------------------------------------------- DList


def test_concurrent_inserts_at_one_position_keep_both_in_one_order(make_node, later) -> None:
    a, b = make_node("a", now=Clock()), make_node("b", now=Clock())
    member = CaseDoc.create(node=b).db_id
    ship(b, a)
    doc = CaseDoc.create(node=a, authorized=[member])
    doc.items.append("x")
    doc.items.append("z")
    ship(a, b)
    doc.items.insert(1, "from a")
    CaseDoc(doc.db_id, member, node=b).items.insert(1, "from b")  # concurrent, same place
    c = later("c")
    deliver(c, signed_here(b) + signed_here(a))
    ship(a, b)
    ship(b, a)
    lists = [CaseDoc(doc.db_id, node=n).items.to_list() for n in (a, b, c)]
    assert lists[0] == lists[1] == lists[2]
    assert lists[0][0] == "x" and lists[0][3] == "z"
    assert sorted(lists[0][1:3]) == ["from a", "from b"]
    ids = [n.store.list_range(doc.db_id, "items") for n in (a, b, c)]
    assert ids[0] == ids[1] == ids[2]


def test_dlist_api(make_node) -> None:
    node = make_node("a")
    doc = CaseDoc.create(node=node)
    items = doc.items
    assert items.length() == len(items) == 0
    assert list(items) == []
    items.append("b")
    items.append("d")
    items.insert(0, "a")
    items.insert(2, "c")
    items.insert(-1, "c2")         # before the last element
    items.insert(99, "e")          # past the end: appended
    assert items.to_list() == ["a", "b", "c", "c2", "d", "e"]
    assert [items.at(i) for i in range(len(items))] == ["a", "b", "c", "c2", "d", "e"]
    assert items[-1] == "e" and items.at(-6) == "a"
    items.set(-3, "C2")
    items[0] = "A"
    assert items.index("C2") == 3 and "C2" in items and "c2" not in items
    items.delete(3)
    del items[-1]
    assert list(items) == ["A", "b", "c", "d"]
    assert items.length() == 4
    with pytest.raises(IndexError):
        items.at(4)
    with pytest.raises(IndexError):
        items.at(-5)
    with pytest.raises(IndexError):
        items.set(10, "x")
    with pytest.raises(ValueError):
        items.index("nope")
    with pytest.raises(dmodel.FieldTypeError):
        items.at("0")


def test_encrypted_dlist_is_readable_by_owner_and_authorized_reader_only(make_node) -> None:
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    reader = CaseDoc.create(node=b).db_id
    stranger = CaseDoc.create(node=c).db_id
    ship(b, a)
    doc = CaseDoc.create(node=a, read=[reader])
    doc.sealed.append("s1")
    doc.sealed.insert(0, "s0")
    ship(a, b)
    ship(a, c)
    assert doc.sealed.to_list() == ["s0", "s1"]
    assert CaseDoc(doc.db_id, reader, node=b).sealed.to_list() == ["s0", "s1"]
    assert CaseDoc(doc.db_id, reader, node=b).sealed[-1] == "s1"
    with pytest.raises(dmodel.DecryptionError):
        CaseDoc(doc.db_id, stranger, node=c).sealed.at(0)
    with pytest.raises(dmodel.DecryptionError):
        CaseDoc(doc.db_id, "", node=c).sealed.at(0)
    # The sealed bytes are the same everywhere; only the keys differ.
    assert a.read_all(doc.db_id) == b.read_all(doc.db_id) == c.read_all(doc.db_id)


def test_delete_beats_a_concurrent_later_set(make_node, later) -> None:
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    member = CaseDoc.create(node=b).db_id
    ship(b, a)
    doc = CaseDoc.create(node=a, authorized=[member])
    doc.items.append("keep")
    doc.items.append("doomed")
    ship(a, b)
    ca.ms += 1000
    doc.items.delete(1)                                          # earlier delete
    cb.ms += 5000
    CaseDoc(doc.db_id, member, node=b).items.set(1, "revived?")  # later set, concurrent
    set_raw, delete_raw = last(b), last(a)
    one, two = later("one"), later("two")
    deliver(one, signed_here(a)[:-1] + signed_here(b)[:-1] + [delete_raw, set_raw])
    deliver(two, signed_here(a)[:-1] + signed_here(b)[:-1] + [set_raw, delete_raw])
    ship(a, b)
    ship(b, a)
    for node in (a, b, one, two):
        assert CaseDoc(doc.db_id, node=node).items.to_list() == ["keep"], node
    element = one.store.list_range(doc.db_id, "items")
    assert element == two.store.list_range(doc.db_id, "items")
    assert len(element) == 1


def test_a_set_on_a_deleted_element_does_not_revive_it(make_node) -> None:
    a = make_node("a", now=Clock())
    doc = CaseDoc.create(node=a)
    doc.items.append("x")
    element = a.store.list_range(doc.db_id, "items")[0]
    doc.items.delete(0)
    # A later set naming the deleted element (say, from a stale view) changes nothing.
    a.write(doc.db_id, [Op(doc.db_id, "lset", "items", [element, "zombie"])])
    assert doc.items.to_list() == []
    assert doc.items.length() == 0
    reg = a.store.register(doc.db_id, f"items#{element.hex()}")
    assert reg is not None and reg.deleted


def test_a_set_that_overtakes_its_insert_waits_for_it(make_node, later) -> None:
    # The set comes from a second device (another chain), so no chain orders the two.
    a, b = make_node("a", now=Clock(), retention="all"), make_node("b", now=Clock())
    doc = CaseDoc.create(node=a)
    doc.items.append("x")
    insert = last(a)
    ship(a, b)
    b.keyring.add(a.identity(doc.db_id), doc.db_id)
    CaseDoc(doc.db_id, node=b).items[0] = "y"
    setting = last(b)
    rest = [r for r in a.updates_since(0) if r != insert]
    for order in ([setting, insert], [insert, setting]):
        r = later(f"r{len(order)}{order[0] == insert}")
        for raw in rest:
            r.ingest(raw)
        r.ingest(order[0])
        assert r.verify_store() == []  # never a register without its position
        r.ingest(order[1])
        assert r.pending_count == 0
        assert CaseDoc(doc.db_id, node=r).items.to_list() == ["y"]
        assert r.verify_store() == []


def test_a_set_naming_an_element_that_never_existed_is_never_stored(make_node, later) -> None:
    a = make_node("a", now=Clock())
    doc = CaseDoc.create(node=a)
    ghost = bytes(34)
    signed = Update.create(a.identity(doc.db_id), node=a.node_id, caller=doc.db_id,
                           timestamp=a.clock.tick(), prev=a.store.chain_head(doc.db_id, a.node_id),
                           ops=[Op(doc.db_id, "lset", "items", [ghost, "boo"])])
    for node in (a, later("r")):
        if node is not a:
            deliver(node, a.updates_since(0))
        node.ingest(signed.raw)
        assert node.pending_count == 1  # waits (bounded) for an insert that never comes
        assert node.store.register(doc.db_id, f"items#{ghost.hex()}") is None
        assert node.verify_store() == []
        assert CaseDoc(doc.db_id, node=node).items.to_list() == []


def test_a_set_on_an_element_whose_insert_was_refused_does_not_wait(make_node, later) -> None:
    # Found by the convergence property: an intruder's insert is refused (and stored, for
    # its chain); its later set of that element must be decided too, not wait forever.
    w = make_node("w", now=Clock(), unauthorized_policy="listeners", retention="all")
    owner, intruder = CaseDoc.create(node=w), CaseDoc.create(node=w)
    CaseDoc(owner.db_id, intruder.db_id, node=w).sealed.insert(0, "in")
    CaseDoc(owner.db_id, intruder.db_id, node=w).sealed[0] = "set"
    raws = w.updates_since(0)
    for name, order in (("fwd", raws), ("rev", [*raws[:2], *reversed(raws[2:])])):
        r = later(name)
        for raw in order:
            r.ingest(raw)
        assert r.pending_count == 0
        assert r.stats.rejected["UnauthorizedError"] == 2
        assert CaseDoc(owner.db_id, node=r).sealed.to_list() == []
        assert r.verify_store() == []


def test_a_set_whose_insert_was_pruned_goes_on_with_its_delete(make_node, later) -> None:
    # The insert of a deleted element may be pruned everywhere; the set still merges
    # once the delete (pinned) arrives, and revives nothing.
    a = make_node("a", now=Clock(), retention="all")
    doc = CaseDoc.create(node=a)
    doc.items.append("x")
    insert = last(a)
    doc.items[0] = "y"
    setting = last(a)
    doc.items.delete(0)
    removal = last(a)
    rest = [r for r in a.updates_since(0) if r not in (insert, setting, removal)]
    r = later("r")
    for raw in [*rest, setting, removal]:
        r.ingest(raw)
    r.release_gaps()
    assert r.pending_count == 0
    assert CaseDoc(doc.db_id, node=r).items.to_list() == []
    assert r.verify_store() == []


def test_a_set_that_comes_after_its_object_was_removed_does_not_wait(make_node, later) -> None:
    # Found by the convergence property: a receiver that prunes drops a removed object's
    # history, the element's insert with it; a set of that element that arrives later
    # must be decided (it changes nothing), not wait for the insert forever.
    a = make_node("a", now=Clock(), retention="all")
    doc = CaseDoc.create(node=a)
    doc.items.append("x")
    insert = decode(last(a)).id
    doc.items[0] = "y"
    setting = last(a)
    doc.remove()
    r = later("r", retention=1)
    deliver(r, [raw for raw in a.updates_since(0) if raw != setting])
    r.settle()
    assert not r.store.has_update(insert), "retention 1 pruned the removed object's insert"
    r.ingest(setting)
    assert r.pending_count == 0
    assert r.verify_store() == []


# ---------------------------------------------------------------- authorization races


def test_revoke_racing_an_update_by_the_revoked_caller(make_node, later) -> None:
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    member = CaseDoc.create(node=b).db_id
    ship(b, a)
    doc = CaseDoc.create(node=a, title="original")
    doc.append_update_authorized(member)
    ship(a, b)
    ca.ms += 2000
    doc.revoke_update_authorized(member)          # t0 + 2 s, b has not seen it
    cb.ms += 3000
    CaseDoc(doc.db_id, member, node=b).title = "by the revoked member"  # t0 + 3 s
    assert b.read(doc.db_id, "title") == "by the revoked member"  # b believed it was fine
    revoke, update = last(a), last(b)
    one = deliver(later("one"), signed_here(a) + signed_here(b))
    two = deliver(later("two"), signed_here(b) + signed_here(a))
    assert one.stats.recomputed == 0          # the revoke was there first: rejected outright
    assert two.stats.recomputed >= 1          # re-decided when the grant and revoke came late
    recomputed = b.stats.recomputed
    ship(a, b)                                # b learns of the revoke in its past
    assert b.stats.recomputed > recomputed
    ship(b, a)
    for node in (a, b, one, two):
        assert node.read(doc.db_id, "title") == "original", node
        assert not CaseDoc(doc.db_id, node=node).is_update_authorized(member)
        held = [e.update_id for e in node.history(doc.db_id, include_rejected=True)
                if e.verdict == "unauthorized"]
        assert held == [decode(update).hex_id], node
    assert decode(revoke).timestamp < decode(update).timestamp


def test_a_write_that_names_a_grant_not_here_yet_waits_for_it(make_node, later) -> None:
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    member = CaseDoc.create(node=b).db_id
    ship(b, a)
    doc = CaseDoc.create(node=a, title="original")
    ca.ms += 1000
    doc.append_update_authorized(member)
    grant = last(a)
    ship(a, b)
    cb.ms += 2000
    CaseDoc(doc.db_id, member, node=b).title = "by the member"
    update = last(b)
    assert decode(update).grant_for(doc.db_id) == decode(grant).id + bytes(2)
    creates = [r for r in signed_here(a) + signed_here(b) if r not in (grant, update)]
    first = later("first")
    for raw in (*creates, update):
        first.ingest(raw)
    assert first.pending_count == 1                              # waits for the grant
    assert decode(grant).id in first.pending_needs()
    deliver(first, [grant])
    second = deliver(later("second"), [*creates, grant, update])
    for node in (first, second):
        assert node.stats.rejected["UnauthorizedError"] == 0
        assert node.read(doc.db_id, "title") == "by the member"
        verdicts = {e.update_id: e.verdict for e in node.history(doc.db_id,
                                                                  include_rejected=True)}
        assert verdicts[decode(update).hex_id] == "accepted"
        assert node.read_all(doc.db_id) == second.read_all(doc.db_id)


def test_a_grant_concurrent_with_a_removal_counts_in_both_orders(make_node, later) -> None:
    # The verdict of a transaction touching a removed object and another one depends on
    # the removed object's grants, so those must not depend on the removal's arrival.
    co, cx, cy = Clock(), Clock(), Clock()
    o, x, y = make_node("o", now=co), make_node("x", now=cx), make_node("y", now=cy)
    remover = CaseDoc.create(node=x).db_id
    member = CaseDoc.create(node=y).db_id
    ship(x, o)
    ship(y, o)
    doc = CaseDoc.create(node=o, authorized=[remover])
    for node in (x, y):
        ship(o, node)
    cx.ms += 1000
    CaseDoc(doc.db_id, remover, node=x).remove()                 # t0 + 1 s
    co.ms += 2000
    doc.append_update_authorized(member)                         # t0 + 2 s, o saw no removal
    ship(o, y)
    cy.ms += 3000
    with dmodel.transaction(member, node=y):                     # t0 + 3 s, neither did y
        CaseDoc(doc.db_id, member, node=y).title = "on the removed object"
        CaseDoc(member, node=y).title = "by the member"
    removal, grant, tx = last(x), last(o), last(y)
    rest = [r for n in (o, x, y) for r in signed_here(n) if r not in (removal, grant, tx)]
    one = deliver(later("one"), [*rest, removal, grant, tx])
    two = deliver(later("two"), [*rest, grant, removal, tx])
    for node in (one, two):
        assert not node.exists(doc.db_id)
        assert node.read(member, "title") == "by the member", node
    assert one.store.auth_events(doc.db_id, "u") == two.store.auth_events(doc.db_id, "u")


# ---------------------------------------------------------------- stale and replayed


def test_replaying_an_old_update_is_a_no_op(make_node, later) -> None:
    a = make_node("a", now=Clock())
    doc = CaseDoc.create(node=a)
    doc.title = "v1"
    captured = last(a)
    doc.title = "v2"
    r = deliver(later("r"), a.updates_since(0))
    for node in (a, r):
        dropped = node.stats.dropped["ReplayedUpdate"]
        length = node.log_length()
        decision = node.ingest(captured)
        assert decision is not None and decision.verdict == "dropped"
        assert node.stats.dropped["ReplayedUpdate"] == dropped + 1
        assert node.read(doc.db_id, "title") == "v2"
        assert node.log_length() == length


def test_an_older_update_never_rolls_a_field_back(make_node, later) -> None:
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    member = CaseDoc.create(node=b).db_id
    ship(b, a)
    doc = CaseDoc.create(node=a, authorized=[member])
    ship(a, b)
    ca.ms += 5000
    doc.title = "newer"                                      # t0 + 5 s
    CaseDoc(doc.db_id, member, node=b).title = "older"       # b's clock is still at t0
    older, newer = last(b), last(a)
    assert decode(older).timestamp < decode(newer).timestamp
    ship(b, a)                                               # arrives after the newer one
    assert a.read(doc.db_id, "title") == "newer"
    ship(a, b)
    assert b.read(doc.db_id, "title") == "newer"
    # A second device of the object itself, signing with an old timestamp.
    identity = a.identity(doc.db_id)
    stale = Update.create(identity, node=bytes(16), caller=doc.db_id,
                          timestamp=decode(newer).timestamp - 1, prev=b"",
                          ops=[Op(doc.db_id, "set", "title", "stale device")])
    for node in (a, b):
        decision = node.ingest(stale.raw)
        assert decision is not None and decision.verdict == "accepted"
        assert node.read(doc.db_id, "title") == "newer"
        reg = node.store.register(doc.db_id, "title")
        assert merge.version_ref(reg.version)[:32] == decode(newer).id


def test_a_future_dated_update_is_held_until_its_time(make_node, tmp_path) -> None:
    signer_clock, receiver_clock = Clock(), Clock()
    signer = make_node("signer", now=signer_clock)
    receiver = dmodel.Node(tmp_path / "receiver", now=receiver_clock)   # default skew: 5 s
    doc = CaseDoc.create(node=signer, title="now")
    ship(signer, receiver)
    signer_clock.ms += 61_000
    doc.title = "from the future"
    future = last(signer)
    decision = receiver.ingest(future)
    assert decision is not None and decision.verdict == "held"
    assert receiver.stats.held_future == 1 and receiver.future_count == 1
    assert receiver.read(doc.db_id, "title") == "now"
    assert not receiver.store.has_update(decode(future).id)
    assert receiver.ingest(future).verdict == "held" and receiver.future_count == 1
    # It is kept across a restart, so a catch-up that moved past it loses nothing.
    receiver.shutdown()
    receiver = dmodel.Node(tmp_path / "receiver", now=receiver_clock)
    try:
        assert receiver.future_count == 1
        receiver_clock.ms += 56_500                             # within the skew: 4.5 s
        assert wait_until(lambda: receiver.read(doc.db_id, "title") == "from the future")
        assert receiver.future_count == 0
        assert receiver.store.future_updates() == []
    finally:
        receiver.shutdown()


def test_an_equivocating_caller_is_counted_and_merged_deterministically(make_node) -> None:
    a = make_node("a", now=Clock())
    doc = CaseDoc.create(node=a, title="created")
    create = decode(last(a))
    identity = a.identity(doc.db_id)

    def fork(title: str, ms: int) -> Update:
        return Update.create(identity, node=a.node_id, caller=doc.db_id,
                             timestamp=create.timestamp + (ms << 16), prev=create.id,
                             ops=[Op(doc.db_id, "set", "title", title)])

    one, two = fork("one", 10), fork("two", 20)            # both name the create as previous
    nodes = [make_node("r1", now=Clock()), make_node("r2", now=Clock())]
    for node, order in zip(nodes, ([one, two], [two, one]), strict=True):
        deliver(node, [create.raw] + [u.raw for u in order])
        assert node.stats.equivocations == 1
        assert node.read(doc.db_id, "title") == "two"      # the later one, in both orders
        accepted = [e.update_id for e in node.history(doc.db_id)]
        assert accepted == [create.hex_id, one.hex_id, two.hex_id]
    assert nodes[0].read_all(doc.db_id) == nodes[1].read_all(doc.db_id)


# ---------------------------------------------------------------- listeners and history


class NoTitles(dmodel.DAction):
    def on_update(self, object_id, field, old_value, new_value) -> None:
        if field == "title":
            raise PermissionError("titles are read-only here")


def test_a_vetoed_transaction_leaves_nothing_on_the_vetoing_node(make_node) -> None:
    a, strict, lax = make_node("a"), make_node("strict"), make_node("lax")
    NoTitles().apply("CaseDoc:*", node=strict)
    doc = CaseDoc.create(node=a)
    ship(a, strict)
    ship(a, lax)
    with doc.transaction():
        doc.tags["k"] = "v"
        doc.items.append("x")
        doc.secret = "s"
        doc.title = "vetoed on strict"
    tx = last(a)
    for node in (strict, lax):
        node.ingest(tx)
    assert strict.stats.rejected["VetoedError"] == 1
    assert strict.read_all(doc.db_id) == {}
    assert strict.store.list_length(doc.db_id, "items") == 0
    assert not strict.store.has_update(decode(tx).id)
    assert CaseDoc(doc.db_id, node=lax).tags.to_dict() == {"k": "v"}
    assert CaseDoc(doc.db_id, node=lax).items.to_list() == ["x"]
    assert lax.read(doc.db_id, "title") == "vetoed on strict"
    assert lax.read_all(doc.db_id) == a.read_all(doc.db_id)
    # A local write vetoed on the strict node raises and stores nothing either.
    mine = CaseDoc.create(node=strict)
    with pytest.raises(dmodel.VetoedError):
        with mine.transaction():
            mine.tags["k"] = "v"
            mine.title = "no"
    assert strict.read_all(mine.db_id) == {}


def test_history_lists_accepted_updates_in_merge_order(make_node) -> None:
    ca, cb = Clock(), Clock()
    a = make_node("a", now=ca)
    b = make_node("b", now=cb, unauthorized_policy="listeners")   # signs anything
    outsider = CaseDoc.create(node=b).db_id
    ship(b, a)
    doc = CaseDoc.create(node=a, title="t0")
    ship(a, b)
    ca.ms += 1000
    doc.title = "t1"
    doc.tags["k"] = "v"
    cb.ms += 500
    CaseDoc(doc.db_id, outsider, node=b).title = "not allowed"   # between t0 and t1
    ship(b, a)
    assert a.read(doc.db_id, "title") == "t1"
    accepted = doc.history()
    assert [e.verdict for e in accepted] == ["accepted"] * 3
    assert all(e.caller_id == doc.db_id for e in accepted)
    timestamps = [e.timestamp for e in accepted]
    assert timestamps == sorted(timestamps)
    assert [e.ops[-1].op for e in accepted] == ["set", "set", "dset"]
    assert [e.update_id for e in doc.history(field="title")] == [e.update_id
                                                                 for e in accepted[:2]]
    everything = doc.history(include_rejected=True)
    assert len(everything) == 4
    held = [e for e in everything if e.verdict == "unauthorized"]
    assert len(held) == 1 and held[0].caller_id == outsider
    assert everything.index(held[0]) == 1                    # merge order, by timestamp
    assert [e.timestamp for e in everything] == sorted(e.timestamp for e in everything)


# ---------------------------------------------------------------- removal


def test_remove_is_final_in_both_orders(make_node, later) -> None:
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    member = CaseDoc.create(node=b).db_id
    ship(b, a)
    doc = CaseDoc.create(node=a, authorized=[member], title="alive")
    doc.items.append("x")
    ship(a, b)
    ca.ms += 1000
    doc.remove()                                               # t0 + 1 s
    cb.ms += 2000
    late = CaseDoc(doc.db_id, member, node=b)                  # b has not seen the removal
    with late.transaction():
        late.title = "after the removal"
        late.items.append("y")
        late.tags["k"] = "v"
    removal, update = last(a), last(b)
    rest = [r for r in signed_here(a) + signed_here(b) if r not in (removal, update)]
    nodes = [deliver(later("one"), [*rest, removal, update]),
             deliver(later("two"), [*rest, update, removal])]
    ship(a, b)
    ship(b, a)
    for node in (*nodes, a, b):
        assert not node.exists(doc.db_id), node
        assert node.read_all(doc.db_id) == {}
        assert node.store.list_range(doc.db_id, "items") == []
        with pytest.raises(dmodel.ObjectNotFoundError):
            CaseDoc(doc.db_id, node=node)
        with pytest.raises(dmodel.ObjectNotFoundError):
            node.read(doc.db_id, "title")


def test_list_elements_released_with_a_removal_are_dropped_too(make_node, later) -> None:
    # An insert and the removal wait for the same missing create and are then applied
    # together, in one atomic batch: the removal must drop the list created just before.
    ca, cx, cy = Clock(), Clock(), Clock()
    a, x, y = make_node("a", now=ca), make_node("x", now=cx), make_node("y", now=cy)
    writer = CaseDoc.create(node=x).db_id
    remover = CaseDoc.create(node=y).db_id
    ship(x, a)
    ship(y, a)
    doc = CaseDoc.create(node=a, authorized=[writer, remover])
    create = last(a)
    ship(a, x)
    ship(a, y)
    cx.ms += 1000
    CaseDoc(doc.db_id, writer, node=x).items.append("element")
    cy.ms += 2000
    CaseDoc(doc.db_id, remover, node=y).remove()
    r = later("r")
    deliver(r, [raw for raw in signed_here(x) + signed_here(y) if decode(raw).ops[0].op
                == "create"])
    for raw in (last(x), last(y)):
        r.ingest(raw)                                         # both wait for the create
    assert r.pending_count == 2
    deliver(r, [create])
    assert not r.exists(doc.db_id)
    assert r.store.list_range(doc.db_id, "items") == []
    store = r.store
    assert not store.client.exists(store.k_list(doc.db_id, "items"), store.k_lists(doc.db_id))


def test_insert_between_two_elements_that_share_a_position(make_node) -> None:
    """New positions end in random digits, but an older or hostile writer can give two
    elements one position: an insert between them must not hang and lands just before
    the pair, the same on every node."""
    a, b = make_node("a"), make_node("b")

    class Shelf(dmodel.DModel):
        items = dmodel.DList()

    shelf, other = Shelf([], node=a), Shelf([], node=b)
    b.ingest_many(a.updates_since(0))
    a.ingest_many(b.updates_since(0))
    shelf.append_update_authorized(other.db_id)
    shelf.items.append("first")
    b.ingest_many(a.updates_since(0))
    shared = b"\xf0"  # what two concurrent appends after "first" chose before
    a.write(shelf.db_id, [Op(shelf.db_id, "lins", "items", [shared, "A"])])
    b.write(other.db_id, [Op(shelf.db_id, "lins", "items", [shared, "B"])])
    a.ingest_many(b.updates_since(0))
    b.ingest_many(a.updates_since(0))
    keys = a.store.list_keys_range(shelf.db_id, "items", 0, -1)
    assert keys[1][:-35] == keys[2][:-35] == shared
    pair = list(shelf.items)[1:]
    shelf.items.insert(2, "between")
    b.ingest_many(a.updates_since(0))
    assert list(shelf.items) == ["first", "between", *pair]
    assert list(Shelf(shelf.db_id, node=b).items) == list(shelf.items)


def test_appends_in_one_transaction_keep_their_order(make_node) -> None:
    a = make_node("a")

    class Shelf(dmodel.DModel):
        items = dmodel.DList()

    shelf = Shelf([], node=a)
    shelf.items.append(0)
    with shelf.transaction():
        for i in range(1, 6):
            shelf.items.append(i)
    assert list(shelf.items) == [0, 1, 2, 3, 4, 5]
    positions = [k[:-35] for k in a.store.list_keys_range(shelf.db_id, "items", 0, -1)]
    assert len(set(positions)) == 6  # distinct: later inserts between them have room
    shelf.items.insert(3, "x")
    assert list(shelf.items) == [0, 1, 2, "x", 3, 4, 5]


def test_state_digest_is_equal_exactly_when_states_are(make_node) -> None:
    a, b = make_node("a"), make_node("b")

    class Card(dmodel.DModel):
        title = dmodel.DField()
        secret = dmodel.DField(encrypted=True)
        tags = dmodel.DDict()
        items = dmodel.DList()

    card = Card.create(title="t", secret="s", node=a)
    card.tags["k"] = 1
    card.items.append("x")
    updates = a.updates_since(0)
    b.ingest_many(reversed(updates))  # another order, and parked until the create arrives
    assert a.state_digest() == b.state_digest()
    card.items.append("y")
    assert a.state_digest() != b.state_digest()
    b.ingest_many(a.updates_since(0))
    assert a.state_digest() == b.state_digest()


def test_two_read_grants_of_one_value_give_one_state_in_every_order(make_node, later) -> None:
    # Each grant_read wraps the value's key afresh (randomized), so the kept wrap must
    # not depend on which grant arrived last, nor on whether they came in one batch.
    # Two devices of one identity grant concurrently (two chains, no order between them).
    o, p = make_node("o", now=Clock()), make_node("p", now=Clock())
    doc = CaseDoc.create(node=o)
    reader = CaseDoc.create(node=o).db_id
    doc.secret = "s"
    ship(o, p)
    p.keyring.add(o.identity(doc.db_id), doc.db_id)
    doc.append_read_authorized(reader)
    CaseDoc(doc.db_id, node=p).append_read_authorized(reader)
    first, second = last(o), last(p)
    rest = [r for r in o.updates_since(0) if r not in (first, second)]
    one = deliver(later("one"), [*rest, first, second])
    two = deliver(later("two"), [*rest, second, first])
    three = later("three")
    three.ingest_many([*rest, second, first])
    assert len({n.state_digest() for n in (one, two, three)}) == 1
    assert len(set(one.store.wraps(doc.db_id).values())) == 1
    assert CaseDoc(doc.db_id, reader, node=o).secret.get() == "s"
