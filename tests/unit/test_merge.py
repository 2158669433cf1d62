"""Convergence rules (dmodel.merge): LWW order, tombstones, removal, authorization as of."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from strategies import NODE, T0, create_op, db_id, grant_ref, ident, signed

from dmodel import merge
from dmodel.merge import Register, State
from dmodel.update import Op, Update

OBJ, X, Y = ident(1), ident(2), ident(3)  # an object, and two other callers
OBJ_ID, X_ID, Y_ID = db_id(OBJ), db_id(X), db_id(Y)
CREATES = [signed(i, [create_op(i)], ts=T0) for i in (OBJ, X, Y)]


def deliver(state: State, update: Update, policy: merge.Policy = "reject") -> merge.Outcome:
    """What a node does with a verified update whose dependencies are known."""
    outcome = merge.apply(update, state)
    if outcome.authorized or merge.unauthorized_is_applied(update, policy):
        state.commit(outcome.writes)
    return outcome


def fresh(*updates: Update) -> State:
    state = State()
    for update in (*CREATES, *updates):
        deliver(state, update)
    return state


def value(state: State, name: str, obj: str = OBJ_ID) -> object:
    reg = state.registers.get((obj, name))
    return None if reg is None or reg.deleted else reg.value


def set_(signer, val, ts, *, obj: str = OBJ_ID, name: str = "name") -> Update:
    return signed(signer, [Op(obj, "set", name, val)], ts=ts)


def both_orders(*updates: Update) -> tuple[State, State]:
    return fresh(*updates), fresh(*reversed(updates))


# ------------------------------------------------------------------ LWW


def test_later_timestamp_wins_in_any_order() -> None:
    s1, s2 = both_orders(set_(OBJ, "old", T0 + 10), set_(OBJ, "new", T0 + 20))
    assert value(s1, "name") == value(s2, "name") == "new"
    assert s1.registers == s2.registers


def test_equal_timestamps_are_ordered_by_caller_oid() -> None:
    grants = [signed(OBJ, [Op(OBJ_ID, "grant_update", "", {"id": m})], ts=T0 + 1)
              for m in (X_ID, Y_ID)]
    wx, wy = (member_set(X, "by-x", T0 + 50, grants[0]),
              member_set(Y, "by-y", T0 + 50, grants[1]))
    winner = "by-x" if X.oid > Y.oid else "by-y"
    s1, s2 = fresh(*grants, wx, wy), fresh(*grants, wy, wx)
    assert value(s1, "name") == value(s2, "name") == winner


def test_equal_timestamp_and_caller_are_ordered_by_update_id() -> None:
    u1, u2 = set_(OBJ, "one", T0 + 50), set_(OBJ, "two", T0 + 50)
    winner = "one" if u1.id > u2.id else "two"
    s1, s2 = both_orders(u1, u2)
    assert value(s1, "name") == value(s2, "name") == winner


def test_version_is_timestamp_then_caller_then_id_then_index() -> None:
    v = merge.version(T0, OBJ.oid, bytes(32), 1)
    assert merge.version_timestamp(v) == T0
    assert merge.version_ref(v) == bytes(32) + b"\x00\x01"
    assert merge.version(T0, "z" * 32, bytes(32), 0) < merge.version(T0 + 1, "a" * 32,
                                                                       bytes(32), 0)
    assert merge.version(T0, "a" * 32, b"\xff" * 32, 0) < merge.version(T0, "b" * 32,
                                                                          bytes(32), 0)


def test_within_one_update_the_last_op_wins() -> None:
    update = signed(OBJ, [Op(OBJ_ID, "set", "name", "first"), Op(OBJ_ID, "set", "name", "second")],
                    ts=T0 + 5)
    assert value(fresh(update), "name") == "second"


def test_the_same_update_delivered_twice_changes_nothing() -> None:
    # Equal versions: the register already holds this op's value, so it is not written again.
    update = signed(OBJ, [Op(OBJ_ID, "set", "name", "first"), Op(OBJ_ID, "set", "name", "second")],
                    ts=T0 + 5)
    state = fresh(update)
    before = dict(state.registers)
    outcome = deliver(state, update)
    assert outcome.writes == [] and outcome.events == []
    assert state.registers == before
    # Inside one update the op index breaks the tie: op 1 holds the register.
    reg = state.registers[(OBJ_ID, "name")]
    assert reg.value == "second" and merge.version_ref(reg.version) == update.id + b"\x00\x01"


def test_a_replayed_older_update_never_rolls_back() -> None:
    old, new = set_(OBJ, "old", T0 + 10), set_(OBJ, "new", T0 + 20)
    state = fresh(old, new)
    outcome = deliver(state, old)
    assert outcome.writes == [] and outcome.events == []
    assert value(state, "name") == "new"


# ------------------------------------------------------------------ tombstones, dicts


def test_tombstone_beats_an_older_set() -> None:
    put = set_(OBJ, "Bob", T0 + 10)
    delete = signed(OBJ, [Op(OBJ_ID, "del", "name")], ts=T0 + 20)
    s1, s2 = both_orders(put, delete)
    assert s1.registers == s2.registers
    assert s1.registers[(OBJ_ID, "name")].deleted
    assert value(s1, "name") is None


def test_a_newer_set_beats_a_tombstone() -> None:
    delete = signed(OBJ, [Op(OBJ_ID, "del", "name")], ts=T0 + 20)
    put = set_(OBJ, "back", T0 + 30)
    s1, s2 = both_orders(delete, put)
    assert value(s1, "name") == value(s2, "name") == "back"


def test_dict_entries_are_independent_registers() -> None:
    u1 = signed(OBJ, [Op(OBJ_ID, "dset", "tags", ["a", 1]), Op(OBJ_ID, "dset", "tags", ["b", 2])],
                ts=T0 + 10)
    u2 = signed(OBJ, [Op(OBJ_ID, "ddel", "tags", "a")], ts=T0 + 20)
    u3 = signed(OBJ, [Op(OBJ_ID, "dset", "tags", ["b", 3])], ts=T0 + 5)  # older: loses
    s1, s2 = fresh(u1, u2, u3), fresh(u3, u2, u1)
    assert s1.registers == s2.registers
    assert s1.registers[(OBJ_ID, "tags:a")].deleted
    assert value(s1, "tags:b") == 2


def test_encrypted_flag_is_kept() -> None:
    envelope = {"b": b"x" * 30, "k": {}}
    state = fresh(signed(OBJ, [Op(OBJ_ID, "set_enc", "salary", envelope)], ts=T0 + 1))
    reg = state.registers[(OBJ_ID, "salary")]
    assert reg.encrypted and reg.value == envelope
    assert Register.unpack(reg.pack()) == reg


# ------------------------------------------------------------------ removal


def test_remove_is_final_in_both_orders() -> None:
    before = set_(OBJ, "before", T0 + 10)
    remove = signed(OBJ, [Op(OBJ_ID, "remove")], ts=T0 + 20)
    after = set_(OBJ, "after", T0 + 30)
    after_del = signed(OBJ, [Op(OBJ_ID, "dset", "tags", ["k", 1])], ts=T0 + 40)
    recreate = signed(OBJ, [create_op(OBJ)], ts=T0 + 50)
    history = [before, remove, after, after_del, recreate]
    states = [fresh(*history), fresh(*reversed(history)),
              fresh(after, recreate, remove, after_del, before)]
    for state in states:
        assert state.objects[OBJ_ID].removed is not None
        assert not [k for k in state.registers if k[0] == OBJ_ID]
    assert states[0].objects == states[1].objects == states[2].objects


def test_two_removals_keep_the_earliest_in_both_orders() -> None:
    first = signed(OBJ, [Op(OBJ_ID, "remove")], ts=T0 + 10)
    second = signed(OBJ, [Op(OBJ_ID, "remove")], ts=T0 + 20)
    middle = set_(OBJ, "middle", T0 + 15)
    earliest = merge.version(first.timestamp, OBJ.oid, first.id, 0)
    for order in ((first, middle, second), (second, middle, first), (middle, second, first)):
        state = fresh(*order)
        assert state.objects[OBJ_ID].removed == earliest, order
        assert not [k for k in state.registers if k[0] == OBJ_ID]


def test_ops_before_the_create_are_no_ops() -> None:
    early = set_(OBJ, "early", T0 - 10)
    state = fresh(early)
    assert (OBJ_ID, "name") not in state.registers


# ------------------------------------------------------------------ lists


def test_deleting_a_deleted_list_element_is_a_no_op() -> None:
    insert = signed(OBJ, [Op(OBJ_ID, "lins", "items", [b"\x80", "x"])], ts=T0 + 10)
    element = insert.id + b"\x00\x00"
    name = f"items#{element.hex()}"
    first, second = (signed(OBJ, [Op(OBJ_ID, "ldel", "items", element)], ts=T0 + t)
                     for t in (20, 30))
    state = fresh(insert, first)
    assert state.registers[(OBJ_ID, name)].deleted
    assert state.list_elements(OBJ_ID, "items") == []
    before = dict(state.registers)
    outcome = deliver(state, second)
    assert outcome.writes == [] and outcome.events == []
    assert state.registers == before
    # Also for an element known only from its delete (its insert has not arrived).
    early = fresh(first)
    assert early.registers[(OBJ_ID, name)] == Register(b"", [None, None], False, True)
    outcome = deliver(early, second)
    assert outcome.writes == [] and outcome.events == []



def test_a_deleted_element_is_the_same_tombstone_whatever_was_seen_of_it() -> None:
    """Seen inserted, set and deleted; deleted first; or deleted with its insert pruned
    (a node rebuilding the object from what retention kept): one register. Before, the
    first kept the element's last value under the delete, so a pruning node that
    rebuilt an object after a late grant held another state (found by the revocation
    property)."""
    insert = signed(OBJ, [Op(OBJ_ID, "lins", "items", [b"\x80", "x"])], ts=T0 + 10)
    element = insert.id + b"\x00\x00"
    name = f"items#{element.hex()}"
    change = signed(OBJ, [Op(OBJ_ID, "lset", "items", [element, "y"])], ts=T0 + 15)
    delete = signed(OBJ, [Op(OBJ_ID, "ldel", "items", element)], ts=T0 + 20)
    states = [fresh(insert, change, delete), fresh(delete, insert, change),
              fresh(change, delete, insert), fresh(delete)]
    tombstone = Register(b"", [None, None], False, True)
    assert [s.registers[(OBJ_ID, name)] for s in states] == [tombstone] * 4
    assert merge.TOMBSTONE == tombstone
    assert all(s.list_elements(OBJ_ID, "items") == [] for s in states)


# ------------------------------------------------------------------ authorization


def grant(kind: str, member: str, ts: int, *, signer=OBJ, obj: str = OBJ_ID,
          frontier: list[bytes] | None = None) -> Update:
    value: dict = {"id": member}
    if kind == "revoke_update":
        value["f"] = sorted(frontier or [])
    return signed(signer, [Op(obj, kind, "", value)], ts=ts)


def member_set(signer, val, ts, g: Update, *, obj: str = OBJ_ID, name: str = "name",
               node: bytes = NODE) -> Update:
    """A member's write naming the grant ``g`` it writes under."""
    return signed(signer, [Op(obj, "set", name, val)], ts=ts, node=node,
                  grants={obj: grant_ref(g)})


