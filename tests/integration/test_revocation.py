"""Authorization that holds (issue 10): revocation, windows, removal and identity keys,
on real nodes (an embedded Redis each), with the clocks the tests drive (``now=``).

The rules under test are merge.py's: a member's update is authorized on an object iff
it names an update-grant of that member whose window is open, or its id is in the
frontier of the revoke that closed that window. Timestamps, node ids and chains carry
no authority; nodes that accepted a write before the revoke reached them re-decide.
"""

from __future__ import annotations

import os
import random

import pytest
from helpers import T0_MS, Clock, wait_until

import dmodel
from dmodel import merge
from dmodel.crypto import Identity
from dmodel.update import Op, Update, decode


@pytest.fixture
def make_node(make_node):
    """Nodes that keep every version: the tests hand whole signed histories around."""
    return lambda name=None, **options: make_node(name, **{"retention": "all", **options})

DAY_MS = 86_400_000




class Worker(dmodel.DModel):
    name = dmodel.DField()
    salary = dmodel.DField(encrypted=True)
    note = dmodel.DField()
    motto = dmodel.DField()
    tags = dmodel.DDict()
    items = dmodel.DList()


class Chief(dmodel.DModel):
    name = dmodel.DField()


def ship(src: dmodel.Node, dst: dmodel.Node) -> None:
    for raw in src.updates_since(0):
        dst.ingest(raw)


def deliver(node: dmodel.Node, raws: list[bytes]) -> dmodel.Node:
    for raw in raws:
        node.ingest(raw)
    assert node.pending_count == 0, node
    return node


def last(node: dmodel.Node) -> bytes:
    """The raw update ``node`` stored last."""
    return node.updates_since(node.log_length() - 1)[0]


def union(*sources: dmodel.Node | list[bytes]) -> list[bytes]:
    """Every distinct raw update of the given nodes / lists, in first-seen order."""
    out: dict[bytes, bytes] = {}
    for src in sources:
        for raw in src if isinstance(src, list) else src.updates_since(0):
            out.setdefault(decode(raw).id, raw)
    return list(out.values())


def accepted_by(node: dmodel.Node, db_id: str, caller: str) -> set[str]:
    return {e.update_id for e in node.history(db_id) if e.caller_id == caller}


def refused_by(node: dmodel.Node, db_id: str, caller: str) -> set[str]:
    return {e.update_id for e in node.history(db_id, include_rejected=True)
            if e.caller_id == caller and e.verdict == "unauthorized"}


def member_write(node: dmodel.Node, signer: Identity, caller: str, ops: list[Op], *,
                 timestamp: int, grant: bytes | None, obj: str) -> Update:
    """A member's update signed by hand (a modified client), on a fresh device id."""
    return Update.create(signer, node=os.urandom(16), caller=caller, timestamp=timestamp,
                         prev=b"", ops=ops, grants={obj: grant} if grant else None)


# ---------------------------------------------------------------- the attack


def attack_from(node: dmodel.Node, worker: str, chief: str, tag: str) -> list[bytes]:
    """Every kind of change, signed as the chief on ``node`` (which believes the chief is
    still authorized); returns the raw updates it signed."""
    before = node.log_length()
    w = Worker(worker, chief, node=node)
    w.name = f"{tag}: name"
    w.salary = 1
    w.tags["k"] = tag
    w.items.append(tag)
    w.remove()
    assert not node.exists(worker)           # it believed the removal was fine
    raws = node.updates_since(before)
    assert len(raws) == 5
    assert all(decode(r).caller == chief for r in raws)
    return raws


def expect_untouched(node: dmodel.Node, worker: str, chief: str, owner_reads: bool) -> None:
    assert node.pending_count == 0, node
    assert node.exists(worker), node
    w = Worker(worker, node=node)
    assert w.name.get() == "Bob", node
    assert w.note.get() == "by the chief, accepted", node
    assert w.motto.get() is None, node
    assert w.tags.to_dict() == {}, node
    assert w.items.to_list() == [], node
    assert sorted(node.read_all(worker)) == ["name", "note", "salary"], node
    if owner_reads:
        assert w.salary.get() == 44321
    assert not w.is_update_authorized(chief)


