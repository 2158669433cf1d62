"""The message bus: a node's ZeroMQ transport (publish to all peers, request one).

:class:`Bus` is the facade: it validates its options once, starts the **bus I/O
thread** (:class:`~dmodel.net.actor.Actor`, which owns every socket) and talks to it
over an inproc pipe plus a queue of typed commands (:mod:`dmodel.net.commands`). The
bus moves opaque bytes; it knows nothing about updates.

Each node binds an XPUB socket (publishes out) and a ROUTER socket (hello and
requests in), and for every peer it knows it connects one DEALER (to the peer's
ROUTER) and one SUB (to the peer's PUB). A peer is addressed by one endpoint, its
ROUTER. The wire format is in :mod:`dmodel.net.frames`, the handshake, gossip and
slow-joiner ACK in :mod:`dmodel.net.mesh` and :mod:`dmodel.net.peers`.

Limits. Payloads over ``max_message_size`` (default ``MAX_UPDATE_SIZE`` plus
``frames.FRAME_OVERHEAD``) are dropped and counted (``stats["dropped"]["oversize"]``).
Malformed and unknown frames are counted and dropped; a source that sends more than
``flood_threshold`` of them within ``flood_window`` seconds is banned for
``flood_ban`` seconds (its connections closed, its frames ignored). Sources are proven
node ids or connections, never ids a remote merely claims (see
:mod:`dmodel.net.actor` for the handshake and the per-source rate limits, and
:mod:`dmodel.net.peers` for the ``dial`` policy). README's "Limits" table lists every
option with its default.

Broker. With ``broker=(xsub, xpub)`` the bus also publishes into a
:class:`~dmodel.net.broker.Broker` and subscribes from it, so peers that cannot
reach each other still get each other's publishes. Requests never go through
the broker. A peer reachable both ways delivers its messages twice; the node
dedupes by update id.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, overload

import zmq

from dmodel.errors import ConfigurationError, NetworkError
from dmodel.net.actor import PIPE_ENDPOINT, PIPE_PUBLISH, PIPE_WAKE, Actor
from dmodel.net.commands import (
    DEFAULT_REQUESTS_PER_S,
    DEFAULT_UNPROVEN_PER_S,
    DEFAULT_UPDATE_BYTES_PER_S,
    DEFAULT_UPDATES_PER_S,
    Ask,
    Command,
    Connect,
    DeferredReply,
    GetPeers,
    GetStats,
    PeerCallback,
    PublishCallback,
    Rates,
    Report,
    RequestCallback,
    Settings,
    Stop,
)
from dmodel.net.curve import CurveConfig
from dmodel.net.discovery import DiscoveryConfig
from dmodel.net.frames import (
    DEFAULT_MAX_MESSAGE_SIZE,
    check_endpoint,
    check_node_id,
    pub_bind_endpoint,
)
from dmodel.net.identity import NodeKey
from dmodel.net.peers import PeerInfo, parse_dial
from dmodel.update import NODE_ID_SIZE

logger = logging.getLogger(__name__)


class Bus:
    """A node's ZeroMQ transport: publish to all peers, request one peer.

    One I/O thread owns every socket; the methods here are thread-safe and talk to
    it over an inproc pipe. ``on_publish(payload, sender_id)``,
    ``on_request(payload, sender_id) -> bytes | None`` and ``on_peer_ready(node_id)``
    (a peer became connected and ready, again after a reconnection) run *on that
    thread*: keep them quick (enqueue and return), and never call :meth:`request`
    from them. A handler with slow work returns a :class:`DeferredReply` and resolves
    it later from its own thread.
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
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
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
        node_key: NodeKey | None = None,
        dial: Any = "learned",
        dial_per_address: int = 4,
        dial_total: int = 64,
        max_updates_per_s: float = DEFAULT_UPDATES_PER_S,
        max_update_bytes_per_s: float = DEFAULT_UPDATE_BYTES_PER_S,
        max_requests_per_s: float = DEFAULT_REQUESTS_PER_S,
        max_unproven_per_s: float = DEFAULT_UNPROVEN_PER_S,
        reply_hwm: int = 16,
        max_requests_in_service: int = 8,
        unreached_after: float = 5.0,
    ) -> None:
        check_node_id(node_id)
        if listen is not None:
            check_endpoint(listen)
            pub_bind_endpoint(listen)
        peer_list = tuple(check_endpoint(p) for p in peers)
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
            broker = (check_endpoint(broker[0]), check_endpoint(broker[1]))
        for name, value in (
            ("max_message_size", max_message_size),
            ("rcvhwm", rcvhwm),
            ("sndhwm", sndhwm),
            ("flood_threshold", flood_threshold),
            ("max_peers", max_peers),
            ("dial_per_address", dial_per_address),
            ("dial_total", dial_total),
            ("reply_hwm", reply_hwm),
            ("max_requests_in_service", max_requests_in_service),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive int")
        for name, fvalue in (
            ("hello_interval", hello_interval),
            ("ping_interval", ping_interval),
            ("peer_timeout", peer_timeout),
            ("flood_window", flood_window),
            ("flood_ban", flood_ban),
            ("max_updates_per_s", max_updates_per_s),
            ("max_update_bytes_per_s", max_update_bytes_per_s),
            ("max_requests_per_s", max_requests_per_s),
            ("max_unproven_per_s", max_unproven_per_s),
            ("unreached_after", unreached_after),
        ):
            if not fvalue > 0:
                raise ConfigurationError(f"{name} must be > 0")
        if not ping_interval < peer_timeout:
            raise ConfigurationError("ping_interval must be shorter than peer_timeout")
        if node_key is not None and not isinstance(node_key, NodeKey):
            raise ConfigurationError("node_key must be a NodeKey")
        parse_dial(dial)

        settings = Settings(
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
            node_key=node_key or NodeKey.generate(),
            dial=dial,
            dial_per_address=dial_per_address,
            dial_total=dial_total,
            rates=Rates(max_updates_per_s, max_update_bytes_per_s, max_requests_per_s,
                        max_unproven_per_s),
            reply_hwm=reply_hwm,
            max_requests_in_service=max_requests_in_service,
            unreached_after=unreached_after,
        )
        self._node_id = node_id
        self._closed = False
        self._close_lock = threading.Lock()
        self._pipe_lock = threading.Lock()
        self._api_dropped = 0
        self._cmds: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._ctx = zmq.Context()
        self._pipe = self._ctx.socket(zmq.PAIR)
        self._pipe.linger = 0
        self._pipe.sndhwm = sndhwm
        self._pipe.bind(PIPE_ENDPOINT)
        self._actor = Actor(settings, self._ctx, self._cmds, self._cond, self._post)
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
    def max_message_size(self) -> int:
        """The largest payload this bus sends or accepts."""
        return self._actor.s.max_message_size

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
                self._pipe.send(PIPE_WAKE, zmq.NOBLOCK)
            except zmq.Again:
                pass  # the pipe is full, so the I/O thread is awake anyway

    def _post(self, cmd: Command) -> None:
        """Queue a command for the I/O thread and wake it (any thread, never blocks)."""
        self._cmds.put(cmd)
        self._wake()

    @overload
    def _call(self, cmd: Ask, wait: float) -> bytes | None: ...
    @overload
    def _call(self, cmd: Connect) -> None: ...
    @overload
    def _call(self, cmd: GetPeers) -> dict[bytes, PeerInfo]: ...
    @overload
    def _call(self, cmd: GetStats) -> dict[str, Any]: ...
    def _call(self, cmd: Ask | Connect | GetPeers | GetStats, wait: float | None = None) -> object:
        """Run a command on the I/O thread and wait for its result (None once ``wait``
        seconds have passed)."""
        self._check()
        fut = cmd.future
        self._post(cmd)
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
        self.publish_many((payload,))

    def publish_many(self, payloads: Sequence[bytes]) -> None:
        """Send each payload to every subscriber, in order, with one wake-up of the I/O
        thread; never blocks (drops at HWM are counted, one per payload)."""
        if not all(isinstance(p, bytes | bytearray | memoryview) for p in payloads):
            raise TypeError("payload must be bytes")
        self._check()
        if not payloads:
            return
        with self._pipe_lock:
            if self._pipe.closed:
                raise NetworkError("bus is closed")
            try:
                self._pipe.send_multipart([PIPE_PUBLISH, *payloads], zmq.NOBLOCK)
            except zmq.Again:
                self._api_dropped += len(payloads)

    def request(self, node_id: bytes, payload: bytes, timeout: float = 5.0) -> bytes | None:
        """Ask one connected peer; its reply, or None on timeout or no answer.

        Returns None at once if the peer is unknown or not connected, or if its
        handler returned None. Must not be called from the bus I/O thread.
        """
        check_node_id(node_id)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError("payload must be bytes")
        if not timeout > 0:
            raise ConfigurationError("timeout must be > 0")
        if self._on_io_thread():
            raise NetworkError("request() called from the bus I/O thread would deadlock")
        return self._call(Ask(node_id, bytes(payload), float(timeout)), wait=timeout + 5)

    def connect(self, endpoint: str) -> None:
        """Connect to a peer's ROUTER endpoint (idempotent); the handshake runs later."""
        check_endpoint(endpoint)
        if self._on_io_thread():
            self._actor.mesh.open_link(endpoint, expected=None, explicit=True,
                                       now=time.monotonic())
            return
        self._call(Connect(endpoint))

    def peers(self) -> dict[bytes, PeerInfo]:
        """The peers this bus connects to, by node id."""
        if self._on_io_thread():
            return self._actor.peer_snapshot()
        return self._call(GetPeers())

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

    def report(self, sender: bytes, reason: str, count: int = 1) -> None:
        """Count ``count`` bad updates from ``sender`` toward a flood ban (any thread)."""
        if count > 0 and not self.closed:
            self._post(Report(sender, reason, count))

    @property
    def node_key(self) -> bytes:
        """This node's public key, which the handshake proves."""
        return self._actor.s.node_key.public

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: messages/bytes in and out, requests, drops by reason, per peer."""
        snap = self._actor.stats_snapshot() if self._on_io_thread() else self._call(GetStats())
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
        self._post(Stop())
        self._thread.join(timeout=30)
        with self._pipe_lock:
            self._pipe.close(linger=0)
        if self._thread.is_alive():
            logger.error("bus I/O thread did not stop; leaking its context")
            return
        self._ctx.term()


__all__ = [
    "NODE_ID_SIZE",
    "Bus",
    "CurveConfig",
    "DeferredReply",
    "DiscoveryConfig",
    "PeerCallback",
    "PeerInfo",
    "PublishCallback",
    "RequestCallback",
]