def test_a_member_writes_under_the_grant_it_names() -> None:
    g = grant("grant_update", X_ID, T0 + 10)
    state = fresh(g)
    assert merge.is_authorized(member_set(X, "x", T0 + 20, g), state)
    # The timestamp is the signer's word: naming the grant is what counts.
    assert merge.is_authorized(member_set(X, "x", T0 + 5, g), state)
    assert not merge.is_authorized(set_(X, "x", T0 + 20), state)  # names no grant
    assert not merge.is_authorized(member_set(Y, "y", T0 + 20, g), state)  # not Y's grant
    assert merge.is_authorized(set_(OBJ, "o", T0 + 1), state)  # the object itself


def test_a_revoke_keeps_only_the_writes_in_its_frontier() -> None:
    g = grant("grant_update", X_ID, T0 + 10)
    seen = member_set(X, "seen", T0 + 20, g)
    unseen = member_set(X, "unseen", T0 + 21, g)
    late_clock = member_set(X, "late clock", T0 + 11, g)  # dated before the revoke
    other_device = member_set(X, "fresh node", T0 + 12, g, node=b"\x09" * 16)
    r = grant("revoke_update", X_ID, T0 + 30, frontier=[seen.id])
    state = fresh(g, r)
    assert merge.is_authorized(seen, state)
    for refused in (unseen, late_clock, other_device):
        assert not merge.is_authorized(refused, state)
    far_past = member_set(X, "x", T0 - 1000, g)
    assert not merge.is_authorized(far_past, state)


