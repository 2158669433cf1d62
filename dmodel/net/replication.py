"""Replication: publish and relay accepted updates, apply peers' updates, serve and
run catch-up. :class:`NetworkService` connects one node to its peers through a
:class:`~dmodel.net.bus.Bus`; it talks to the node only through :class:`LogSource`.

Threads (each started here is joined by :meth:`NetworkService.close`):

- **bus I/O thread** (the bus's): ``_on_publish`` and ``_on_request`` only enqueue, and
  ``_on_peer_ready`` only flags; none of them touches Redis.
- **request worker** (``dmodel-serve-*``): answers peers' requests (log pages, updates
  by id, creates by db_id) with store reads, and sends each reply back through the bus
  (a :class:`~dmodel.net.bus.DeferredReply`). Its queue is bounded: when it is full a
  request gets no reply at once and is counted (``stats["requests_dropped"]``); the
  asker treats that as a peer that did not answer and asks again on its next pass.
- **apply thread** (``dmodel-apply-*``): drains the bounded queue of published updates
  into ``ingest_many``. When the queue is full, messages are dropped and counted
  (``stats["queue_dropped"]``) and a catch-up pass is scheduled: catch-up
  (``dmodel.net.sync``) brings them back, so nothing accepted is lost for good.
- **sync thread** (``dmodel-sync-*``): pulls each peer's log from where it last stopped
  (per peer epoch and position, kept in the store), at start, when a peer connects,
  every ``sync_interval`` seconds, and whenever updates wait for a missing dependency.
- whichever thread accepted an update (a local writer, the apply or the sync thread)
  runs ``_publish``.

Every update the node accepts, local or received live, is published: remote ones are
thereby relayed, so a partial mesh delivers everything; duplicates are dropped by
update id at the receiver and so never relayed twice. It is not relayed when every
other peer said it is connected to the update's signing node (peers tell each other
whom they are connected to), so a full mesh does not echo every update n times.
Updates pulled by catch-up are not re-published: the peer they came from serves them
to anyone else who lacks them. A missed relay is made up by the next catch-up pass.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import msgpack

from .. import merge
from ..crypto import SIGNATURE_SIZE
from ..errors import NetworkError
from ..update import update_id
from . import sync
from .bus import Bus, DeferredReply
from .frames import reply_budget
from .peers import mesh_of, relay_targets

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
_BATCH = 256  # updates applied (and committed) together by the apply thread
_FETCH = 500  # updates asked for in one request
_MAX_BUSY_SKIPS = 4  # catch-up passes skipped in a row while live updates are queued


class LogStore(Protocol):
    """The store reads and cursor writes replication needs (``node.store`` today)."""

    def meta(self, key: str) -> bytes | None: ...
    def set_meta(self, key: str, value: bytes) -> None: ...
    def log_range(self, start: int = 0, stop: int = -1) -> list[bytes]: ...
    def raw_updates(self, uids: Iterable[bytes]) -> list[bytes | None]: ...
    def object_meta(self, db_id: str) -> Any: ...
    def missing(self, uids: Sequence[bytes]) -> list[bytes]: ...


class PublishStats(Protocol):
    published: int


class LogSource(Protocol):
    """What replication needs from a node. ``store`` and ``stats`` are still reached
    directly: the node has no methods yet for the log reads, the cursors and the
    published counter."""

    node_id: bytes
    store: LogStore
    stats: PublishStats

    @property
    def closed(self) -> bool: ...
    @property
    def pending_count(self) -> int: ...
    def on_accepted(self, callback: Callable[[Any, bool], None]) -> None: ...
    def ingest_many(self, raws: Iterable[bytes]) -> list[Any]: ...
    def pending_needs(self) -> list[bytes | str]: ...
    def log_length(self) -> int: ...


class RequestWorker:
    """One thread answering requests in arrival order from a bounded queue."""

    def __init__(self, serve: Callable[[bytes, bytes], bytes | None], size: int,
                 name: str) -> None:
        self._serve = serve
        self._queue: queue.Queue[tuple[bytes, bytes, DeferredReply] | None] = queue.Queue(
            maxsize=size)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, payload: bytes, sender: bytes) -> DeferredReply | None:
        """Queue a request (bus I/O thread); None, answered at once, when the queue is full."""
        deferred = DeferredReply()
        try:
            self._queue.put_nowait((payload, sender, deferred))
        except queue.Full:
            self.dropped += 1
            return None
        return deferred

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            payload, sender, deferred = item
            reply: bytes | None = None
            try:
                reply = self._serve(payload, sender)
            except Exception:
                logger.exception("serving a sync request failed")
            deferred.resolve(reply)

    def close(self) -> None:
        """Stop after the request at hand; unanswered ones get no reply. Call after the
        bus stopped submitting."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[2].resolve(None)
        self._queue.put(None)
        self._thread.join(10)


