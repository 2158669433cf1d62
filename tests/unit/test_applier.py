"""The Applier over the in-memory store: the pipeline's rules with no Redis.

Next to (never instead of) the integration tests, which run the same Applier over
RedisStore. Updates are signed by deterministic identities with a fixed clock.
"""

from __future__ import annotations

import itertools

import pytest

from dmodel import merge, pipeline
from dmodel.actions import DAction, ListenerRegistry
from dmodel.clock import HybridClock, pack
from dmodel.crypto import Identity
from dmodel.errors import ReplayedUpdate, UnauthorizedError, VetoedError
from dmodel.node.applier import Applier
from dmodel.store.base import MemoryStore
from dmodel.update import Op, Update

NODE = bytes(16)
NOW_MS = 1_700_000_000_000
NOW_NS = NOW_MS * 1_000_000


class Signer:
    """One object's identity and hash chain on NODE."""

    _seeds = itertools.count(1)

    def __init__(self, model: str = "Thing") -> None:
        self.identity = Identity.from_seed(next(self._seeds).to_bytes(32, "big"))
        self.db_id = f"{model}:{self.identity.oid}"
        self.head = b""

    def sign(self, ts_ms: int, *ops: Op, grants: dict[str, bytes] | None = None) -> Update:
        update = Update.create(self.identity, node=NODE, caller=self.db_id,
                               timestamp=pack(ts_ms), prev=self.head, ops=ops, grants=grants)
        self.head = update.id
        return update

    def create(self, ts_ms: int, update: tuple[str, ...] = ()) -> Update:
        keys = self.identity.public
        return self.sign(ts_ms, Op(self.db_id, "create", "", {
            "sign": keys.verify_key, "box": keys.box_key, "read": [], "update": list(update)}))


def make_applier(policy: merge.Policy = "reject") -> tuple[Applier, MemoryStore]:
    store = MemoryStore()
    applier = Applier(store, HybridClock(lambda: NOW_NS), policy=lambda model: policy,
                      skew_ms=60_000)
    return applier, store


def value(store: MemoryStore, db_id: str, name: str) -> object:
    reg = store.register(db_id, name)
    return None if reg is None or reg.deleted else reg.value


def test_accepts_a_create_and_a_set() -> None:
    applier, store = make_applier()
    owner = Signer()
    create, set_ = owner.create(NOW_MS - 10), owner.sign(NOW_MS - 5, Op(owner.db_id, "set",
                                                                        "name", "Bob"))
    decisions = applier.ingest([create, set_])
    assert [d.verdict for d in decisions] == [pipeline.ACCEPTED] * 2
    assert value(store, owner.db_id, "name") == "Bob"
    assert store.history(owner.db_id) == [create.id, set_.id]
    assert applier.stats.applied == 2 and applier.stats.remote == 2


def test_local_update_uses_the_local_snapshot_rule() -> None:
    applier, store = make_applier()
    owner = Signer()
    applier.apply_local([owner.create(NOW_MS)])
    decision = applier.apply_local([owner.sign(NOW_MS + 1, Op(owner.db_id, "set", "n", 1))])[0]
    assert decision.verdict == pipeline.ACCEPTED
    assert applier.stats.local == 2 and value(store, owner.db_id, "n") == 1


@pytest.mark.parametrize("policy", ["reject", "listeners"])
def test_unauthorized_update_under_each_policy(policy: merge.Policy) -> None:
    applier, store = make_applier(policy)
    owner, stranger = Signer(), Signer()
    creates = [owner.create(NOW_MS - 9), stranger.create(NOW_MS - 8)]
    write = stranger.sign(NOW_MS - 1, Op(owner.db_id, "set", "name", "Eve"))
    decisions = applier.ingest([*creates, write])
    if policy == "reject":
        assert decisions[-1].verdict == pipeline.UNAUTHORIZED
        assert isinstance(decisions[-1].error, UnauthorizedError)
        assert value(store, owner.db_id, "name") is None
        assert store.history(owner.db_id, held=True) == [write.id]  # held, not applied
        assert applier.stats.rejected["UnauthorizedError"] == 1
    else:  # handed to listeners: none vetoes, so it is applied
        assert decisions[-1].verdict == pipeline.ACCEPTED
        assert value(store, owner.db_id, "name") == "Eve"


def test_local_unauthorized_stores_nothing() -> None:
    applier, store = make_applier()
    owner, stranger = Signer(), Signer()
    applier.ingest([owner.create(NOW_MS - 9), stranger.create(NOW_MS - 8)])
    log = store.log_length()
    decision = applier.apply_local([stranger.sign(NOW_MS, Op(owner.db_id, "set", "x", 1))])[0]
    assert decision.verdict == pipeline.UNAUTHORIZED
    assert store.log_length() == log and store.history(owner.db_id, held=True) == []


def test_before_listener_veto_drops_the_update() -> None:
    applier, store = make_applier()

    class Veto(DAction):
        def on_update(self, object_id, field, old_value, new_value):  # noqa: ANN001, ANN201
            if new_value == "forbidden":
                raise ValueError("no")

    owner = Signer()
    Veto().apply("Thing:*", registry=applier.listeners)
    assert isinstance(applier.listeners, ListenerRegistry)
    create = owner.create(NOW_MS - 9)
    ok = owner.sign(NOW_MS - 5, Op(owner.db_id, "set", "name", "fine"))
    bad = owner.sign(NOW_MS - 4, Op(owner.db_id, "set", "name", "forbidden"))
    decisions = applier.ingest([create, ok, bad])
    assert [d.verdict for d in decisions] == [pipeline.ACCEPTED] * 2 + [pipeline.VETOED]
    assert isinstance(decisions[-1].error, VetoedError)
    assert value(store, owner.db_id, "name") == "fine"
    assert not store.has_update(decisions[-1].update.id)
    # the vetoed update's link stands: the caller's next update is judged on its own
    after = owner.sign(NOW_MS - 1, Op(owner.db_id, "set", "name", "later"))
    assert applier.ingest([after])[0].verdict == pipeline.ACCEPTED