def test_a_new_grant_opens_a_new_window() -> None:
    g1 = grant("grant_update", X_ID, T0 + 10)
    r1 = grant("revoke_update", X_ID, T0 + 20)
    g2 = grant("grant_update", X_ID, T0 + 30)
    state = fresh(g1, r1, g2)
    assert not merge.is_authorized(member_set(X, "old window", T0 + 40, g1), state)
    assert merge.is_authorized(member_set(X, "new window", T0 + 40, g2), state)
    assert merge.open_grant(state.auth[(OBJ_ID, "u", X_ID)]) == grant_ref(g2)
    assert merge.open_grant(fresh(g1, r1).auth[(OBJ_ID, "u", X_ID)]) is None


def test_grants_keep_a_window_open_and_revokes_close_it_together() -> None:
    g1, g1b = grant("grant_update", X_ID, T0 + 10), grant("grant_update", X_ID, T0 + 11)
    w1, w2 = member_set(X, "w1", T0 + 12, g1), member_set(X, "w2", T0 + 13, g1)
    # Two devices of the owner revoke, each having accepted one write.
    ra = grant("revoke_update", X_ID, T0 + 20, frontier=[w1.id])
    rb = grant("revoke_update", X_ID, T0 + 21, frontier=[w2.id])
    assert merge.is_authorized(w1, fresh(g1, g1b))  # a second grant keeps it open
    state = fresh(g1, g1b, ra, rb)
    assert merge.is_authorized(w1, state) and merge.is_authorized(w2, state)
    assert not merge.is_authorized(member_set(X, "w3", T0 + 14, g1b), state)


