"""RedisStore on a real 3-master Redis Cluster (``redis+cluster://``): the tour, verify,
a one-object write as one step in one slot, two nodes converging over loopback ZeroMQ,
a late joiner, a commit cut between its slots, a second node refused, and writes
acknowledged while slots move between masters.

Each test uses a prefix of its own on the session's cluster (``redis_cluster``).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers import wait_until

import dmodel
from dmodel import DField, DList, DModel
from dmodel.errors import StoreInUseError
from dmodel.merge import Register
from dmodel.store.redis import RedisStore, _tag

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(60)]

LOOPBACK = "tcp://127.0.0.1:*"
_prefixes = itertools.count()


class CPerson(DModel):
    name = DField(index=True)
    age = DField()
    tags = DList()


@pytest.fixture
def cluster_node(redis_cluster, tmp_path):
    """``cluster_node(name, prefix=None, **options)``: a Node whose store is the cluster,
    under a prefix of this test's own (or ``prefix``, to reopen one)."""
    nodes: list[dmodel.Node] = []
    test_prefix = f"ct{os.getpid()}x{next(_prefixes)}"

    def _make(name: str = "a", prefix: str | None = None, **options) -> dmodel.Node:
        options.setdefault("listen", "")
        options.setdefault("peers", [])
        node = dmodel.Node(tmp_path / name, redis_url=redis_cluster.url, discovery=False,
                           redis_prefix=prefix or f"{test_prefix}{name}:", **options)
        nodes.append(node)
        return node

    yield _make
    for node in reversed(nodes):
        node.shutdown()


def _keys(cluster, pattern: str) -> dict[bytes, int]:
    """Every key matching ``pattern`` on any master -> that master's port."""
    return {key: server.port for server in cluster.nodes
            for key in server.client.keys(pattern)}


def _masters_used(cluster, node: dmodel.Node) -> set[int]:
    return set(_keys(cluster, node.store.prefix + "*").values())


def _slot(cluster, store, db_id: str) -> int:
    return cluster.keyslot(_tag(store.k_reg(db_id)))


def _cross_pair(node: dmodel.Node) -> tuple[CPerson, CPerson]:
    """p, and q (used as p, who may update it) in another slot: p's transactions over
    both are commits across two slots."""
    p = CPerson(node=node)
    while True:
        q = CPerson.create(node=node, authorized=[p])
        if _slot(node.store.client, node.store, q.db_id) != _slot(node.store.client,
                                                                  node.store, p.db_id):
            return p, CPerson(q.db_id, p.db_id, node=node)


def _cross_write(p: CPerson, q: CPerson, value: object) -> None:
    with dmodel.transaction(p, node=p._node):
        p.name.set(value)
        q.name.set(value)


def test_the_tour_on_a_cluster_spreads_objects_and_verifies(cluster_node, redis_cluster):
    node = cluster_node()
    people = [CPerson(node=node) for _ in range(12)]
    for i, p in enumerate(people):
        p.name.set(f"p{i}")
        p.age.set(20 + i)
    people[0].tags.extend(["a", "b"])
    people[0].tags.insert(1, "m")
    with people[1].transaction():
        people[1].name.set("renamed")
        people[1].tags.append("t")
    assert list(people[0].tags) == ["a", "m", "b"]
    assert [p.db_id for p in CPerson.find(name="renamed", node=node)] == [people[1].db_id]
    assert CPerson.query(node=node).where(CPerson.age >= 30).count() == 2
    # Objects land on every master: 12 random ids miss one of three about 1.5% of the
    # time, so more are made until they cover all three (60 miss one ~1e-10 of the time).
    spread = list(people)
    while len(_masters_used(redis_cluster, node)) < 3 and len(spread) < 60:
        spread.append(CPerson(node=node))
    assert len(_masters_used(redis_cluster, node)) == 3
    store = node.store
    assert store.shards == 64
    for p in people:  # one object's keys share a slot with the updates it signs
        keys = _keys(redis_cluster, f"{store.prefix}*}}{p.db_id}*")
        assert len(keys) >= 3
        shard = store.shard_of(p.db_id)
        assert {redis_cluster.keyslot(k) for k in keys} == {
            redis_cluster.keyslot(store._key(shard, "log"))}
    assert store.journal_size() == 0  # every commit was one object's: no journal
    node.settle()
    assert node.verify_store() == []
    key = node.store.k_reg(people[2].db_id)  # tampered by hand: verify says so
    genuine = Register.unpack(node.store.client.hget(key, "age"))
    node.store.client.hset(key, "age", Register(genuine.version, 99).pack())
    problems = node.verify_store()
    assert len(problems) == 1 and f"{people[2].db_id}:age" in problems[0]


