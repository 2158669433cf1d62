"""The bus actor: every ZeroMQ socket of a node and the one loop that polls them.

Everything here runs on the **bus I/O thread** (``dmodel-bus-<id>``), except the
command dataclasses and :class:`DeferredReply`, which API threads and the request
worker build and hand over. The API side (:class:`dmodel.net.bus.Bus`) talks to the
loop over an inproc PAIR pipe (publishes, wake-ups) plus a queue of typed commands.
The codecs live in :mod:`~dmodel.net.frames`, links and the handshake in
:mod:`~dmodel.net.mesh`; this module binds, polls, decodes and dispatches.

Limits. Payloads over ``max_message_size`` are dropped and counted
(``stats["dropped"]["oversize"]``); ZMQ_MAXMSGSIZE is the hard bound above it (a
bigger frame makes ZeroMQ drop the connection, which then reconnects by itself).
Malformed and unknown frames are counted and dropped, and feed the flood guard.

Strangers. A connection to our ROUTER is *unproven* until its HELLO signs the nonce
our WELCOME gave it (:mod:`dmodel.net.identity`); until then it may send only HELLO,
its bad frames are blamed on the connection (``"conn:<routing id>"``), and all unproven
frames from one source address share a token bucket (``unproven_rate`` a second), so
rotating routing ids buys nothing. Proven peers get token buckets of their own for
updates (count and bytes) and requests; over them, frames are dropped and counted
(``dropped["updates_limited"]``, ``["requests_limited"]``), never banned for it; a
proven node that is not a peer we link to gets a quarter of them, and every frame the
ROUTER drops draws on one budget shared by all (:mod:`dmodel.net.router`). At
most ``max_requests_in_service`` requests of one connection are being served at a
time, a repeated request id is dropped (``["duplicate_request"]``), and the ROUTER
sends with ZMQ_ROUTER_MANDATORY and a ``reply_hwm`` high-water mark: replies to a
peer that does not read them are dropped (``["reply_hwm"]``), not queued.

Requests. ``on_request`` runs on this thread, so it must be quick: it returns the
reply, None (NO_REPLY), or a :class:`DeferredReply` that another thread resolves
later; the reply then comes back as a :class:`SendReply` command.

Records are logged as ``dmodel.net.bus``, the transport's one logger name.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq

from dmodel.errors import NetworkError
from dmodel.net import frames as fr
from dmodel.net.commands import (
    Ask,
    Command,
    Connect,
    GetPeers,
    Report,
    SendReply,
    Settings,
    Stop,
    drain,
)
from dmodel.net.curve import make_client, make_server, start_authenticator
from dmodel.net.flood import RateLimiter
from dmodel.net.mesh import Mesh, SocketSet
from dmodel.net.peers import Link, Peer, PeerInfo
from dmodel.net.router import REJECTS_PER_REQUEST_RATE, STRANGER_SHARE, RouterSide

logger = logging.getLogger("dmodel.net.bus")

PIPE_ENDPOINT = "inproc://dmodel-bus-pipe"
PIPE_PUBLISH = b"P"
PIPE_WAKE = b"W"

_COUNTERS = ("messages_in", "messages_out", "bytes_in", "bytes_out", "requests_in",
             "requests_out", "replies_in", "replies_out", "request_timeouts",
             "requests_unroutable", "callback_errors", "bans", "relinks", "resubscribes",
             "proofs_ok", "proofs_failed", "dials_refused", "beacons_in", "beacons_failed")


@dataclass(slots=True)
class _Pending:
    future: Future[bytes | None]
    deadline: float
    link: Link


# ---------------------------------------------------------------------- actor


class Actor(RouterSide):
    """Everything that runs on the bus I/O thread. Only that thread touches it,
    except the few attributes the API reads after ``started`` is set."""

    def __init__(self, settings: Settings, ctx: zmq.Context[zmq.Socket[bytes]],
                 cmds: queue.SimpleQueue[Command],
                 cond: threading.Condition, post: Callable[[Command], None]) -> None:
        self.s = settings
        self.ctx = ctx
        self.cmds = cmds
        self.cond = cond
        self.post = post
        self.node_id = settings.node_id
        self.hard_limit = fr.hard_limit(settings.max_message_size)

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

        self.counters: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.io = SocketSet(ctx, settings.rcvhwm, settings.sndhwm)
        self.mesh = Mesh(
            settings, self.io, self.counters, self.dropped, schedule=self._schedule,
            on_usable=self._on_usable, on_link_closed=self._on_link_closed,
            read_dealer=lambda link: functools.partial(self._on_dealer, link),
            read_sub=lambda peer, sock: functools.partial(self._on_sub, peer, sock),
        )
        self.table = self.mesh.table
        self.flood = self.mesh.flood
        self.auth: Any = None
        self.pipe: zmq.Socket[bytes] | None = None
        self.router: zmq.Socket[bytes] | None = None
        self.xpub: zmq.Socket[bytes] | None = None
        self.broker_pub: zmq.Socket[bytes] | None = None
        self.broker_sub: zmq.Socket[bytes] | None = None
        self.next_broker_probe = 0.0

        self.sessions = self.mesh.sessions
        rate = settings.rates
        self.update_limit = RateLimiter(rate.updates, 2 * rate.updates)
        self.update_bytes = RateLimiter(rate.update_bytes,
                                        max(2 * rate.update_bytes, 2 * self.hard_limit))
        self.request_limit = RateLimiter(rate.requests, 2 * rate.requests)
        self.unproven_limit = RateLimiter(rate.unproven, 2 * rate.unproven)
        rejects = REJECTS_PER_REQUEST_RATE * rate.requests
        self.reject_limit = RateLimiter(rejects, max(16.0, rejects / 10), max_sources=1)
        self.router_paused_until = 0.0  # 0: the ROUTER is read
        self.stranger_request_limit = RateLimiter(rate.requests / STRANGER_SHARE,
                                                  2 * rate.requests / STRANGER_SHARE)
        self.stranger_update_limit = RateLimiter(rate.updates / STRANGER_SHARE,
                                                 2 * rate.updates / STRANGER_SHARE)
        self.stranger_update_bytes = RateLimiter(
            rate.update_bytes / STRANGER_SHARE,
            max(2 * rate.update_bytes / STRANGER_SHARE, 2 * self.hard_limit))
        self.strangers_serving: set[bytes] = set()
        self.unread: dict[bytes, float] = {}
        self.in_service: dict[bytes, set[bytes]] = {}  # routing id -> req ids being served
        self.pending: dict[bytes, _Pending] = {}
        self.req_ids = itertools.count(1)
        self.next_timer = 0.0
        self.stopping = False

    # ------------------------------------------------------------ socket setup

    def _advertised(self, bound: str) -> str:
        if self.s.advertise_host and fr.is_wildcard(bound):
            return fr.with_host(bound, self.s.advertise_host)
        return bound

    def _setup(self) -> None:
        s = self.s
        if s.curve is not None:
            self.auth = start_authenticator(self.ctx, s.curve, logger.getChild("zap"))

        self.pipe = self.io.open(zmq.PAIR)
        self.pipe.connect(PIPE_ENDPOINT)
        self.io.watch(self.pipe, self._on_pipe)

        if s.listen is not None:
            self.router = self.io.open(zmq.ROUTER)
            self.router.maxmsgsize = self.hard_limit
            self.router.sndhwm = s.reply_hwm
            self.router.router_mandatory = True
            make_server(self.router, s.curve)
            self.xpub = self.io.open(zmq.XPUB)
            self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
            make_server(self.xpub, s.curve)
            try:
                self.router.bind(s.listen)
                self.xpub.bind(fr.pub_bind_endpoint(s.listen))
            except zmq.ZMQError as exc:
                raise NetworkError(f"cannot bind {s.listen}: {exc}") from exc
            self.endpoint = self._advertised(self.router.get_string(zmq.LAST_ENDPOINT))
            self.pub_endpoint = self._advertised(self.xpub.get_string(zmq.LAST_ENDPOINT))
            self.io.watch(self.router, self._on_router)
            self.io.watch(self.xpub, functools.partial(self._on_xpub, self.xpub, False))

        if s.broker is not None:
            self.broker_pub = self.io.open(zmq.XPUB)
            self.broker_pub.setsockopt(zmq.XPUB_VERBOSE, 1)
            make_client(self.broker_pub, s.curve)
            self.broker_sub = self.io.open(zmq.SUB)
            self.broker_sub.maxmsgsize = self.hard_limit
            make_client(self.broker_sub, s.curve)
            try:
                self.broker_pub.connect(s.broker[0])
                self.broker_sub.connect(s.broker[1])
            except zmq.ZMQError as exc:
                raise NetworkError(f"cannot connect to broker {s.broker}: {exc}") from exc
            self.broker_sub.subscribe(fr.MESSAGE)
            self.broker_sub.subscribe(fr.ACK + self.node_id)
            self.io.watch(self.broker_pub, functools.partial(self._on_xpub, self.broker_pub, True))
            self.io.watch(self.broker_sub, functools.partial(self._on_sub, None, self.broker_sub))

        self.mesh.endpoint, self.mesh.pub_endpoint = self.endpoint, self.pub_endpoint
        if s.discovery is not None and s.discovery.enabled:
            self.mesh.open_discovery(s.discovery)
        now = time.monotonic()
        for endpoint in s.peers:
            self.mesh.open_link(endpoint, expected=None, explicit=True, now=now)

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
                events = self.io.poller.poll(timeout_ms)
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            for sock, _ in events:
                handler = self.io.handlers.get(sock)
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
            fut = getattr(cmd, "future", None)
            if fut is not None and not fut.done():
                fut.set_exception(error)
        self.io.close_all()
        self.mesh.close_discovery()
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
        nxt = min(self.mesh.timers(now), self._resume_router(now))
        for req_id, pending in list(self.pending.items()):
            if now >= pending.deadline:
                del self.pending[req_id]
                self.counters["request_timeouts"] += 1
                if not pending.future.done():
                    pending.future.set_result(None)
            else:
                nxt = min(nxt, pending.deadline)
        if self.broker_pub is not None and not self.broker_ready:
            if now >= self.next_broker_probe:
                self._ack(self.broker_pub, self.node_id)  # probe our own broker path
                self.next_broker_probe = now + s.hello_interval
            nxt = min(nxt, self.next_broker_probe)
        self.next_timer = nxt

    # ------------------------------------------------------------- bookkeeping

    def _on_usable(self, peer: Peer, usable: bool) -> None:
        with self.cond:
            self.ready_count += 1 if usable else -1
            self.cond.notify_all()
        if usable and self.s.on_peer_ready is not None:
            try:
                self.s.on_peer_ready(peer.node_id)
            except Exception:
                self.counters["callback_errors"] += 1
                logger.exception("on_peer_ready callback failed")

    def _on_link_closed(self, link: Link) -> None:
        for req_id, pending in list(self.pending.items()):
            if pending.link is link:
                del self.pending[req_id]
                if not pending.future.done():
                    pending.future.set_result(None)

    def _ack(self, sock: zmq.Socket[bytes] | None, subscriber: bytes) -> None:
        if sock is not None:
            sock.send_multipart(fr.ack_frames(subscriber, self.node_id), zmq.NOBLOCK)

    def _deliver(self, payload: bytes, sender: bytes, peer: Peer | None,
                 src: bytes | str, now: float, stranger: bool = False) -> bool:
        """Hand one update payload, unparsed, to ``on_publish`` (the per-source token
        buckets checked first: the only per-message work besides the frame checks);
        False if a limit dropped it. A ``stranger`` (a push from a proven node that is
        not a peer we link to) has buckets of a quarter the size."""
        count, size = ((self.stranger_update_limit, self.stranger_update_bytes) if stranger
                       else (self.update_limit, self.update_bytes))
        if not (count.allow(src, now) and size.allow(src, now, len(payload))):
            self.dropped["updates_limited"] += 1
            if peer is not None:
                peer.stats["limited"] += 1
            return False
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
        return True

    # ------------------------------------------------------- pipe and commands

    def _on_pipe(self) -> None:
        assert self.pipe is not None
        for frames in drain(self.pipe):
            if frames[0] == PIPE_PUBLISH:
                for payload in frames[1:]:
                    self._publish(payload)
        while not self.stopping:
            try:
                cmd = self.cmds.get_nowait()
            except queue.Empty:
                break
            self._command(cmd)

    def _publish(self, payload: bytes) -> None:
        self.counters["messages_out"] += 1
        self.counters["bytes_out"] += len(payload)
        for sock in (self.xpub, self.broker_pub):
            if sock is not None:
                sock.send_multipart(fr.message_frames(self.node_id, payload), zmq.NOBLOCK)
        if self.xpub is None:
            # A client-only node has no PUB: push to the peers it is connected to.
            for peer in self.table.push_targets():
                assert peer.link is not None
                try:
                    peer.link.sock.send_multipart(fr.push_frames(payload), zmq.NOBLOCK)
                    peer.stats["messages_out"] += 1
                except zmq.Again:
                    self.dropped["hwm"] += 1

    def _command(self, cmd: Command) -> None:
        if isinstance(cmd, Stop):
            self.stopping = True
            return
        if isinstance(cmd, SendReply):
            self._done_serving(cmd.ident, cmd.req_id)
            self._send_reply(cmd.ident, cmd.req_id, cmd.payload)
            return
        if isinstance(cmd, Report):
            self._report(cmd)
            return
        fut = cmd.future
        if not fut.set_running_or_notify_cancel():
            return
        try:
            if isinstance(cmd, Ask):
                self._start_request(cmd)
                return
            if isinstance(cmd, Connect):
                self.mesh.open_link(cmd.endpoint, expected=None, explicit=True,
                                    now=time.monotonic())
                result: Any = None
            elif isinstance(cmd, GetPeers):
                result = self.peer_snapshot()
            else:
                result = self.stats_snapshot()
        except Exception as exc:
            fut.set_exception(exc)
            return
        fut.set_result(result)

    def _start_request(self, cmd: Ask) -> None:
        peer = self.table.peers.get(cmd.node_id)
        if peer is None or peer.link is None or not peer.connected:
            self.counters["requests_unroutable"] += 1
            cmd.future.set_result(None)
            return
        req_id = next(self.req_ids).to_bytes(fr.REQ_ID_SIZE, "big")
        try:
            peer.link.sock.send_multipart(fr.request_frames(req_id, cmd.payload), zmq.NOBLOCK)
        except zmq.Again:
            self.counters["requests_unroutable"] += 1
            cmd.future.set_result(None)
            return
        self.counters["requests_out"] += 1
        peer.stats["requests_out"] += 1
        deadline = time.monotonic() + cmd.timeout
        self.pending[req_id] = _Pending(cmd.future, deadline, peer.link)
        self._schedule(deadline)

    # ---------------------------------------------------------------- handlers

    def _on_dealer(self, link: Link) -> None:
        for frames in drain(link.sock):
            self._dealer_message(link, frames)

    def _dealer_message(self, link: Link, frames: list[bytes]) -> None:
        src = link.source
        if self.flood.banned(src):
            self.dropped["banned"] += 1
            return
        peer = self.table.peer_of(link)
        try:
            msg = fr.decode_dealer(frames)
        except fr.MalformedFrame as exc:
            self.mesh.bad(src, exc.reason, peer)
            return
        now = time.monotonic()
        if isinstance(msg, fr.Hello):
            self.mesh.welcomed(link, msg, now)
            return
        pending = self.pending.get(msg.req_id)
        if pending is None or pending.link is not link:
            self.dropped["late_reply"] += 1
            return
        del self.pending[msg.req_id]
        reply = msg.payload
        if reply is not None:
            if len(reply) > self.s.max_message_size:
                self.mesh.bad(src, "oversize", peer)
                reply = None
            else:
                self.counters["replies_in"] += 1
                self.counters["bytes_in"] += len(reply)
        if peer is not None:
            peer.last_seen = now
        if not pending.future.done():
            pending.future.set_result(reply)

    def _on_sub(self, peer: Peer | None, sock: zmq.Socket[bytes]) -> None:
        for frames in drain(sock):
            self._sub_message(peer, frames)
            if self.stopping:
                return

    def _sub_message(self, peer: Peer | None, frames: list[bytes]) -> None:
        src: bytes | str = peer.node_id if peer is not None else "broker"
        if self.flood.banned(src):
            self.dropped["banned"] += 1
            return
        now = time.monotonic()
        if peer is not None:
            peer.sub_seen = now
            # The common case, a peer's MESSAGE, checked inline (no decoded object): the
            # payload goes on as it came, to be decoded on the apply side.
            if (len(frames) == 3 and frames[0] == fr.MESSAGE and frames[1] == peer.node_id
                    and len(frames[2]) <= self.s.max_message_size):
                peer.last_seen = now
                self._deliver(frames[2], frames[1], peer, src, now)
                return
        try:
            msg = fr.decode_sub(frames, self.node_id)
        except fr.MalformedFrame as exc:
            self.mesh.bad(src, exc.reason, peer)
            return
        if isinstance(msg, fr.Message):
            if msg.sender == self.node_id:
                self.dropped["echo"] += 1  # our own message back through the broker
                return
            if peer is not None and msg.sender != peer.node_id:
                self.mesh.bad(src, "spoofed", peer)
                return
            if len(msg.payload) > self.s.max_message_size:
                self.mesh.bad(src, "oversize", peer)
                return
            if peer is not None:
                peer.last_seen = now
            origin = self.table.peers.get(msg.sender) if peer is None else peer
            self._deliver(msg.payload, msg.sender, origin, src, now)
        elif peer is None:
            if msg.sender == self.node_id and not self.broker_ready:
                with self.cond:
                    self.broker_ready = True
                    self.cond.notify_all()
                logger.debug("broker path ready")
        elif msg.sender == peer.node_id:
            peer.last_seen = time.monotonic()
            if not peer.ready:
                self.mesh.set_state(peer, ready=True)
                if peer.link is not None and peer.link.welcomed:
                    peer.link.next_hello = time.monotonic() + self.s.ping_interval
        else:
            self.mesh.bad(src, "spoofed", peer)

    def _on_xpub(self, sock: zmq.Socket[bytes], only_self: bool) -> None:
        for frames in drain(sock):
            data = frames[0]
            # A new subscriber on its ACK topic: acknowledge it. Through the broker we
            # only probe our own path; peers ack each other directly.
            subscriber = fr.ack_subscriber(data)
            if subscriber is not None and (not only_self or subscriber == self.node_id):
                self._ack(sock, subscriber)

    # --------------------------------------------------------------- snapshots

    def peer_snapshot(self) -> dict[bytes, PeerInfo]:
        return self.table.snapshot(time.monotonic(), time.time())

    def stats_snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: self.counters[key] for key in _COUNTERS}
        out["dropped"] = dict(self.dropped)
        out["banned"] = self.flood.bans
        out["pending_requests"] = len(self.pending)
        out["sessions"] = len(self.sessions)
        out["unreached"] = self.mesh.unreached(time.monotonic())
        out["dials_refused_by"] = dict(self.mesh.dial.refused)
        out["links"] = len(self.table.links)
        out["self_endpoints"] = sorted(self.table.self_endpoints)
        out["broker_ready"] = self.broker_ready
        out["peers"] = self.table.stats()
        return out
