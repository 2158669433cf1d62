"""The mesh: links to peers, their SUBs, the hello handshake and gossip, on the I/O thread.

Runs on the **bus I/O thread** only (:mod:`dmodel.net.actor` owns it). The decisions
(whom to dial, backoff, who is usable) are in :mod:`~dmodel.net.peers`, the bans in
:mod:`~dmodel.net.flood`; this module opens and closes the DEALER and SUB sockets that
go with them and tells the actor, through callbacks, when a peer becomes usable or a
link goes away. Reading frames off those sockets stays with the actor.

Slow joiner. The PUB side is an XPUB with XPUB_VERBOSE, so it sees every
subscription. Besides ``b"M"``, each SUB subscribes to the topic
``b"A" + its own node id``; when the XPUB sees that subscription it publishes an
ACK on it, and the SUB side marks the peer *ready* when the ACK arrives. Because
the ACK travelled the very path later messages take, a ready peer receives
everything published after that. Every HELLO also triggers an ACK, which covers
reconnections. DEALERs use ZMQ_IMMEDIATE, so a HELLO to a peer that is down is not
queued, it is simply re-sent later.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq

from dmodel.errors import NetworkError
from dmodel.net import frames as fr
from dmodel.net.commands import Settings
from dmodel.net.curve import make_client
from dmodel.net.discovery import (
    Beacon,
    BeaconSender,
    DiscoveryConfig,
    MalformedBeacon,
    decode_beacon,
    open_beacon_socket,
    recv_beacons,
)
from dmodel.net.flood import FloodGuard
from dmodel.net.identity import KeyPins, NodeKey, proof_message, verify
from dmodel.net.peers import FIRST_BACKOFF, DialPolicy, Link, Peer, PeerTable, SessionTable

logger = logging.getLogger("dmodel.net.bus")

Handler = Callable[[], None]
_WARNED_MAX = 4096  # endpoints remembered as warned about (learned ones are capped too)


class SocketSet:
    """The actor's sockets, its poller, and what to call when each is readable."""

    def __init__(self, ctx: zmq.SyncContext, rcvhwm: int, sndhwm: int) -> None:
        self.ctx = ctx
        self.rcvhwm = rcvhwm
        self.sndhwm = sndhwm
        self.sockets: list[zmq.SyncSocket] = []
        self.poller = zmq.Poller()
        self.handlers: dict[Any, Handler] = {}

    def open(self, kind: int) -> zmq.SyncSocket:
        sock = self.ctx.socket(kind)
        self.sockets.append(sock)
        sock.linger = 0
        sock.rcvhwm = self.rcvhwm
        sock.sndhwm = self.sndhwm
        return sock

    def close(self, sock: zmq.SyncSocket | None) -> None:
        if sock is None:
            return
        self.handlers.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except KeyError:
            pass
        if sock in self.sockets:
            self.sockets.remove(sock)
        sock.close(linger=0)

    def watch(self, sock: Any, handler: Handler, key: Any = None) -> None:
        self.poller.register(sock, zmq.POLLIN)
        self.handlers[sock if key is None else key] = handler

    def close_all(self) -> None:
        for sock in self.sockets:
            try:
                sock.close(linger=0)
            except zmq.ZMQError:
                pass
        self.sockets.clear()


