"""Catch-up by state sums (dmodel.node.statesum, the "sum" requests of dmodel.net.sync):
two peers that hold most of the same state exchange what differs, not their logs.
Real nodes (embedded Redis), real ZeroMQ over loopback."""

from __future__ import annotations

import msgpack
import pytest
from helpers import wait_until

import dmodel
from dmodel.buckets import BUCKETS_PER_GROUP, bucket_of

LOOPBACK = "tcp://127.0.0.1:*"


class Item(dmodel.DModel):
    name = dmodel.DField()
    tags = dmodel.DList()


def _differing_objects(a: dmodel.Node, b: dmodel.Node) -> set[str]:
    """Objects whose digests differ, found the way catch-up does: groups, buckets, objects."""
    sa, sb = a.state_sums, b.state_sums
    for sums in (sa, sb):
        sums.refresh(lambda: 0)
    out: set[str] = set()
    for group, (x, y) in enumerate(zip(sa.group_sums(), sb.group_sums(), strict=True)):
        if x == y:
            continue
        for i, (bx, by) in enumerate(zip(sa.bucket_sums(group), sb.bucket_sums(group),
                                         strict=True)):
            if bx != by:
                mine, theirs = sa.objects(group * BUCKETS_PER_GROUP + i), \
                    sb.objects(group * BUCKETS_PER_GROUP + i)
                out |= {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
    return out


def test_the_same_state_in_any_arrival_order_has_the_same_sums(make_node) -> None:
    a, b = make_node("a", retention=2), make_node("b", retention=2)
    items = [Item.create(name=f"i{i}", node=a) for i in range(40)]
    for i, item in enumerate(items):
        item.name = f"renamed {i}"
        item.name = f"again {i}"  # with retention 2, b never stores what a pruned
        item.tags.extend([i, i + 1])
    b.ingest_many(a.updates_since(0)[::-1])  # newest first: most wait for their create
    wait_until(lambda: b.pending_count == 0 and b.state_digest() == a.state_digest())
    assert _differing_objects(a, b) == set() and len(a.state_sums) == len(b.state_sums) == 40
    items[7].name = "only on a"
    items[9].tags.delete(0)
    assert _differing_objects(a, b) == {items[7].db_id, items[9].db_id}
    b.ingest_many(a.updates_since(0))
    assert _differing_objects(a, b) == set()


def test_a_bucket_holds_the_objects_that_hash_there(make_node) -> None:
    a = make_node("a")
    items = [Item.create(name="x", node=a) for _ in range(30)]
    a.state_sums.refresh(a.log_length)
    for item in items:
        assert item.db_id in a.state_sums.objects(bucket_of(item.db_id))
    items[0].remove()
    a.state_sums.refresh(a.log_length)  # a removed object keeps a (different) digest
    assert items[0].db_id in a.state_sums.objects(bucket_of(items[0].db_id))


# State sums from 200 log entries behind on (2000 by default), to keep tests short.
OPTIONS = {"sync_interval": 0.2, "state_sync_after": 200}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("state_sync_after", [200, 0])
def test_peers_holding_the_same_big_state_exchange_only_what_differs(make_node,
                                                                     state_sync_after) -> None:
    options = OPTIONS | {"state_sync_after": state_sync_after}
    n = 500
    a = make_node("a", listen=LOOPBACK, discovery=False, peers=[], network_options=options)
    b = make_node("b", listen=LOOPBACK, discovery=False, peers=[], network_options=options)
    items = [Item.create(name=f"i{i}", node=a) for i in range(n)]
    b.ingest_many(a.updates_since(0))  # b holds a's state, as if restored from a backup
    items[3].name = "changed"
    items[4].tags.append("new")
    late = Item.create(name="late", node=a)
    mine = Item.create(name="b only", node=b)
    wait_until(lambda: a.state_sums.built and b.state_sums.built, timeout=60)
    log_length = a.log_length()
    b.network.connect(a.network.endpoint)
    wait_until(lambda: b.exists(late.db_id) and b.read(items[3].db_id, "name") == "changed"
               and a.exists(mine.db_id), timeout=60)
    if state_sync_after:  # the pass is counted after what it fetched is applied
        wait_until(lambda: b.network.stats["state_passes"] >= 1, timeout=30)
    stats = b.network.stats
    assert stats["pulled"] <= 10 and a.network.stats["served"] <= 10  # either way
    if state_sync_after:
        assert stats["state_objects"] <= 10  # the objects that differ, not the n shared
        assert stats["log_ids"] < 50  # a's log was not read, only what came after the sums
        _, position = msgpack.unpackb(b.store.meta(f"cursor:{a.node_id.hex()}"))
        assert position >= log_length
    else:  # state sums off: a's whole log is read (its ids), to find the few missing
        assert stats["state_passes"] == 0 and stats["log_ids"] >= n
    wait_until(lambda: a.state_digest() == b.state_digest(), timeout=30)
    assert a.verify_store() == [] and b.verify_store() == []


@pytest.mark.timeout(120)
def test_a_joiner_with_an_empty_store_reads_the_log(make_node) -> None:
    a = make_node("a", listen=LOOPBACK, discovery=False, peers=[],
                  network_options=OPTIONS)
    items = [Item.create(name=f"i{i}", node=a) for i in range(OPTIONS["state_sync_after"] + 100)]
    b = make_node("b", listen=LOOPBACK, discovery=False, peers=[a.network.endpoint],
                  network_options=OPTIONS)
    wait_until(lambda: b.exists(items[-1].db_id) and b.log_length() == a.log_length(),
               timeout=60)
    assert b.network.stats["state_passes"] == 0
    assert b.state_digest() == a.state_digest()


@pytest.mark.timeout(120)
def test_a_peer_does_not_fetch_back_what_it_pruned_lately(make_node) -> None:
    """a's own overwrites, pruned by its retention, are still in b's log (b keeps all):
    reading that log, a fetches none of them (ingest would drop them as replays)."""
    options = {"sync_interval": 0.2, "state_sync_after": 0}
    a = make_node("a", listen=LOOPBACK, discovery=False, peers=[], network_options=options,
                  retention=1)
    b = make_node("b", listen=LOOPBACK, discovery=False, peers=[], network_options=options,
                  retention="all")
    item = Item.create(name="v0", node=a)
    b.ingest_many(a.updates_since(0))
    for i in range(1, 301):
        item.name = f"v{i}"
        b.ingest_many(a.updates_since(a.log_length() - 1))  # before a prunes it
    a.settle()
    assert len(a.store.missing(b.store.log_range())) >= 290  # pruned on a, all kept on b
    a.network.connect(b.network.endpoint)
    wait_until(lambda: a.network.stats["log_ids"] >= 301, timeout=60)
    assert a.network.stats["pulled"] == 0
    assert a.read(item.db_id, "name") == b.read(item.db_id, "name") == "v300"
