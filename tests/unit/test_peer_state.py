"""Peer and gossip state: whom to dial, backoff, usable peers, relay choice (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dmodel.net.frames import MAX_GOSSIP
from dmodel.net.peers import (
    FIRST_BACKOFF,
    GOSSIP_LINK_GIVE_UP,
    Link,
    Peer,
    PeerInfo,
    PeerTable,
    mesh_of,
    relay_targets,
)

ME, A, B, C = (bytes([i]) * 16 for i in range(4))
EP_A, EP_B = "tcp://10.0.0.1:5000", "tcp://10.0.0.2:5000"


def connected(table: PeerTable, node_id: bytes, endpoint: str) -> Peer:
    peer = table.peers[node_id] = Peer(node_id)
    peer.endpoint = endpoint
    peer.link = table.links[endpoint] = Link(endpoint, None, node_id, False, 0.0)
    peer.link.node_id = node_id
    table.endpoint_owner[endpoint] = node_id
    table.set_state(peer, connected=True, ready=True)
    return peer


def test_should_dial_a_stranger_once() -> None:
    table = PeerTable(ME, max_peers=8)
    assert table.should_dial(A, EP_A)
    assert not table.should_dial(ME, EP_A)  # ourselves
    assert not table.should_dial(A, "")
    table.links[EP_A] = Link(EP_A, None, A, False, 0.0)
    assert not table.should_dial(A, EP_A)  # already dialling that endpoint


def test_no_dial_to_known_aliases_and_connected_peers() -> None:
    table = PeerTable(ME, max_peers=8)
    table.self_endpoints.add(EP_B)
    assert not table.should_dial(B, EP_B) and table.is_alias(EP_B)
    connected(table, A, EP_A)
    assert not table.should_dial(A, "tcp://10.9.9.9:1")  # A is connected elsewhere
    del table.links[EP_A]
    assert table.is_alias(EP_A)  # its endpoint belongs to a connected peer
    assert not table.should_dial(C, EP_A)


def test_dial_limits() -> None:
    table = PeerTable(ME, max_peers=2)
    table.links["tcp://h:1"] = Link("tcp://h:1", None, A, False, 0.0)
    table.links["tcp://h:2"] = Link("tcp://h:2", None, A, False, 0.0)
    assert not table.should_dial(B, "tcp://h:3")  # max_peers links
    table.max_peers = 8
    assert table.should_dial(B, "tcp://h:3")
    assert not table.should_dial(A, "tcp://h:3")  # already two tries for A


def test_set_state_reports_usable_changes_only() -> None:
    peer = Peer(A)
    assert PeerTable.set_state(peer, connected=True) is None
    assert PeerTable.set_state(peer, ready=True) is True
    assert PeerTable.set_state(peer, ready=True) is None
    assert PeerTable.set_state(peer, connected=False) is False


def test_hello_backoff_then_keepalive() -> None:
    link = Link(EP_A, None, None, True, now=0.0)
    delays = []
    for _ in range(12):
        before = link.backoff
        link.hello_sent(0.0, peer_ready=False, ping_interval=1.0, hello_interval=0.5)
        delays.append(link.next_hello)
        assert link.next_hello == before
    assert delays[0] == FIRST_BACKOFF and max(delays) == 0.5
    link.welcomed = True
    link.hello_sent(10.0, peer_ready=True, ping_interval=1.0, hello_interval=0.5)
    assert link.next_hello == 11.0
    link.renew(object(), 20.0)
    assert not link.welcomed and link.backoff == FIRST_BACKOFF and link.next_hello == 20.0


def test_gossiped_links_are_given_up_explicit_ones_not() -> None:
    gossiped = Link(EP_A, None, A, False, now=0.0)
    explicit = Link(EP_B, None, None, True, now=0.0)
    late = GOSSIP_LINK_GIVE_UP + 1
    assert gossiped.given_up(late) and not explicit.given_up(late)
    assert not gossiped.given_up(1.0)
    # Blame goes to the endpoint until a node id is proven, never to a gossiped id.
    assert gossiped.source == EP_A and explicit.source == EP_B
    gossiped.node_id = A
    assert gossiped.source == A


def test_gossip_lists_connected_peers_with_gossipable_endpoints() -> None:
    table = PeerTable(ME, max_peers=500)
    connected(table, A, EP_A)
    connected(table, B, "inproc://b")
    peer_c = Peer(C)
    peer_c.endpoint = "tcp://10.0.0.3:1"
    table.peers[C] = peer_c  # known, not connected
    assert table.gossip() == ((A, EP_A),)
    for i in range(MAX_GOSSIP + 10):
        connected(table, i.to_bytes(16, "big"), f"tcp://h:{i + 1}")
    assert len(table.gossip()) == MAX_GOSSIP


def test_snapshot_and_push_targets() -> None:
    table = PeerTable(ME, max_peers=8)
    peer = connected(table, A, EP_A)
    peer.last_seen = 90.0
    peer.neighbours = frozenset({B})
    info = table.snapshot(mono=100.0, wall=1000.0)[A]
    assert info == PeerInfo(A, EP_A, "", 990.0, True, True, frozenset({B}))
    assert table.push_targets() == [peer]
    assert mesh_of({A: info}) == {A: frozenset({B})}


def test_relay_targets() -> None:
    mesh = {A: frozenset({C}), B: frozenset()}
    assert relay_targets(mesh, C) == [B]  # A hears C directly
    assert relay_targets(mesh, A) == [B]  # never back to the origin
    assert relay_targets({}, A) == []


@given(st.dictionaries(st.sampled_from([A, B, C]), st.frozensets(st.sampled_from([A, B, C]))),
       st.sampled_from([A, B, C]))
def test_relay_targets_are_exactly_who_may_not_hear_the_origin(mesh, origin) -> None:
    targets = set(relay_targets(mesh, origin))
    for peer, neighbours in mesh.items():
        assert (peer in targets) == (peer != origin and origin not in neighbours)


def test_dial_policy_modes_and_caps() -> None:
    import pytest

    from dmodel.errors import ConfigurationError
    from dmodel.net.peers import DialPolicy

    learned = DialPolicy("learned", per_address=2, total=3, window=10.0)
    assert not learned.permitted("ipc:///tmp/x") and not learned.permitted("inproc://x")
    assert learned.permitted(EP_A)
    assert learned.attempt(EP_A, 0.0, False) and learned.attempt(EP_A, 1.0, False)
    assert not learned.attempt(EP_A, 2.0, False)  # per address
    assert learned.attempt(EP_A, 2.0, True)  # configured peers are never refused
    assert learned.attempt(EP_B, 2.0, False)
    assert not learned.attempt("tcp://10.0.0.3:1", 2.0, False)  # in total
    assert learned.attempt(EP_A, 20.0, False)  # the window moved on
    assert learned.refused == {"per_address": 1, "total": 1}

    static = DialPolicy("static")
    assert not static.permitted(EP_A) and static.attempt(EP_A, 0.0, True)
    nets = DialPolicy(["10.0.0.0/24"])
    assert nets.permitted(EP_A) and not nets.permitted("tcp://192.168.1.1:1")
    assert not nets.permitted("tcp://example.org:1")  # no DNS for learned names
    with pytest.raises(ConfigurationError):
        DialPolicy("everything")


def test_sessions_are_bounded_and_proven_apart() -> None:
    from dmodel.net.peers import SessionTable

    table = SessionTable(limit=2, idle=10.0)
    s1, _s2, _s3 = (table.open(bytes([i]) * 20, 0.0) for i in range(3))
    assert table.get(s1.ident) is None and len(table) == 2  # the oldest went
    s4 = table.open(b"\x04" * 20, 1.0)
    assert s4.source.startswith("conn:")
    table.prove(s4, A, b"k" * 32)
    assert table.get(s4.ident) is s4 and s4.source == A and table.has_node(A)
    table.expire(20.0)
    assert len(table) == 0
