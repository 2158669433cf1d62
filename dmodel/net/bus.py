"""The message bus: one I/O thread that owns every ZeroMQ socket of a node.

The bus moves opaque bytes; it knows nothing about updates. Each node binds an
XPUB socket (publishes out) and a ROUTER socket (hello and requests in), and for
every peer it knows it connects one DEALER (to the peer's ROUTER) and one SUB (to
the peer's PUB). A peer is addressed by one endpoint, its ROUTER.

Wire format (all frames are bytes; ``id`` is a 16-byte node id)::

    DEALER -> ROUTER   (the ROUTER sees the DEALER's routing id first:
                        node id + 4 random bytes, one per connection)
      HELLO     [b"H", body]              body: msgpack map, see below
      REQUEST   [b"Q", req_id(8), payload]
      PUSH      [b"U", payload]           publish from a client-only node
    ROUTER -> DEALER
      WELCOME   [b"W", body]
      REPLY     [b"R", req_id(8), payload]
      NO_REPLY  [b"N", req_id(8)]         the handler returned None or failed
    XPUB -> SUB
      MESSAGE   [b"M", sender id, payload]
      ACK       [b"A" + subscriber id, sender id]

    body = {"v": 1, "id": node id, "ep": ROUTER endpoint or "",
            "pub": PUB endpoint or "", "peers": [[node id, endpoint], ...]}

Handshake and gossip. A DEALER sends HELLO until WELCOME comes back, with a
backoff from 10 ms up to ``hello_interval`` (DEALERs use ZMQ_IMMEDIATE, so a
HELLO to a peer that is down is not queued, it is simply re-sent later). After
WELCOME the SUB connects to the peer's PUB, and HELLO continues every
``ping_interval`` as keepalive. Both HELLO and WELCOME carry the sender's
connected peers, and the ROUTER side connects back to whoever says HELLO, so
knowing one member is enough to join a mesh. Connections are deduplicated by
node id; an endpoint that turns out to be our own is remembered and skipped.

Slow joiner. The PUB side is an XPUB with XPUB_VERBOSE, so it sees every
subscription. Besides ``b"M"``, each SUB subscribes to the topic
``b"A" + its own node id``; when the XPUB sees that subscription it publishes an
ACK on it, and the SUB side marks the peer *ready* when the ACK arrives. Because
the ACK travelled the very path later messages take, a ready peer receives
everything published after that. Every HELLO also triggers an ACK, which covers
reconnections. ``wait_for_peers`` counts peers that are connected and ready.

Limits. Payloads over ``max_message_size`` are dropped and counted
(``stats["dropped"]["oversize"]``). ZMQ_MAXMSGSIZE is set 64 KiB above that as a
hard memory bound: a bigger frame makes ZeroMQ drop the connection, which then
reconnects by itself (that message is lost and not counted). Malformed and
unknown frames are counted and dropped; a source that sends more than
``flood_threshold`` of them within ``flood_window`` seconds is banned for
``flood_ban`` seconds (its connections closed, its frames ignored).

Broker. With ``broker=(xsub, xpub)`` the bus also publishes into a
:class:`~dmodel.net.broker.Broker` and subscribes from it, so peers that cannot
reach each other still get each other's publishes. Requests never go through
the broker. A peer reachable both ways delivers its messages twice; the node
dedupes by update id.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from dmodel.errors import ConfigurationError, NetworkError
from dmodel.net.curve import ZAP_DOMAIN, CurveConfig
from dmodel.net.discovery import (
    Beacon,
    DiscoveryConfig,
    MalformedBeacon,
    decode_beacon,
    open_beacon_socket,
    recv_beacons,
    send_beacon,
)

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
NODE_ID_SIZE = 16

_HELLO = b"H"
_WELCOME = b"W"
_REQUEST = b"Q"
_REPLY = b"R"
_NO_REPLY = b"N"
_PUSH = b"U"
_MESSAGE = b"M"
_ACK = b"A"

_PIPE_PUBLISH = b"P"
_PIPE_WAKE = b"W"
_PIPE_ENDPOINT = "inproc://dmodel-bus-pipe"

_REQ_ID_SIZE = 8
_NONCE_SIZE = 4
_HARD_LIMIT_SLACK = 64 * 1024
_MAX_ENDPOINT_LEN = 256
_MAX_GOSSIP = 64
_BATCH = 256
_FIRST_BACKOFF = 0.01
_GOSSIP_LINK_GIVE_UP = 60.0
_WILDCARD_HOSTS = frozenset({"", "*", "0.0.0.0", "::", "[::]"})

PublishCallback = Callable[[bytes, bytes], None]
RequestCallback = Callable[[bytes, bytes], "bytes | None"]
PeerCallback = Callable[[bytes], None]


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


# --------------------------------------------------------------------------- helpers


def _check_node_id(node_id: object, what: str = "node_id") -> bytes:
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_SIZE:
        raise ConfigurationError(f"{what} must be {NODE_ID_SIZE} bytes")
    return node_id


def _check_endpoint(endpoint: object) -> str:
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise ConfigurationError(f"not a ZeroMQ endpoint: {endpoint!r}")
    if len(endpoint) > _MAX_ENDPOINT_LEN:
        raise ConfigurationError("endpoint too long")
    return endpoint


def _split_host(endpoint: str) -> tuple[str, str] | None:
    """(host, port) of a tcp:// endpoint, or None."""
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[6:].rpartition(":")
    if not sep:
        return None
    return host, port


def _with_host(endpoint: str, host: str) -> str:
    parts = _split_host(endpoint)
    if parts is None:
        return endpoint
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{parts[1]}"


def _is_wildcard(endpoint: str) -> bool:
    parts = _split_host(endpoint)
    return parts is not None and parts[0] in _WILDCARD_HOSTS


def _pub_bind_endpoint(listen: str) -> str:
    scheme, _, rest = listen.partition("://")
    if scheme == "tcp":
        host, sep, _port = rest.rpartition(":")
        if not sep:
            raise ConfigurationError(f"tcp endpoint needs a port: {listen!r}")
        return f"tcp://{host}:*"
    if scheme == "ipc":
        return "ipc://*" if rest == "*" else f"{listen}.pub"
    return f"{listen}.pub"


def _gossip_endpoint_ok(endpoint: object) -> bool:
    return (
        isinstance(endpoint, str)
        and 0 < len(endpoint) <= _MAX_ENDPOINT_LEN
        and (endpoint.startswith("tcp://") or endpoint.startswith("ipc://"))
    )


