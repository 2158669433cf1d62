"""What crosses into the bus I/O thread: its settings and typed commands.

:class:`Settings` are the bus options, validated once by :class:`dmodel.net.bus.Bus`
and read-only after. API threads put commands on the actor's queue and wake it; the
actor (:mod:`dmodel.net.actor`) runs them on the I/O thread and answers through each
command's future. A :class:`DeferredReply` is what an ``on_request`` handler returns
to answer later from another thread (the replication request worker does): its
:meth:`~DeferredReply.resolve` posts a :class:`SendReply` command.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import zmq

from dmodel.net.curve import CurveConfig
from dmodel.net.discovery import DiscoveryConfig
from dmodel.net.identity import NodeKey
from dmodel.net.peers import PeerInfo

PublishCallback = Callable[[bytes, bytes], None]
RequestCallback = Callable[[bytes, bytes], "bytes | DeferredReply | None"]
PeerCallback = Callable[[bytes], None]
RECV_BATCH = 256  # frames taken from one socket before the poll loop looks again


_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def drain(sock: zmq.SyncSocket, copy: bool = True) -> Iterator[list[Any]]:
    """The messages ``sock`` holds now, at most RECV_BATCH (bus I/O thread, after the
    poll said it is readable).

    After the first read it asks ZMQ_EVENTS instead of reading until ``zmq.Again``:
    raising and catching that costs more than a whole message at low rates.
    """
    for i in range(RECV_BATCH):
        # pyzmq types every option's value as int | bytes | str; ZMQ_EVENTS is an int.
        if sock.closed or (i and not sock.getsockopt(_EVENTS) & _POLLIN):  # type: ignore[operator]
            return
        try:
            yield sock.recv_multipart(zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return


@dataclass(frozen=True, slots=True)
class Stop:
    """Leave the loop and close everything."""


@dataclass(frozen=True, slots=True)
class Connect:
    endpoint: str
    future: Future[None] = field(default_factory=Future)


@dataclass(frozen=True, slots=True)
class Ask:
    """Send a request to a peer; the future gets its reply or None."""

    node_id: bytes
    payload: bytes
    timeout: float
    future: Future[bytes | None] = field(default_factory=Future)


@dataclass(frozen=True, slots=True)
class GetPeers:
    future: Future[dict[bytes, PeerInfo]] = field(default_factory=Future)


@dataclass(frozen=True, slots=True)
class GetStats:
    future: Future[dict[str, Any]] = field(default_factory=Future)


@dataclass(frozen=True, slots=True)
class SendReply:
    """The answer to a request that was deferred (None sends NO_REPLY)."""

    ident: bytes
    req_id: bytes
    payload: bytes | None


@dataclass(frozen=True, slots=True)
class Report:
    """``count`` bad updates (``reason``) came from ``sender``: count them toward a ban."""

    sender: bytes
    reason: str
    count: int = 1


Command = Stop | Connect | Ask | GetPeers | GetStats | SendReply | Report


DEFAULT_UPDATES_PER_S = 20_000.0
DEFAULT_UPDATE_BYTES_PER_S = 64.0 * 1024 * 1024
DEFAULT_REQUESTS_PER_S = 200.0
DEFAULT_UNPROVEN_PER_S = 100.0


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-source token-bucket rates (a second; bursts are twice as much)."""

    updates: float = DEFAULT_UPDATES_PER_S
    update_bytes: float = DEFAULT_UPDATE_BYTES_PER_S
    requests: float = DEFAULT_REQUESTS_PER_S
    unproven: float = DEFAULT_UNPROVEN_PER_S


class DeferredReply:
    """Returned by ``on_request`` to answer later, from any thread, with :meth:`resolve`."""

    __slots__ = ("_lock", "_send", "_reply", "_resolved")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._send: Callable[[bytes | None], None] | None = None
        self._reply: bytes | None = None
        self._resolved = False

    def resolve(self, reply: bytes | None) -> None:
        """Send ``reply`` (bytes, or None for no reply) to the asker. Only the first counts."""
        if reply is not None:
            if not isinstance(reply, bytes | bytearray | memoryview):
                raise TypeError(f"reply must be bytes or None, not {type(reply).__name__}")
            reply = bytes(reply)
        with self._lock:
            if self._resolved:
                return
            self._resolved, self._reply, send = True, reply, self._send
        if send is not None:
            send(reply)

    def _attach(self, send: Callable[[bytes | None], None]) -> tuple[bool, bytes | None]:
        """Route the reply through ``send``; (True, reply) if it was resolved already."""
        with self._lock:
            if self._resolved:
                return True, self._reply
            self._send = send
            return False, None


@dataclass(frozen=True, slots=True)
class Settings:
    """The bus options, validated once by :class:`dmodel.net.bus.Bus`."""

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
    node_key: NodeKey
    dial: Any = "learned"
    dial_per_address: int = 4
    dial_total: int = 64
    rates: Rates = field(default_factory=Rates)
    reply_hwm: int = 16
    max_requests_in_service: int = 8
    unreached_after: float = 5.0