def test_a_revoked_chief_cannot_write_from_any_device_clock_or_chain(make_node) -> None:
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    chief = Chief.create(node=b, name="C").db_id
    ship(b, a)
    ca.ms += 1000
    worker = Worker.create(node=a, authorized=[chief], name="Bob", salary=44321,
                           note="initial").db_id
    grant = merge.open_grant(a.store.member_events(worker, "u", chief))
    ship(a, b)
    cb.ms += 2000
    Worker(worker, chief, node=b).note = "by the chief, accepted"
    good = decode(last(b))
    ship(b, a)
    assert a.read(worker, "note") == "by the chief, accepted"
    before_revoke = union(a)

    # D: a second device of the chief, clock 30 s late (a skew wide enough to take A's
    # updates); E: another device, a fresh node id. Both saw the grant, not the revoke.
    cd = Clock(ca.ms + 10_000 - 30_000)
    d = make_node("d", now=cd, skew=60)
    ce = Clock(ca.ms + 10_000)
    e = make_node("e", now=ce)
    for device in (d, e):
        deliver(device, before_revoke)
        device.keyring.add(b.identity(chief), chief)

    ca.ms += 10_000
    Worker(worker, node=a).revoke_update_authorized(chief)
    revoke = last(a)
    assert decode(revoke).ops[0].value["f"] == [good.id]        # the frontier

    cb.ms += 3000                                                # b has not seen the revoke
    attacks = attack_from(b, worker, chief, "b") + attack_from(d, worker, chief, "d") \
        + attack_from(e, worker, chief, "e")
    # D's timestamps precede the revoke's: under timestamp rules they would win.
    assert all(decode(r).timestamp < decode(revoke).timestamp
               for r in attacks if decode(r).node == d.node_id)
    backdated = member_write(e, b.identity(chief), chief,
                             [Op(worker, "dset", "tags", ["backdated", "x"])],
                             timestamp=good.timestamp - 1, grant=grant, obj=worker)
    no_grant = member_write(e, b.identity(chief), chief,
                            [Op(worker, "set", "name", "named no grant")],
                            timestamp=decode(revoke).timestamp - 5, grant=None, obj=worker)
    forged = [backdated.raw, no_grant.raw]
    everything = union(before_revoke, [revoke], attacks, forged)
    assert len(everything) == len(before_revoke) + 1 + 15 + 2

    recomputed = {n: n.stats.recomputed for n in (b, d, e)}
    later = Clock(T0_MS + 3_600_000)
    for clock in (ca, cb, ce):                           # an hour passes; D stays 30 s late
        clock.ms = later.ms
    cd.ms = later.ms - 30_000
    t1, t2, t3 = (make_node(f"t{i}", now=later) for i in (1, 2, 3))
    rest = [r for r in everything if r != revoke]
    rng = random.Random(10)
    shuffled = rest[:]
    rng.shuffle(shuffled)
    deliver(t1, everything)                              # the revoke before the attacks
    deliver(t2, rest + [revoke])                         # the revoke last
    deliver(t3, everything[::-1])                        # backwards
    deliver(a, shuffled)
    deliver(b, shuffled + [revoke])                      # b hears of the revoke last
    deliver(d, [revoke] + rest)
    deliver(e, everything[::-1])
    nodes = (a, b, d, e, t1, t2, t3)
    for node in nodes:
        expect_untouched(node, worker, chief, owner_reads=node is a)
        assert accepted_by(node, worker, chief) == {good.hex_id}, node
        assert refused_by(node, worker, chief) == {
            decode(r).hex_id for r in [*attacks, *forged]}, node
    for node in (b, d, e, t2):
        assert node.stats.recomputed > recomputed.get(node, 0), node   # re-decided
    assert len({n.state_digest() for n in nodes}) == 1
    assert all(n.read_all(worker) == a.read_all(worker) for n in nodes)

    # A month later, a device that saw only the grant writes a field nobody wrote since.
    for clock in (ca, cb, cd, ce, later):
        clock.ms += 30 * DAY_MS
    cf = Clock(later.ms)
    f = make_node("f", now=cf)
    deliver(f, before_revoke)
    f.keyring.add(b.identity(chief), chief)
    Worker(worker, chief, node=f).motto = "a month later"
    assert f.read(worker, "motto") == "a month later"           # f believed it was fine
    month = last(f)
    for node in nodes:
        node.ingest(month)
        assert node.read(worker, "motto") is None, node
        assert decode(month).hex_id in refused_by(node, worker, chief), node
    f_recomputed = f.stats.recomputed
    deliver(f, everything)
    assert f.stats.recomputed > f_recomputed
    expect_untouched(f, worker, chief, owner_reads=False)
    assert len({n.state_digest() for n in (*nodes, f)}) == 1


