"""Peer and gossip state: which peers we know, link to, and who hears whom (pure).

No sockets and no threads. A :class:`Link` holds the DEALER the actor made for it as
an opaque handle; everything else is bookkeeping and decisions the bus I/O thread
(:mod:`dmodel.net.actor`) acts on. :func:`relay_targets` is read by the replication
side (any thread) from a mesh map it replaces whole.

Handshake and gossip. A DEALER sends HELLO until WELCOME comes back, with a backoff
from 10 ms up to ``hello_interval``; after WELCOME, HELLO continues every
``ping_interval`` as keepalive. Both carry the sender's connected peers, and the
ROUTER side dials back whoever says HELLO, so knowing one member is enough to join a
mesh. Connections are deduplicated by node id; an endpoint that turns out to be our
own is remembered and skipped; a gossiped endpoint that never answers is given up.
Node ids count only once proven (the WELCOME signed our link's nonce, see
:mod:`dmodel.net.identity`); until then a link is blamed by the endpoint we dialled.

Dialing policy (:class:`DialPolicy`). Endpoints we learn (HELLO, WELCOME, gossip,
beacons) pass :func:`~dmodel.net.frames.gossip_endpoint_ok` first, then the ``dial``
option: ``"learned"`` (default: any of them), ``"static"`` (only the configured peers
and ``connect()``), or networks (``["10.0.0.0/8"]``: only IP literals inside them).
New sockets to one host are capped per minute (``dial_per_address``), and
to learned endpoints in total (``dial_total``); configured peers are never refused.
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dmodel.errors import ConfigurationError
from dmodel.net.frames import MAX_GOSSIP, gossip_endpoint_ok, split_host
from dmodel.net.identity import HANDSHAKE_NONCE_SIZE

FIRST_BACKOFF = 0.01
GOSSIP_LINK_GIVE_UP = 60.0


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the bus knows about one peer it connects to.

    ``last_seen`` is wall-clock time (``time.time()``) of the last frame from the
    peer on our own link to it (WELCOME, REPLY, its PUB), or None. ``connected``:
    the hello handshake completed and the peer has not been silent for
    ``peer_timeout``. ``ready``: also, our SUB is known to receive its publishes.
    """

    node_id: bytes
    endpoint: str
    pub_endpoint: str
    last_seen: float | None
    connected: bool
    ready: bool
    neighbours: frozenset[bytes] = frozenset()
    """Node ids of the peers it said (in its last WELCOME) it is connected to."""


class Link:
    """One DEALER we connected to a ROUTER endpoint (``sock`` is the actor's)."""

    __slots__ = ("endpoint", "sock", "expected", "node_id", "explicit", "created",
                 "next_hello", "backoff", "welcomed", "sock_since", "nonce", "key",
                 "welcome_proof", "proof", "warned", "reached")

    def __init__(self, endpoint: str, sock: Any, expected: bytes | None, explicit: bool,
                 now: float) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.sock_since = now
        self.expected = expected
        self.node_id: bytes | None = None
        self.explicit = explicit
        self.created = now
        self.next_hello = now
        self.backoff = FIRST_BACKOFF
        self.welcomed = False
        self.reached = False  # welcomed us once (a peer that went away later was there)
        self.warned = False
        self.new_nonce()

    def new_nonce(self) -> None:
        """A fresh handshake: a new nonce for the peer to sign, nothing proven yet."""
        self.nonce = os.urandom(HANDSHAKE_NONCE_SIZE)
        self.key: bytes | None = None  # the peer's proven node key
        self.welcome_proof = b""  # the WELCOME signature we checked
        self.proof = b""  # our signature over the peer's session nonce

    @property
    def source(self) -> bytes | str:
        """Whom to blame for a bad frame on this link: the proven node id, else the
        endpoint we dialled (never an id someone gossiped)."""
        return self.node_id or self.endpoint

    def restart(self, now: float) -> None:
        """Say HELLO again now and back off from the start."""
        self.backoff = FIRST_BACKOFF
        self.next_hello = now

    def renew(self, sock: Any, now: float) -> None:
        """A fresh socket replaced the old one: the handshake starts over."""
        self.sock = sock
        self.sock_since = now
        self.welcomed = False
        self.new_nonce()
        self.restart(now)

    def hello_sent(self, now: float, peer_ready: bool, ping_interval: float,
                   hello_interval: float) -> None:
        """Schedule the next HELLO: keepalive once ready, else exponential backoff."""
        if self.welcomed and peer_ready:
            self.next_hello = now + ping_interval
        else:
            self.next_hello = now + self.backoff
            self.backoff = min(self.backoff * 2, hello_interval)

    def unreached(self, now: float, after: float) -> bool:
        """Dialled more than ``after`` seconds ago and never welcomed us (a peer that
        welcomed us and went away is not: it was there, and is being tried again)."""
        return not self.reached and now - self.created > after

    def given_up(self, now: float) -> bool:
        """A gossiped endpoint that never welcomed us: stop trying."""
        return not self.explicit and not self.welcomed and now - self.created > GOSSIP_LINK_GIVE_UP