def test_authorization_does_not_depend_on_arrival_order() -> None:
    g = grant("grant_update", X_ID, T0 + 10)
    w = member_set(X, "w", T0 + 20, g)
    r = grant("revoke_update", X_ID, T0 + 30, frontier=[w.id])
    s1, s2 = fresh(g, r), fresh(r, g)
    assert s1.auth == s2.auth
    for update, expected in ((w, True), (member_set(X, "v", T0 + 25, g), False)):
        assert merge.is_authorized(update, s1) is expected
        assert merge.is_authorized(update, s2) is expected


def test_create_lists_grant_at_the_create() -> None:
    owner = ident(9)
    create = signed(owner, [create_op(owner, read=[X_ID], update=[X_ID])], ts=T0 + 100)
    state = fresh(create)
    write = member_set(X, "x", T0 + 200, create, obj=db_id(owner))
    assert merge.is_authorized(write, state)
    assert merge.current_members({"m": state.auth[(db_id(owner), "r", X_ID)]}) == {"m"}
    assert not merge.is_authorized(member_set(Y, "y", T0 + 200, create, obj=db_id(owner)),
                                   state)


def test_a_second_create_with_other_keys_changes_nothing() -> None:
    other_box = signed(OBJ, [Op(OBJ_ID, "create", "", {
        "sign": OBJ.public.verify_key, "box": X.public.box_key, "read": [], "update": []})],
        ts=T0 - 50)
    state = fresh(other_box)
    assert state.objects[OBJ_ID].keys == OBJ.public
    assert merge.version_timestamp(state.objects[OBJ_ID].created) == T0