# ---------------------------------------------------------------- legitimate cases


def test_concurrent_writes_by_two_authorized_members_are_both_kept(make_node) -> None:
    ca, cx, cy = Clock(), Clock(), Clock()
    a, x, y = make_node("a", now=ca), make_node("x", now=cx), make_node("y", now=cy)
    one = Chief.create(node=x).db_id
    two = Chief.create(node=y).db_id
    ship(x, a)
    ship(y, a)
    worker = Worker.create(node=a, authorized=[one, two], name="Bob").db_id
    ship(a, x)
    ship(a, y)
    cx.ms += 1000
    cy.ms += 2000
    wx, wy = Worker(worker, one, node=x), Worker(worker, two, node=y)
    wx.note = "from one"                                  # t0 + 1 s
    wx.tags["one"] = 1
    wy.note = "from two"                                  # t0 + 2 s: wins the register
    wy.items.append("two")
    raws = union(a, x, y)
    later = Clock(T0_MS + 3_600_000)
    nodes = [deliver(make_node("r1", now=later), raws),
             deliver(make_node("r2", now=later), raws[::-1])]
    ship(x, a)
    ship(y, a)
    ship(y, x)
    ship(x, y)
    for node in (a, x, y, *nodes):
        w = Worker(worker, node=node)
        assert w.note.get() == "from two", node
        assert w.tags.to_dict() == {"one": 1}, node
        assert w.items.to_list() == ["two"], node
        assert len(accepted_by(node, worker, one)) == 2
        assert len(accepted_by(node, worker, two)) == 2
        assert node.stats.rejected["UnauthorizedError"] == 0
    assert len({n.state_digest() for n in (a, x, y, *nodes)}) == 1


def owner_and_chief(make_node):
    """Node a owns worker "Bob", with chief (owned on b) update-authorized; both have
    seen both creates. Returns (a, b, a's clock, b's clock, chief id, worker id)."""
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    chief = Chief.create(node=b).db_id
    ship(b, a)
    worker = Worker.create(node=a, authorized=[chief], name="Bob").db_id
    ship(a, b)
    return a, b, ca, cb, chief, worker


def test_grant_revoke_regrant_opens_a_new_window_only(make_node) -> None:
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    chief = Chief.create(node=b).db_id
    ship(b, a)
    owner = Worker.create(node=a, name="Bob")
    worker = owner.db_id
    ca.ms += 1000
    owner.append_update_authorized(chief)
    first = merge.open_grant(a.store.member_events(worker, "u", chief))
    ship(a, b)
    cb.ms += 2000
    Worker(worker, chief, node=b).note = "window one"
    ship(b, a)
    ca.ms += 3000
    owner.revoke_update_authorized(chief)
    ca.ms += 1000
    owner.append_update_authorized(chief)
    second = merge.open_grant(a.store.member_events(worker, "u", chief))
    assert second is not None and second != first
    ship(a, b)
    cb.ms += 5000
    Worker(worker, chief, node=b).motto = "window two"   # names the new grant
    in_new = decode(last(b))
    assert in_new.grant_for(worker) == second
    # A modified client names the old grant for a write after the revoke.
    old = member_write(b, b.identity(chief), chief, [Op(worker, "set", "name", "old window")],
                       timestamp=in_new.timestamp + 1, grant=first, obj=worker)
    raws = union(a, b, [old.raw])
    later = Clock(T0_MS + 3_600_000)
    nodes = [deliver(make_node("r1", now=later), raws),
             deliver(make_node("r2", now=later), raws[::-1])]
    ship(b, a)
    a.ingest(old.raw)
    b.ingest(old.raw)
    for node in (a, b, *nodes):
        w = Worker(worker, node=node)
        assert (w.name.get(), w.note.get(), w.motto.get()) == (
            "Bob", "window one", "window two"), node
        assert w.is_update_authorized(chief)
        assert refused_by(node, worker, chief) == {old.hex_id}, node
        assert len(accepted_by(node, worker, chief)) == 2
    assert len({n.state_digest() for n in (a, b, *nodes)}) == 1


