"""Grants, revokes and re-grants racing a member's writes from two devices (issue 10).

Each example builds a history on three writer nodes (real nodes sharing one embedded
Redis, each under its own key prefix, as in test_convergence): node A owns an object
and grants, revokes and re-grants update rights to a member, at random moments, and
writes to it itself; the member writes to A's object from two devices (its keys on
both), each knowing what random sync steps brought it, so it writes inside windows,
after revokes it has not heard of, and (a modified client) naming old grants. Every
writer decides by the ``reject`` policy, as a real peer would.

Every update is then delivered to three receivers in random orders with duplicates;
they must agree with each other and with ``merge.fold``, the member's accepted updates
must be exactly those an independent reading of the rule allows (named grant's window
open, or the update in the frontier of the revoke that closed it), and the writers,
once they have exchanged everything, must hold the same state as the receivers.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_convergence import (
    RECEIVER_NOW_NS,
    T0_MS,
    Clock,
    CvDoc,
    World,
    deliver,
    field_change,
    fold_state,
    node_state,
    ship_all,
    values,
)

import dmodel
from dmodel import merge
from dmodel.update import Op, Update, decode

MAX_EXAMPLES = 40 if os.environ.get("CI") else 80


def expected_member_verdicts(raws: list[bytes], owner: str, member: str) -> dict[bytes, bool]:
    """The rule of merge.py, read independently: which of the member's updates of
    ``owner`` are authorized, given the owner's grants and revokes (signed on one node,
    so their signing order is their version order)."""
    updates = [decode(r) for r in raws]
    events = []   # (granted, ref, frontier) in the owner's order
    for u in sorted((u for u in updates if u.caller == owner), key=lambda u: u.timestamp):
        for index, op in enumerate(u.ops):
            if op.op == "create" and member in op.value["update"]:
                events.append((True, u.id + index.to_bytes(2, "big"), set()))
            elif op.op in ("grant_update", "revoke_update") and op.value["id"] == member:
                events.append((op.op == "grant_update", u.id + index.to_bytes(2, "big"),
                               set(op.value.get("f", ()))))
    verdicts = {}
    for u in updates:
        if u.caller != member or not any(op.obj == owner for op in u.ops):
            continue
        named = u.grant_for(owner)
        at = next((i for i, (granted, ref, _) in enumerate(events)
                   if granted and ref == named), None)
        if at is None:
            verdicts[u.id] = False
            continue
        j = at + 1
        while j < len(events) and events[j][0]:
            j += 1
        frontier: set[bytes] = set()
        closed = False
        while j < len(events) and not events[j][0]:
            closed = True
            frontier |= events[j][2]
            j += 1
        verdicts[u.id] = not closed or u.id in frontier
    return verdicts


@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_revocation_races_converge_to_the_rule(server, data) -> None:
    url, root = server
    world = World(url, root)
    try:
        clocks = [Clock(T0_MS + data.draw(st.integers(0, 2000), label="offset"))
                  for _ in range(3)]
        a, b1, b2 = (world.node(name, clock, "reject", "all")
                     for name, clock in zip(("a", "b1", "b2"), clocks, strict=True))
        writers = [a, b1, b2]
        member = CvDoc.create(node=b1).db_id
        ship_all(b1, a)
        # Granted at creation (a grant at the create's version), or only later.
        initially = [member] if data.draw(st.booleans(), label="granted at creation") else []
        owner = CvDoc.create(node=a, title="created", update=initially)
        for device in (b1, b2):
            ship_all(a, device)
            ship_all(b1, device)
        b2.keyring.add(b1.identity(member), member)
        devices = {"b1": b1, "b2": b2}

        for _ in range(data.draw(st.integers(6, 24), label="steps")):
            who = data.draw(st.sampled_from(range(3)), label="writer")
            clocks[who].ms += data.draw(st.sampled_from([0, 1, 7, 400, 1500]), label="advance")
            step = data.draw(st.sampled_from(
                ["grant", "revoke", "write", "write", "write", "owner", "forged",
                 "push", "push", "sync"]), label="step")
            if step == "push":  # the owner's news reaches one device
                ship_all(a, devices[data.draw(st.sampled_from(sorted(devices)), label="to")])
            elif step == "sync":
                src, dst = data.draw(st.permutations(writers), label="pair")[:2]
                ship_all(src, dst)
            elif step in ("grant", "revoke"):
                doc = CvDoc(owner.db_id, node=a)
                (doc.append_update_authorized if step == "grant"
                 else doc.revoke_update_authorized)(member)
            elif step == "owner":
                change = field_change(data, CvDoc(owner.db_id, node=a))
                if change is not None:
                    change()
            else:
                device = devices[data.draw(st.sampled_from(sorted(devices)), label="device")]
                if step == "write":
                    change = field_change(data, CvDoc(owner.db_id, member, node=device))
                    if change is not None:
                        try:
                            change()
                        except dmodel.UnauthorizedError:
                            pass          # refused here: nothing was stored or sent
                    continue
                # a modified client: names any grant it has seen, whatever came after
                events = device.store.member_events(owner.db_id, "u", member)
                grants = [merge.version_ref(v) for v, granted, _ in events if granted]
                if not grants:
                    continue
                named = data.draw(st.sampled_from(grants), label="named grant")
                update = Update.create(
                    device.identity(member), node=os.urandom(16), caller=member,
                    timestamp=device.clock.tick(), prev=b"",
                    ops=[Op(owner.db_id, "set", "title", data.draw(values, label="value"))],
                    grants={owner.db_id: named})
                device.ingest(update.raw)

        raws = list({decode(r).id: r for w in writers for r in w.updates_since(0)}.values())
        objects = [owner.db_id, member]
        # They keep every version: the verdicts below are read from their histories.
        receivers = [world.node(f"r{i}", lambda: RECEIVER_NOW_NS, "reject", "all")
                     for i in range(3)]
        for receiver in receivers:
            deliver(data, receiver, raws)
            assert receiver.pending_count == 0
            assert receiver.log_length() == len(raws)
            assert not receiver.stats.dropped.keys() - {"ReplayedUpdate"}
        states = [node_state(r, objects) for r in receivers]
        for other in states[1:]:
            assert other == states[0]
        # One that prunes all it can reaches the same state (not the same history).
        pruning = world.node("rp", lambda: RECEIVER_NOW_NS, "reject", "1")
        deliver(data, pruning, raws)
        assert pruning.pending_count == 0
        assert pruning.state_digest() == receivers[0].state_digest()
        reference = fold_state(merge.fold([decode(r) for r in raws]), objects)
        for db_id in objects:
            got = {k: v for k, v in states[0][db_id].items() if k in reference[db_id]}
            assert got == reference[db_id], db_id

        verdicts = expected_member_verdicts(raws, owner.db_id, member)
        accepted = states[0][owner.db_id]["accepted"]
        held = states[0][owner.db_id]["held"]
        assert {u for u, ok in verdicts.items() if ok} == accepted & set(verdicts)
        assert {u for u, ok in verdicts.items() if not ok} == held & set(verdicts)
        event(f"member updates: {min(3, sum(verdicts.values()))}+ accepted, "
              f"{min(3, len(verdicts) - sum(verdicts.values()))}+ refused")
        event(f"recomputed on a writer: {any(w.stats.recomputed for w in writers)}")

        # The writers, judging by the same rule, converge on the same state.
        for src in writers:
            for dst in writers:
                if src is not dst:
                    ship_all(src, dst)
        for writer in writers:
            assert writer.pending_count == 0
            assert node_state(writer, objects) == states[0], writer
            assert writer.state_digest() == receivers[0].state_digest()
    finally:
        world.close()
