"""Nodes over the network: in-process nodes, each with its own embedded Redis, talking
real ZeroMQ on 127.0.0.1.

The bus itself (handshake, gossip, limits, CURVE handshakes) is tested in test_bus.py;
here the subject is the node: updates published and relayed, catch-up after being away,
convergence of what several nodes store, and hostile input on the wire.

Most nodes run periodic catch-up every 0.2 s (``sync_interval``) instead of the default
2 s, so a test that relies on it is quick. Some turn it off (NO_CATCH_UP): the relay
tests, to show that live relay alone delivers, and the late joiner and restart tests, to
show that the pass made when a peer connects brings what was missed.
"""

from __future__ import annotations

import os

import msgpack
import pytest
import zmq
from helpers import ship, wait_until
from hostile_net.attacker import proven_dealer

import dmodel
from dmodel.errors import DecryptionError, ObjectNotFoundError, UnauthorizedError
from dmodel.model import model_class
from dmodel.net.curve import CurveConfig
from dmodel.update import Op

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "tcp://127.0.0.1:*"
NO_CATCH_UP = 3600.0  # no test outlives it: only the passes at start and on connect run


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)


# ------------------------------------------------------------------ helpers


@pytest.fixture
def net(make_node):
    """``net(name, peers=[node or endpoint], curve=..., policy=..., **network_options)``."""

    def _net(name: str, *, peers=(), curve=None, policy=None, **options) -> dmodel.Node:
        options.setdefault("sync_interval", 0.2)
        extra = {"unauthorized_policy": policy} if policy else {}
        return make_node(name, listen=LOOPBACK, discovery=False, curve=curve,
                         peers=[p if isinstance(p, str) else p.network.endpoint for p in peers],
                         network_options=options, **extra)

    return _net


def linked(*nodes: dmodel.Node, n: int | None = None) -> None:
    """Wait until each node has ``n`` (default: all the others) peers connected and ready."""
    for node in nodes:
        want = len(nodes) - 1 if n is None else n
        assert node.network.wait_for_peers(want, timeout=10), node.network.peers()


def value(node: dmodel.Node, db_id: str, field: str, caller: str | None = None):
    """The field's value read as ``caller``; a marker string while it cannot be read."""
    try:
        return node.read(db_id, field, reader=caller)
    except ObjectNotFoundError:
        return "<unknown here>"
    except DecryptionError:
        return "<sealed>"


def state(node: dmodel.Node) -> tuple[dict, frozenset]:
    """Every live object's registers, and the set of stored update ids."""
    registers = {db_id: node.read_all(db_id) for db_id in sorted(node.object_ids())}
    return registers, frozenset(node.store.log_range())


def converged(*nodes: dmodel.Node) -> bool:
    first = state(nodes[0])
    return all(state(node) == first for node in nodes[1:])


def peer_ids(node: dmodel.Node) -> set[bytes]:
    return {bytes.fromhex(nid) for nid, info in node.network.peers().items() if info.connected}


# ------------------------------------------------------------------ two nodes


def test_walkthrough_across_the_network(net) -> None:
    a = net("a")
    b = net("b", peers=[a])
    linked(a, b)

    # A plain field travels, an encrypted one cannot be read by someone else.
    p = Person([], node=a)
    p.name.set("Bob")
    p.salary.set("1234")
    wait_until(lambda: value(b, p.db_id, "name", "") == "Bob")
    wait_until(lambda: value(b, p.db_id, "salary", "") == "<sealed>")  # there, not readable
    stranger = Person([], node=b)
    with pytest.raises(DecryptionError, match="no decryption key found"):
        Person(p.db_id, stranger.db_id, node=b).salary.get()

    # The chief lives on b; a worker created on a authorizes it, and the chief reads
    # the salary on b.
    chief = Person([], node=b)
    wait_until(lambda: a.exists(chief.db_id))
    worker = Person([chief.db_id], node=a)
    worker.name.set("Bob")
    worker.salary.set("44321")
    wait_until(lambda: value(b, worker.db_id, "salary", chief.db_id) == "44321")
    assert value(b, worker.db_id, "salary", "") == "<sealed>"

    # The chief updates the worker from b; a accepts it.
    as_chief = Person(worker.db_id, chief.db_id, node=b)
    as_chief.name.set("Robert")
    as_chief.salary.set("99999")
    wait_until(lambda: worker.salary.get() == "99999")
    assert worker.name.get() == "Robert"

    # An intruder on b is refused locally; nothing is stored or sent.
    intruder = Person([], node=b)
    log_b = b.log_length()
    with pytest.raises(UnauthorizedError):
        Person(worker.db_id, intruder.db_id, node=b).name.set("hacked")
    assert b.log_length() == log_b


