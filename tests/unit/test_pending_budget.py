"""The pending set's budgets: count and bytes, in total, per source and for unverified
updates; evictions fall on the source with the largest share (real signed updates)."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmodel.clock import pack
from dmodel.crypto import Identity
from dmodel.errors import ConfigurationError
from dmodel.node.pending import PendingLimits, PendingSet
from dmodel.update import Op, Update

NODE = bytes(16)


def _update(n: int, size: int) -> Update:
    identity = Identity.from_seed(n.to_bytes(32, "big"))
    db_id = f"Thing:{identity.oid}"
    return Update.create(identity, node=NODE, caller=db_id, timestamp=pack(1_700_000_000_000),
                         prev=b"", ops=[Op(db_id, "set", "pad", "x" * size)])


POOL = [_update(n, 50 + 40 * (n % 7)) for n in range(1, 61)]
DEPS = POOL[:6]  # what parked updates wait for
SMALL = PendingLimits(size=20, bytes=6000, source_size=8, source_bytes=2500,
                      unverified_bytes=2000)


def check(pending: PendingSet, limits: PendingLimits) -> None:
    usage = pending.sources()
    assert len(pending) <= limits.size and pending.size_bytes <= limits.bytes
    assert pending.unverified_bytes <= limits.unverified_bytes
    assert sum(n for n, _ in usage.values()) == len(pending)
    assert sum(b for _, b in usage.values()) == pending.size_bytes
    for count, size in usage.values():
        assert 0 < count <= limits.source_size and size <= limits.source_bytes


actions = st.lists(st.one_of(
    st.tuples(st.just("park"), st.integers(6, 59), st.integers(0, 3), st.booleans(),
              st.integers(0, 5)),
    st.tuples(st.just("release"), st.integers(0, 5))), max_size=80)


@given(actions)
def test_every_limit_holds_after_every_step_and_nothing_is_lost(steps) -> None:
    dropped: collections.Counter[str] = collections.Counter()
    pending = PendingSet(dropped, SMALL)
    released: list[Update] = []
    parked: set[bytes] = set()
    for step in steps:
        if step[0] == "park":
            _, i, source, verified, dep = step
            with pending.arriving([POOL[i]], [f"peer{source}"]):
                pending.park(POOL[i], [DEPS[dep].id], verified=verified)
            parked.add(POOL[i].id)
        else:
            pending.release(DEPS[step[1]], released.extend)
        check(pending, SMALL)
    # Whatever was parked is still waiting, was released, or was counted as evicted
    # (an update parked again after its release or eviction counts once per parking).
    for dep in DEPS:
        pending.release(dep, released.extend)
    assert len(pending) == 0 and pending.bookkeeping() == 0
    assert {u.id for u in released} <= parked
    assert len(released) + dropped["PendingEvicted"] >= len(parked)


def test_a_flooding_source_evicts_its_own_updates_only() -> None:
    dropped: collections.Counter[str] = collections.Counter()
    pending = PendingSet(dropped, SMALL)
    honest = POOL[6:9]
    with pending.arriving(honest, ["honest"] * 3):
        for u in honest:
            pending.park(u, [DEPS[0].id], verified=True)
    flood = POOL[9:59]
    with pending.arriving(flood, ["attacker"] * len(flood)):
        for u in flood:
            pending.park(u, [DEPS[1].id], verified=True)
    usage = pending.sources()
    assert usage["honest"][0] == 3
    assert usage["attacker"][0] <= SMALL.source_size
    assert dropped["PendingEvicted"] == len(flood) - usage["attacker"][0]
    released: list[Update] = []
    pending.release(DEPS[0], released.extend)
    assert released == honest


def test_many_sources_over_the_total_evict_from_the_largest_share() -> None:
    dropped: collections.Counter[str] = collections.Counter()
    pending = PendingSet(dropped, SMALL)
    honest = POOL[6]
    with pending.arriving([honest], ["honest"]):
        pending.park(honest, [DEPS[0].id], verified=True)
    for n, u in enumerate(POOL[7:59]):  # sybils: 13 sources, 4 updates each
        with pending.arriving([u], [f"sybil{n % 13}"]):
            pending.park(u, [DEPS[1].id], verified=True)
        check(pending, SMALL)
    assert pending.sources()["honest"] == (1, len(honest.raw))
    assert dropped["PendingEvicted"] > 0


def test_unverified_updates_get_a_small_share_of_their_own() -> None:
    dropped: collections.Counter[str] = collections.Counter()
    limits = PendingLimits(size=100, bytes=100_000, source_size=100, source_bytes=100_000,
                           unverified_bytes=1000)
    pending = PendingSet(dropped, limits)
    verified = POOL[6:26]
    for u in verified:
        pending.park(u, [DEPS[0].id], verified=True)
    for u in POOL[26:56]:
        pending.park(u, [DEPS[1].id], verified=False)
    assert pending.unverified_bytes <= 1000 and dropped["PendingEvicted"] > 0
    released: list[Update] = []
    pending.release(DEPS[0], released.extend)
    assert released == verified  # the checked ones kept every place


def test_the_caller_is_the_source_when_no_peer_is_named() -> None:
    pending = PendingSet(collections.Counter(), SMALL)
    pending.park(POOL[6], [DEPS[0].id])
    assert list(pending.sources()) == [POOL[6].caller]


def test_an_update_parked_again_after_its_release_keeps_its_source() -> None:
    pending = PendingSet(collections.Counter(), SMALL)
    update = POOL[6]
    with pending.arriving([update], ["peer"]):
        pending.park(update, [DEPS[0].id], verified=True)
    # Released for DEPS[0], it turns out to wait for DEPS[1] as well.
    pending.release(DEPS[0], lambda batch: [pending.park(u, [DEPS[1].id], verified=True)
                                            for u in batch])
    assert list(pending.sources()) == ["peer"]
    assert pending.needs() == [DEPS[1].id]


def test_gaps_taken_out_leave_no_accounting_behind() -> None:
    pending = PendingSet(collections.Counter(), SMALL)
    identity = Identity.from_seed(bytes(31) + b"\x63")
    db_id = f"Thing:{identity.oid}"
    linked = Update.create(identity, node=NODE, caller=db_id, timestamp=pack(1_700_000_000_000),
                           prev=b"\x01" * 32, ops=[Op(db_id, "set", "a", 1)])
    pending.park(linked, [linked.prev], verified=True)  # waits for its link alone
    assert pending.has_gaps and pending.size_bytes == len(linked.raw)
    assert pending.take_gaps(0) == [linked]
    assert not pending.has_gaps and pending.sources() == {} and pending.size_bytes == 0
    assert pending.bookkeeping() == 0


def test_limits_come_from_the_pending_options_and_are_checked() -> None:
    options = {"pending_bytes": 1024, "pending_source_size": 3, "rcvhwm": 10}
    limits = PendingLimits.take(options)
    assert (limits.bytes, limits.source_size, limits.size) == (1024, 3, 10_000)
    assert options == {"rcvhwm": 10}  # the rest are the bus's
    with pytest.raises(ConfigurationError, match="pending_unverified_bytes"):
        PendingLimits.take({"pending_unverified_bytes": 0})
    with pytest.raises(ConfigurationError):
        PendingLimits(size=True)