def test_only_the_object_itself_may_grant() -> None:
    g = grant("grant_update", X_ID, T0 + 10)
    state = fresh(g)
    by_x = signed(X, [Op(OBJ_ID, "grant_update", "", {"id": Y_ID})], ts=T0 + 20,
                  grants={OBJ_ID: grant_ref(g)})  # X may update OBJ, but not grant
    assert not merge.is_authorized(by_x, state)
    assert not merge.unauthorized_is_applied(by_x, "listeners")
    deliver(state, by_x, "listeners")
    assert (OBJ_ID, "u", Y_ID) not in state.auth
    assert not merge.is_authorized(member_set(Y, "y", T0 + 30, by_x), state)


def test_unauthorized_writes_are_applied_only_under_the_listeners_policy() -> None:
    write = set_(X, "hacked", T0 + 20)
    rejecting, deferring = fresh(), fresh()
    assert not deliver(rejecting, write, "reject").authorized
    deliver(deferring, write, "listeners")
    assert value(rejecting, "name") is None
    assert value(deferring, "name") == "hacked"


def test_grant_read_records_wraps() -> None:
    ref = b"\x05" * 34
    update = signed(OBJ, [Op(OBJ_ID, "grant_read", "", {"id": X_ID, "w": {ref: b"wrapped"}})],
                    ts=T0 + 10)
    state = fresh(update)
    assert state.wraps[(OBJ_ID, ref, X.oid)] == b"wrapped"
    assert state.auth[(OBJ_ID, "r", X_ID)][-1][1] is True


def test_auth_events_round_trip() -> None:
    events = merge.add_auth_event((), b"\x02", True)
    events = merge.add_auth_event(events, b"\x01", False, frozenset({b"\x07" * 32}))
    assert events == ((b"\x01", False, frozenset({b"\x07" * 32})),
                      (b"\x02", True, frozenset()))
    assert merge.add_auth_event(events, b"\x01", False) is events  # idempotent
    assert merge.unpack_auth(merge.pack_auth(events)) == events
    # Events stored before frontiers existed read as revokes with an empty frontier.
    import msgpack
    assert merge.unpack_auth(msgpack.packb([[b"\x01", False]])) == (
        (b"\x01", False, frozenset()),)


# ------------------------------------------------------------------ fold


CALLERS = [OBJ, X, Y]


@st.composite
def histories(draw: st.DrawFn) -> list[Update]:
    """Creates of OBJ, X, Y, then a few writes, deletes, grants, revokes and removes.

    A member's write names one of the grants made so far to it (or none); a revoke's
    frontier is any subset of the member's writes made so far on the object.
    """
    updates = list(CREATES)
    grants: dict[tuple[str, str], list[bytes]] = {}
    writes: dict[tuple[str, str], list[bytes]] = {}
    for _ in range(draw(st.integers(1, 8))):
        signer = draw(st.sampled_from(CALLERS))
        target = draw(st.sampled_from([OBJ_ID, X_ID, Y_ID]))
        ts = T0 + draw(st.integers(-2, 12))
        kind = draw(st.sampled_from(["set", "set", "del", "dset", "grant", "revoke", "remove"]))
        me = db_id(signer)
        if kind == "set":
            op = Op(target, "set", draw(st.sampled_from(["a", "b"])), draw(st.integers(0, 3)))
        elif kind == "del":
            op = Op(target, "del", draw(st.sampled_from(["a", "b"])))
        elif kind == "dset":
            op = Op(target, "dset", "d", [draw(st.sampled_from(["k", "l"])), ts])
        elif kind in ("grant", "revoke"):
            member = draw(st.sampled_from([OBJ_ID, X_ID, Y_ID]))
            value: dict = {"id": member}
            if kind == "revoke":
                done = writes.get((me, member), [])
                value["f"] = sorted(draw(st.sets(st.sampled_from(done))) if done else set())
            op = Op(me, f"{kind}_update", "", value)
        else:
            op = Op(me, "remove")
        named = None
        if op.obj != me:
            choices = grants.get((op.obj, me), [])
            if choices and draw(st.booleans()):
                named = {op.obj: draw(st.sampled_from(choices))}
        update = signed(signer, [op], ts=ts, grants=named)
        if op.op == "grant_update":
            grants.setdefault((me, op.value["id"]), []).append(grant_ref(update))
        if op.obj != me:
            writes.setdefault((op.obj, me), []).append(update.id)
        updates.append(update)
    return updates