def test_missing_dependency_is_parked_then_released() -> None:
    applier, store = make_applier()
    owner = Signer()
    create = owner.create(NOW_MS - 9)
    first = owner.sign(NOW_MS - 5, Op(owner.db_id, "set", "n", 1))
    second = owner.sign(NOW_MS - 4, Op(owner.db_id, "set", "n", 2))
    assert applier.ingest([second])[0].verdict == pipeline.MISSING  # its prev is unknown
    assert applier.ingest([first])[0].verdict == pipeline.MISSING  # its caller is unknown
    assert len(applier.pending) == 2
    assert set(applier.pending.needs()) == {first.id, create.id}
    applier.ingest([create])
    assert len(applier.pending) == 0
    assert value(store, owner.db_id, "n") == 2
    assert store.history(owner.db_id) == [create.id, first.id, second.id]


def test_duplicate_is_dropped_once_stored() -> None:
    applier, store = make_applier()
    owner = Signer()
    create = owner.create(NOW_MS - 9)
    applier.ingest([create])
    again = applier.ingest([create])[0]
    assert again.verdict == pipeline.DROPPED and isinstance(again.error, ReplayedUpdate)
    twice = applier.ingest([owner.sign(NOW_MS - 1, Op(owner.db_id, "set", "n", 1))] * 2)
    assert [d.verdict for d in twice] == [pipeline.ACCEPTED, pipeline.DROPPED]
    assert applier.stats.duplicates == 2 and store.log_length() == 2


def test_batch_with_a_late_grant_converges() -> None:
    """A member's write that arrives before the (earlier-signed) grant letting it write."""
    owner, member = Signer(), Signer()
    create_o, create_m = owner.create(NOW_MS - 90), member.create(NOW_MS - 80)
    grant = owner.sign(NOW_MS - 50, Op(owner.db_id, "grant_update", "", {"id": member.db_id}))
    write = member.sign(NOW_MS - 10, Op(owner.db_id, "set", "name", "by member"),
                        grants={owner.db_id: grant.id + bytes(2)})
    everything = [create_o, create_m, grant, write]
    reference = merge.fold(everything)
    for order in ([create_o, create_m, write, grant], everything):
        applier, store = make_applier()
        applier.ingest(order)
        assert value(store, owner.db_id, "name") == "by member"
        assert store.registers(owner.db_id) == {
            name: reg for (obj, name), reg in reference.registers.items()
            if obj == owner.db_id}
        assert store.history(owner.db_id, held=True) == []
    assert applier.stats.recomputed == 0  # in order: nothing to re-decide


def test_a_write_naming_a_grant_not_here_waits_for_it() -> None:
    applier, store = make_applier()
    owner, member = Signer(), Signer()
    applier.ingest([owner.create(NOW_MS - 90), member.create(NOW_MS - 80)])
    grant = owner.sign(NOW_MS - 50, Op(owner.db_id, "grant_update", "", {"id": member.db_id}))
    write = member.sign(NOW_MS - 10, Op(owner.db_id, "set", "name", "by member"),
                        grants={owner.db_id: grant.id + bytes(2)})
    assert applier.ingest([write])[0].verdict == pipeline.MISSING
    assert applier.pending.needs() == [grant.id]
    assert applier.ingest([grant])[0].verdict == pipeline.ACCEPTED
    assert len(applier.pending) == 0
    assert value(store, owner.db_id, "name") == "by member"
    assert write.id in store.history(owner.db_id)


def test_a_revoke_that_arrives_later_re_decides_what_it_does_not_name() -> None:
    applier, store = make_applier()
    owner, member = Signer(), Signer()
    creates = [owner.create(NOW_MS - 90), member.create(NOW_MS - 80)]
    grant = owner.sign(NOW_MS - 50, Op(owner.db_id, "grant_update", "", {"id": member.db_id}))
    ref = {owner.db_id: grant.id + bytes(2)}
    seen = member.sign(NOW_MS - 40, Op(owner.db_id, "set", "name", "seen"), grants=ref)
    revoke = owner.sign(NOW_MS - 30, Op(owner.db_id, "revoke_update", "",
                                        {"id": member.db_id, "f": [seen.id]}))
    unseen = member.sign(NOW_MS - 45, Op(owner.db_id, "set", "other", "unseen"), grants=ref)
    applier.ingest([*creates, grant, seen, unseen])
    assert value(store, owner.db_id, "other") == "unseen"  # the window looks open here
    assert applier.ingest([revoke])[0].verdict == pipeline.ACCEPTED
    assert applier.stats.recomputed >= 1
    assert value(store, owner.db_id, "name") == "seen"
    assert value(store, owner.db_id, "other") is None
    assert unseen.id in store.history(owner.db_id, held=True)


def test_on_accepted_callbacks_see_every_stored_update() -> None:
    applier, _ = make_applier()
    seen: list[tuple[bytes, bool]] = []
    applier.on_accepted(lambda update, local: seen.append((update.id, local)))
    owner = Signer()
    create = owner.create(NOW_MS - 9)
    applier.ingest([create])
    local = applier.apply_local([owner.sign(NOW_MS, Op(owner.db_id, "set", "n", 1))])[0]
    assert seen == [(create.id, False), (local.update.id, True)]