class Peer:
    """A peer we connect to, keyed by node id (``sub`` is the actor's SUB socket)."""

    __slots__ = ("node_id", "endpoint", "pub_endpoint", "link", "sub", "last_seen",
                 "connected", "ready", "stats", "sub_seen", "neighbours")

    def __init__(self, node_id: bytes) -> None:
        self.node_id = node_id
        self.endpoint = ""
        self.pub_endpoint = ""
        self.link: Link | None = None
        self.sub: Any = None
        self.last_seen: float | None = None
        self.connected = False
        self.ready = False
        self.stats: Counter[str] = Counter()
        self.sub_seen = 0.0
        self.neighbours: frozenset[bytes] = frozenset()

    @property
    def usable(self) -> bool:
        """Connected and ready: it hears us and we hear it."""
        return self.connected and self.ready


class PeerTable:
    """Links by endpoint, peers by node id, and what we learned about endpoints."""

    def __init__(self, own_id: bytes, max_peers: int) -> None:
        self.own_id = own_id
        self.max_peers = max_peers
        self.links: dict[str, Link] = {}
        self.peers: dict[bytes, Peer] = {}
        self.self_endpoints: set[str] = set()
        self.endpoint_owner: dict[str, bytes] = {}

    def peer_of(self, link: Link) -> Peer | None:
        return self.peers.get(link.node_id) if link.node_id else None

    def is_alias(self, endpoint: str) -> bool:
        """True if dialling ``endpoint`` would reach ourselves or a peer we talk to."""
        if endpoint in self.self_endpoints:
            return True
        owner = self.peers.get(self.endpoint_owner.get(endpoint, b""))
        return owner is not None and owner.connected

    def should_dial(self, node_id: bytes, endpoint: str) -> bool:
        """Someone said ``node_id`` listens at ``endpoint``: is it worth a new link?"""
        if not endpoint or node_id == self.own_id:
            return False
        if endpoint in self.links or self.is_alias(endpoint):
            return False
        peer = self.peers.get(node_id)
        if peer is not None and peer.connected:
            return False
        if len(self.links) >= self.max_peers:
            return False
        trying = sum(1 for link in self.links.values() if link.expected == node_id)
        return trying < 2

    def gossip(self) -> tuple[tuple[bytes, str], ...]:
        """The connected peers we tell others about (bounded)."""
        return tuple(
            (peer.node_id, peer.endpoint)
            for peer in self.peers.values()
            if peer.connected and gossip_endpoint_ok(peer.endpoint)
        )[:MAX_GOSSIP]

    @staticmethod
    def set_state(peer: Peer, *, connected: bool | None = None,
                  ready: bool | None = None) -> bool | None:
        """Update a peer's flags; the new ``usable`` if it changed, else None."""
        before = peer.usable
        if connected is not None:
            peer.connected = connected
        if ready is not None:
            peer.ready = ready
        after = peer.usable
        return after if after != before else None

    def push_targets(self) -> list[Peer]:
        """Peers a client-only node (no PUB) pushes its publishes to."""
        return [p for p in self.peers.values() if p.connected and p.link is not None]

    def snapshot(self, mono: float, wall: float) -> dict[bytes, PeerInfo]:
        """PeerInfo by node id, ``last_seen`` turned from monotonic into wall time."""
        return {
            nid: PeerInfo(
                node_id=nid,
                endpoint=p.endpoint,
                pub_endpoint=p.pub_endpoint,
                last_seen=None if p.last_seen is None else wall - (mono - p.last_seen),
                connected=p.connected,
                ready=p.usable,
                neighbours=p.neighbours,
            )
            for nid, p in self.peers.items()
        }

    def stats(self) -> dict[bytes, dict[str, int]]:
        return {nid: dict(p.stats) for nid, p in self.peers.items()}


def mesh_of(peers: Mapping[bytes, PeerInfo]) -> dict[bytes, frozenset[bytes]]:
    """Ready peer -> the peers it says it hears directly."""
    return {nid: info.neighbours for nid, info in peers.items() if info.ready}


def relay_targets(mesh: Mapping[bytes, frozenset[bytes]], origin: bytes) -> list[bytes]:
    """Peers that may not hear ``origin`` directly, so an update from it needs a relay."""
    return [peer for peer, neighbours in mesh.items()
            if peer != origin and origin not in neighbours]