def test_unauthorized_write_from_a_lax_peer_is_rejected_by_the_others(net) -> None:
    a = net("a")
    b = net("b", peers=[a])
    linked(a, b)
    worker = Person.create(name="Bob", salary="44321", node=a)
    wait_until(lambda: value(b, worker.db_id, "name") == "Bob")

    # A peer that defers unauthorized updates to listeners accepts its own caller's
    # write and publishes it; a and b (default policy: reject) hold it back.
    lax = net("lax", peers=[b], policy="listeners")
    linked(a, b, lax)
    wait_until(lambda: lax.exists(worker.db_id))
    attacker = Person([], node=lax)
    Person(worker.db_id, attacker.db_id, node=lax).name.set("hacked")
    assert value(lax, worker.db_id, "name") == "hacked"
    wait_until(lambda: a.stats.rejected["UnauthorizedError"] == 1
               and b.stats.rejected["UnauthorizedError"] == 1)
    assert value(a, worker.db_id, "name") == value(b, worker.db_id, "name") == "Bob"
    held = a.history(worker.db_id, include_rejected=True)
    assert [h.verdict for h in held].count("unauthorized") == 1
    # Held, not relayed: all three store the same updates, with different verdicts.
    wait_until(lambda: state(a)[1] == state(b)[1] == state(lax)[1])


# ------------------------------------------------------------------ relay


@pytest.fixture
def chain(net):
    """Three nodes in a line, a - b - c: a and c never connect to each other.

    The bus gossips peers, so by default any two nodes of a mesh end up connected
    directly. ``max_peers=1`` on a and c stops them from opening a second link: c
    keeps only its configured peer b, and a only the link back to b (b is not
    limited). Periodic catch-up is off (NO_CATCH_UP): the one pass each node makes when
    a peer connects runs before anything is written.
    """
    a = net("a", max_peers=1, sync_interval=NO_CATCH_UP)
    b = net("b", peers=[a], sync_interval=NO_CATCH_UP)
    c = net("c", peers=[b], max_peers=1, sync_interval=NO_CATCH_UP)
    linked(b, n=2)
    linked(a, c, n=1)
    return a, b, c


def test_partial_mesh_relays_through_the_middle_node(chain) -> None:
    a, b, c = chain

    def through_b(node: dmodel.Node, db_id: str, want: str) -> bool:
        # b relays live; a publish lost under load (slow joiner, full pipe) is pulled by
        # a catch-up pass here, since the fixture turns the periodic ones off.
        if value(node, db_id, "name") == want:
            return True
        b.network.sync_now()
        node.network.sync_now()
        return False

    p = Person.create(name="Bob", salary="1", node=a)
    p.name = "Bobby"
    wait_until(lambda: through_b(c, p.db_id, "Bobby"))
    q = Person.create(name="Carol", node=c)
    wait_until(lambda: through_b(a, q.db_id, "Carol"))

    assert peer_ids(a) == {b.node_id} and peer_ids(c) == {b.node_id}  # never a direct link
    wait_until(lambda: b.stats.remote == 3)  # every update went through b
    got = c.network.stats
    assert got["received"] + got["pulled"] >= 2  # a's two updates, from b (the only link)
    wait_until(lambda: converged(a, b, c))


def test_update_of_an_undeclared_model_is_stored_and_relayed(chain) -> None:
    a, b, c = chain
    assert model_class("NeverDeclared") is None  # no class for it, in any node
    db_id = a.create("NeverDeclared")
    a.write(db_id, [Op(db_id, "set", "x", 1)])
    wait_until(lambda: value(c, db_id, "x") == 1)
    assert value(b, db_id, "x") == 1
    assert c.object_ids("NeverDeclared") == [db_id]
    for node in (b, c):  # nothing refused; relayed copies coming back are duplicates
        assert set(node.stats.dropped) <= {"ReplayedUpdate"}


