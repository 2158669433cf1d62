"""The pending set where updates arrive: budgets per peer over the network, and no place
for a forgery whose key is known (real Redis, real ZeroMQ on 127.0.0.1)."""

from __future__ import annotations

import os
import time

import pytest
import zmq
from helpers import ship, wait_until
from hostile_net.attacker import proven_dealer

import dmodel
from dmodel.clock import pack
from dmodel.crypto import Identity
from dmodel.update import Op, Update

pytestmark = pytest.mark.timeout(60)


class Parked(dmodel.DModel):
    name = dmodel.DField("name", False)


def orphan() -> bytes:
    """A well-signed write by an object nobody has heard of: it waits for its caller,
    unverified (the key is in the create it waits for)."""
    identity = Identity.generate()
    db_id = f"Parked:{identity.oid}"
    return Update.create(identity, node=os.urandom(16), caller=db_id,
                         timestamp=pack(time.time_ns() // 1_000_000), prev=b"",
                         ops=[Op(db_id, "set", "name", "waiting")]).raw


def test_updates_pushed_by_one_peer_count_against_that_peer(make_node) -> None:
    victim = make_node("victim", listen="tcp://127.0.0.1:*",
                       network_options={"pending_source_size": 50})
    ctx = zmq.Context()
    try:
        dealer = proven_dealer(ctx, victim.network.endpoint)
        for _ in range(200):  # 200 callers, one peer
            dealer.send_multipart([b"U", orphan()])
        wait_until(lambda: victim.stats.dropped["PendingEvicted"] == 150, timeout=20)
    finally:
        ctx.destroy(linger=0)
    assert victim.pending_count == 50
    usage = victim.applier.pending.sources()
    assert list(usage.values()) == [(50, victim.applier.pending.size_bytes)]
    # Without a peer named (a tool calling ingest), each caller is its own source.
    for _ in range(60):
        victim.ingest(orphan())
    assert victim.pending_count == 110 and victim.stats.dropped["PendingEvicted"] == 150


def test_a_forgery_whose_key_is_known_is_dropped_instead_of_waiting(make_node) -> None:
    a, b = make_node("a"), make_node("b")
    p = Parked.create(name="v0", node=a)
    ship(a, b)  # b knows p's key
    since = a.log_length()
    p.name = "v1"
    p.name = "v2"
    first, second = a.updates_since(since)
    forged = second[:10] + bytes([second[10] ^ 1]) + second[11:]  # its signature only
    decision = b.ingest(forged)  # waits for `first`, but its signature is checked now
    assert decision.verdict == "dropped" and type(decision.error).__name__ == "ForgedUpdate"
    assert b.pending_count == 0 and b.stats.dropped["ForgedUpdate"] == 1
    assert b.ingest(second).verdict == "missing" and b.pending_count == 1
    assert b.ingest(first).applied
    assert b.pending_count == 0 and Parked(p.db_id, "", node=b).name.get() == "v2"


def test_pending_limits_given_when_the_network_starts_add_to_the_node_s(make_node) -> None:
    # `dmodel peer --network-options` hands its JSON to start_network, not to Node().
    node = make_node("n", start_network=False, network_options={"pending_bytes": 1 << 20})
    node.start_network(listen="tcp://127.0.0.1:*", pending_source_size=7)
    limits = node.applier.pending.limits
    assert (limits.bytes, limits.source_size, limits.size) == (1 << 20, 7, 10_000)
    parked = [orphan() for _ in range(10)]
    node.ingest_many(parked, ["one peer"] * 10)
    assert node.pending_count == 7 and node.stats.dropped["PendingEvicted"] == 3
