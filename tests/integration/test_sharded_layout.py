"""The store's 64-shard layout (the default on a Redis Cluster) on the embedded Redis:
log pages merged from the shards' logs, reads by update id with and without knowing the
shard, value indexes merged across shards, catch-up with a one-shard peer, restart, and
the layout kept by the store (``DMODEL_REDIS_SHARDS``)."""

from __future__ import annotations

import pytest
from helpers import wait_until

import dmodel
from dmodel import DField, DList, DModel
from dmodel.errors import ConfigurationError
from dmodel.net.catchup import _page_error
from dmodel.net.sync import LogPage
from dmodel.store.redis import RedisStore

LOOPBACK = "tcp://127.0.0.1:*"


class SPerson(DModel):
    name = DField(index=True)
    age = DField(index=True)
    tags = DList()


@pytest.fixture
def sharded(make_node, monkeypatch):
    """``sharded(name, **options)``: a node whose new store has 64 shards."""
    def _make(name: str = "a", **options) -> dmodel.Node:
        monkeypatch.setenv("DMODEL_REDIS_SHARDS", "64")
        options.setdefault("listen", "")
        options.setdefault("peers", [])
        node = make_node(name, discovery=False, **options)
        monkeypatch.delenv("DMODEL_REDIS_SHARDS")
        assert node.store.shards == 64
        return node
    return _make


def _pages(store: RedisStore, limit: int) -> list[bytes]:
    """Every id of the log, page by page as a peer reads it, each page checked as the
    catch-up client checks it."""
    out: list[bytes] = []
    pos = 0
    while True:
        ids, resume = store.log_page(pos, limit)
        page = LogPage(b"e" * 16, pos, store.log_length(), tuple(ids), resume)
        assert _page_error(page, pos, limit) == ""
        out += ids
        if not ids or resume >= page.end:
            return out
        pos = resume


def test_log_pages_merged_from_the_shards_list_every_id_once_in_order(sharded):
    node = sharded(retention=2)
    people = [SPerson(node=node) for _ in range(40)]
    hot = people[0]
    for i in range(300):  # one object (one shard) far busier than the rest
        hot.age.set(i)
    for i, p in enumerate(people):
        p.name.set(f"p{i}")
    node.settle()
    log = node.store.log_range()
    assert len(log) < node.log_length()  # retention left gaps
    assert len(set(log)) == len(log)
    for limit in (1, 7, 64, 256, 5000):
        assert _pages(node.store, limit) == log
    assert node.store.log_range(-3) == log[-3:]
    seq = node.log_length()
    assert node.store.log_range(seq - 2) == log[-2:]


def test_reads_by_id_find_updates_in_any_shard(sharded):
    node = sharded()
    people = [SPerson(node=node) for _ in range(20)]
    for p in people:
        p.name.set("x")
    store = node.store
    log = store.log_range()
    raws = store.raw_updates(log)
    store._homes.clear()  # as after a restart: every shard is asked
    assert store.raw_updates(log) == raws and all(raws)
    assert store.missing(log) == []
    unknown = [b"\x07" * 32, b"\x08" * 32]
    store._homes.clear()
    assert store.missing([unknown[0], log[0], unknown[1]]) == unknown
    assert store.raw_updates([log[3], unknown[0]]) == [raws[3], None]
    assert store.has_update(log[5]) and not store.has_update(unknown[1])


def test_index_queries_merge_the_shards(sharded, make_node):
    node = sharded()
    plain = make_node("plain", listen="", peers=[], discovery=False)
    assert plain.store.shards == 1
    for i in range(60):
        SPerson.create(node=node, name=f"n{i % 7}", age=i % 13)
    plain.ingest_many(node.updates_since(0))

    def answers(n: dmodel.Node) -> list[object]:
        q = SPerson.query(node=n)
        out: list[object] = [q.where(SPerson.age >= 5).count(), q.where(name="n3").count()]
        for desc in (False, True):
            for offset, count in ((0, 5), (3, 10), (50, 20), (0, None)):
                page = q.where(SPerson.age >= 2).order_by(SPerson.age, desc=desc).offset(offset)
                page = page.limit(count) if count is not None else page
                out.append([(p.age.get(), p.db_id) for p in page])
        return out

    assert answers(node) == answers(plain)


def test_a_sharded_node_and_a_plain_one_catch_up_with_each_other(sharded, make_node):
    options = {"sync_interval": 0.2}
    a = sharded("a", listen=LOOPBACK, network_options=options)
    made = [SPerson(node=a) for _ in range(30)]
    for i, p in enumerate(made):
        p.name.set(f"n{i}")
        p.tags.append(i)
    b = make_node("b", listen=LOOPBACK, peers=[a.network.endpoint], discovery=False,
                  network_options=options)
    assert b.store.shards == 1
    theirs = SPerson(node=b)
    theirs.name.set("from b")
    wait_until(lambda: set(a.store.log_range()) == set(b.store.log_range())
               and len(a.store.log_range()) == 92, timeout=20)
    assert a.state_digest() == b.state_digest()
    assert a.read(theirs.db_id, "name") == "from b"
    assert a.verify_store() == [] and b.verify_store() == []


