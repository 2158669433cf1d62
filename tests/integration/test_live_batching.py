"""The live receive path of a node: the bus I/O thread hands payloads over unparsed, the
apply thread takes them in batches coalesced over ``apply_window``, and with a backlog
the verify thread prepares (decodes, checks signatures of) the next batch while one is
applied. Batches are observed through ``node.network.stats`` (``apply_batches``,
``apply_batch_max``, ``prepared_ahead``), never through time.
"""

from __future__ import annotations

import os
import time

import pytest
import zmq
from helpers import wait_until
from hostile_net.attacker import proven_dealer

import dmodel
from dmodel.crypto import Identity
from dmodel.errors import ConfigurationError
from dmodel.net import frames as fr
from dmodel.net.bus import Bus
from dmodel.update import Op, Update, decode

pytestmark = pytest.mark.timeout(90)

LOOPBACK = "tcp://127.0.0.1:*"
WIDE = 1.0  # the largest window: updates written back to back surely fall in it


class Item(dmodel.DModel):
    n = dmodel.DField("n", False)


@pytest.fixture
def pair(make_node):
    """``pair(**B's network options)``: A and B (``peers=[A]``), connected."""

    def _pair(**options):
        a = make_node("a", listen=LOOPBACK, discovery=False,
                      network_options={"sync_interval": 0.2})
        b = make_node("b", listen=LOOPBACK, discovery=False, peers=[a.network.endpoint],
                      network_options={"sync_interval": 0.2, **options})
        for node in (a, b):
            assert node.network.wait_for_peers(1, timeout=10)
        return a, b

    return _pair


def settled(node: dmodel.Node, received: int) -> None:
    """Wait until ``node`` received ``received`` live messages and applied them all (a
    copy that catch-up brought first may still sit in its window)."""
    wait_until(lambda: node.network.stats["received"] >= received)
    assert node.network.wait_idle(10)


def has(node: dmodel.Node, db_id: str, value: object) -> bool:
    try:
        return node.read(db_id, "n") == value
    except dmodel.DModelError:
        return False


def test_updates_written_together_are_applied_as_one_batch(pair) -> None:
    a, b = pair(apply_window=WIDE)
    item = Item([], node=a)
    settled(b, 1)
    before = b.network.stats["apply_batches"]
    for i in range(5):
        item.n.set(i)
    settled(b, 6)
    assert has(b, item.db_id, 4)
    stats = b.network.stats
    assert stats["apply_batch_max"] >= 2
    assert stats["apply_batches"] - before < 5


def test_an_update_alone_is_applied_without_waiting_for_company(pair) -> None:
    a, b = pair(apply_window=WIDE)
    item = Item([], node=a)
    settled(b, 1)
    before = b.network.stats["apply_batches"]
    item.n.set("alone")
    settled(b, 2)
    assert has(b, item.db_id, "alone")
    assert b.network.stats["apply_batches"] - before == 1


def test_no_window_still_applies_everything(pair) -> None:
    a, b = pair(apply_window=0)
    item = Item([], node=a)
    for i in range(20):
        item.n.set(i)
    wait_until(lambda: has(b, item.db_id, 19))
    assert b.network.stats["apply_batches"] >= 1


@pytest.mark.parametrize("window", [-0.1, 1.5, "1", True])
def test_apply_window_is_checked(make_node, window) -> None:
    with pytest.raises(ConfigurationError):
        make_node("x", listen=LOOPBACK, discovery=False,
                  network_options={"apply_window": window})


def signed_history(sets: int) -> tuple[str, list[bytes]]:
    """A create and ``sets`` chained sets of one fresh object, timestamped now."""
    who = Identity.generate()
    db_id = f"Item:{who.oid}"
    node, ts = os.urandom(16), (time.time_ns() // 1_000_000) << 16
    head = Update.create(who, node=node, caller=db_id, timestamp=ts, prev=b"", ops=(
        Op(db_id, "create", "", {"sign": who.public.verify_key, "box": who.public.box_key,
                                 "read": [], "update": []}),))
    raws = [head.raw]
    for i in range(sets):
        head = Update.create(who, node=node, caller=db_id, timestamp=ts + i + 1,
                             prev=head.id, ops=(Op(db_id, "set", "n", i),))
        raws.append(head.raw)
    return db_id, raws


def forge(raw: bytes) -> bytes:
    return bytes([raw[0] ^ 1]) + raw[1:]  # one bit of the signature (raw = sig || body)


def test_a_backlog_goes_through_the_verify_thread_and_forgeries_are_still_dropped(
        make_node) -> None:
    b = make_node("b", listen=LOOPBACK, discovery=False, retention="all",  # keeps all 400
                  network_options={"sync_interval": 3600.0})
    db_id, raws = signed_history(400)  # more than two batches of 256
    forged = [forge(raws[k]) for k in (50, 300, 399)]  # twins of good ones (same ids)
    lone = forge(signed_history(1)[1][0])  # a forged create of an unknown object
    wire = [*raws[:100], forged[0], *raws[100:], forged[1], forged[2], lone]
    ctx = zmq.Context()
    sock = proven_dealer(ctx, b.network.endpoint)
    try:
        received = b.network.stats["received"]
        with b.applier.lock:  # the apply thread stalls: a backlog builds up
            for raw in wire:
                sock.send_multipart(fr.push_frames(raw))
            wait_until(lambda: b.network.stats["received"] - received == len(wire), 30)
        assert b.network.wait_idle(30)
    finally:
        sock.close(0)
        ctx.term()
    stats = b.network.stats
    assert b.read(db_id, "n") == 399
    assert set(b.store.log_range()) == {decode(r).id for r in raws}
    dropped = b.stats.dropped
    # The forged twin arriving before its good copy fails its own check; those after it
    # are replays of a stored id. Nothing forged is stored, and each one is counted.
    assert dropped["ForgedUpdate"] + dropped["ReplayedUpdate"] == 4
    assert dropped["ForgedUpdate"] >= 1  # the lone forged create at least
    assert stats["invalid_updates"] == dropped["ForgedUpdate"]
    if (os.cpu_count() or 1) > 1:
        assert stats["prepared_ahead"] >= 1
    assert stats["apply_batch_max"] > 100  # the backlog went in a few large batches


def test_the_io_thread_still_limits_updates_per_source(pair) -> None:
    a, b = pair(max_updates_per_s=5)
    item = Item([], node=a)
    for i in range(40):
        item.n.set(i)
    wait_until(lambda: b.network.stats["guard"].get("updates_limited", 0) > 0)
    wait_until(lambda: has(b, item.db_id, 39), 30)  # catch-up brings what was refused


def test_publish_many_delivers_every_payload_in_order() -> None:
    got: list[bytes] = []
    quiet = {"on_request": lambda payload, sender: None}
    with Bus(node_id=os.urandom(16), on_publish=lambda p, s: None, **quiet) as a, \
            Bus(node_id=os.urandom(16), peers=[a.endpoint],
                on_publish=lambda payload, sender: got.append(payload), **quiet) as b:
        assert a.wait_for_peers(1, 10) and b.wait_for_peers(1, 10)
        payloads = [f"m{i}".encode() for i in range(50)]
        a.publish_many(payloads[:1])
        a.publish_many(payloads[1:])
        a.publish_many([])
        wait_until(lambda: len(got) >= 50)
        assert got == payloads
        assert b.stats["messages_in"] == 50
        with pytest.raises(TypeError):
            a.publish_many(["text"])  # type: ignore[list-item]