class Mesh:
    """Links, SUBs and the handshake of one bus (I/O thread only)."""

    def __init__(
        self,
        settings: Settings,
        sockets: SocketSet,
        counters: Counter[str],
        dropped: Counter[str],
        *,
        schedule: Callable[[float], None],
        on_usable: Callable[[Peer, bool], None],
        on_link_closed: Callable[[Link], None],
        read_dealer: Callable[[Link], Handler],
        read_sub: Callable[[Peer, zmq.SyncSocket], Handler],
    ) -> None:
        self.s = settings
        self.node_id = settings.node_id
        self.sockets = sockets
        self.counters = counters
        self.dropped = dropped
        self.schedule = schedule
        self.on_usable = on_usable
        self.on_link_closed = on_link_closed
        self.read_dealer = read_dealer
        self.read_sub = read_sub
        self.hard_limit = fr.hard_limit(settings.max_message_size)
        self.table = PeerTable(self.node_id, settings.max_peers)
        self.flood = FloodGuard(settings.flood_threshold, settings.flood_window,
                                settings.flood_ban)
        self.key: NodeKey = settings.node_key
        self.pins = KeyPins()
        self.sessions = SessionTable(4 * settings.max_peers, 10 * settings.peer_timeout)
        self.dial = DialPolicy(settings.dial, settings.dial_per_address, settings.dial_total)
        self.endpoint: str | None = None
        self.pub_endpoint: str | None = None
        self.discovery: DiscoveryConfig | None = None
        self.udp: Any = None
        self.beacons: BeaconSender | None = None
        self.next_beacon = 0.0
        self.warned_unreached: dict[str, None] = {}  # endpoints named in a warning

    def set_state(self, peer: Peer, *, connected: bool | None = None,
                   ready: bool | None = None) -> None:
        usable = self.table.set_state(peer, connected=connected, ready=ready)
        if usable is None:
            return
        self.on_usable(peer, usable)

    def bad(self, src: bytes | str | None, reason: str, peer: Peer | None = None) -> None:
        """Count a dropped frame, and ban its source if it floods."""
        self.dropped[reason] += 1
        if peer is not None:
            peer.stats["dropped"] += 1
        if src is None or src == "broker" or src == self.node_id:
            return
        now = time.monotonic()
        if self.flood.record(src, now):
            self._ban(src, now)

    def _ban(self, src: bytes | str, now: float) -> None:
        s = self.s
        logger.warning("banning %s for %.0fs: more than %d bad frames in %.0fs",
                       src.hex() if isinstance(src, bytes) else src, s.flood_ban,
                       s.flood_threshold, s.flood_window)
        self.counters["bans"] += 1
        self.schedule(now + s.flood_ban)
        peer = self.table.peers.get(src) if isinstance(src, bytes) else None
        if peer is not None:
            self.drop_peer(peer)
        if isinstance(src, bytes):
            self.sessions.drop_node(src)
        for link in list(self.table.links.values()):
            if src in (link.expected, link.node_id, link.endpoint):
                self.close_link(link)

    def drop_peer(self, peer: Peer) -> None:
        self.set_state(peer, connected=False, ready=False)
        if peer.link is not None:
            self.close_link(peer.link)
        self.sockets.close(peer.sub)
        peer.sub = None
        self.table.peers.pop(peer.node_id, None)

    def close_link(self, link: Link) -> None:
        if self.table.links.get(link.endpoint) is link:
            del self.table.links[link.endpoint]
        self.on_link_closed(link)
        self.sockets.close(link.sock)
        peer = self.table.peer_of(link)
        if peer is not None and peer.link is link:
            peer.link = None
            self.set_state(peer, connected=False)

    def open_link(self, endpoint: str, *, expected: bytes | None, explicit: bool,
                   now: float) -> Link | None:
        existing = self.table.links.get(endpoint)
        if existing is not None:
            existing.explicit = existing.explicit or explicit
            return existing
        if self.table.is_alias(endpoint):
            return None  # ourselves, or another name for a peer we already talk to
        if not self.dial.attempt(endpoint, now, explicit):
            self.counters["dials_refused"] += 1
            return None
        try:
            sock = self._dealer(endpoint, explicit)
        except zmq.ZMQError as exc:
            if explicit:
                raise NetworkError(f"cannot connect to {endpoint}: {exc}") from exc
            logger.debug("cannot connect to gossiped %s: %s", endpoint, exc)
            return None
        link = self.table.links[endpoint] = Link(endpoint, sock, expected, explicit, now)
        self.sockets.watch(sock, self.read_dealer(link))
        self.schedule(now)
        logger.debug("connecting to %s", endpoint)
        return link

    def _dealer(self, endpoint: str, explicit: bool = True) -> zmq.SyncSocket:
        sock = self.sockets.open(zmq.DEALER)
        sock.maxmsgsize = self.hard_limit
        sock.immediate = True
        if not explicit:  # a learned endpoint that refuses us is retried slowly
            sock.reconnect_ivl = 2000
            sock.reconnect_ivl_max = 60_000
        sock.routing_id = os.urandom(fr.ROUTING_ID_SIZE)  # names the connection only
        make_client(sock, self.s.curve)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            self.sockets.close(sock)
            raise
        return sock

    def renew_link_socket(self, link: Link, now: float) -> None:
        if not self.dial.attempt(link.endpoint, now, link.explicit):
            self.counters["dials_refused"] += 1
            link.sock_since = now  # ZeroMQ keeps reconnecting the old socket meanwhile
            return
        self.counters["relinks"] += 1
        self.sockets.close(link.sock)
        # connected once before: cannot fail
        link.renew(self._dealer(link.endpoint, link.explicit), now)
        self.sockets.watch(link.sock, self.read_dealer(link))

    def heard(self, node_id: bytes, endpoint: str, now: float) -> None:
        """Someone told us node_id listens at endpoint: connect unless known."""
        if self.flood.banned(node_id) or self.flood.banned(endpoint):
            return
        if not self.dial.permitted(endpoint):
            self.dial.refused["policy"] += 1
            return
        if self.table.should_dial(node_id, endpoint):
            self.open_link(endpoint, expected=node_id, explicit=False, now=now)

    def hello_body(self, nonce: bytes, proof: bytes, gossip: bool = True) -> bytes:
        return fr.encode_hello(fr.Hello(self.node_id, self.endpoint or "",
                                        self.pub_endpoint or "",
                                        self.table.gossip() if gossip else (),
                                        self.key.public, nonce, proof))

    def sign_proof(self, role: bytes, their_nonce: bytes) -> bytes:
        return self.key.sign(proof_message(role, self.node_id, self.key.public, their_nonce))

    def check_proof(self, role: bytes, hello: fr.Hello, our_nonce: bytes) -> bool:
        """``hello`` signed ``our_nonce`` with its key, and that key may speak for its id."""
        if not hello.proof or not verify(
                hello.key, proof_message(role, hello.node_id, hello.key, our_nonce),
                hello.proof):
            self.counters["proofs_failed"] += 1
            return False
        if not self.pins.accept(hello.node_id, hello.key):
            self.dropped["identity_conflict"] += 1
            return False
        self.counters["proofs_ok"] += 1
        return True

    def _send_hello(self, link: Link, now: float) -> None:
        try:
            link.sock.send_multipart(fr.hello_frames(self.hello_body(link.nonce, link.proof)),
                                     zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet (ZMQ_IMMEDIATE): try again later
        peer = self.table.peer_of(link)
        link.hello_sent(now, peer is not None and peer.ready, self.s.ping_interval,
                        self.s.hello_interval)

    def timers(self, now: float) -> float:
        """Hellos, reconnections, silent peers, bans, beacons; when to come back."""
        lifted, flood_next = self.flood.tick(now)
        for src in lifted:
            logger.info("ban on %r lifted", src)
        self.sessions.expire(now)
        return min(self.link_timers(now), self.peer_timers(now), flood_next,
                   self.beacon_timer(now))

    def link_timers(self, now: float) -> float:
        nxt = now + 3600.0
        timeout = self.s.peer_timeout
        for link in list(self.table.links.values()):
            if link.given_up(now):
                logger.debug("giving up on %s", link.endpoint)
                self.close_link(link)
                continue
            if not link.warned:
                if link.unreached(now, self.s.unreached_after):
                    link.warned = True
                    self.warn_unreached(link.endpoint, now - link.created)
                elif not link.welcomed:
                    nxt = min(nxt, link.created + self.s.unreached_after)
            if not link.welcomed and now - link.sock_since > timeout:
                # ZeroMQ does not reconnect after a protocol error (a failed CURVE
                # handshake, a frame over ZMQ_MAXMSGSIZE): start over with a new socket.
                self.renew_link_socket(link, now)
            if now >= link.next_hello:
                self._send_hello(link, now)
            nxt = min(nxt, link.next_hello)
            if not link.welcomed:
                nxt = min(nxt, link.sock_since + timeout)
        return nxt

    def peer_timers(self, now: float) -> float:
        nxt = now + 3600.0
        timeout = self.s.peer_timeout
        for peer in list(self.table.peers.values()):
            if not peer.connected or peer.last_seen is None:
                continue
            if now - peer.last_seen > timeout:
                logger.info("peer %s silent for %.1fs", peer.node_id.hex(), timeout)
                self.set_state(peer, connected=False, ready=False)
                if peer.link is not None:
                    self.renew_link_socket(peer.link, now)
                    nxt = now
                continue
            nxt = min(nxt, peer.last_seen + timeout)
            if peer.sub is None:
                continue
            # Every HELLO makes the peer publish an ACK to us, so a SUB that
            # hears nothing for peer_timeout is broken: resubscribe.
            if now - peer.sub_seen > timeout:
                logger.info("no traffic from %s's PUB; resubscribing", peer.node_id.hex())
                self.counters["resubscribes"] += 1
                self.sockets.close(peer.sub)
                peer.sub = None
                self.set_state(peer, ready=False)
                self.open_sub(peer, now)
                if peer.link is not None:
                    peer.link.restart(now)
                    nxt = now
            else:
                nxt = min(nxt, peer.sub_seen + timeout)
        return nxt

    def warn_unreached(self, endpoint: str, waited: float) -> None:
        """A WARNING naming ``endpoint``, once per endpoint (a link made again for it
        later stays quiet)."""
        if endpoint in self.warned_unreached:
            return
        if len(self.warned_unreached) >= _WARNED_MAX:
            del self.warned_unreached[next(iter(self.warned_unreached))]
        self.warned_unreached[endpoint] = None
        logger.warning("peer %s not reached within %.1f s: is a node running and listening "
                       "there, on an address this host can reach (not 127.0.0.1 of another "
                       "host)? is a firewall in the way? (it is connected as soon as it "
                       "answers; listed in node.network.stats['guard']['unreached'] "
                       "meanwhile)", endpoint, waited)

    def unreached(self, now: float) -> list[str]:
        """Endpoints dialled for longer than ``unreached_after`` that never welcomed us."""
        return sorted(link.endpoint for link in self.table.links.values()
                      if link.unreached(now, self.s.unreached_after))

    def welcomed(self, link: Link, hello: fr.Hello, now: float) -> None:
        node_id = hello.node_id
        table = self.table
        if hello.key != link.key or hello.proof != link.welcome_proof:
            if not self.check_proof(fr.WELCOME, hello, link.nonce):
                self.bad(link.source, "forged_hello", table.peer_of(link))
                return
            link.key, link.welcome_proof = hello.key, hello.proof
            link.proof = self.sign_proof(fr.HELLO, hello.nonce)
            self._send_hello(link, now)  # prove ourselves before any request goes out
        if node_id == self.node_id:
            logger.debug("%s is ourselves", link.endpoint)
            table.self_endpoints.add(link.endpoint)
            self.close_link(link)
            return
        if self.flood.banned(node_id):
            self.close_link(link)
            return
        if link.node_id is not None and link.node_id != node_id:
            # A different node now answers at this endpoint: forget the old one.
            old = table.peers.get(link.node_id)
            if old is not None and old.link is link:
                old.link = None
                self.drop_peer(old)
            link.node_id = None
        table.endpoint_owner[link.endpoint] = node_id
        peer = table.peers.get(node_id)
        if peer is None:
            peer = table.peers[node_id] = Peer(node_id)
        if peer.link is not None and peer.link is not link:
            if peer.connected:
                self.close_link(link)  # an alias of a peer we already talk to
                return
            self.close_link(peer.link)
        peer.link = link
        link.node_id = node_id
        link.welcomed = link.reached = True
        peer.endpoint = link.endpoint
        peer.last_seen = now

        pub = hello.pub_endpoint
        if pub and fr.is_wildcard(pub):
            dialed = fr.split_host(link.endpoint)
            pub = fr.with_host(pub, dialed[0]) if dialed else ""
        if pub and not self.pub_allowed(link, pub):
            self.dropped["endpoint_refused"] += 1
            pub = ""
        if pub != peer.pub_endpoint or peer.sub is None:
            self.sockets.close(peer.sub)
            peer.sub = None
            peer.pub_endpoint = pub
            self.set_state(peer, ready=False)
            if pub:
                self.open_sub(peer, now)
            else:
                self.set_state(peer, ready=True)
        was = peer.connected
        self.set_state(peer, connected=True)
        if not was:
            logger.info("connected to peer %s at %s", node_id.hex(), link.endpoint)
        if not peer.ready:
            link.restart(now + FIRST_BACKOFF)
            self.schedule(link.next_hello)
        peer.neighbours = frozenset(gid for gid, _ in hello.peers)
        self.dropped["endpoint_refused"] += hello.skipped
        for gid, gep in hello.peers:
            self.heard(gid, gep, now)

    def pub_allowed(self, link: Link, pub: str) -> bool:
        """A PUB endpoint from a WELCOME: tcp:// under the dialing policy, or whatever
        a configured non-tcp peer says (an ipc:// peer we were told to dial)."""
        if link.explicit and not link.endpoint.startswith("tcp://"):
            return True
        return fr.gossip_endpoint_ok(pub) and (link.explicit or self.dial.permitted(pub))

    def open_sub(self, peer: Peer, now: float) -> None:
        peer.sub_seen = now
        sub = self.sockets.open(zmq.SUB)
        sub.maxmsgsize = self.hard_limit
        make_client(sub, self.s.curve)
        try:
            sub.connect(peer.pub_endpoint)
        except zmq.ZMQError as exc:
            logger.warning("cannot subscribe to %s: %s", peer.pub_endpoint, exc)
            self.sockets.close(sub)
            return
        sub.subscribe(fr.MESSAGE)
        sub.subscribe(fr.ACK + self.node_id)
        peer.sub = sub
        self.sockets.watch(sub, self.read_sub(peer, sub))

    def hello_from(self, node_id: bytes, hello: fr.Hello, address: str | None,
                   now: float) -> None:
        """A HELLO reached our ROUTER (``address``: the sender's IP): dial back, and
        dial whom it knows."""
        # Frames on our ROUTER do not refresh peer.last_seen: a peer is alive when
        # *our* link to it answers. A peer that restarted at a new endpoint keeps
        # saying HELLO here; counting that would keep the dead link "connected"
        # forever and heard() would never dial the new endpoint.
        endpoint = hello.endpoint
        if endpoint and fr.is_wildcard(endpoint):
            endpoint = fr.with_host(endpoint, address) if address else ""
        if endpoint and not fr.gossip_endpoint_ok(endpoint):
            self.dropped["endpoint_refused"] += 1
            endpoint = ""
        if endpoint:
            self.heard(node_id, endpoint, now)
        self.dropped["endpoint_refused"] += hello.skipped
        for gid, gep in hello.peers:
            self.heard(gid, gep, now)

    # ---------------------------------------------------------------- discovery

    def open_discovery(self, config: DiscoveryConfig) -> None:
        """Bind the beacon socket and watch it; beacons go out if we listen on tcp://."""
        self.discovery = config
        try:
            self.udp = open_beacon_socket(config)
        except OSError as exc:
            raise NetworkError(f"cannot bind beacon port {config.port}: {exc}") from exc
        fd = self.udp.fileno()
        self.sockets.watch(fd, self._on_udp, key=fd)
        parts = fr.split_host(self.endpoint or "")
        if parts is not None:
            self.beacons = BeaconSender(self.udp, config, Beacon(
                self.node_id, int(parts[1]), config.cluster_tag))
        elif self.endpoint is not None:
            logger.warning("discovery: %s is not tcp://, not sending beacons", self.endpoint)

    def close_discovery(self) -> None:
        if self.udp is not None:
            self.udp.close()

    def beacon_timer(self, now: float) -> float:
        """Send a beacon when one is due; when the next one is."""
        if self.beacons is None:
            return now + 3600.0
        if now >= self.next_beacon:
            if not self.beacons.send():
                self.counters["beacons_failed"] += 1
            self.next_beacon = now + self.beacons.config.interval
        return self.next_beacon

    def _on_udp(self) -> None:
        d = self.discovery
        assert d is not None
        now = time.monotonic()
        for data, address in recv_beacons(self.udp):
            try:
                beacon = decode_beacon(data)
            except MalformedBeacon:
                self.dropped["beacon"] += 1
                continue
            if beacon.node_id == self.node_id:
                continue
            if beacon.cluster != d.cluster_tag:
                self.dropped["beacon_cluster"] += 1
                continue
            self.counters["beacons_in"] += 1
            # The endpoint is always on the datagram's source address: a beacon cannot
            # point us at a third host (a spoofed source is bounded by the dial caps).
            self.heard(beacon.node_id, fr.with_host(f"tcp://h:{beacon.port}", address), now)