def test_a_sharded_store_reopens_with_its_positions_clock_and_layout(sharded, make_node,
                                                                     monkeypatch, tmp_path):
    node = sharded("a")
    people = [SPerson(node=node) for _ in range(10)]
    for p in people:
        p.name.set("v")
    seq, hlc, log = node.log_length(), node.store.last_hlc(), node.store.log_range()
    node.shutdown()
    again = make_node("a", listen="", peers=[], discovery=False)  # no variable: kept
    assert again.store.shards == 64
    assert again.log_length() == seq and again.store.last_hlc() == hlc
    assert again.store.log_range() == log
    p = people[0]
    again.write(p.db_id, [dmodel.update.Op(p.db_id, "set", "name", "w")])
    assert again.store.log_range()[-1] not in log and again.log_length() == seq + 1
    assert again.store.last_hlc() > hlc
    again.shutdown()
    monkeypatch.setenv("DMODEL_REDIS_SHARDS", "1")  # for a new store: this one keeps 64
    kept = make_node("a", listen="", peers=[], discovery=False)
    assert kept.store.shards == 64 and kept.store.log_range()[:len(log)] == log
    monkeypatch.setenv("DMODEL_REDIS_SHARDS", "8")
    with pytest.raises(ConfigurationError, match="DMODEL_REDIS_SHARDS must be 1 or 64"):
        make_node("b", listen="", peers=[], discovery=False)


def test_a_store_from_before_shards_keeps_one_shard(make_node, monkeypatch):
    monkeypatch.delenv("DMODEL_REDIS_SHARDS", raising=False)
    node = make_node("old", listen="", peers=[], discovery=False)
    SPerson(node=node).name.set("x")
    client = node.store.client
    assert client.hget(node.store.k_meta, "shards") is None  # one server, the default
    assert RedisStore(client, prefix=node.store.prefix, shards=None).shards == 1
    assert RedisStore(client, prefix=node.store.prefix, shards=64).shards == 1  # kept
    assert node.read(node.object_ids()[0], "name") == "x"
    assert RedisStore(client, prefix="fresh:", shards=64).shards == 64
    assert RedisStore(client, prefix="fresh:").shards == 64  # as recorded


def _hget_calls(store: RedisStore) -> int:
    stats = store.client.info("commandstats")
    return int(stats.get("cmdstat_hget", {}).get("calls", 0))


def test_a_chain_within_one_batch_is_not_looked_for_in_other_shards(sharded, make_node):
    # Each update's previous one is in the same batch, not yet stored: the batch links it.
    # Looking for it in the 63 other shards cost 63 reads per update (the cause of a
    # 4-6x slower apply on a cluster).
    writer = make_node("w", listen="", peers=[], discovery=False)
    person = SPerson(node=writer)
    for i in range(60):
        person.age.set(i)
    raws = writer.updates_since(0)
    node = sharded("b")
    before = _hget_calls(node.store)
    decisions = node.ingest_many(raws)
    assert all(d is not None and d.applied for d in decisions)
    reads = _hget_calls(node.store) - before
    assert reads < 10 * len(raws), reads  # (each update: its chain link, head, next, field)
    assert node.read(person.db_id, "age") == 59 and node.verify_store() == []


def test_a_prev_of_another_signer_in_the_same_batch_is_still_found(sharded, make_node):
    # The batch links only a previous update of the same caller: a replayed copy of
    # another signer's stored update, sent in the batch with an update naming it as
    # its previous one, leaves that update refused as a broken chain, not waiting.
    writer = make_node("w", listen="", peers=[], discovery=False)
    p, q = SPerson(node=writer), SPerson(node=writer)
    p.name.set("p")
    q.name.set("q")
    first = sharded("b")
    first.ingest_many(writer.updates_since(0))
    first.shutdown()
    node = make_node("b", listen="", peers=[], discovery=False)  # (nothing seen lately)
    p_head = writer.store.chain_head(p.db_id, writer.node_id)
    assert node.store.shards == 64 and node.store.has_update(p_head)
    wrong = dmodel.update.Update.create(
        writer.identity(q.db_id), node=writer.node_id, caller=q.db_id,
        timestamp=writer.clock.tick(), prev=p_head,
        ops=[dmodel.update.Op(q.db_id, "set", "name", "x")])
    dropped = node.stats.dropped.copy()
    node.ingest_many([node.store.raw_update(p_head), wrong.raw])
    assert node.stats.dropped - dropped == {"ReplayedUpdate": 1, "BrokenChainUpdate": 1}
    assert node.pending_count == 0 and node.read(q.db_id, "name") == "q"