def test_a_write_to_one_object_is_one_step_in_its_slot(cluster_node, redis_cluster):
    """The per-shard layout: creating an object, setting its fields, a transaction on it
    and growing its list each run one script call, on the master of the object's slot;
    a transaction over two objects in two slots is journaled."""
    node = cluster_node()
    people = [CPerson(node=node) for _ in range(8)]
    node.settle()
    for server in redis_cluster.nodes:
        server.client.config_resetstat()

    def calls() -> dict[int, int]:
        out = {}
        for server in redis_cluster.nodes:
            stat = server.client.info("commandstats").get("cmdstat_evalsha", {})
            out[server.port] = int(stat.get("calls", 0))
        return out

    expected = dict.fromkeys(calls(), 0)
    for i, p in enumerate(people):
        p.name.set(f"n{i}")
        p.tags.append(i)
        with p.transaction():
            p.age.set(i)
            p.tags.append("t")
        owner = redis_cluster.owner(_slot(redis_cluster, node.store, p.db_id))
        expected[owner.port] += 3
        assert calls() == expected
    assert node.store.journal_size() == 0
    p, q = _cross_pair(node)
    node.store.after_journal = lambda: journaled.append(node.store.journal_size())
    journaled: list[int] = []
    _cross_write(p, q, "both")
    assert journaled == [1] and node.read(q.db_id, "name") == "both"
    node.settle()
    assert node.store.journal_size() == 0 and node.verify_store() == []


def test_the_readme_tour_runs_on_a_cluster(redis_cluster, tmp_path, monkeypatch):
    """The README's tour as written, its store the cluster (through DMODEL_REDIS_URL,
    under the default prefix, which no other test here uses)."""
    from test_readme import run_tour

    for server in redis_cluster.nodes:
        for key in server.client.keys("dm:*"):
            server.client.delete(key)
    run_tour(tmp_path, monkeypatch, redis_url=redis_cluster.url)
    assert len(_keys(redis_cluster, "dm:*")) > 10


def test_two_cluster_backed_nodes_converge_and_a_late_joiner_catches_up(cluster_node):
    a = cluster_node("a", listen=LOOPBACK, network_options={"sync_interval": 0.2})
    b = cluster_node("b", listen=LOOPBACK, peers=[a.network.endpoint],
                     network_options={"sync_interval": 0.2})
    assert b.network.wait_for_peers(1, timeout=10)
    made = [CPerson(node=a) for _ in range(5)]
    for i, p in enumerate(made):
        p.name.set(f"n{i}")
    theirs = CPerson(node=b)
    theirs.name.set("from b")
    wait_until(lambda: set(a.store.log_range()) == set(b.store.log_range())
               and len(a.store.log_range()) == 12, timeout=20)
    late = cluster_node("late", listen=LOOPBACK, peers=[a.network.endpoint],
                        network_options={"sync_interval": 0.2})
    wait_until(lambda: set(late.store.log_range()) == set(a.store.log_range()), timeout=20)
    for node in (a, b, late):
        assert node.read(theirs.db_id, "name") == "from b"
        assert [node.read(p.db_id, "name") for p in made] == [f"n{i}" for i in range(5)]
        assert node.verify_store() == []
    assert a.state_digest() == b.state_digest() == late.state_digest()


def test_cluster_backed_peers_compare_state_sums(cluster_node):
    """Two cluster-backed nodes holding the same objects catch up by state sums (the
    object reads and held ids run as cluster pipelines)."""
    options = {"sync_interval": 0.2, "state_sync_after": 10}
    a = cluster_node("a", listen=LOOPBACK, network_options=options)
    b = cluster_node("b", listen=LOOPBACK, network_options=options)
    made = [CPerson(node=a) for _ in range(30)]
    b.ingest_many(a.updates_since(0))
    made[0].name.set("changed")
    made[1].tags.append("t")
    wait_until(lambda: a.state_sums.built and b.state_sums.built, timeout=20)
    b.network.connect(a.network.endpoint)
    wait_until(lambda: b.read(made[0].db_id, "name") == "changed"
               and b.list_length(made[1].db_id, "tags") == 1, timeout=20)
    stats = b.network.stats
    assert stats["state_passes"] >= 1 and stats["log_ids"] < 10 and stats["pulled"] <= 4
    assert a.state_digest() == b.state_digest()


