"""The ROUTER side of the bus actor: frames that peers' DEALERs send us.

``RouterSide`` is the half of :class:`~dmodel.net.actor.Actor` that handles the bound
ROUTER socket, on the **bus I/O thread**: the handshake (HELLO, proof of the peer's
key), requests (handed to the request worker, answered through ``_send_reply``),
reports and pushes, with the flood guard and rate limits applied per proven peer or per
connection before proof. The attributes it uses are set up by ``Actor``.

Rejected frames. Every frame the ROUTER drops unserved (banned or unproven source,
malformed, over a rate limit, a repeated or excess request) takes a token from one
bucket shared by all sources: ``REJECTS_PER_REQUEST_RATE`` x ``max_requests_per_s`` a
second (1,000 by default). When it is empty the actor stops reading the ROUTER for
``ROUTER_PAUSE`` seconds (``dropped["router_paused"]`` counts the pauses). Reading
costs the same whether a frame is served or not, so without this a peer that sends as
fast as we drop keeps the I/O thread busy however little it gets. Paused, the frames
wait in ZeroMQ's queue (``rcvhwm``), then in the sender's: TCP pushes back on it and it
stalls, not us. ZeroMQ reads the ROUTER's connections in turn, so an honest peer's
frames wait at most a pause plus one frame per other connection; its updates come on
our SUB to its PUB, which is never paused.

Strangers and deaf connections. A requester that proved its node id but is not a peer
we link to (no endpoint we dialled: an attacker, or a client-only node) is a
*stranger*: it gets a quarter of ``max_requests_per_s`` and of the update limits
(``max_updates_per_s``, ``max_update_bytes_per_s``, for its pushes), and all strangers
together at most ``STRANGER_SHARE`` x ``max_requests_in_service`` requests in service,
so the request worker's queue keeps room for the peers we link to (over:
``requests_busy``).
A connection that does not read its replies (one was dropped at ``reply_hwm``) gets its
requests dropped unserved for ``UNREAD_HOLD`` seconds (``dropped["requests_unread"]``):
no store read is spent on a reply nobody takes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from dmodel.net import frames as fr
from dmodel.net.commands import RECV_BATCH, Command, DeferredReply, Report, SendReply, Settings
from dmodel.net.flood import FloodGuard, RateLimiter
from dmodel.net.peers import Peer, PeerTable, Session, SessionTable

if TYPE_CHECKING:
    from dmodel.net.mesh import Mesh, SocketSet

logger = logging.getLogger("dmodel.net.bus")

REJECTS_PER_REQUEST_RATE = 5  # rejected ROUTER frames a second, per max_requests_per_s
ROUTER_PAUSE = 0.05  # seconds the ROUTER is not read once the reject budget is spent
_ALL = "all"  # the reject bucket's one key
STRANGER_SHARE = 4  # strangers: 1/4 of the request rate each, 4 x in-service in all
UNREAD_HOLD = 1.0  # seconds a connection's requests are dropped after a reply hit reply_hwm


def _peer_address(frame: zmq.Frame) -> str | None:
    """The remote address ZeroMQ gives for the connection ``frame`` came on, if any."""
    try:
        address = frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return None
    return address if isinstance(address, str) else None


class RouterSide:
    """Handling of the bound ROUTER socket (mixed into ``Actor``)."""

    # Set by Actor.__init__ and Actor._setup.
    s: Settings
    node_id: bytes
    post: Callable[[Command], None]
    mesh: Mesh
    io: SocketSet
    table: PeerTable
    flood: FloodGuard
    sessions: SessionTable
    counters: Counter[str]
    dropped: Counter[str]
    router: zmq.Socket[bytes] | None
    xpub: zmq.Socket[bytes] | None
    stopping: bool
    request_limit: RateLimiter
    unproven_limit: RateLimiter
    reject_limit: RateLimiter
    stranger_request_limit: RateLimiter
    router_paused_until: float
    in_service: dict[bytes, set[bytes]]
    strangers_serving: set[bytes]  # routing ids of strangers with requests in service
    unread: dict[bytes, float]  # routing id -> requests dropped until (it does not read)

    # Defined by Actor.
    def _deliver(self, payload: bytes, sender: bytes, peer: Peer | None,
                 src: bytes | str, now: float, stranger: bool = False) -> bool:
        raise NotImplementedError

    def _ack(self, sock: zmq.Socket[bytes] | None, subscriber: bytes) -> None:
        raise NotImplementedError

    def _schedule(self, when: float) -> None:
        raise NotImplementedError

    def _on_router(self) -> None:
        """Read what the ROUTER holds (at most RECV_BATCH messages), until the reject
        budget runs out.

        Not :func:`~dmodel.net.commands.drain`: a message's parts are read while
        ``Frame.more`` says so, and the batch ends at ``zmq.Again``, which costs one
        exception per wake-up instead of two socket option reads per message (about a
        third of the cost of a small message read in full, at flood rates)."""
        sock = self.router
        assert sock is not None
        for _ in range(RECV_BATCH):
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [frame]
            while frame.more:  # the parts of a message arrive together
                frame = sock.recv(copy=False)
                frames.append(frame)
            now = time.monotonic()
            if not self._router_message(frames, now) and not self.reject_limit.allow(_ALL, now):
                self._pause_router(now)
            if self.stopping or self.router_paused_until:
                return

    def _pause_router(self, now: float) -> None:
        """Stop reading the ROUTER for ROUTER_PAUSE seconds (see the module docstring)."""
        assert self.router is not None
        self.dropped["router_paused"] += 1
        self.router_paused_until = now + ROUTER_PAUSE
        self.io.poller.unregister(self.router)
        self._schedule(self.router_paused_until)

    def _resume_router(self, now: float) -> float:
        """Read the ROUTER again once its pause is over; when to look again (or inf)."""
        if not self.router_paused_until:
            return float("inf")
        if now < self.router_paused_until:
            return self.router_paused_until
        self.router_paused_until = 0.0
        if self.router is not None and not self.stopping:
            self.io.poller.register(self.router, zmq.POLLIN)
        return float("inf")

    def _router_message(self, frames: list[zmq.Frame], now: float) -> bool:
        """Handle one message from the ROUTER; False if it was dropped unserved."""
        ident = frames[0].bytes
        session = self.sessions.get(ident)
        if session is None or session.node_id is None:
            return self._unproven_message(ident, session, frames, now)
        src = session.node_id
        if self.flood.banned(src):
            self.dropped["banned"] += 1
            return False
        session.seen = now
        peer = self.table.peers.get(src)
        try:
            msg = fr.decode_router([f.bytes for f in frames[1:]])
        except fr.MalformedFrame as exc:
            self.mesh.bad(src, exc.reason, peer)
            return False
        if isinstance(msg, fr.Hello):
            return self._hello(session, msg, frames[-1], now)
        if isinstance(msg, fr.Request):
            return self._request(session, msg, peer, now)
        if len(msg.payload) > self.s.max_message_size:
            self.mesh.bad(src, "oversize", peer)
            return False
        return self._deliver(msg.payload, src, peer, src, now, stranger=peer is None)

    def _unproven_message(self, ident: bytes, session: Session | None,
                          frames: list[zmq.Frame], now: float) -> bool:
        """A frame from a connection that has not proven a node key: HELLO or nothing."""
        src = "conn:" + ident.hex()
        if self.flood.banned(src):
            self.dropped["banned"] += 1
            return False
        address = _peer_address(frames[-1])
        if not self.unproven_limit.allow(address, now):
            self.dropped["unproven_limited"] += 1
            return False
        if len(frames) != 3 or frames[1].bytes != fr.HELLO:
            self.mesh.bad(src, "unproven")
            return False
        try:
            hello = fr.decode_hello(frames[2].bytes)
        except fr.MalformedFrame as exc:
            self.mesh.bad(src, exc.reason)
            return False
        if session is None:
            session = self.sessions.open(ident, now)
        session.seen = now
        return self._hello(session, hello, frames[-1], now)

    def _hello(self, session: Session, hello: fr.Hello, body: zmq.Frame, now: float) -> bool:
        if session.node_id is not None:
            if hello.node_id != session.node_id or hello.key != session.key:
                self.mesh.bad(session.source, "identity_conflict")
                return False
        elif hello.proof:
            if self.flood.banned(hello.node_id):
                self.dropped["banned"] += 1
                return False
            if not self.mesh.check_proof(fr.HELLO, hello, session.nonce):
                self.mesh.bad(session.source, "forged_hello")
                return False
            if hello.node_id != self.node_id:
                self.sessions.prove(session, hello.node_id, hello.key)
        proven = session.node_id is not None
        if session.welcome is None or session.welcome[0] != hello.nonce:
            session.welcome = (hello.nonce, self.mesh.sign_proof(fr.WELCOME, hello.nonce))
        body_out = self.mesh.hello_body(session.nonce, session.welcome[1], gossip=proven)
        self._router_send(fr.welcome_frames(session.ident, body_out))
        if not proven:
            return True
        self._ack(self.xpub, hello.node_id)
        address = _peer_address(body)
        self.mesh.hello_from(hello.node_id, hello, address, now)
        return True

    def _request(self, session: Session, msg: fr.Request, peer: Peer | None,
                 now: float) -> bool:
        src, ident = session.node_id, session.ident
        assert src is not None
        until = self.unread.get(ident)
        if until is not None:
            if now < until:
                self.dropped["requests_unread"] += 1
                return False  # no reply either: it would not be read
            del self.unread[ident]
        if len(msg.payload) > self.s.max_message_size:
            self.mesh.bad(src, "oversize", peer)
            self._send_reply(ident, msg.req_id, None)
            return False
        stranger = peer is None
        limit = self.stranger_request_limit if stranger else self.request_limit
        if not limit.allow(src, now):
            self.dropped["requests_limited"] += 1
            self._send_reply(ident, msg.req_id, None)
            return False
        serving = self.in_service.get(ident)
        if serving is not None:
            if msg.req_id in serving:
                self.dropped["duplicate_request"] += 1
                return False
            if len(serving) >= self.s.max_requests_in_service:
                self.dropped["requests_busy"] += 1
                self._send_reply(ident, msg.req_id, None)
                return False
        if stranger and self._strangers_in_service() >= (
                STRANGER_SHARE * self.s.max_requests_in_service):
            self.dropped["requests_busy"] += 1
            self._send_reply(ident, msg.req_id, None)
            return False
        self.counters["requests_in"] += 1
        self.counters["bytes_in"] += len(msg.payload)
        if peer is not None:
            peer.stats["requests_in"] += 1
        self._answer(ident, msg.req_id, msg.payload, src)
        if stranger and ident in self.in_service:
            self.strangers_serving.add(ident)
        return True

    def _strangers_in_service(self) -> int:
        """Requests of strangers being served now (at most STRANGER_SHARE x
        max_requests_in_service, over at most that many connections)."""
        in_service = self.in_service
        return sum(len(in_service.get(ident, ())) for ident in self.strangers_serving)

    def _done_serving(self, ident: bytes, req_id: bytes) -> None:
        """The request ``req_id`` of ``ident`` was answered (a SendReply came back)."""
        serving = self.in_service.get(ident)
        if serving is not None:
            serving.discard(req_id)
            if not serving:
                del self.in_service[ident]
                self.strangers_serving.discard(ident)

    def _report(self, cmd: Report) -> None:
        """The node found ``cmd.count`` bad updates from ``cmd.sender``: count them like
        bad frames, against the sender only if it proved its node id to us."""
        peer = self.table.peers.get(cmd.sender)
        proven = peer is not None or self.sessions.has_node(cmd.sender)
        for _ in range(cmd.count):
            if not proven or self.flood.banned(cmd.sender):
                self.dropped[cmd.reason] += 1
            else:
                self.mesh.bad(cmd.sender, cmd.reason, peer)

    def _answer(self, ident: bytes, req_id: bytes, payload: bytes, sender: bytes) -> None:
        reply: bytes | None = None
        try:
            answer = self.s.on_request(payload, sender)
            if isinstance(answer, DeferredReply):
                post = self.post
                done, answer = answer._attach(
                    lambda late: post(SendReply(ident, req_id, late)))
                if not done:
                    self.in_service.setdefault(ident, set()).add(req_id)
                    return  # answered later, through a SendReply command
            if answer is not None and not isinstance(answer, bytes | bytearray | memoryview):
                raise TypeError(f"on_request returned {type(answer).__name__}, not bytes")
            reply = answer
        except Exception:
            reply = None
            self.counters["callback_errors"] += 1
            logger.exception("on_request callback failed")
        self._send_reply(ident, req_id, reply)

    def _send_reply(self, ident: bytes, req_id: bytes, reply: bytes | None) -> None:
        if self.router is None:
            return
        failed = self._router_send(fr.reply_frames(ident, req_id, reply))
        if failed is None:
            if reply is not None:
                self.counters["replies_out"] += 1
                self.counters["bytes_out"] += len(reply)
        elif failed == "reply_hwm":  # it does not read its replies: serve it nothing
            now = time.monotonic()
            if len(self.unread) >= 4 * len(self.sessions) + 16:
                self.unread = {i: t for i, t in self.unread.items() if t > now}
            self.unread[ident] = now + UNREAD_HOLD

    def _router_send(self, frames: list[bytes]) -> str | None:
        """Send on the ROUTER; None if sent, else why not (counted): ``"reply_hwm"``, the
        peer does not read, or ``"reply_unroutable"``, it is gone."""
        assert self.router is not None
        try:
            self.router.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped["reply_hwm"] += 1
            return "reply_hwm"
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.dropped["reply_unroutable"] += 1
            return "reply_unroutable"
        return None

