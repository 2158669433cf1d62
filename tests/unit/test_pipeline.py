"""pipeline.decide over hand-built Snapshots: one test per check, in the order decide runs
them (replay, chain, dependencies, signature, one identity per id, skew, policy). Pure."""

from __future__ import annotations

import dataclasses

from strategies import NODE, T0, create_op, db_id, grant_ref, ident, signed

from dmodel import merge, pipeline
from dmodel.clock import pack, physical_ms
from dmodel.errors import (
    BrokenChainUpdate,
    ConflictingCreate,
    ForgedUpdate,
    ReplayedUpdate,
    UnauthorizedError,
)
from dmodel.pipeline import ACCEPTED, DROPPED, HELD, MISSING, UNAUTHORIZED, Snapshot
from dmodel.update import Op, Update

OBJ, X, Y, STRANGER = ident(1), ident(2), ident(3), ident(4)  # STRANGER is created nowhere
OBJ_ID, X_ID, Y_ID, STRANGER_ID = db_id(OBJ), db_id(X), db_id(Y), db_id(STRANGER)
CREATES = [signed(i, [create_op(i)]) for i in (OBJ, X, Y)]
NOW = T0  # the node's clock: updates at T0 + a counter are not from the future
OTHER_NODE = b"\x09" * 16


def snap(*stored: Update, **facts) -> Snapshot:
    """The state that ``stored`` (after the creates) folds to, plus link facts."""
    return Snapshot(state=merge.fold([*CREATES, *stored]), **facts)


def decide(update: Update, snapshot: Snapshot | None = None, **options) -> pipeline.Decision:
    return pipeline.decide(update, snap() if snapshot is None else snapshot, now=NOW, **options)


def set_(signer, val: object = "v", *, obj: str = OBJ_ID, ts: int = T0 + 1,
         **kw) -> Update:
    return signed(signer, [Op(obj, "set", "name", val)], ts=ts, **kw)


def grant_to(member: str, *, kind: str = "grant_update", ts: int = T0 + 1) -> Update:
    return signed(OBJ, [Op(OBJ_ID, kind, "", {"id": member})], ts=ts)


# ------------------------------------------------------------------ replay and chain


def test_an_update_already_seen_is_dropped_as_replayed() -> None:
    update = set_(OBJ)
    assert decide(update).verdict == ACCEPTED
    d = decide(update, snap(seen=True))
    assert d.verdict == DROPPED and d.outcome is None
    assert isinstance(d.error, ReplayedUpdate) and d.error.update_id == update.id


def test_an_update_whose_previous_is_not_stored_waits_for_it() -> None:
    prev = b"\x01" * 32
    update = set_(OBJ, prev=prev)
    d = decide(update, snap(prev_chain=None))
    assert d.verdict == MISSING and d.missing == (prev,)
    assert decide(update, snap(prev_chain=(OBJ_ID, NODE))).verdict == ACCEPTED


def test_a_previous_update_of_another_caller_or_node_breaks_the_chain() -> None:
    update = set_(OBJ, prev=b"\x01" * 32)
    for chain in ((X_ID, NODE), (OBJ_ID, OTHER_NODE)):
        d = decide(update, snap(prev_chain=chain))
        assert d.verdict == DROPPED, chain
        assert isinstance(d.error, BrokenChainUpdate) and d.error.update_id == update.id


# ------------------------------------------------------------------ dependencies


def test_an_unknown_caller_is_waited_for() -> None:
    g = grant_to(STRANGER_ID)
    update = set_(STRANGER, grants={OBJ_ID: grant_ref(g)})  # changes only OBJ, a known object
    d = decide(update, snap(g))
    assert d.verdict == MISSING and d.missing == (STRANGER_ID,)


def test_an_unknown_object_is_waited_for_unless_the_update_creates_it() -> None:
    unknown = db_id(ident(5), "Thing")
    d = decide(set_(X, obj=unknown, grants={unknown: b"\x02" * 34}))
    assert d.verdict == MISSING and d.missing == (unknown,)
    creating = signed(STRANGER, [create_op(STRANGER), Op(STRANGER_ID, "set", "name", "new")])
    d = decide(creating)
    assert d.verdict == ACCEPTED and d.authorized


def test_a_named_grant_not_stored_is_waited_for() -> None:
    g = grant_to(X_ID)
    update = set_(X, grants={OBJ_ID: grant_ref(g)})
    d = decide(update, snap())  # the grant has not arrived here
    assert d.verdict == MISSING and d.missing == (g.id,)
    assert decide(update, snap(g)).verdict == ACCEPTED


def test_a_named_update_that_is_stored_but_not_a_grant_of_the_caller_is_unauthorized() -> None:
    plain = set_(OBJ, "not a grant")
    to_y = grant_to(Y_ID)
    for named in (plain, to_y):
        update = set_(X, grants={OBJ_ID: grant_ref(named)})
        d = decide(update, snap(plain, to_y, stored={named.id}))
        assert d.verdict == UNAUTHORIZED, named
        assert isinstance(d.error, UnauthorizedError) and d.error.db_id == OBJ_ID