# ------------------------------------------------------------------ catch-up


def test_late_joiner_catches_up_with_what_was_created_before(net) -> None:
    a = net("a")
    b = net("b", peers=[a])
    linked(a, b)
    early = [Person.create(name=f"a{i}", salary=str(i), node=a) for i in range(5)]
    early += [Person.create(name=f"b{i}", node=b) for i in range(5)]
    early[0].name = "renamed"
    wait_until(lambda: converged(a, b))

    # No periodic catch-up on the joiner: the pass that runs when a peer connects
    # (here: b, then a by gossip) is what brings the history.
    c = net("c", peers=[b], sync_interval=NO_CATCH_UP)
    wait_until(lambda: converged(a, b, c))
    # It came by catch-up: nothing was published after c joined. (A wait: the counter
    # moves just after the batch it counts is committed and visible.)
    wait_until(lambda: c.network.stats["pulled"] >= 11)
    assert value(c, early[0].db_id, "name") == "renamed"
    late = Person.create(name="late", node=c)
    wait_until(lambda: value(a, late.db_id, "name") == "late")


def _cursor(node: dmodel.Node, peer: dmodel.Node) -> tuple[bytes, int]:
    """Where ``node``'s catch-up from ``peer`` stands: (peer's epoch, log position)."""
    return node.network._cursor(peer.node_id)


def test_restarted_node_catches_up_from_its_cursor(net) -> None:
    # a declares a silent peer dead after 1 s instead of 5 (the default), so that it
    # soon dials the restarted b at its new endpoint.
    a = net("a", peer_timeout=1.0, ping_interval=0.25)
    b = net("b", peers=[a])
    linked(a, b)
    p = Person.create(name="v0", node=a)
    wait_until(lambda: _cursor(b, a) == (a.network.epoch, a.log_length()))
    node_id, epoch, saved = b.node_id, b.network.epoch, _cursor(b, a)
    b.shutdown()

    p.name = "v1"
    p.name = "v2"
    q = Person.create(name="while away", node=a)
    missed = a.log_length() - saved[1]

    # Same home, new port, no configured peers: a cannot reach it, so the cursor read
    # here is what the store kept, not a new catch-up pass. No periodic catch-up either:
    # the pass that runs when a becomes its peer is what brings the missed updates.
    b = net("b", sync_interval=NO_CATCH_UP, ping_interval=0.25)
    assert (b.node_id, b.network.epoch) == (node_id, epoch)
    assert _cursor(b, a) == saved
    assert value(b, p.db_id, "name") == "v0"
    b.network.connect(a.network.endpoint)
    wait_until(lambda: converged(a, b))
    assert value(b, p.db_id, "name") == "v2" and value(b, q.db_id, "name") == "while away"
    wait_until(lambda: b.network.stats["pulled"] == missed)

    # And a reaches b again at its new endpoint, although the restarted b says hello to
    # a's ROUTER every 0.25 s, well within a's peer_timeout: that must not keep a's link
    # to the old endpoint "alive", or a never dials the new one.
    r = Person.create(name="back", node=b)
    wait_until(lambda: value(a, r.db_id, "name") == "back")
    assert a.network.peers()[b.node_id.hex()].endpoint == b.network.endpoint


def test_partition_heals_to_the_same_registers(net) -> None:
    a = net("a")
    b = net("b")  # no peers: the two sides cannot talk
    # Before the partition both sides knew a shared document and its editor.
    editor = Person([], node=b)
    ship(b, a)
    doc = Person.create(name="draft", salary="1", authorized=[editor.db_id], node=a)
    ship(a, b)

    doc.name = "from a"
    doc.salary = "2"
    Person(doc.db_id, editor.db_id, node=b).name.set("from b")
    only_a = Person.create(name="only a", node=a)
    only_b = Person.create(name="only b", node=b)
    assert value(a, doc.db_id, "name") == "from a" and value(b, doc.db_id, "name") == "from b"
    assert not a.exists(only_b.db_id) and not b.exists(only_a.db_id)

    a.network.connect(b.network.endpoint)  # the partition heals
    wait_until(lambda: converged(a, b))
    assert value(a, doc.db_id, "name") in ("from a", "from b")
    assert value(b, doc.db_id, "salary", editor.db_id) == "2"
    assert value(b, only_a.db_id, "name") == "only a"
    assert value(a, only_b.db_id, "name") == "only b"


