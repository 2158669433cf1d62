"""No split brain: the same updates, in any order and duplicated, give the same state.

Each example builds a random history on 2-3 *writer* nodes (real nodes, real Redis).
Every writer creates 1-2 objects and holds their keys (sometimes a second device holds
the keys of another writer's object too); any of them may sign changes to any object
it knows: field sets and deletes (plain and encrypted), DDict and DList operations,
multi-object transactions, grants and revokes (of its own object), removals, and
now and then a fork of its own hash chain (an equivocation). The writers' physical
clocks are driven by the test so timestamps interleave and race, and the writers
exchange updates only at random sync steps, so they sign concurrent changes (a
revoke on one writer, an update by the revoked caller on another that has not seen
it, ...). Writers apply whatever they sign (policy ``listeners``): the receivers judge.

Every update any writer stored is then handed to three fresh *receiver* nodes, each
in its own shuffled order with duplicates (one update at a time, or in random
``ingest_many`` batches), and the receivers must agree on every object, field, list,
authorization set, wrapped key and verdict, and match ``merge.fold`` (the reference:
every update applied in version order). Under the ``listeners`` policy the writers
themselves must agree with them once they have exchanged everything.

All nodes of the module share one embedded Redis server, each node under its own key
prefix (one prefix per node and example), so an example costs no server start-up.
``CONV_EXAMPLES=1000`` runs a longer hunt.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from helpers import T0_MS, Clock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmodel
from dmodel import merge
from dmodel.update import Op, Update, decode

RECEIVER_NOW_NS = (T0_MS + 86_400_000) * 1_000_000   # receivers live a day later
LISTS = ("items", "sealed")
MAX_EXAMPLES = 20 if os.environ.get("CI") else 40
if os.environ.get("CONV_EXAMPLES"):
    MAX_EXAMPLES = int(os.environ["CONV_EXAMPLES"])


class CvDoc(dmodel.DModel):
    """Every kind of state: plain and encrypted fields, dicts and lists."""

    title = dmodel.DField()
    secret = dmodel.DField(encrypted=True)
    tags = dmodel.DDict()
    vault = dmodel.DDict(encrypted=True)
    items = dmodel.DList()
    sealed = dmodel.DList(encrypted=True)


_examples = itertools.count()




@dataclass
class World:
    """The nodes of one example; ``close`` shuts them and deletes their keys."""

    url: str
    root: Any
    example: int = field(default_factory=lambda: next(_examples))
    nodes: list[dmodel.Node] = field(default_factory=list)

    def node(self, name: str, now: Callable[[], int], policy: str,
             retention: str | None = None) -> dmodel.Node:
        home = self.root / f"ex{self.example}" / name
        # Writers' clocks drift apart by up to ~30 s over a history; a skew bound above
        # that keeps their exchanges immediate (holding is tested on its own).
        node = dmodel.Node(home, redis_url=self.url, redis_prefix=f"ex{self.example}:{name}:",
                           now=now, unauthorized_policy=policy, skew=60, retention=retention)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.shutdown()
        cleaner = redis.Redis.from_url(self.url)
        keys = list(cleaner.scan_iter(match=f"ex{self.example}:*", count=1000))
        if keys:
            cleaner.delete(*keys)
        cleaner.close()


def ship_all(src: dmodel.Node, dst: dmodel.Node) -> None:
    for raw in src.updates_since(0):
        dst.ingest(raw)


# ---------------------------------------------------------------- generating a history

values = st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b", "", "zz"]), st.none())
dict_keys = st.sampled_from(["k1", "k2"])
FIELD_KINDS = ["set", "set_enc", "del", "dset", "dset_enc", "ddel",
               "append", "insert", "lset", "ldel"]
AUTH_KINDS = ["grant_update", "revoke_update", "grant_read", "revoke_read"]


def field_change(data: Any, obj: CvDoc) -> Callable[[], None] | None:
    """Draw one field change of ``obj`` (as its caller); None when it does not apply."""
    kind = data.draw(st.sampled_from(FIELD_KINDS), label="kind")
    value = data.draw(values, label="value")
    if kind == "set":
        return lambda: setattr(obj, "title", value)
    if kind == "set_enc":
        return lambda: setattr(obj, "secret", value)
    if kind == "del":
        name = data.draw(st.sampled_from(["title", "secret"]))
        return lambda: obj.delete(name)
    if kind in ("dset", "dset_enc", "ddel"):
        plain = kind == "dset" or (kind == "ddel" and data.draw(st.booleans(), label="plain"))
        d = obj.tags if plain else obj.vault
        key = data.draw(dict_keys, label="key")
        if kind == "ddel":
            return lambda: d.delete(key)
        return lambda: d.set(key, value)
    lst = obj.items if data.draw(st.booleans(), label="plain list") else obj.sealed
    length = lst.length()
    if kind == "append":
        return lambda: lst.append(value)
    if kind == "insert":
        index = data.draw(st.integers(-length - 1, length + 1), label="index")
        return lambda: lst.insert(index, value)
    if length == 0:
        return None
    index = data.draw(st.integers(-length, length - 1), label="index")

    def change() -> None:
        # An earlier change of the same transaction may have shortened the list.
        if -lst.length() <= index < lst.length():
            lst.set(index, value) if kind == "lset" else lst.delete(index)
    return change


@dataclass
class Writer:
    node: dmodel.Node
    clock: Clock
    callers: list[str]          # objects whose keys this writer holds

    def __repr__(self) -> str:  # short, for hypothesis' failure reports
        return f"<writer {self.node.home.name}>"


def build_history(data: Any, world: World) -> tuple[list[bytes], list[str], list[dmodel.Node]]:
    """Run random operations on writer nodes; return every raw update, every object id
    and the writer nodes."""
    n_writers = data.draw(st.integers(2, 3), label="writers")
    writers: list[Writer] = []
    for i in range(n_writers):
        clock = Clock(T0_MS + data.draw(st.integers(0, 3000), label="clock offset"))
        # Writers apply whatever they are asked to sign: the receivers judge authorization.
        # They keep every version, so that the history handed over is whole; the
        # receivers prune under the default retention.
        writers.append(Writer(world.node(f"w{i}", clock, "listeners", "all"), clock, []))
    objects: list[str] = []
    for w in writers:
        for _ in range(data.draw(st.integers(1, 2), label="objects")):
            # Every object is a caller too: its keys sign its grants and revokes.
            db_id = CvDoc.create(node=w.node, title="created").db_id
            w.callers.append(db_id)
            objects.append(db_id)
    if data.draw(st.booleans(), label="second device"):
        # One identity, two devices: writer 1 also signs as writer 0's caller.
        caller = writers[0].callers[0]
        ship_all(writers[0].node, writers[1].node)
        writers[1].node.keyring.add(writers[0].node.identity(caller), caller)
        writers[1].callers.append(caller)

    for _ in range(data.draw(st.integers(4, 22), label="steps")):
        w = data.draw(st.sampled_from(writers), label="writer")
        # Small steps: writers' clocks stay well within their 60 s skew of each other.
        w.clock.ms += data.draw(st.sampled_from([0, 0, 1, 7, 400, 1500]), label="advance")
        step = data.draw(st.sampled_from(["sync", "sync", "change", "change", "change",
                                          "auth", "tx", "remove", "fork"]), label="step")
        node = w.node
        if step == "sync":
            src = data.draw(st.sampled_from(writers), label="from")
            if src is not w:
                ship_all(src.node, node)
            continue
        callers = [c for c in w.callers if node.exists(c)]
        known = [o for o in objects if node.exists(o)]
        if not callers or not known:
            continue
        caller = data.draw(st.sampled_from(callers), label="caller")
        if step == "fork":
            equivocate(data, w, caller)
            continue
        if step == "auth":  # only the object itself grants and revokes
            target = CvDoc(caller, node=node)
            member = data.draw(st.sampled_from(known), label="member")
            kind = data.draw(st.sampled_from(AUTH_KINDS), label="auth")
            method = {"grant_update": target.append_update_authorized,
                      "revoke_update": target.revoke_update_authorized,
                      "grant_read": target.append_read_authorized,
                      "revoke_read": target.revoke_read_authorized}[kind]
            if data.draw(st.booleans(), label="with a change"):
                change = field_change(data, target)
                with target.transaction():
                    method(member)
                    if change is not None:
                        change()
            else:
                method(member)
            continue
        if step == "remove":
            if data.draw(st.integers(0, 2)):  # removals are rare
                continue
            CvDoc(data.draw(st.sampled_from(known), label="removed"), caller, node=node).remove()
            continue
        if step == "change":
            target = CvDoc(data.draw(st.sampled_from(known), label="target"), caller, node=node)
            change = field_change(data, target)
            if change is not None:
                change()
            continue
        # a multi-op transaction, possibly over several objects, signed once by ``caller``
        changes = []
        for _ in range(data.draw(st.integers(2, 3), label="tx ops")):
            target = CvDoc(data.draw(st.sampled_from(known), label="target"), caller, node=node)
            change = field_change(data, target)
            if change is not None:
                changes.append(change)
        with dmodel.transaction(caller, node=node):
            for change in changes:
                change()

    raws: dict[bytes, bytes] = {}
    for w in writers:
        for raw in w.node.updates_since(0):
            raws[decode(raw).id] = raw
    return list(raws.values()), objects, [w.node for w in writers]


def equivocate(data: Any, w: Writer, caller: str) -> None:
    """Sign, as ``caller`` on ``w``, an update naming an earlier update of its chain on
    ``w`` as previous (a fork of the hash chain), and store it on ``w``."""
    node = w.node
    chain = [u for u in map(decode, node.updates_since(0))
             if u.caller == caller and u.node == node.node_id]
    followed = {u.prev for u in chain}
    candidates = [u for u in chain if u.id in followed]  # the fork is a second successor
    if not candidates:
        return
    prev = data.draw(st.sampled_from(candidates), label="fork after")
    value = data.draw(values, label="value")
    update = Update.create(node.identity(caller), node=node.node_id, caller=caller,
                           timestamp=node.clock.tick(), prev=prev.id,
                           ops=[Op(caller, "set", "title", value)])
    equivocations = node.stats.equivocations
    node.ingest(update.raw)
    assert node.stats.equivocations == equivocations + 1


# ---------------------------------------------------------------- comparing states


def node_state(node: dmodel.Node, objects: list[str]) -> dict[str, dict[str, Any]]:
    """Everything observable about ``objects`` on ``node``."""
    out = {}
    store = node.store
    for db_id in objects:
        out[db_id] = {
            "exists": node.exists(db_id),
            "meta": store.object_meta(db_id),
            "registers": node.read_all(db_id),
            "lists": {name: store.list_range(db_id, name) for name in LISTS},
            "read": store.auth_events(db_id, "r"),
            "update": store.auth_events(db_id, "u"),
            "wraps": store.client.hgetall(store.k_wrap(db_id)),
            "accepted": set(store.history(db_id)),
            "held": set(store.history(db_id, held=True)),
        }
    return out


def fold_state(state: merge.State, objects: list[str]) -> dict[str, dict[str, Any]]:
    """The same view of the reference state (no history: fold keeps no verdict lists)."""
    out = {}
    for db_id in objects:
        meta = state.objects.get(db_id)
        auth: dict[str, dict[str, merge.AuthEvents]] = {"r": {}, "u": {}}
        for (obj, kind, member), events in state.auth.items():
            if obj == db_id and events:
                auth[kind][member] = events
        out[db_id] = {
            "exists": meta is not None and meta.removed is None,
            "meta": meta,
            "registers": {name: reg for (obj, name), reg in state.registers.items()
                          if obj == db_id and not reg.deleted},
            "lists": {name: state.list_elements(db_id, name) for name in LISTS},
            "read": auth["r"],
            "update": auth["u"],
            "wraps": {ref + oid.encode(): w for (obj, ref, oid), w in state.wraps.items()
                      if obj == db_id},
        }
    return out


def deliver(data: Any, node: dmodel.Node, raws: list[bytes]) -> None:
    """Ingest all of ``raws`` in a random order with random duplicates (drawn as indexes),
    one at a time or in random batches."""
    n = len(raws)
    order = data.draw(st.permutations(range(n)), label="order")
    dupes = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n)),
                               max_size=max(1, n // 3)), label="duplicates (index, at)")
    sequence = list(order)
    for index, at in dupes:
        sequence.insert(at, index)
    if not data.draw(st.booleans(), label="in batches"):
        for i in sequence:
            node.ingest(raws[i])
        return
    while sequence:
        size = data.draw(st.integers(1, 12), label="batch")
        batch, sequence = sequence[:size], sequence[size:]
        node.ingest_many([raws[i] for i in batch])


@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_receivers_converge_whatever_the_delivery_order(server, data) -> None:
    url, root = server
    world = World(url, root)
    try:
        raws, objects, writers = build_history(data, world)
        policy = data.draw(st.sampled_from(["reject", "listeners"]), label="policy")
        # They keep every version: their histories are compared too.
        receivers = [world.node(f"r{i}", lambda: RECEIVER_NOW_NS, policy, "all")
                     for i in range(3)]
        for receiver in receivers:
            deliver(data, receiver, raws)
            assert receiver.pending_count == 0
            assert receiver.log_length() == len(raws)
            assert not receiver.stats.dropped.keys() - {"ReplayedUpdate"}
        states = [node_state(r, objects) for r in receivers]
        for db_id in objects:
            for other in states[1:]:
                assert other[db_id] == states[0][db_id], db_id
        # One that prunes all it can reaches the same state (not the same history).
        pruning = world.node("rp", lambda: RECEIVER_NOW_NS, policy, "1")
        pruning.state_sums.build()  # before delivery: kept up to date commit by commit
        deliver(data, pruning, raws)
        pruning.release_gaps()  # links it pruned itself before their successors came
        assert pruning.pending_count == 0
        assert pruning.state_digest() == receivers[0].state_digest()
        # State sums (what catch-up compares) agree too: kept as it went, or read at once.
        sums = [node.state_sums for node in (pruning, *receivers)]
        for each in sums:
            each.refresh(lambda: 0)
        assert all(each.group_sums() == sums[0].group_sums() for each in sums)
        assert len(sums[0]) == len(set(objects) & set(receivers[0].store.object_ids()))
        reference = fold_state(merge.fold([decode(r) for r in raws], policy=policy), objects)
        for db_id in objects:
            got = {k: v for k, v in states[0][db_id].items() if k in reference[db_id]}
            assert got == reference[db_id], db_id
        if policy == "listeners":
            # The writers, which use that policy too, agree once they have exchanged
            # everything (their state grew by local writes and partial syncs).
            for src in writers:
                for dst in writers:
                    if src is not dst:
                        ship_all(src, dst)
            for writer in writers:
                assert writer.pending_count == 0
                mine = node_state(writer, objects)
                for db_id in objects:
                    assert mine[db_id] == states[0][db_id], (writer, db_id)
    finally:
        world.close()


def test_harness_judges_a_known_race_alike_on_every_receiver(server) -> None:
    """Sanity check of the harness: a hand-made race is judged alike on every receiver."""
    url, root = server
    world = World(url, root)
    try:
        ca, cb = Clock(T0_MS), Clock(T0_MS)
        a = world.node("a", ca, "listeners")
        b = world.node("b", cb, "listeners")
        owner = CvDoc.create(node=a, title="owned by a")
        member = CvDoc.create(node=b)
        ship_all(b, a)
        owner.append_update_authorized(member.db_id)
        ship_all(a, b)
        ca.ms += 10
        owner.revoke_update_authorized(member.db_id)      # b has not seen this
        cb.ms += 1000
        CvDoc(owner.db_id, member.db_id, node=b).title = "by the revoked member"
        ship_all(b, a)
        raws = list({decode(r).id: r for n in (a, b) for r in n.updates_since(0)}.values())
        finals = []
        for i, order in enumerate((raws, raws[::-1])):
            r = world.node(f"r{i}", lambda: RECEIVER_NOW_NS, "reject")
            for raw in order:
                r.ingest(raw)
            assert r.pending_count == 0
            finals.append(r.read(owner.db_id, "title"))
        assert finals == ["owned by a", "owned by a"]
    finally:
        world.close()