@dataclass(frozen=True, slots=True)
class _Hello:
    node_id: bytes
    endpoint: str
    pub_endpoint: str
    peers: tuple[tuple[bytes, str], ...]


def _encode_hello(node_id: bytes, endpoint: str, pub: str, peers: list[list[Any]]) -> bytes:
    return msgpack.packb(
        {"v": PROTOCOL_VERSION, "id": node_id, "ep": endpoint, "pub": pub, "peers": peers},
        use_bin_type=True,
    )


def _decode_hello(data: bytes) -> _Hello | None:
    """A HELLO/WELCOME body, or None if it is not one (never raises)."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=_MAX_ENDPOINT_LEN,
            max_bin_len=NODE_ID_SIZE,
            max_array_len=_MAX_GOSSIP * 2,
            max_map_len=16,
        )
    except Exception:  # msgpack raises a zoo of types on hostile input
        return None
    if not isinstance(obj, dict) or obj.get("v") != PROTOCOL_VERSION:
        return None
    node_id, ep, pub, peers = obj.get("id"), obj.get("ep"), obj.get("pub"), obj.get("peers")
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_SIZE:
        return None
    if not isinstance(ep, str) or not isinstance(pub, str) or not isinstance(peers, list):
        return None
    if len(peers) > _MAX_GOSSIP:
        return None
    gossip: list[tuple[bytes, str]] = []
    for item in peers:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], bytes)
            or len(item[0]) != NODE_ID_SIZE
            or not _gossip_endpoint_ok(item[1])
        ):
            return None
        gossip.append((item[0], item[1]))
    return _Hello(node_id, ep, pub, tuple(gossip))


# ------------------------------------------------------------------- actor state


class _Link:
    """One DEALER we connected to a ROUTER endpoint."""

    __slots__ = (
        "endpoint",
        "sock",
        "expected",
        "node_id",
        "explicit",
        "created",
        "next_hello",
        "backoff",
        "welcomed",
        "sock_since",
    )

    def __init__(
        self, endpoint: str, sock: zmq.Socket, expected: bytes | None, explicit: bool, now: float
    ) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.sock_since = now
        self.expected = expected
        self.node_id: bytes | None = None
        self.explicit = explicit
        self.created = now
        self.next_hello = now
        self.backoff = _FIRST_BACKOFF
        self.welcomed = False


class _Peer:
    """A peer we connect to, keyed by node id."""

    __slots__ = (
        "node_id",
        "endpoint",
        "pub_endpoint",
        "link",
        "sub",
        "last_seen",
        "connected",
        "ready",
        "stats",
        "sub_seen",
        "neighbours",
    )

    def __init__(self, node_id: bytes) -> None:
        self.node_id = node_id
        self.endpoint = ""
        self.pub_endpoint = ""
        self.link: _Link | None = None
        self.sub: zmq.Socket | None = None
        self.last_seen: float | None = None
        self.connected = False
        self.ready = False
        self.stats: Counter[str] = Counter()
        self.sub_seen = 0.0
        self.neighbours: frozenset[bytes] = frozenset()


@dataclass(slots=True)
class _Pending:
    future: Future[bytes | None]
    deadline: float
    link: _Link
    node_id: bytes


@dataclass(frozen=True, slots=True)
class _Settings:
    node_id: bytes
    listen: str | None
    peers: tuple[str, ...]
    on_publish: PublishCallback
    on_request: RequestCallback
    on_peer_ready: PeerCallback | None
    curve: CurveConfig | None
    advertise_host: str | None
    max_message_size: int
    rcvhwm: int
    sndhwm: int
    discovery: DiscoveryConfig | None
    broker: tuple[str, str] | None
    hello_interval: float
    ping_interval: float
    peer_timeout: float
    flood_threshold: int
    flood_window: float
    flood_ban: float
    max_peers: int


class _CurveAllowList:
    """ZAP credentials provider: accept client keys the CurveConfig allows."""

    def __init__(self, config: CurveConfig) -> None:
        self._config = config

    def callback(self, domain: str, key: bytes) -> bool:
        return self._config.is_allowed(key)


class _Actor:
    """Everything that runs on the bus I/O thread. Only that thread touches it,
    except the few attributes the API reads after ``started`` is set."""

    def __init__(
        self,
        settings: _Settings,
        ctx: zmq.Context,
        cmds: queue.SimpleQueue,
        cond: threading.Condition,
    ) -> None:
        self.s = settings
        self.ctx = ctx
        self.cmds = cmds
        self.cond = cond
        self.node_id = settings.node_id
        self.hard_limit = settings.max_message_size + _HARD_LIMIT_SLACK

        # handshake results, read by the API thread after `started` is set
        self.started = threading.Event()
        self.startup_error: BaseException | None = None
        self.failure: BaseException | None = None
        self.endpoint: str | None = None
        self.pub_endpoint: str | None = None
        # guarded by `cond`
        self.ready_count = 0
        self.broker_ready = False
        self.finished = False

        self.sockets: list[zmq.Socket] = []
        self.poller = zmq.Poller()
        self.handlers: dict[Any, Callable[[], None]] = {}
        self.auth: Any = None
        self.pipe: zmq.Socket | None = None
        self.router: zmq.Socket | None = None
        self.xpub: zmq.Socket | None = None
        self.broker_pub: zmq.Socket | None = None
        self.broker_sub: zmq.Socket | None = None
        self.udp: Any = None
        self.beacon: Beacon | None = None
        self.next_beacon = 0.0
        self.next_broker_probe = 0.0

        self.links: dict[str, _Link] = {}
        self.peers: dict[bytes, _Peer] = {}
        self.self_endpoints: set[str] = set()
        self.endpoint_owner: dict[str, bytes] = {}
        self.pending: dict[bytes, _Pending] = {}
        self.req_ids = itertools.count(1)
        self.flood: dict[bytes | str, list[float]] = {}
        self.bans: dict[bytes | str, float] = {}
        self.next_timer = 0.0
        self.next_prune = 0.0
        self.stopping = False

        self.counters: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    # ------------------------------------------------------------ socket setup

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        self.sockets.append(sock)
        sock.linger = 0
        sock.rcvhwm = self.s.rcvhwm
        sock.sndhwm = self.s.sndhwm
        return sock

    def _close_socket(self, sock: zmq.Socket | None) -> None:
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

    def _watch(self, sock: Any, handler: Callable[[], None], key: Any = None) -> None:
        self.poller.register(sock, zmq.POLLIN)
        self.handlers[sock if key is None else key] = handler

    def _curve_server(self, sock: zmq.Socket) -> None:
        cfg = self.s.curve
        if cfg is not None:
            sock.curve_server = True
            sock.curve_secretkey = cfg.server_secret
            sock.curve_publickey = cfg.server_public
            sock.zap_domain = ZAP_DOMAIN.encode()

    def _curve_client(self, sock: zmq.Socket) -> None:
        cfg = self.s.curve
        if cfg is not None:
            sock.curve_serverkey = cfg.server_public
            sock.curve_publickey = cfg.client_public
            sock.curve_secretkey = cfg.client_secret

    def _advertised(self, bound: str) -> str:
        if self.s.advertise_host and _is_wildcard(bound):
            return _with_host(bound, self.s.advertise_host)
        return bound

    def _setup(self) -> None:
        s = self.s
        if s.curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.ctx, log=logger.getChild("zap"))
            self.auth.start()
            self.auth.configure_curve_callback(
                domain=ZAP_DOMAIN, credentials_provider=_CurveAllowList(s.curve)
            )

        self.pipe = self._socket(zmq.PAIR)
        self.pipe.connect(_PIPE_ENDPOINT)
        self._watch(self.pipe, self._on_pipe)

        if s.listen is not None:
            self.router = self._socket(zmq.ROUTER)
            self.router.maxmsgsize = self.hard_limit
            self._curve_server(self.router)
            self.xpub = self._socket(zmq.XPUB)
            self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
            self._curve_server(self.xpub)
            try:
                self.router.bind(s.listen)
                self.xpub.bind(_pub_bind_endpoint(s.listen))
            except zmq.ZMQError as exc:
                raise NetworkError(f"cannot bind {s.listen}: {exc}") from exc
            self.endpoint = self._advertised(self.router.LAST_ENDPOINT.decode())
            self.pub_endpoint = self._advertised(self.xpub.LAST_ENDPOINT.decode())
            self._watch(self.router, self._on_router)
            self._watch(self.xpub, functools.partial(self._on_xpub, self.xpub, False))

        if s.broker is not None:
            self.broker_pub = self._socket(zmq.XPUB)
            self.broker_pub.setsockopt(zmq.XPUB_VERBOSE, 1)
            self._curve_client(self.broker_pub)
            self.broker_sub = self._socket(zmq.SUB)
            self.broker_sub.maxmsgsize = self.hard_limit
            self._curve_client(self.broker_sub)
            try:
                self.broker_pub.connect(s.broker[0])
                self.broker_sub.connect(s.broker[1])
            except zmq.ZMQError as exc:
                raise NetworkError(f"cannot connect to broker {s.broker}: {exc}") from exc
            self.broker_sub.subscribe(_MESSAGE)
            self.broker_sub.subscribe(_ACK + self.node_id)
            self._watch(self.broker_pub, functools.partial(self._on_xpub, self.broker_pub, True))
            self._watch(self.broker_sub, functools.partial(self._on_sub, None, self.broker_sub))

        d = s.discovery
        if d is not None and d.enabled:
            try:
                self.udp = open_beacon_socket(d)
            except OSError as exc:
                raise NetworkError(f"cannot bind beacon port {d.port}: {exc}") from exc
            fd = self.udp.fileno()
            self._watch(fd, self._on_udp, key=fd)
            parts = _split_host(self.endpoint or "")
            if parts is not None:
                self.beacon = Beacon(self.node_id, int(parts[1]), d.cluster_tag)
            elif self.endpoint is not None:
                logger.warning("discovery: %s is not tcp://, not sending beacons", self.endpoint)

        now = time.monotonic()
        for endpoint in s.peers:
            self._open_link(endpoint, expected=None, explicit=True, now=now)

    # --------------------------------------------------------------- main loop

    def run(self) -> None:
        try:
            self._setup()
        except BaseException as exc:
            self.startup_error = exc
            self._teardown()
            self.started.set()
            return
        self.started.set()
        try:
            self._loop()
        except BaseException as exc:
            logger.exception("bus I/O thread of %s died", self.node_id.hex())
            self.failure = exc
        finally:
            self._teardown()

    def _loop(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            if now >= self.next_timer:
                self._timers(now)
            timeout_ms = max(0, int((self.next_timer - time.monotonic()) * 1000) + 1)
            try:
                events = self.poller.poll(timeout_ms)
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            for sock, _ in events:
                handler = self.handlers.get(sock)
                if handler is not None:  # None: closed by an earlier handler this round
                    handler()
                if self.stopping:
                    break

    def _teardown(self) -> None:
        error = NetworkError("bus closed" if self.failure is None else "bus I/O thread died")
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        self.pending.clear()
        while True:
            try:
                cmd = self.cmds.get_nowait()
            except queue.Empty:
                break
            fut = cmd[-1]
            if isinstance(fut, Future) and not fut.done():
                fut.set_exception(error)
        for sock in list(self.sockets):
            try:
                sock.close(linger=0)
            except zmq.ZMQError:
                pass
        self.sockets.clear()
        if self.udp is not None:
            self.udp.close()
        if self.auth is not None:
            try:
                self.auth.stop()
            except Exception:
                logger.debug("ZAP authenticator did not stop cleanly", exc_info=True)
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def _schedule(self, when: float) -> None:
        if when < self.next_timer:
            self.next_timer = when

    def _timers(self, now: float) -> None:
        s = self.s
        nxt = now + 3600.0
        for link in list(self.links.values()):
            if (
                not link.explicit
                and not link.welcomed
                and now - link.created > _GOSSIP_LINK_GIVE_UP
            ):
                logger.debug("giving up on %s", link.endpoint)
                self._close_link(link)
                continue
            if not link.welcomed and now - link.sock_since > s.peer_timeout:
                # ZeroMQ does not reconnect after a protocol error (a failed CURVE
                # handshake, a frame over ZMQ_MAXMSGSIZE): start over with a new socket.
                self._renew_link_socket(link, now)
            if now >= link.next_hello:
                self._send_hello(link, now)
            nxt = min(nxt, link.next_hello)
            if not link.welcomed:
                nxt = min(nxt, link.sock_since + s.peer_timeout)
        for peer in list(self.peers.values()):
            if not peer.connected or peer.last_seen is None:
                continue
            if now - peer.last_seen > s.peer_timeout:
                logger.info("peer %s silent for %.1fs", peer.node_id.hex(), s.peer_timeout)
                self._set_state(peer, connected=False, ready=False)
                if peer.link is not None:
                    self._renew_link_socket(peer.link, now)
                    nxt = now
                continue
            nxt = min(nxt, peer.last_seen + s.peer_timeout)
            if peer.sub is not None:
                # Every HELLO makes the peer publish an ACK to us, so a SUB that
                # hears nothing for peer_timeout is broken: resubscribe.
                if now - peer.sub_seen > s.peer_timeout:
                    logger.info("no traffic from %s's PUB; resubscribing", peer.node_id.hex())
                    self.counters["resubscribes"] += 1
                    self._close_socket(peer.sub)
                    peer.sub = None
                    self._set_state(peer, ready=False)
                    self._open_sub(peer, now)
                    if peer.link is not None:
                        peer.link.backoff = _FIRST_BACKOFF
                        peer.link.next_hello = now
                        nxt = now
                else:
                    nxt = min(nxt, peer.sub_seen + s.peer_timeout)
        for req_id, pending in list(self.pending.items()):
            if now >= pending.deadline:
                del self.pending[req_id]
                self.counters["request_timeouts"] += 1
                if not pending.future.done():
                    pending.future.set_result(None)
            else:
                nxt = min(nxt, pending.deadline)
        for src, until in list(self.bans.items()):
            if now >= until:
                del self.bans[src]
                logger.info("ban on %r lifted", src)
            else:
                nxt = min(nxt, until)
        if now >= self.next_prune:
            window = s.flood_window
            self.flood = {k: v for k, v in self.flood.items() if now - v[0] <= window}
            self.next_prune = now + window
        nxt = min(nxt, self.next_prune)
        if self.udp is not None and self.beacon is not None and s.discovery is not None:
            if now >= self.next_beacon:
                if not send_beacon(self.udp, s.discovery, self.beacon):
                    self.counters["beacons_failed"] += 1
                self.next_beacon = now + s.discovery.interval
            nxt = min(nxt, self.next_beacon)
        if self.broker_pub is not None and not self.broker_ready:
            if now >= self.next_broker_probe:
                self._broker_probe()
                self.next_broker_probe = now + s.hello_interval
            nxt = min(nxt, self.next_broker_probe)
        self.next_timer = nxt

    # ------------------------------------------------------------- bookkeeping

    def _set_state(
        self, peer: _Peer, *, connected: bool | None = None, ready: bool | None = None
    ) -> None:
        before = peer.connected and peer.ready
        if connected is not None:
            peer.connected = connected
        if ready is not None:
            peer.ready = ready
        after = peer.connected and peer.ready
        if before != after:
            with self.cond:
                self.ready_count += 1 if after else -1
                self.cond.notify_all()
            if after and self.s.on_peer_ready is not None:
                try:
                    self.s.on_peer_ready(peer.node_id)
                except Exception:
                    self.counters["callback_errors"] += 1
                    logger.exception("on_peer_ready callback failed")

    def _bad(self, src: bytes | str | None, reason: str, peer: _Peer | None = None) -> None:
        """Count a dropped frame, and ban its source if it floods."""
        self.dropped[reason] += 1
        if peer is not None:
            peer.stats["dropped"] += 1
        if src is None or src == "broker" or src == self.node_id:
            return
        now = time.monotonic()
        window = self.flood.get(src)
        if window is None or now - window[0] > self.s.flood_window:
            window = self.flood[src] = [now, 0]
        window[1] += 1
        if window[1] > self.s.flood_threshold:
            self._ban(src, now)

    def _ban(self, src: bytes | str, now: float) -> None:
        logger.warning(
            "banning %s for %.0fs: more than %d bad frames in %.0fs",
            src.hex() if isinstance(src, bytes) else src,
            self.s.flood_ban,
            self.s.flood_threshold,
            self.s.flood_window,
        )
        self.counters["bans"] += 1
        self.bans[src] = now + self.s.flood_ban
        self.flood.pop(src, None)
        self._schedule(now + self.s.flood_ban)
        peer = self.peers.get(src) if isinstance(src, bytes) else None
        if peer is not None:
            self._drop_peer(peer)
        for link in list(self.links.values()):
            if src in (link.expected, link.node_id, link.endpoint):
                self._close_link(link)

    def _banned(self, src: bytes | str | None) -> bool:
        return src is not None and src in self.bans

    def _drop_peer(self, peer: _Peer) -> None:
        self._set_state(peer, connected=False, ready=False)
        if peer.link is not None:
            self._close_link(peer.link)
        self._close_socket(peer.sub)
        peer.sub = None
        self.peers.pop(peer.node_id, None)

    def _close_link(self, link: _Link) -> None:
        if self.links.get(link.endpoint) is link:
            del self.links[link.endpoint]
        for req_id, pending in list(self.pending.items()):
            if pending.link is link:
                del self.pending[req_id]
                if not pending.future.done():
                    pending.future.set_result(None)
        self._close_socket(link.sock)
        if link.node_id is not None:
            peer = self.peers.get(link.node_id)
            if peer is not None and peer.link is link:
                peer.link = None
                self._set_state(peer, connected=False)

    def _open_link(
        self, endpoint: str, *, expected: bytes | None, explicit: bool, now: float
    ) -> _Link | None:
        existing = self.links.get(endpoint)
        if existing is not None:
            existing.explicit = existing.explicit or explicit
            return existing
        if endpoint in self.self_endpoints:
            return None
        owner = self.peers.get(self.endpoint_owner.get(endpoint, b""))
        if owner is not None and owner.connected:
            return None  # another name for a peer we already talk to
        try:
            sock = self._dealer(endpoint)
        except zmq.ZMQError as exc:
            if explicit:
                raise NetworkError(f"cannot connect to {endpoint}: {exc}") from exc
            logger.debug("cannot connect to gossiped %s: %s", endpoint, exc)
            return None
        link = _Link(endpoint, sock, expected, explicit, now)
        self.links[endpoint] = link
        self._watch(sock, functools.partial(self._on_dealer, link))
        self._schedule(now)
        logger.debug("connecting to %s", endpoint)
        return link

    def _dealer(self, endpoint: str) -> zmq.Socket:
        sock = self._socket(zmq.DEALER)
        sock.maxmsgsize = self.hard_limit
        sock.immediate = True
        sock.routing_id = self.node_id + os.urandom(_NONCE_SIZE)
        self._curve_client(sock)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            self._close_socket(sock)
            raise
        return sock

    def _renew_link_socket(self, link: _Link, now: float) -> None:
        self.counters["relinks"] += 1
        self._close_socket(link.sock)
        link.sock = self._dealer(link.endpoint)  # connected once before: cannot fail
        link.sock_since = now
        link.welcomed = False
        link.backoff = _FIRST_BACKOFF
        link.next_hello = now
        self._watch(link.sock, functools.partial(self._on_dealer, link))

    def _heard(self, node_id: bytes, endpoint: str, now: float) -> None:
        """Someone told us node_id listens at endpoint: connect unless known."""
        if not endpoint or node_id == self.node_id:
            return
        if self._banned(node_id) or self._banned(endpoint):
            return
        if endpoint in self.self_endpoints or endpoint in self.links:
            return
        peer = self.peers.get(node_id)
        if peer is not None and peer.connected:
            return
        owner = self.endpoint_owner.get(endpoint)
        if owner is not None and owner in self.peers and self.peers[owner].connected:
            return
        if len(self.links) >= self.s.max_peers:
            return
        trying = sum(1 for link in self.links.values() if link.expected == node_id)
        if trying >= 2:
            return
        self._open_link(endpoint, expected=node_id, explicit=False, now=now)

    def _hello_body(self) -> bytes:
        gossip = [
            [peer.node_id, peer.endpoint]
            for peer in self.peers.values()
            if peer.connected and _gossip_endpoint_ok(peer.endpoint)
        ][:_MAX_GOSSIP]
        return _encode_hello(self.node_id, self.endpoint or "", self.pub_endpoint or "", gossip)

    def _send_hello(self, link: _Link, now: float) -> None:
        try:
            link.sock.send_multipart([_HELLO, self._hello_body()], zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet (ZMQ_IMMEDIATE): try again later
        peer = self.peers.get(link.node_id) if link.node_id else None
        if link.welcomed and peer is not None and peer.ready:
            link.next_hello = now + self.s.ping_interval
        else:
            link.next_hello = now + link.backoff
            link.backoff = min(link.backoff * 2, self.s.hello_interval)

    def _ack(self, sock: zmq.Socket | None, subscriber: bytes) -> None:
        if sock is not None:
            sock.send_multipart([_ACK + subscriber, self.node_id], zmq.NOBLOCK)

    def _broker_probe(self) -> None:
        self._ack(self.broker_pub, self.node_id)

    def _deliver(self, payload: bytes, sender: bytes, peer: _Peer | None) -> None:
        self.counters["messages_in"] += 1
        self.counters["bytes_in"] += len(payload)
        if peer is not None:
            peer.stats["messages_in"] += 1
            peer.stats["bytes_in"] += len(payload)
        try:
            self.s.on_publish(payload, sender)
        except Exception:
            self.counters["callback_errors"] += 1
            logger.exception("on_publish callback failed")

    # ---------------------------------------------------------------- handlers

    def _on_pipe(self) -> None:
        assert self.pipe is not None
        for _ in range(_BATCH):
            try:
                frames = self.pipe.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames[0] == _PIPE_PUBLISH:
                self._publish(frames[1])
        while not self.stopping:
            try:
                cmd = self.cmds.get_nowait()
            except queue.Empty:
                break
            self._command(cmd)

    def _publish(self, payload: bytes) -> None:
        self.counters["messages_out"] += 1
        self.counters["bytes_out"] += len(payload)
        if self.xpub is not None:
            self.xpub.send_multipart([_MESSAGE, self.node_id, payload], zmq.NOBLOCK)
        if self.broker_pub is not None:
            self.broker_pub.send_multipart([_MESSAGE, self.node_id, payload], zmq.NOBLOCK)
        if self.xpub is None:
            # A client-only node has no PUB: push to the peers it is connected to.
            for peer in self.peers.values():
                if peer.connected and peer.link is not None:
                    try:
                        peer.link.sock.send_multipart([_PUSH, payload], zmq.NOBLOCK)
                        peer.stats["messages_out"] += 1
                    except zmq.Again:
                        self.dropped["hwm"] += 1

    def _command(self, cmd: tuple[Any, ...]) -> None:
        name = cmd[0]
        fut: Future[Any] | None = cmd[-1] if isinstance(cmd[-1], Future) else None
        if fut is not None and not fut.set_running_or_notify_cancel():
            return
        try:
            if name == "stop":
                self.stopping = True
                result: Any = None
            elif name == "connect":
                self._open_link(cmd[1], expected=None, explicit=True, now=time.monotonic())
                result = None
            elif name == "request":
                self._start_request(cmd[1], cmd[2], cmd[3], cmd[4])
                return
            elif name == "peers":
                result = self.peer_snapshot()
            elif name == "stats":
                result = self.stats_snapshot()
            else:  # pragma: no cover - the API only sends the names above
                raise NetworkError(f"unknown bus command {name!r}")
        except Exception as exc:
            if fut is not None:
                fut.set_exception(exc)
            return
        if fut is not None:
            fut.set_result(result)

    def _start_request(
        self, node_id: bytes, payload: bytes, timeout: float, fut: Future[bytes | None]
    ) -> None:
        peer = self.peers.get(node_id)
        if peer is None or peer.link is None or not peer.connected:
            self.counters["requests_unroutable"] += 1
            fut.set_result(None)
            return
        req_id = next(self.req_ids).to_bytes(_REQ_ID_SIZE, "big")
        try:
            peer.link.sock.send_multipart([_REQUEST, req_id, payload], zmq.NOBLOCK)
        except zmq.Again:
            self.counters["requests_unroutable"] += 1
            fut.set_result(None)
            return
        self.counters["requests_out"] += 1
        peer.stats["requests_out"] += 1
        deadline = time.monotonic() + timeout
        self.pending[req_id] = _Pending(fut, deadline, peer.link, node_id)
        self._schedule(deadline)

    def _on_router(self) -> None:
        assert self.router is not None
        for _ in range(_BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._router_message(frames)
            if self.stopping:
                break

    def _router_message(self, frames: list[zmq.Frame]) -> None:
        assert self.router is not None
        ident = frames[0].bytes
        src: bytes = ident[:NODE_ID_SIZE] if len(ident) == NODE_ID_SIZE + _NONCE_SIZE else ident
        if self._banned(src):
            self.dropped["banned"] += 1
            return
        if len(ident) != NODE_ID_SIZE + _NONCE_SIZE or len(frames) < 2:
            self._bad(src, "malformed")
            return
        node_id = src
        peer = self.peers.get(node_id)
        kind = frames[1].bytes
        n = len(frames)
        now = time.monotonic()
        if kind == _HELLO and n == 3:
            hello = _decode_hello(frames[2].bytes)
            if hello is None or hello.node_id != node_id:
                self._bad(src, "malformed", peer)
                return
            self.router.send_multipart([ident, _WELCOME, self._hello_body()], zmq.NOBLOCK)
            self._ack(self.xpub, node_id)
            # Frames on our ROUTER do not refresh peer.last_seen: a peer is alive when
            # *our* link to it answers. A peer that restarted at a new endpoint keeps
            # saying HELLO here; counting that would keep the dead link "connected"
            # forever and _heard() would never dial the new endpoint.
            endpoint = hello.endpoint
            if endpoint and _is_wildcard(endpoint):
                try:
                    address = frames[2].get("Peer-Address")
                except (zmq.ZMQError, AttributeError):
                    address = None
                endpoint = _with_host(endpoint, address) if address else ""
            if endpoint:
                self._heard(node_id, endpoint, now)
            for gid, gep in hello.peers:
                self._heard(gid, gep, now)
        elif kind == _REQUEST and n == 4 and len(frames[2].bytes) == _REQ_ID_SIZE:
            req_id = frames[2].bytes
            payload = frames[3].bytes
            if len(payload) > self.s.max_message_size:
                self._bad(src, "oversize", peer)
                self.router.send_multipart([ident, _NO_REPLY, req_id], zmq.NOBLOCK)
                return
            self.counters["requests_in"] += 1
            self.counters["bytes_in"] += len(payload)
            if peer is not None:
                peer.stats["requests_in"] += 1
            reply: Any = None
            try:
                reply = self.s.on_request(payload, node_id)
                if reply is not None and not isinstance(reply, bytes | bytearray | memoryview):
                    raise TypeError(f"on_request returned {type(reply).__name__}, not bytes")
            except Exception:
                reply = None
                self.counters["callback_errors"] += 1
                logger.exception("on_request callback failed")
            if reply is None:
                self.router.send_multipart([ident, _NO_REPLY, req_id], zmq.NOBLOCK)
            else:
                self.counters["replies_out"] += 1
                self.counters["bytes_out"] += len(reply)
                self.router.send_multipart([ident, _REPLY, req_id, reply], zmq.NOBLOCK)
        elif kind == _PUSH and n == 3:
            payload = frames[2].bytes
            if len(payload) > self.s.max_message_size:
                self._bad(src, "oversize", peer)
                return
            self._deliver(payload, node_id, peer)
        elif kind in (_HELLO, _REQUEST, _PUSH):
            self._bad(src, "malformed", peer)
        else:
            self._bad(src, "unknown", peer)

    def _on_dealer(self, link: _Link) -> None:
        for _ in range(_BATCH):
            if link.sock.closed:
                return
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._dealer_message(link, frames)

    def _dealer_message(self, link: _Link, frames: list[bytes]) -> None:
        src = link.node_id or link.expected or link.endpoint
        if self._banned(src):
            self.dropped["banned"] += 1
            return
        peer = self.peers.get(link.node_id) if link.node_id else None
        kind, n = frames[0], len(frames)
        now = time.monotonic()
        if kind == _WELCOME and n == 2:
            hello = _decode_hello(frames[1])
            if hello is None:
                self._bad(src, "malformed", peer)
                return
            self._welcomed(link, hello, now)
        elif kind in (_REPLY, _NO_REPLY) and n == (3 if kind == _REPLY else 2):
            pending = self.pending.get(frames[1])
            if pending is None or pending.link is not link:
                self.dropped["late_reply"] += 1
                return
            del self.pending[frames[1]]
            reply: bytes | None = None
            if kind == _REPLY:
                reply = frames[2]
                if len(reply) > self.s.max_message_size:
                    self._bad(src, "oversize", peer)
                    reply = None
                else:
                    self.counters["replies_in"] += 1
                    self.counters["bytes_in"] += len(reply)
            if peer is not None:
                peer.last_seen = now
            if not pending.future.done():
                pending.future.set_result(reply)
        elif kind in (_WELCOME, _REPLY, _NO_REPLY):
            self._bad(src, "malformed", peer)
        else:
            self._bad(src, "unknown", peer)

    def _welcomed(self, link: _Link, hello: _Hello, now: float) -> None:
        node_id = hello.node_id
        if node_id == self.node_id:
            logger.debug("%s is ourselves", link.endpoint)
            self.self_endpoints.add(link.endpoint)
            self._close_link(link)
            return
        if self._banned(node_id):
            self._close_link(link)
            return
        if link.node_id is not None and link.node_id != node_id:
            # A different node now answers at this endpoint: forget the old one.
            old = self.peers.get(link.node_id)
            if old is not None and old.link is link:
                old.link = None
                self._drop_peer(old)
            link.node_id = None
        self.endpoint_owner[link.endpoint] = node_id
        peer = self.peers.get(node_id)
        if peer is None:
            peer = self.peers[node_id] = _Peer(node_id)
        if peer.link is not None and peer.link is not link:
            if peer.connected:
                self._close_link(link)  # an alias of a peer we already talk to
                return
            self._close_link(peer.link)
        peer.link = link
        link.node_id = node_id
        link.welcomed = True
        peer.endpoint = link.endpoint
        peer.last_seen = now

        pub = hello.pub_endpoint
        if pub and _is_wildcard(pub):
            dialed = _split_host(link.endpoint)
            pub = _with_host(pub, dialed[0]) if dialed else ""
        if pub != peer.pub_endpoint or peer.sub is None:
            self._close_socket(peer.sub)
            peer.sub = None
            peer.pub_endpoint = pub
            self._set_state(peer, ready=False)
            if pub:
                self._open_sub(peer, now)
            else:
                self._set_state(peer, ready=True)
        was = peer.connected
        self._set_state(peer, connected=True)
        if not was:
            logger.info("connected to peer %s at %s", node_id.hex(), link.endpoint)
        if not peer.ready:
            link.backoff = _FIRST_BACKOFF
            link.next_hello = now + link.backoff
            self._schedule(link.next_hello)
        peer.neighbours = frozenset(gid for gid, _ in hello.peers)
        for gid, gep in hello.peers:
            self._heard(gid, gep, now)

    def _open_sub(self, peer: _Peer, now: float) -> None:
        peer.sub_seen = now
        sub = self._socket(zmq.SUB)
        sub.maxmsgsize = self.hard_limit
        self._curve_client(sub)
        try:
            sub.connect(peer.pub_endpoint)
        except zmq.ZMQError as exc:
            logger.warning("cannot subscribe to %s: %s", peer.pub_endpoint, exc)
            self._close_socket(sub)
            return
        sub.subscribe(_MESSAGE)
        sub.subscribe(_ACK + self.node_id)
        peer.sub = sub
        self._watch(sub, functools.partial(self._on_sub, peer, sub))

    def _on_sub(self, peer: _Peer | None, sock: zmq.Socket) -> None:
        for _ in range(_BATCH):
            if sock.closed:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._sub_message(peer, frames)
            if self.stopping:
                return

    def _sub_message(self, peer: _Peer | None, frames: list[bytes]) -> None:
        src: bytes | str = peer.node_id if peer is not None else "broker"
        if self._banned(src):
            self.dropped["banned"] += 1
            return
        if peer is not None:
            peer.sub_seen = time.monotonic()
        topic, n = frames[0], len(frames)
        if topic == _MESSAGE and n == 3 and len(frames[1]) == NODE_ID_SIZE:
            sender, payload = frames[1], frames[2]
            if sender == self.node_id:
                self.dropped["echo"] += 1  # our own message back through the broker
                return
            if peer is not None and sender != peer.node_id:
                self._bad(src, "spoofed", peer)
                return
            if len(payload) > self.s.max_message_size:
                self._bad(src, "oversize", peer)
                return
            if peer is not None:
                peer.last_seen = time.monotonic()
            self._deliver(payload, sender, self.peers.get(sender) if peer is None else peer)
        elif n == 2 and topic == _ACK + self.node_id and len(frames[1]) == NODE_ID_SIZE:
            sender = frames[1]
            if peer is None:
                if sender == self.node_id and not self.broker_ready:
                    with self.cond:
                        self.broker_ready = True
                        self.cond.notify_all()
                    logger.debug("broker path ready")
            elif sender == peer.node_id:
                peer.last_seen = time.monotonic()
                if not peer.ready:
                    self._set_state(peer, ready=True)
                    if peer.link is not None and peer.link.welcomed:
                        peer.link.next_hello = time.monotonic() + self.s.ping_interval
            else:
                self._bad(src, "spoofed", peer)
        elif topic == _MESSAGE or topic.startswith(_ACK):
            self._bad(src, "malformed", peer)
        else:
            self._bad(src, "unknown", peer)

    def _on_xpub(self, sock: zmq.Socket, only_self: bool) -> None:
        for _ in range(_BATCH):
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            # b"\x01A<id>" is a new subscriber on its ACK topic: acknowledge it.
            # Through the broker we only probe our own path; peers ack each other
            # directly, so there is no need to ack every broker subscriber.
            if len(data) == 2 + NODE_ID_SIZE and data[:2] == b"\x01" + _ACK:
                if not only_self or data[2:] == self.node_id:
                    self._ack(sock, data[2:])

    def _on_udp(self) -> None:
        d = self.s.discovery
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
            self._heard(beacon.node_id, f"tcp://{address}:{beacon.port}", now)

    # --------------------------------------------------------------- snapshots

    def peer_snapshot(self) -> dict[bytes, PeerInfo]:
        mono, wall = time.monotonic(), time.time()
        return {
            nid: PeerInfo(
                node_id=nid,
                endpoint=p.endpoint,
                pub_endpoint=p.pub_endpoint,
                last_seen=None if p.last_seen is None else wall - (mono - p.last_seen),
                connected=p.connected,
                ready=p.connected and p.ready,
                neighbours=p.neighbours,
            )
            for nid, p in self.peers.items()
        }

    def stats_snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            key: self.counters[key]
            for key in (
                "messages_in",
                "messages_out",
                "bytes_in",
                "bytes_out",
                "requests_in",
                "requests_out",
                "replies_in",
                "replies_out",
                "request_timeouts",
                "requests_unroutable",
                "callback_errors",
                "bans",
                "relinks",
                "resubscribes",
            )
        }
        out["dropped"] = dict(self.dropped)
        out["banned"] = sorted(self.bans, key=repr)
        out["pending_requests"] = len(self.pending)
        out["links"] = len(self.links)
        out["self_endpoints"] = sorted(self.self_endpoints)
        out["broker_ready"] = self.broker_ready
        out["peers"] = {nid: dict(p.stats) for nid, p in self.peers.items()}
        return out


# ------------------------------------------------------------------------ public


class Bus:
    """A node's ZeroMQ transport: publish to all peers, request one peer.

    One I/O thread owns every socket; the methods here are thread-safe and talk to
    it over an inproc pipe. ``on_publish(payload, sender_id)``,
    ``on_request(payload, sender_id) -> bytes | None`` and ``on_peer_ready(node_id)``
    (a peer became connected and ready, again after a reconnection) run *on that
    thread*: keep them quick (enqueue and return), and never call :meth:`request`
    from them.
    """

    def __init__(
        self,
        *,
        node_id: bytes,
        listen: str | None = "tcp://127.0.0.1:*",
        peers: Iterable[str] = (),
        on_publish: PublishCallback,
        on_request: RequestCallback,
        on_peer_ready: PeerCallback | None = None,
        curve: CurveConfig | None = None,
        advertise_host: str | None = None,
        max_message_size: int = 1 << 20,
        rcvhwm: int = 10000,
        sndhwm: int = 10000,
        discovery: DiscoveryConfig | None = None,
        broker: tuple[str, str] | None = None,
        hello_interval: float = 0.5,
        ping_interval: float = 1.0,
        peer_timeout: float = 5.0,
        flood_threshold: int = 1000,
        flood_window: float = 10.0,
        flood_ban: float = 60.0,
        max_peers: int = 256,
    ) -> None:
        _check_node_id(node_id)
        if listen is not None:
            _check_endpoint(listen)
            _pub_bind_endpoint(listen)
        peer_list = tuple(_check_endpoint(p) for p in peers)
        if not callable(on_publish) or not callable(on_request):
            raise ConfigurationError("on_publish and on_request must be callables")
        if on_peer_ready is not None and not callable(on_peer_ready):
            raise ConfigurationError("on_peer_ready must be a callable or None")
        if curve is not None and not isinstance(curve, CurveConfig):
            raise ConfigurationError("curve must be a CurveConfig")
        if discovery is not None and not isinstance(discovery, DiscoveryConfig):
            raise ConfigurationError("discovery must be a DiscoveryConfig")
        if broker is not None:
            if not isinstance(broker, tuple | list) or len(broker) != 2:
                raise ConfigurationError("broker must be (xsub_endpoint, xpub_endpoint)")
            broker = (_check_endpoint(broker[0]), _check_endpoint(broker[1]))
        for name, value in (
            ("max_message_size", max_message_size),
            ("rcvhwm", rcvhwm),
            ("sndhwm", sndhwm),
            ("flood_threshold", flood_threshold),
            ("max_peers", max_peers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive int")
        for name, fvalue in (
            ("hello_interval", hello_interval),
            ("ping_interval", ping_interval),
            ("peer_timeout", peer_timeout),
            ("flood_window", flood_window),
            ("flood_ban", flood_ban),
        ):
            if not fvalue > 0:
                raise ConfigurationError(f"{name} must be > 0")
        if not ping_interval < peer_timeout:
            raise ConfigurationError("ping_interval must be shorter than peer_timeout")

        settings = _Settings(
            node_id=node_id,
            listen=listen,
            peers=peer_list,
            on_publish=on_publish,
            on_request=on_request,
            on_peer_ready=on_peer_ready,
            curve=curve,
            advertise_host=advertise_host,
            max_message_size=max_message_size,
            rcvhwm=rcvhwm,
            sndhwm=sndhwm,
            discovery=discovery,
            broker=broker,
            hello_interval=hello_interval,
            ping_interval=ping_interval,
            peer_timeout=peer_timeout,
            flood_threshold=flood_threshold,
            flood_window=flood_window,
            flood_ban=flood_ban,
            max_peers=max_peers,
        )
        self._node_id = node_id
        self._closed = False
        self._close_lock = threading.Lock()
        self._pipe_lock = threading.Lock()
        self._api_dropped = 0
        self._cmds: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._ctx = zmq.Context()
        self._pipe = self._ctx.socket(zmq.PAIR)
        self._pipe.linger = 0
        self._pipe.sndhwm = sndhwm
        self._pipe.bind(_PIPE_ENDPOINT)
        self._actor = _Actor(settings, self._ctx, self._cmds, self._cond)
        self._thread = threading.Thread(
            target=self._actor.run, name=f"dmodel-bus-{node_id.hex()[:8]}", daemon=True
        )
        self._thread.start()
        self._actor.started.wait()
        error = self._actor.startup_error
        if error is not None:
            self._thread.join()
            self._pipe.close(linger=0)
            self._ctx.term()
            self._closed = True
            if isinstance(error, NetworkError | ConfigurationError):
                raise error
            raise NetworkError(f"bus failed to start: {error}") from error

    def __repr__(self) -> str:
        return f"<Bus {self._node_id.hex()[:8]} {self.endpoint or 'client-only'}>"

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def node_id(self) -> bytes:
        """This node's 16-byte id."""
        return self._node_id

    @property
    def endpoint(self) -> str | None:
        """The ROUTER endpoint peers should connect to (None for a client-only bus)."""
        return self._actor.endpoint

    @property
    def pub_endpoint(self) -> str | None:
        """The PUB endpoint (None for a client-only bus)."""
        return self._actor.pub_endpoint

    @property
    def closed(self) -> bool:
        """True once close() was called or the I/O thread died."""
        return self._closed or not self._thread.is_alive()

    # ---------------------------------------------------------------- internals

    def _on_io_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def _check(self) -> None:
        if self._actor.failure is not None:
            raise NetworkError("bus I/O thread died") from self._actor.failure
        if self._closed or not self._thread.is_alive():
            raise NetworkError("bus is closed")

    def _wake(self) -> None:
        with self._pipe_lock:
            if self._pipe.closed:
                return
            try:
                self._pipe.send(_PIPE_WAKE, zmq.NOBLOCK)
            except zmq.Again:
                pass  # the pipe is full, so the I/O thread is awake anyway

    def _call(self, *cmd: Any, wait: float | None = None) -> Any:
        """Run a command on the I/O thread and wait for its result."""
        self._check()
        fut: Future[Any] = Future()
        self._cmds.put((*cmd, fut))
        self._wake()
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                return fut.result(timeout=0.25)
            except TimeoutError:
                if not self._thread.is_alive():
                    self._check()
                    raise NetworkError("bus stopped") from None
                if deadline is not None and time.monotonic() > deadline:
                    return None

    # ------------------------------------------------------------------- public

    def publish(self, payload: bytes) -> None:
        """Send payload to every subscriber; never blocks (drops at HWM are counted)."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError("payload must be bytes")
        self._check()
        with self._pipe_lock:
            if self._pipe.closed:
                raise NetworkError("bus is closed")
            try:
                self._pipe.send_multipart([_PIPE_PUBLISH, payload], zmq.NOBLOCK)
            except zmq.Again:
                self._api_dropped += 1

    def request(self, node_id: bytes, payload: bytes, timeout: float = 5.0) -> bytes | None:
        """Ask one connected peer; its reply, or None on timeout or no answer.

        Returns None at once if the peer is unknown or not connected, or if its
        handler returned None. Must not be called from the bus I/O thread.
        """
        _check_node_id(node_id)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError("payload must be bytes")
        if not timeout > 0:
            raise ConfigurationError("timeout must be > 0")
        if self._on_io_thread():
            raise NetworkError("request() called from the bus I/O thread would deadlock")
        return self._call("request", node_id, bytes(payload), float(timeout), wait=timeout + 5)

    def connect(self, endpoint: str) -> None:
        """Connect to a peer's ROUTER endpoint (idempotent); the handshake runs later."""
        _check_endpoint(endpoint)
        if self._on_io_thread():
            self._actor._open_link(endpoint, expected=None, explicit=True, now=time.monotonic())
            return
        self._call("connect", endpoint)

    def peers(self) -> dict[bytes, PeerInfo]:
        """The peers this bus connects to, by node id."""
        if self._on_io_thread():
            return self._actor.peer_snapshot()
        return self._call("peers")

    def wait_for_peers(self, n: int, timeout: float) -> bool:
        """Wait until at least n peers are connected and ready; False on timeout."""
        self._check()
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._actor.ready_count >= n or self._actor.finished, timeout
            )
            return bool(ok) and self._actor.ready_count >= n

    def wait_for_broker(self, timeout: float) -> bool:
        """Wait until our own probe went through the broker and back; False on timeout."""
        self._check()
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._actor.broker_ready or self._actor.finished, timeout
            )
            return bool(ok) and self._actor.broker_ready

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: messages/bytes in and out, requests, drops by reason, per peer."""
        snap = self._actor.stats_snapshot() if self._on_io_thread() else self._call("stats")
        with self._pipe_lock:
            if self._api_dropped:
                snap["dropped"]["hwm"] = snap["dropped"].get("hwm", 0) + self._api_dropped
        return snap

    def close(self) -> None:
        """Stop the I/O thread, join it and release the sockets. Idempotent."""
        if self._on_io_thread():
            raise NetworkError("close() cannot be called from the bus I/O thread")
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._cmds.put(("stop",))
        self._wake()
        self._thread.join(timeout=30)
        with self._pipe_lock:
            self._pipe.close(linger=0)
        if self._thread.is_alive():
            logger.error("bus I/O thread did not stop; leaking its context")
            return
        self._ctx.term()


__all__ = ["Bus", "CurveConfig", "DiscoveryConfig", "PeerInfo"]