def test_a_set_of_an_unknown_element_waits_for_its_insert_unless_the_update_deletes_it() -> None:
    element = b"\x05" * 32 + b"\x00\x00"  # (the insert: update 0x05.., op 0)
    setting = signed(OBJ, [Op(OBJ_ID, "lset", "items", [element, "y"])], ts=T0 + 1)
    d = decide(setting)
    assert d.verdict == MISSING and d.missing == (element[:32],)
    # Set and deleted in one update: the delete is final wherever the element is, so
    # nothing waits (retention prunes the insert of a deleted element).
    set_op = Op(OBJ_ID, "lset", "items", [element, "y"])
    del_op = Op(OBJ_ID, "ldel", "items", element)
    for ops in ([set_op, del_op], [del_op, set_op]):
        d = decide(signed(OBJ, ops, ts=T0 + 1))
        assert d.verdict == ACCEPTED, ops
        assert [w.data for w in d.outcome.writes if w.kind == "register"][-1].deleted


# ------------------------------------------------------------------ signature, identity


def test_a_bad_signature_is_dropped_as_forged() -> None:
    forged = set_(X, caller=OBJ_ID)  # signed with X's key, claims to be OBJ
    d = decide(forged)
    assert d.verdict == DROPPED and d.outcome is None
    assert isinstance(d.error, ForgedUpdate) and d.error.update_id == forged.id
    tampered = dataclasses.replace(set_(OBJ), signature=bytes(64))
    assert isinstance(decide(tampered).error, ForgedUpdate)


def test_verified_skips_the_signature_check() -> None:
    forged = set_(X, caller=OBJ_ID)
    d = decide(forged, verified=True)
    assert d.verdict == ACCEPTED and d.error is None


def test_a_second_create_with_other_keys_is_a_conflicting_create() -> None:
    other_box = signed(OBJ, [Op(OBJ_ID, "create", "", {
        "sign": OBJ.public.verify_key, "box": X.public.box_key, "read": [], "update": []})])
    d = decide(other_box)  # the signature is OBJ's: only the keys differ
    assert d.verdict == DROPPED and isinstance(d.error, ConflictingCreate)
    again = signed(OBJ, [create_op(OBJ)], ts=T0 + 5)  # the same keys: harmless
    assert decide(again).verdict == ACCEPTED


# ------------------------------------------------------------------ skew


def test_the_skew_bound_is_inclusive_and_one_ms_beyond_is_held() -> None:
    skew = 5_000
    now_ms = physical_ms(NOW)
    at_bound = set_(OBJ, ts=pack(now_ms + skew, 0xFFFF))  # the last timestamp of that ms
    assert decide(at_bound, skew_ms=skew).verdict == ACCEPTED
    beyond = set_(OBJ, ts=pack(now_ms + skew + 1))
    d = decide(beyond, skew_ms=skew)
    assert d.verdict == HELD and d.outcome is None
    assert d.release_at == now_ms + 1
    # When its time comes it is decided like any other update.
    later = pipeline.decide(beyond, snap(), now=pack(d.release_at), skew_ms=skew)
    assert later.verdict == ACCEPTED


# ------------------------------------------------------------------ policy


def test_an_unauthorized_write_is_rejected_or_left_to_listeners_by_policy() -> None:
    update = set_(X, "hacked")  # X names no grant on OBJ
    rejected = decide(update)
    assert rejected.verdict == UNAUTHORIZED and not rejected.authorized
    assert isinstance(rejected.error, UnauthorizedError) and rejected.error.db_id == OBJ_ID
    deferred = decide(update, policy=lambda model: "listeners")
    assert deferred.verdict == ACCEPTED and not deferred.authorized
    assert [w.name for w in deferred.outcome.writes] == ["name"]
    g = grant_to(X_ID)
    authorized = decide(set_(X, grants={OBJ_ID: grant_ref(g)}), snap(g))
    assert authorized.verdict == ACCEPTED and authorized.authorized


def test_grants_and_revokes_by_others_are_never_applied() -> None:
    g = grant_to(X_ID)  # X may update OBJ, which does not let it grant or revoke there
    for kind in ("grant_update", "revoke_update", "grant_read", "revoke_read"):
        value: dict = {"id": Y_ID}
        if kind == "revoke_update":
            value["f"] = []
        elif kind == "grant_read":
            value["w"] = {}
        update = signed(X, [Op(OBJ_ID, kind, "", value)], ts=T0 + 2,
                        grants={OBJ_ID: grant_ref(g)})
        for policy in ("reject", "listeners"):
            d = decide(update, snap(g), policy=lambda model, p=policy: p)
            assert d.verdict == UNAUTHORIZED, (kind, policy)
            assert isinstance(d.error, UnauthorizedError)