def test_burst_over_small_hwms_converges_by_catch_up(net, make_node) -> None:
    small = {"rcvhwm": 100, "sndhwm": 100, "queue_size": 8}
    a = net("a", **small)
    b = net("b", peers=[a], **small)
    linked(a, b)
    # 1500 signed updates made offline, handed to a at once: a stores them in one batch
    # and publishes them back to back, far past the HWMs and b's apply queue.
    src = make_node("src", retention="all")  # hands over every version, not the live ones
    people = [Person.create(name="p", node=src) for _ in range(10)]
    for i in range(1500):
        people[i % 10].name = f"v{i}"
    a.ingest_many(src.updates_since(0))
    assert a.log_length() == 1510

    # Updates may be lost on the way (at a's publish pipe, at the HWMs or at b's full
    # queue); whatever was lost, catch-up fills in. Losses are likely but not required.
    wait_until(lambda: converged(a, b), timeout=30)
    assert value(b, people[9].db_id, "name") == "v1499"


# ------------------------------------------------------------------ hostile wire


def test_garbage_frames_do_not_stop_valid_updates(net, make_node) -> None:
    a = net("a")
    b = net("b", peers=[a])
    linked(a, b)
    src = make_node("src")
    genuine = Person.create(name="genuine", node=src)
    create_raw = src.updates_since(0)[0]
    forged = bytes([create_raw[0] ^ 1]) + create_raw[1:]  # a flipped signature bit

    ctx = zmq.Context()
    try:
        stranger = ctx.socket(zmq.DEALER)  # never proves a node key: nothing it pushes counts
        stranger.linger = 0
        stranger.connect(a.network.endpoint)
        stranger.send_multipart([b"U", create_raw])
        dealer = proven_dealer(ctx, a.network.endpoint)  # did the handshake: pushes count
        bad_updates = [b"", b"\x00" * 80, os.urandom(300), create_raw[:-5],
                       msgpack.packb({"v": 1}), forged]
        for payload in bad_updates:
            dealer.send_multipart([b"U", payload])  # PUSH: lands in a's apply queue
        for frames in ([b"Z", b"junk"], [b"H", b"not a hello"], [b"Q", b"short", b"x"], [b"U"]):
            dealer.send_multipart(frames)  # bad bus frames: dropped by the bus
        wait_until(lambda: sum(v for k, v in a.stats.dropped.items()
                               if k != "ReplayedUpdate") >= len(bad_updates))

        # Valid traffic still flows, from the peer and even through the same socket.
        p = Person.create(name="after the garbage", node=b)
        wait_until(lambda: value(a, p.db_id, "name") == "after the garbage")
        dealer.send_multipart([b"U", create_raw])
        wait_until(lambda: value(a, genuine.db_id, "name") == "genuine")
    finally:
        ctx.destroy(linger=0)

    assert a.stats.dropped["ForgedUpdate"] == 1
    assert a.stats.dropped["MalformedUpdate"] >= 4
    stats = a.network.stats
    assert stats["invalid_updates"] == len(bad_updates)  # counted toward the sender's ban
    assert stats["guard"]["invalid_update"] == len(bad_updates)
    assert stats["guard"]["unproven"] >= 1 and stats["guard"]["bans"] == 0
    bus = a.network.bus.stats
    assert bus["dropped"].get("unknown", 0) + bus["dropped"].get("malformed", 0) >= 4
    assert not bus["banned"]  # well under the flood threshold
    wait_until(lambda: converged(a, b))  # a relayed the genuine update it got that way


# ------------------------------------------------------------------ CURVE


@pytest.mark.parametrize("secure", [True, False], ids=["curve", "plain"])
def test_nodes_with_the_same_transport_settings_converge(net, secure) -> None:
    cluster = CurveConfig.generate() if secure else None
    a = net("a", curve=cluster)
    b = net("b", peers=[a], curve=cluster)
    linked(a, b)
    p = Person.create(name="Bob", salary="1", node=a)
    q = Person.create(name="Alice", node=b)
    wait_until(lambda: value(b, p.db_id, "name") == "Bob" and value(a, q.db_id, "name") == "Alice")
    wait_until(lambda: converged(a, b))