def observable(state: State) -> tuple:
    return state.objects, state.registers, state.auth, state.wraps


def redecided(arrived: list[Update], auth: dict, policy: merge.Policy) -> State:
    """The state that ``arrived``, re-applied in arrival order, gives when every update is
    judged against the authorization events ``auth`` (the node's re-decision)."""
    judge, state = State(auth=dict(auth)), State()
    for update in arrived:
        outcome = merge.apply(update, state, authorized=merge.is_authorized(update, judge))
        if outcome.authorized or merge.unauthorized_is_applied(update, policy):
            state.commit(outcome.writes)
    return state


def delivered_one_at_a_time(delivery: list[Update], policy: merge.Policy) -> State:
    """What a node does with ``delivery``: one update at a time, an update waiting until
    the objects it changes are known, each judged against the events known so far; when
    the authorization events change, what arrived so far is re-decided against them."""
    state, arrived, waiting = State(), [], list(delivery)
    progress = True
    while waiting and progress:
        progress = False
        for update in list(waiting):
            if not all(op.obj in state.objects or op.op == "create" for op in update.ops):
                continue
            waiting.remove(update)
            arrived.append(update)
            progress = True
            known = dict(state.auth)
            deliver(state, update, policy)
            while state.auth != known:
                known = dict(state.auth)
                state = redecided(arrived, known, policy)
    assert not waiting
    return state


@given(histories(), st.randoms(use_true_random=False), st.integers(0, 3))
def test_fold_is_order_independent(history: list[Update], rnd: random.Random,
                                   dups: int) -> None:
    # fold sorts its input, so shuffling what it is given proves little; what it claims is
    # that any arrival order, with duplicates, reaches its state when updates are merged
    # one at a time and re-decided as authorization events arrive.
    delivery = history + [rnd.choice(history) for _ in range(dups)]
    rnd.shuffle(delivery)
    for policy in merge.POLICIES:
        assert observable(delivered_one_at_a_time(delivery, policy)) == observable(
            merge.fold(history, policy=policy)), policy


@given(histories(), st.randoms(use_true_random=False))
def test_incremental_delivery_of_own_writes_matches_fold(history: list[Update],
                                                         rnd: random.Random) -> None:
    # Without cross-object writes no verdict depends on another update, so applying updates
    # one at a time, in any order (waiting for unknown objects as a node does), gives the
    # registers and objects of the reference fold.
    own = [u for u in history if all(op.obj == u.caller for op in u.ops)]
    delivery = own + own[:2]
    rnd.shuffle(delivery)
    state, waiting = State(), list(delivery)
    progress = True
    while waiting and progress:
        progress = False
        for update in list(waiting):
            if all(op.obj in state.objects or op.op == "create" for op in update.ops):
                deliver(state, update)
                waiting.remove(update)
                progress = True
    reference = merge.fold(own)
    assert state.registers == reference.registers
    assert state.objects == reference.objects