def test_writes_accepted_before_the_revoke_count_when_they_arrive_late(make_node) -> None:
    a, b, ca, cb, chief, worker = owner_and_chief(make_node)
    cb.ms += 1000
    w = Worker(worker, chief, node=b)
    w.note = "accepted before the revoke"
    w.tags["k"] = "v"
    writes = b.updates_since(b.log_length() - 2)
    ship(b, a)
    ca.ms += 2000
    Worker(worker, node=a).revoke_update_authorized(chief)
    revoke = last(a)
    assert decode(revoke).ops[0].value["f"] == sorted(decode(r).id for r in writes)
    # T gets the creates, the grant and the revoke first, the chief's writes last.
    t = make_node("t", now=Clock(T0_MS + 3_600_000))
    deliver(t, [r for r in union(a) if r not in writes])
    assert t.read(worker, "note") is None
    deliver(t, writes)
    for node in (a, t):
        assert node.read(worker, "note") == "accepted before the revoke"
        assert Worker(worker, node=node).tags.to_dict() == {"k": "v"}
        assert accepted_by(node, worker, chief) == {decode(r).hex_id for r in writes}
        assert node.stats.rejected["UnauthorizedError"] == 0
    assert t.state_digest() == a.state_digest()


def test_a_transaction_by_the_revoked_member_is_refused_as_a_whole(make_node) -> None:
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    chief = Chief.create(node=b, name="C").db_id
    ship(b, a)
    worker = Worker.create(node=a, authorized=[chief], name="Bob").db_id
    ship(a, b)
    ca.ms += 1000
    Worker(worker, node=a).revoke_update_authorized(chief)
    revoke = last(a)
    cb.ms += 500                                   # before the revoke, b has not seen it
    with dmodel.transaction(chief, node=b):        # all or nothing, on every node
        Worker(worker, chief, node=b).name = "tx on the worker"
        Chief(chief, node=b).name = "tx on the chief itself"
    tx = last(b)
    assert b.read(chief, "name") == "tx on the chief itself"
    rest = [r for r in union(a, b) if r not in (revoke, tx)]
    later = Clock(T0_MS + 3_600_000)
    nodes = [deliver(make_node("r1", now=later), [*rest, revoke, tx]),
             deliver(make_node("r2", now=later), [*rest, tx, revoke])]
    b.ingest(revoke)
    a.ingest(tx)
    for node in (a, b, *nodes):
        assert (node.read(worker, "name"), node.read(chief, "name")) == ("Bob", "C"), node
        assert refused_by(node, worker, chief) == {decode(tx).hex_id}, node
    assert len({n.state_digest() for n in (a, b, *nodes)}) == 1


def test_a_write_held_for_its_timestamp_when_the_revoke_is_signed_is_refused(make_node) -> None:
    # Held updates are not accepted, so they are in no frontier: released after the
    # revoke, the write is refused (what every node that got it later decides too).
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb, skew=120)
    chief = Chief.create(node=b, name="C").db_id
    ship(b, a)
    worker = Worker.create(node=a, authorized=[chief], name="Bob").db_id
    ship(a, b)
    cb.ms += 60_000
    Worker(worker, chief, node=b).name = "from a fast device"
    write = last(b)
    assert a.ingest(write).verdict == "held"
    ca.ms += 1000
    Worker(worker, node=a).revoke_update_authorized(chief)
    revoke = last(a)
    assert decode(revoke).ops[0].value["f"] == []
    ca.ms += 60_000                                # its time comes
    wait_until(lambda: a.future_count == 0)
    assert a.read(worker, "name") == "Bob"
    assert refused_by(a, worker, chief) == {decode(write).hex_id}
    recomputed = b.stats.recomputed
    b.ingest(revoke)                               # b accepted its own write: re-decides
    assert b.stats.recomputed > recomputed
    assert b.read(worker, "name") == "Bob"
    assert a.state_digest() == b.state_digest()


# ---------------------------------------------------------------- removal