def test_curve_outsiders_get_nothing(net) -> None:
    cluster = CurveConfig.generate()
    a = net("a", curve=cluster)
    b = net("b", peers=[a], curve=cluster)
    plain = net("plain", peers=[a, b])
    wrong = net("wrong", peers=[a, b], curve=CurveConfig.generate())
    linked(a, b)
    p = Person.create(name="Bob", node=a)
    wait_until(lambda: value(b, p.db_id, "name") == "Bob")

    # The outsiders keep trying to connect (hellos every 10 ms, backing off to 0.5 s);
    # within a second and a half none of them gets a handshake through.
    assert not plain.network.wait_for_peers(1, timeout=1.5)
    assert not wrong.network.wait_for_peers(1, timeout=0.1)
    assert plain.network.sync_now() == 0 and wrong.network.sync_now() == 0
    for outsider in (plain, wrong):
        assert outsider.log_length() == 0 and not outsider.exists(p.db_id)
        assert not peer_ids(outsider)
    assert peer_ids(a) == {b.node_id} and peer_ids(b) == {a.node_id}


def test_catch_up_of_more_than_one_message_worth_of_updates(make_node) -> None:
    """Replies are cut to the bus's message size limit; the asker asks for the rest."""

    class Blob(dmodel.DModel):
        data = dmodel.DField()

    a = make_node("a", listen="tcp://127.0.0.1:*", network_options={"sync_interval": 60},
                  retention="all")  # every version is served, not only the live ones
    blob = Blob([], node=a)
    for i in range(15):  # ~1.8 MB in all, over the 1 MiB message limit
        blob.data.set(bytes([i]) * 120_000)
    b = make_node("b", listen="tcp://127.0.0.1:*", peers=[a.network.endpoint],
                  network_options={"sync_interval": 60})
    assert b.network.wait_for_peers(1, timeout=10)
    b.network.sync_now()
    assert b.log_length() == a.log_length()
    assert Blob(blob.db_id, node=b).data.get() == bytes([14]) * 120_000


# ------------------------------------------------------------------ identity, CURVE


def test_cluster_init_and_join_turn_curve_on(net, tmp_path) -> None:
    from click.testing import CliRunner

    from dmodel.cli import cli

    runner = CliRunner()
    key = tmp_path / "cluster.key"
    assert runner.invoke(cli, ["cluster", "init", str(key)]).exit_code == 0
    assert key.stat().st_mode & 0o777 == 0o600
    assert runner.invoke(cli, ["cluster", "init", str(key)]).exit_code != 0  # no overwrite
    for name in ("a", "b"):
        result = runner.invoke(cli, ["cluster", "join", str(key), "--home",
                                     str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert (tmp_path / name / "cluster.key").stat().st_mode & 0o777 == 0o600
    a = net("a")
    b = net("b", peers=[a])
    linked(a, b)
    assert a.network.bus._actor.s.curve is not None  # no curve= option: the home's key
    p = Person.create(name="over CURVE", node=a)
    wait_until(lambda: value(b, p.db_id, "name") == "over CURVE")
    outsider = net("outsider", peers=[a])  # no cluster key: gets nothing
    assert not outsider.network.wait_for_peers(1, timeout=1.0)


def test_a_node_keeps_its_node_key_and_proves_it(net, tmp_path) -> None:
    a = net("a")
    key = (tmp_path / "a" / "node.key").read_bytes()
    assert (tmp_path / "a" / "node.key").stat().st_mode & 0o777 == 0o600
    b = net("b", peers=[a])
    linked(a, b)
    assert a.network.stats["guard"]["proofs_ok"] >= 1
    assert b.network.stats["guard"]["proofs_ok"] >= 1
    a.shutdown()
    a = net("a", peers=[b])
    assert (tmp_path / "a" / "node.key").read_bytes() == key
    linked(a, b)  # the same key again for the same node id: no identity conflict
    assert b.network.stats["guard"].get("identity_conflict", 0) == 0