def test_a_commit_over_four_slots_runs_its_steps_together_and_alone_when_they_fail(
        cluster_node, redis_cluster):
    """The steps after the lead one run as one pipeline; a step the pipeline could not
    run (here: the masters lost the script) is run again on its own."""
    node = cluster_node()
    p = CPerson(node=node)
    slots = {_slot(redis_cluster, node.store, p.db_id)}
    others = []
    while len(others) < 3:
        q = CPerson.create(node=node, authorized=[p])
        if (slot := _slot(redis_cluster, node.store, q.db_id)) not in slots:
            slots.add(slot)
            others.append(CPerson(q.db_id, p.db_id, node=node))

    def write_all(value: str) -> None:
        with dmodel.transaction(p, node=node):
            p.name.set(value)
            for q in others:
                q.name.set(value)

    store, run_alone = node.store, []
    apply_one = store._apply
    store._apply = lambda step, commit_id: (run_alone.append(step), apply_one(step, commit_id))
    write_all("together")
    assert len(run_alone) == 1  # the lead step; the other three went as one pipeline

    def flush_scripts() -> None:
        for server in redis_cluster.nodes:
            server.client.script_flush()

    node.store.after_journal = flush_scripts
    write_all("alone")
    assert len(run_alone) == 1 + 1 + 3
    node.store.after_journal = None
    for server in redis_cluster.nodes:
        server.client.config_resetstat()
    write_all("again")
    errors = sum(int(server.client.info("commandstats").get("cmdstat_evalsha", {})
                     .get("failed_calls", 0)) for server in redis_cluster.nodes)
    assert errors == 0
    assert {node.read(o.db_id, "name") for o in [p, *others]} == {"again"}
    node.settle()
    assert node.store.journal_size() == 0 and node.verify_store() == []
    assert len(node.history(others[0].db_id)) == 4


def test_a_commit_cut_between_its_slots_is_finished_on_reopen(cluster_node):
    node = cluster_node("a")
    p, q = _cross_pair(node)
    _cross_write(p, q, "first")
    prefix = node.store.prefix

    def crash() -> None:
        raise KeyboardInterrupt("killed between the journal and the other slots")

    node.store.after_journal = crash
    with pytest.raises(KeyboardInterrupt):
        _cross_write(p, q, "second")
    assert node.store.journal_size() == 1  # journaled, not applied
    names = {Register.unpack(node.store.client.hget(node.store.k_reg(o.db_id), "name")).value
             for o in (p, q)}
    assert names == {"first", "second"}  # the lead slot's part only
    node.shutdown()
    again = cluster_node("a", prefix=prefix)
    assert again.store.journal_size() == 0
    assert again.read(p.db_id, "name") == again.read(q.db_id, "name") == "second"
    assert len(again.history(q.db_id)) == 3 and again.verify_store() == []


def test_a_node_killed_after_its_journal_write_is_recovered(redis_cluster, tmp_path,
                                                            cluster_node):
    """A real process SIGKILLs itself between the journal write and the per-slot writes."""
    prefix = f"kill{os.getpid()}:"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import dmodel
        from test_cluster_store import _cross_pair, _cross_write
        node = dmodel.Node({str(tmp_path / "k")!r}, redis_url={redis_cluster.url!r},
                           redis_prefix={prefix!r}, listen="", peers=[], discovery=False)
        p, q = _cross_pair(node)
        _cross_write(p, q, "first")
        print(p.db_id, q.db_id, flush=True)
        node.store.after_journal = lambda: os.kill(os.getpid(), signal.SIGKILL)
        _cross_write(p, q, "second")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    db_ids = proc.stdout.split()
    from dmodel.store.connect import connect
    client = connect(redis_cluster.url)
    client.delete(f"{prefix}{{{prefix}}}lock")  # the dead holder's lock, not to wait out
    assert RedisStore(client, prefix=prefix).journal_size() == 1
    client.close()
    node = cluster_node("k", prefix=prefix)
    assert [node.read(db_id, "name") for db_id in db_ids] == ["second", "second"]
    assert node.store.journal_size() == 0
    assert node.verify_store() == []