class NetworkService:
    """The network side of one node (publish, apply queue, catch-up)."""

    def __init__(self, node: LogSource, *, listen: str | None, peers: Iterable[str] = (),
                 discovery: bool = False, curve: Any = None, broker: Any = None,
                 sync_interval: float = 2.0, queue_size: int = 10_000, page_size: int = 2000,
                 discovery_config: Any = None, request_queue_size: int = 256,
                 **bus_options: Any) -> None:
        self.node = node
        self.sync_interval = sync_interval
        self.page_size = page_size
        self.stats = {"received": 0, "queue_dropped": 0, "pulled": 0, "served": 0,
                      "sync_errors": 0, "requests_dropped": 0}
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_size)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress: list[ProgressCallback] = []
        self._catching_up = threading.local()  # set while the sync thread ingests
        self._dropped_seen = 0
        self._force_pull = threading.Event()
        self._mesh: dict[bytes, frozenset[bytes]] = {}  # ready peer -> peers it hears
        self._busy_passes = 0
        self._sync_lock = threading.Lock()
        self.epoch = self._epoch()
        if discovery and discovery_config is None:
            from .discovery import DiscoveryConfig

            discovery_config = DiscoveryConfig(enabled=True)
        if listen is None and discovery:
            listen = "tcp://0.0.0.0:*"
        options: dict[str, Any] = dict(bus_options)
        if curve is not None:
            options["curve"] = curve
        if broker is not None:
            options["broker"] = broker
        if discovery_config is not None:
            options["discovery"] = discovery_config
        self.bus = Bus(node_id=node.node_id, listen=listen, peers=list(peers),
                       on_publish=self._on_publish, on_request=self._on_request,
                       on_peer_ready=self._on_peer_ready, **options)
        self._reply_budget = reply_budget(self.bus.max_message_size)
        short = node.node_id.hex()[:6]
        self._server = RequestWorker(self._serve, request_queue_size, f"dmodel-serve-{short}")
        node.on_accepted(self._publish)
        self._apply_thread = threading.Thread(target=self._apply_loop, daemon=True,
                                              name=f"dmodel-apply-{short}")
        self._sync_thread = threading.Thread(target=self._sync_loop, daemon=True,
                                             name=f"dmodel-sync-{short}")
        self._apply_thread.start()
        self._sync_thread.start()

    def _epoch(self) -> bytes:
        epoch = self.node.store.meta("epoch")
        if not epoch:
            epoch = os.urandom(16)
            self.node.store.set_meta("epoch", epoch)
        return epoch

    # ----------------------------------------------------------------- public
    @property
    def endpoint(self) -> str | None:
        """The endpoint peers connect to (None when not listening)."""
        return self.bus.endpoint

    def connect(self, endpoint: str) -> None:
        self.bus.connect(endpoint)

    def peers(self) -> dict[bytes, Any]:
        return self.bus.peers()

    def wait_for_peers(self, n: int, timeout: float = 10.0) -> bool:
        return self.bus.wait_for_peers(n, timeout)

    def on_progress(self, callback: ProgressCallback) -> None:
        """``callback(peer_hex, done, total)`` during catch-up from a peer."""
        self._progress.append(callback)

    def sync_now(self) -> int:
        """Pull what every connected peer has and this node has not; returns updates pulled."""
        with self._sync_lock:
            return self._sync_all(force=True)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until the apply queue is drained (tests, demo)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            self._stop.wait(0.01)
        return False

    def close(self) -> None:
        """Stop the threads and the bus. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self.bus.close()
        self._server.close()
        self._apply_thread.join(10)
        self._sync_thread.join(10)

    # --------------------------------------------------------------- I/O side
    def _publish(self, update: Any, local: bool) -> None:
        if getattr(self._catching_up, "active", False):
            return  # pulled from a peer that has it: whoever lacks it pulls it likewise
        if not local and not relay_targets(self._mesh, update.node):
            return  # every other peer hears the signing node directly: no relay needed
        try:
            self.bus.publish(update.raw)
            self.node.stats.published += 1
        except NetworkError as exc:
            if not self._stop.is_set():
                logger.warning("publish failed: %s", exc)

    def _on_publish(self, payload: bytes, sender: bytes) -> None:
        # Runs on the bus I/O thread: enqueue only.
        self.stats["received"] += 1
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.stats["queue_dropped"] += 1
            self._wake.set()

    def _on_request(self, payload: bytes, sender: bytes) -> DeferredReply | None:
        # Runs on the bus I/O thread: hand over to the request worker.
        deferred = self._server.submit(payload, sender)
        if deferred is None:
            self.stats["requests_dropped"] += 1
        return deferred

    def _serve(self, payload: bytes, sender: bytes) -> bytes | None:
        # Runs on the request worker: answered from the store, no lock on the node.
        try:
            request = sync.decode_request(payload)
        except sync.SyncMessageError as exc:
            logger.debug("bad sync request from %s: %s", sender.hex()[:8], exc)
            return None
        store = self.node.store
        try:
            if isinstance(request, sync.LogRequest):
                start = request.start if request.epoch == self.epoch else 0
                uids = store.log_range(start, start + request.limit - 1)
                return sync.encode_log_page(sync.LogPage(self.epoch, start,
                                                         self.node.log_length(), tuple(uids)))
            if request.kind == "get":
                raws = store.raw_updates(request.ids)
                self.stats["served"] += sum(r is not None for r in raws)
            else:
                uids = []
                for db_id in request.ids:
                    meta = store.object_meta(db_id)
                    if meta is not None:
                        uids.append(merge.version_ref(meta.created)[:32])
                raws = store.raw_updates(uids)
            return sync.encode_updates(self._within_budget(r for r in raws if r is not None))
        except Exception:
            logger.exception("serving a sync request failed")
            return None

    def _within_budget(self, raws: Iterable[bytes]) -> list[bytes]:
        """As many updates as fit in one reply under the bus's message size limit (at
        least one); the asker asks again for the rest."""
        out: list[bytes] = []
        size = 0
        for raw in raws:
            size += len(raw) + 8
            if out and size > self._reply_budget:
                break
            out.append(raw)
        return out

    # ------------------------------------------------------------ apply thread
    def _apply_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                raws = [raw for raw in batch if raw is not None]
                if raws and not self._stop.is_set():
                    decisions = self.node.ingest_many(raws)
                    if any(d is not None and d.verdict == "missing" for d in decisions):
                        self._wake.set()
            except Exception:
                if not self.node.closed:
                    logger.exception("applying updates failed")
            finally:
                for _ in batch:
                    self._queue.task_done()
            if None in batch or self._stop.is_set() or self.node.closed:
                return

    # ------------------------------------------------------------- sync thread
    def _refresh_mesh(self) -> None:
        # Replaced whole, so the publisher reads it without a lock. A stale view costs
        # an extra relay, or a missing one that the next catch-up pass makes up for.
        self._mesh = mesh_of(self.bus.peers())

    def _on_peer_ready(self, peer_id: bytes) -> None:
        # Until the next refresh, assume the new peer hears nobody else directly.
        self._mesh = {**self._mesh, peer_id: frozenset()}
        self._force_pull.set()  # a peer (re)connected: catch up with it now
        self._wake.set()

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                force = self._force_pull.is_set()
                self._force_pull.clear()
                with self._sync_lock:
                    self._sync_all(force=force)
            except Exception:
                if self._stop.is_set() or self.node.closed:
                    return
                self.stats["sync_errors"] += 1
                logger.exception("catch-up pass failed")
            self._wake.wait(self.sync_interval)
            self._wake.clear()

    def _sync_all(self, *, force: bool = False) -> int:
        self._refresh_mesh()
        total = 0
        dropped = self.stats["queue_dropped"]
        busy = (not self._queue.empty() and dropped == self._dropped_seen
                and self._busy_passes < _MAX_BUSY_SKIPS)
        self._dropped_seen = dropped
        if busy and not force:
            # Live updates are flowing and none were lost here: a pull now would mostly
            # fetch what is already queued. Pull anyway every few passes, for losses on
            # the wire that no counter sees.
            self._busy_passes += 1
        else:
            self._busy_passes = 0
            for peer_id in list(self.bus.peers()):
                if self._stop.is_set():
                    break
                total += self._pull_log(peer_id)
        if self.node.pending_count:
            total += self._fetch_missing()
        return total

    def _cursor(self, peer_id: bytes) -> tuple[bytes, int]:
        data = self.node.store.meta(f"cursor:{peer_id.hex()}")
        if not data:
            return b"", 0
        epoch, pos = msgpack.unpackb(data)
        return epoch, pos

    def _save_cursor(self, peer_id: bytes, epoch: bytes, pos: int) -> None:
        self.node.store.set_meta(f"cursor:{peer_id.hex()}", msgpack.packb([epoch, pos]))

    def _pull_log(self, peer_id: bytes) -> int:
        epoch, pos = self._cursor(peer_id)
        pulled = 0
        while not self._stop.is_set():
            reply = self.bus.request(peer_id, sync.encode_log_request(epoch, pos,
                                                                      self.page_size))
            if reply is None:
                break
            try:
                page = sync.decode_log_page(reply)
            except sync.SyncMessageError as exc:
                logger.debug("bad log page from %s: %s", peer_id.hex()[:8], exc)
                break
            if page.epoch != epoch:
                epoch, pos = page.epoch, page.start
            missing = self.node.store.missing(page.ids)
            while missing:
                got = self._fetch(peer_id, "get", missing[:_FETCH])
                if got is None:
                    return pulled  # the peer went away: keep the cursor, retry next pass
                if not got:
                    break  # the peer no longer has them
                pulled += len(got)
                # A reply holds what fits under the size limit: ask again for the rest.
                missing = [uid for uid in missing if uid not in got]
            pos = page.start + len(page.ids)
            self._save_cursor(peer_id, epoch, pos)
            if page.ids:  # progress through that peer's log, whether or not we lacked them
                for callback in self._progress:
                    try:
                        callback(peer_id.hex(), pos, page.end)
                    except Exception:
                        logger.exception("progress callback failed")
            if missing:
                logger.info("catch-up from %s: %d/%d", peer_id.hex()[:8], pos, page.end)
            if not page.ids or pos >= page.end:
                break
        return pulled

    def _fetch(self, peer_id: bytes, kind: str, wanted: list[Any]) -> set[bytes] | None:
        """Ask one peer for updates (by id) or creates (by db_id) and ingest them;
        returns the ids received (None if the peer did not answer)."""
        reply = self.bus.request(peer_id, sync.encode_fetch(kind, wanted))
        if reply is None:
            return None
        try:
            raws = sync.decode_updates(reply)
        except sync.SyncMessageError as exc:
            logger.debug("bad reply from %s: %s", peer_id.hex()[:8], exc)
            return None
        self._catching_up.active = True
        try:
            self.node.ingest_many(raws)
        finally:
            self._catching_up.active = False
        self.stats["pulled"] += len(raws)
        return {update_id(raw[SIGNATURE_SIZE:]) for raw in raws}

    def _fetch_missing(self) -> int:
        needs = self.node.pending_needs()
        ids = [n for n in needs if isinstance(n, bytes)][:sync.MAX_IDS]
        objs = [n for n in needs if isinstance(n, str)][:sync.MAX_IDS]
        got = 0
        for peer_id in list(self.bus.peers()):
            for kind, wanted in (("get", ids), ("obj", objs)):
                if wanted:
                    got += len(self._fetch(peer_id, kind, wanted) or ())
            if not self.node.pending_count:
                break
        return got