def test_only_the_object_or_a_covered_member_may_remove(make_node) -> None:
    ca, cm, cs = Clock(), Clock(), Clock()
    a = make_node("a", now=ca)
    m = make_node("m", now=cm)
    s = make_node("s", now=cs, unauthorized_policy="listeners")   # signs anything
    member = Chief.create(node=m).db_id
    stranger = Chief.create(node=s).db_id
    ship(m, a)
    ship(s, a)
    by_member = Worker.create(node=a, authorized=[member], name="member removes").db_id
    by_self = Worker.create(node=a, name="self removes").db_id
    by_stranger = Worker.create(node=a, authorized=[member], name="stranger removes").db_id
    ship(a, m)
    ship(a, s)
    cs.ms += 1000
    Worker(by_stranger, stranger, node=s).remove()
    Worker(by_self, stranger, node=s).remove()
    stranger_removes = s.updates_since(s.log_length() - 2)
    assert all(decode(r).grant_for(decode(r).ops[0].obj) is None for r in stranger_removes)
    cm.ms += 2000
    Worker(by_member, member, node=m).remove()
    ca.ms += 3000
    Worker(by_self, node=a).remove()
    raws = union(a, m, s)
    t = deliver(make_node("t", now=Clock(T0_MS + 3_600_000)), raws[::-1])
    ship(m, a)
    ship(s, a)
    for node in (a, t):
        assert not node.exists(by_member), node
        assert not node.exists(by_self), node
        assert node.exists(by_stranger), node
        assert node.read(by_stranger, "name") == "stranger removes"
        assert {decode(r).hex_id for r in stranger_removes} == (
            refused_by(node, by_stranger, stranger) | refused_by(node, by_self, stranger))
    assert a.state_digest() == t.state_digest()


def test_a_revoked_members_remove_is_refused_everywhere(make_node) -> None:
    a, b, ca, cb, chief, worker = owner_and_chief(make_node)
    ca.ms += 1000
    Worker(worker, node=a).revoke_update_authorized(chief)
    revoke = last(a)
    cb.ms += 500                                   # before the revoke, b has not seen it
    Worker(worker, chief, node=b).remove()
    removal = last(b)
    assert not b.exists(worker)
    rest = [r for r in union(a, b) if r not in (revoke, removal)]
    later = Clock(T0_MS + 3_600_000)
    nodes = [deliver(make_node("r1", now=later), [*rest, revoke, removal]),
             deliver(make_node("r2", now=later), [*rest, removal, revoke])]
    a.ingest(removal)
    recomputed = b.stats.recomputed
    b.ingest(revoke)
    assert b.stats.recomputed > recomputed
    for node in (a, b, *nodes):
        assert node.exists(worker), node
        assert node.read(worker, "name") == "Bob"
        assert refused_by(node, worker, chief) == {decode(removal).hex_id}, node
    assert len({n.state_digest() for n in (a, b, *nodes)}) == 1


def test_writing_to_a_removed_object_raises_removed(make_node) -> None:
    a, b = make_node("a"), make_node("b")
    chief = Chief.create(node=b).db_id
    ship(b, a)
    worker = Worker.create(node=a, authorized=[chief], name="Bob")
    ship(a, b)
    as_chief = Worker(worker.db_id, chief, node=b)
    worker.remove()
    ship(a, b)
    length = (a.log_length(), b.log_length())
    writes = [lambda w: setattr(w, "name", "x"), lambda w: w.tags.set("k", "v"),
              lambda w: w.items.append("x"), lambda w: setattr(w, "salary", 1),
              lambda w: w.remove(), lambda w: w.delete("name")]
    for handle in (worker, as_chief):
        for write in writes:
            with pytest.raises(dmodel.ObjectNotFoundError, match="removed"):
                write(handle)
    assert (a.log_length(), b.log_length()) == length     # nothing signed or stored


# ---------------------------------------------------------------- identity keys


def test_a_second_create_with_another_box_key_is_refused(make_node) -> None:
    a, b = make_node("a"), make_node("b")
    worker = Worker.create(node=a, name="Bob").db_id
    ship(a, b)
    first = b.store.object_meta(worker)
    identity = a.identity(worker)
    other_box = Identity.generate().public.box_key
    assert other_box != identity.public.box_key
    second = Update.create(identity, node=os.urandom(16), caller=worker,
                           timestamp=decode(b.updates_since(0)[0]).timestamp - 100, prev=b"",
                           ops=[Op(worker, "create", "", {
                               "sign": identity.public.verify_key, "box": other_box,
                               "read": [], "update": []})])
    dropped, equivocations = b.stats.dropped["ConflictingCreate"], b.stats.equivocations
    decision = b.ingest(second.raw)
    assert decision is not None and decision.verdict == "dropped"
    assert type(decision.error).__name__ == "ConflictingCreate"
    assert b.stats.dropped["ConflictingCreate"] == dropped + 1
    assert b.stats.equivocations == equivocations + 1
    assert b.store.object_meta(worker) == first
    assert b.store.object_meta(worker).keys.box_key == identity.public.box_key
    assert not b.store.has_update(second.id)
    assert b.read(worker, "name") == "Bob"