class Session:
    """One connection to our ROUTER, named by its routing id (I/O thread only).

    ``node_id`` and ``key`` are set once its HELLO signed our ``nonce``; before that
    the connection may send nothing but HELLO.
    """

    __slots__ = ("ident", "nonce", "node_id", "key", "welcome", "seen")

    def __init__(self, ident: bytes, now: float) -> None:
        self.ident = ident
        self.nonce = os.urandom(HANDSHAKE_NONCE_SIZE)
        self.node_id: bytes | None = None
        self.key: bytes | None = None
        self.welcome: tuple[bytes, bytes] | None = None  # (their nonce, our signature)
        self.seen = now

    @property
    def source(self) -> bytes | str:
        """The proven node id, else the connection itself."""
        return self.node_id or "conn:" + self.ident.hex()


class SessionTable:
    """Sessions by routing id; at most ``limit`` unproven and ``limit`` proven ones
    (the oldest go first), forgotten after ``idle`` seconds without a frame."""

    def __init__(self, limit: int, idle: float) -> None:
        self.limit = limit
        self.idle = idle
        self.unproven: dict[bytes, Session] = {}
        self.proven: dict[bytes, Session] = {}

    def get(self, ident: bytes) -> Session | None:
        return self.proven.get(ident) or self.unproven.get(ident)

    def open(self, ident: bytes, now: float) -> Session:
        if len(self.unproven) >= self.limit:
            del self.unproven[next(iter(self.unproven))]
        session = self.unproven[ident] = Session(ident, now)
        return session

    def prove(self, session: Session, node_id: bytes, key: bytes) -> None:
        self.unproven.pop(session.ident, None)
        session.node_id, session.key = node_id, key
        if len(self.proven) >= self.limit:
            del self.proven[next(iter(self.proven))]
        self.proven[session.ident] = session

    def has_node(self, node_id: bytes) -> bool:
        return any(s.node_id == node_id for s in self.proven.values())

    def drop_node(self, node_id: bytes) -> None:
        for ident in [i for i, s in self.proven.items() if s.node_id == node_id]:
            del self.proven[ident]

    def expire(self, now: float) -> None:
        for table in (self.unproven, self.proven):
            for ident in [i for i, s in table.items() if now - s.seen > self.idle]:
                del table[ident]

    def __len__(self) -> int:
        return len(self.unproven) + len(self.proven)


DialOption = str | Sequence[str]
Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def parse_dial(option: DialOption) -> str | Networks:
    """``"learned"``, ``"static"``, or a tuple of ip_network objects."""
    if option in ("learned", "static"):
        return str(option)
    if isinstance(option, str) or not isinstance(option, Sequence) or not option:
        raise ConfigurationError(
            'dial must be "learned", "static" or a list of networks like ["10.0.0.0/8"]')
    try:
        return tuple(ipaddress.ip_network(net, strict=False) for net in option)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"bad network in dial: {exc}") from None


class DialPolicy:
    """Which learned endpoints we may dial, and how often (pure; time injected)."""

    def __init__(self, mode: DialOption = "learned", per_address: int = 4,
                 total: int = 64, window: float = 60.0) -> None:
        self.mode = parse_dial(mode)
        self.per_address = per_address
        self.total = total
        self.window = window
        self._by_host: dict[str, deque[float]] = {}
        self._learned: deque[float] = deque()
        self.refused: Counter[str] = Counter()

    def permitted(self, endpoint: str) -> bool:
        """The policy alone: may an endpoint learned from a peer be dialled at all?"""
        if not gossip_endpoint_ok(endpoint):
            return False
        if isinstance(self.mode, str):  # "learned" or "static"
            return self.mode == "learned"
        parts = split_host(endpoint)
        assert parts is not None  # gossip_endpoint_ok: tcp://host:port
        try:
            address = ipaddress.ip_address(parts[0].strip("[]"))
        except ValueError:
            return False  # no DNS for learned names under a network list
        return any(address in net for net in self.mode)

    def attempt(self, endpoint: str, now: float, explicit: bool) -> bool:
        """May we open a socket to ``endpoint`` now? Records the attempt if so."""
        if not explicit and not self.permitted(endpoint):
            self.refused["policy"] += 1
            return False
        parts = split_host(endpoint)
        host = parts[0] if parts else endpoint
        times = self._by_host.get(host)
        if times is None:
            if len(self._by_host) >= 4096:
                self._prune(now)
            times = self._by_host[host] = deque()
        while times and now - times[0] > self.window:
            times.popleft()
        while self._learned and now - self._learned[0] > self.window:
            self._learned.popleft()
        if not explicit:
            if len(times) >= self.per_address:
                self.refused["per_address"] += 1
                return False
            if len(self._learned) >= self.total:
                self.refused["total"] += 1
                return False
            self._learned.append(now)
        times.append(now)
        return True

    def _prune(self, now: float) -> None:
        for host in [h for h, t in self._by_host.items() if not t or now - t[-1] > self.window]:
            del self._by_host[host]
        while len(self._by_host) >= 4096:
            del self._by_host[next(iter(self._by_host))]