def test_a_node_killed_with_a_finished_commit_in_its_journal_replays_nothing(
        redis_cluster, tmp_path, cluster_node):
    """A finished commit's journal entry goes with the next commit's step in its
    journal's slot; a node killed before that leaves it, and reopening replays it
    harmlessly (its steps are the last ones in their slots, so their guards skip them)."""
    prefix = f"fin{os.getpid()}:"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import dmodel
        from test_cluster_store import _cross_pair
        node = dmodel.Node({str(tmp_path / "k")!r}, redis_url={redis_cluster.url!r},
                           redis_prefix={prefix!r}, listen="", peers=[], discovery=False)
        p, q = _cross_pair(node)
        for i in range(5):
            with dmodel.transaction(p, node=node):
                p.name.set(f"p{{i}}")
                q.tags.append(i)
        assert node.store.journal_size() == 1
        print(p.db_id, q.db_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    p_id, q_id = proc.stdout.split()
    from dmodel.store.connect import connect
    client = connect(redis_cluster.url)
    client.delete(f"{prefix}{{{prefix}}}lock")
    assert RedisStore(client, prefix=prefix).journal_size() == 1
    client.close()
    node = cluster_node("k", prefix=prefix)
    assert node.store.journal_size() == 0
    assert node.read(p_id, "name") == "p4"
    assert node.list_length(q_id, "tags") == 5
    assert len(node.history(q_id)) == 6 and node.verify_store() == []


def test_a_second_node_on_the_same_prefix_is_refused_naming_the_holder(cluster_node):
    first = cluster_node("a")
    with pytest.raises(StoreInUseError, match=first.node_id.hex()) as caught:
        cluster_node("b", prefix=first.store.prefix)
    assert f"pid {os.getpid()}" in str(caught.value)
    other = cluster_node("c")  # another prefix is another store
    assert other.store.prefix != first.store.prefix
    prefix = first.store.prefix
    first.shutdown()  # released on shutdown: the next one gets it
    second = cluster_node("b", prefix=prefix)
    assert first.node_id.hex() not in second.store.client.get(second.store.k_lock).decode()


def test_a_stale_lock_of_a_dead_holder_is_taken_over_after_its_expiry(cluster_node,
                                                                      redis_cluster):
    from dmodel.store.connect import connect
    prefix = f"stale{os.getpid()}:"
    client = connect(redis_cluster.url)
    client.set(f"{prefix}{{{prefix}}}lock", "node dead pid 1 on gone", px=300)
    with pytest.raises(StoreInUseError, match="node dead pid 1 on gone"):
        cluster_node("a", prefix=prefix)
    wait_until(lambda: not client.exists(f"{prefix}{{{prefix}}}lock"), timeout=5)
    node = cluster_node("a", prefix=prefix)
    assert node.node_id.hex() in client.get(node.store.k_lock).decode()
    client.close()


def test_every_acknowledged_write_survives_slots_moving_under_a_writer(cluster_node,
                                                                       redis_cluster):
    """Writes of one object (one slot) and transactions over two (journaled across two
    slots) go on while every slot they use moves to another master."""
    node = cluster_node()
    people = [CPerson(node=node) for _ in range(6)]
    for p in people:
        p.name.set("start")
    pair = _cross_pair(node)
    store = node.store
    slots = sorted({_slot(redis_cluster, store, p.db_id) for p in [*people, *pair]})
    acknowledged: dict[str, int] = {}
    failures: list[BaseException] = []
    stop = threading.Event()

    def write() -> None:
        try:
            for i in range(100_000):
                if stop.is_set():
                    return
                if i % 4 == 3:
                    _cross_write(*pair, i)
                    acknowledged.update({pair[0].db_id: i, pair[1].db_id: i})
                    continue
                p = people[i % len(people)]
                p.name.set(i)
                acknowledged[p.db_id] = i
        except BaseException as exc:  # reported below
            failures.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(acknowledged) == len(people) + 2 or failures, timeout=20)
        before = sum(acknowledged.values())
        split: list[int] = []
        for slot in slots:  # each to the next master, the writer at work while its
            src = redis_cluster.owner(slot)  # keys are split between the two
            dst = redis_cluster.nodes[(redis_cluster.nodes.index(src) + 1) % 3]
            redis_cluster.move_slots([slot], src, dst, batch=2,
                                     midway=lambda s: (split.append(s), time.sleep(0.05)))
        count = sum(acknowledged.values())
        assert split and count > before  # writes went on while slots were split
        wait_until(lambda: sum(acknowledged.values()) > count + 20 or failures, timeout=20)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert not failures, failures
    node.settle()
    assert store.journal_size() == 0
    for p in [*people, *pair]:
        assert node.read(p.db_id, "name") == acknowledged[p.db_id]
    log = store.log_range()  # (retention pruned the pair's older versions: gaps)
    assert len(log) == len(set(log)) and len(log) <= store.log_length()
    assert {uid for p in [*people, *pair] for uid in store.history(p.db_id)} == set(log)
    assert node.verify_store() == []
