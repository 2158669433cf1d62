"""Convergence rules (dmodel.merge): LWW order, tombstones, removal, authorization as of."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from strategies import T0, create_op, db_id, ident, signed

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
        state.apply(outcome.writes)
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
    wx, wy = set_(X, "by-x", T0 + 50), set_(Y, "by-y", T0 + 50)
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
    envelope = {"c": b"x", "k": {}}
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


def test_ops_before_the_create_are_no_ops() -> None:
    early = set_(OBJ, "early", T0 - 10)
    state = fresh(early)
    assert (OBJ_ID, "name") not in state.registers


# ------------------------------------------------------------------ authorization


def grant(kind: str, member: str, ts: int, *, signer=OBJ, obj: str = OBJ_ID) -> Update:
    return signed(signer, [Op(obj, kind, "", {"id": member})], ts=ts)


def test_a_caller_is_authorized_after_a_grant() -> None:
    state = fresh(grant("grant_update", X_ID, T0 + 10))
    assert merge.is_authorized(set_(X, "x", T0 + 20), state)
    assert not merge.is_authorized(set_(X, "x", T0 + 5), state)  # before the grant
    assert not merge.is_authorized(set_(Y, "y", T0 + 20), state)  # never granted
    assert merge.is_authorized(set_(OBJ, "o", T0 + 1), state)  # the object itself


def test_a_revoke_before_the_update_makes_it_unauthorized() -> None:
    state = fresh(grant("grant_update", X_ID, T0 + 10), grant("revoke_update", X_ID, T0 + 30))
    assert merge.is_authorized(set_(X, "x", T0 + 20), state)
    assert not merge.is_authorized(set_(X, "x", T0 + 40), state)


def test_authorization_does_not_depend_on_arrival_order() -> None:
    g, r = grant("grant_update", X_ID, T0 + 10), grant("revoke_update", X_ID, T0 + 30)
    s1, s2 = fresh(g, r), fresh(r, g)
    assert s1.auth == s2.auth
    for ts, expected in ((T0 + 5, False), (T0 + 20, True), (T0 + 40, False)):
        assert merge.is_authorized(set_(X, "x", ts), s1) is expected
        assert merge.is_authorized(set_(X, "x", ts), s2) is expected


def test_create_lists_grant_at_the_create() -> None:
    owner = ident(9)
    create = signed(owner, [create_op(owner, read=[X_ID], update=[X_ID])], ts=T0 + 100)
    state = fresh(create)
    write = set_(X, "x", T0 + 200, obj=db_id(owner))
    assert merge.is_authorized(write, state)
    assert merge.current_members({"m": state.auth[(db_id(owner), "r", X_ID)]}) == {"m"}
    assert not merge.is_authorized(set_(Y, "y", T0 + 200, obj=db_id(owner)), state)


def test_only_the_object_itself_may_grant() -> None:
    state = fresh(grant("grant_update", X_ID, T0 + 10))
    by_x = grant("grant_update", Y_ID, T0 + 20, signer=X)  # X may update OBJ, but not grant
    assert not merge.is_authorized(by_x, state)
    assert not merge.unauthorized_is_applied(by_x, "listeners")
    deliver(state, by_x, "listeners")
    assert (OBJ_ID, "u", Y_ID) not in state.auth
    assert not merge.is_authorized(set_(Y, "y", T0 + 30), state)


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
    events = merge.add_auth_event(events, b"\x01", False)
    assert events == ((b"\x01", False), (b"\x02", True))
    assert merge.add_auth_event(events, b"\x01", False) is events  # idempotent
    assert merge.unpack_auth(merge.pack_auth(events)) == events
    assert merge.authorized_as_of(events, b"\x03") is True
    assert merge.authorized_as_of(events, b"\x02") is False  # strictly before
    assert merge.authorized_as_of((), b"\x09") is False


# ------------------------------------------------------------------ fold


CALLERS = [OBJ, X, Y]


@st.composite
def histories(draw: st.DrawFn) -> list[Update]:
    """Creates of OBJ, X, Y, then a few writes, deletes, grants, revokes and removes."""
    updates = list(CREATES)
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
            op = Op(me, f"{kind}_update", "", {"id": draw(st.sampled_from([OBJ_ID, X_ID, Y_ID]))})
        else:
            op = Op(me, "remove")
        updates.append(signed(signer, [op], ts=ts))
    return updates


def observable(state: State) -> tuple:
    return state.objects, state.registers, state.auth, state.wraps


@given(histories(), st.randoms(use_true_random=False), st.integers(0, 3))
def test_fold_is_order_independent(history: list[Update], rnd: random.Random,
                                   dups: int) -> None:
    reference = merge.fold(history)
    delivery = history + [rnd.choice(history) for _ in range(dups)]
    rnd.shuffle(delivery)
    assert observable(merge.fold(delivery)) == observable(reference)
    assert observable(merge.fold(delivery, policy="listeners")) == observable(
        merge.fold(history, policy="listeners"))


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
