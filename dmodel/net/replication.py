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
  Each requester has a byte budget for replies (``reply_bytes_per_s``, a token
  bucket): a reply holds what the budget allows, or nothing (``["replies_limited"]``).
- **apply thread** (``dmodel-apply-*``): drains the :class:`Inbox` of published updates
  into ``ingest_many``. The bus I/O thread only appends the payloads, undecoded; the
  apply thread takes what arrived within ``apply_window`` seconds of the first one
  (default 1 ms, 0 to take only what is there), up to 256, as one batch: updates
  arriving together are applied together, and one alone waits at most the window
  (``stats["apply_batches"]``, ``["apply_batch_max"]``). The inbox is bounded by count
  (``queue_size``) and by bytes (``queue_bytes``); when it is full, messages are
  dropped and counted (``stats["queue_dropped"]``) and a catch-up pass is scheduled:
  catch-up (``dmodel.net.sync``) brings them back, so nothing accepted is lost for
  good. An update the node drops as malformed, oversized or forged is reported to the
  bus, which counts it toward its sender's flood ban like a malformed frame
  (``stats["invalid_updates"]``).
- **verify thread** (``dmodel-verify-*``, only on a machine with two cores or more):
  while the apply thread applies one batch, it decodes the next and checks its
  signatures (``node.prepare_many``; the Ed25519 verify releases the GIL). Those checks
  go into the one pipeline with the batch, which skips them; what it could not check
  (a key only the store knows) the pipeline checks itself. With no backlog the apply
  thread prepares its batch itself: no hand-off per update. Batches prepared there are
  counted (``stats["prepared_ahead"]``).
- **sync thread** (``dmodel-sync-*``): pulls each peer's log from where it last stopped
  (per peer epoch and position, kept in the store), at start, when a peer connects,
  every ``sync_interval`` seconds, and whenever updates wait for a missing dependency.
  Peers take turns, best score first; a turn ends after ``sync_turn_seconds`` or
  ``sync_turn_bytes``. A page must make verifiable progress: it starts where we asked,
  lists no more than we asked, ``end`` is not before what it lists, an empty page may
  not claim more, and the ids it lists must be served when fetched; a reply may hold
  only updates that were asked for. A peer that breaks this loses its turn and a point
  of score (``stats["sync_bad_replies"]``), so one hostile peer delays a pass by at most
  one turn (``sync_turn_seconds``) and then goes last. ``stats["log_ids"]`` counts the
  ids read in log pages, ``["sync_bytes"]`` the bytes of all catch-up replies.
  When a peer's log runs more than ``state_sync_after`` entries (2000) past our cursor
  and we hold at least half as many ourselves (a restored backup, a replaced store, a
  long partition), the turn first compares state sums (``dmodel.node.statesum``):
  groups, then buckets, then objects that differ, whose held update ids are fetched if
  missing; the cursor then moves to the log length the peer's sums covered
  (``stats["state_passes"]``, ``["state_objects"]``: objects found to differ). Replies
  that break that protocol count as bad replies, as above; a peer still building its
  sums answers ``busy`` and its log is read instead.
- whichever thread accepted an update (a local writer, the apply or the sync thread)
  runs ``_publish``; the apply thread collects a batch's relays and hands them to the
  bus at once (``Bus.publish_many``: one wake-up of the I/O thread per batch).

Every update the node accepts, local or received live, is published: remote ones are
thereby relayed, so a partial mesh delivers everything; duplicates are dropped by
update id at the receiver and so never relayed twice. It is not relayed when every
other peer said it is connected to the update's signing node (peers tell each other
whom they are connected to), so a full mesh does not echo every update n times.
Updates pulled by catch-up are not re-published: the peer they came from serves them
to anyone else who lacks them. A missed relay is made up by the next catch-up pass.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from .. import merge
from ..errors import ConfigurationError, NetworkError
from . import sync
from .bus import Bus, DeferredReply
from .catchup import STATE_SYNC_AFTER, CatchUp
from .curve import CurveConfig
from .flood import RateLimiter
from .frames import DEFAULT_MAX_MESSAGE_SIZE, reply_budget
from .identity import load_node_key
from .peers import mesh_of, relay_targets

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
_BATCH = 256  # updates applied (and committed) together by the apply thread
DEFAULT_APPLY_WINDOW = 0.001  # seconds a live batch waits for more after its first update
_MiB = 1024 * 1024
CLUSTER_KEY_FILE = "cluster.key"
# Verdicts that only a broken or hostile sender produces (a replay or an unknown model
# is normal between honest peers, and does not count).
_GARBAGE = frozenset({"MalformedUpdate", "OversizedUpdate", "ForgedUpdate"})


# A batch taken from the inbox and what prepare_many made of it (a future while the
# verify thread works on it).
_Prepared = tuple[list[tuple[bytes, bytes]], "list[Any] | concurrent.futures.Future[list[Any]]"]


class LogStore(Protocol):
    """The store reads and cursor writes replication needs (``node.store`` today)."""

    def meta(self, key: str) -> bytes | None: ...
    def set_meta(self, key: str, value: bytes) -> None: ...
    def log_range(self, start: int = 0, stop: int = -1) -> list[bytes]: ...
    def raw_updates(self, uids: Iterable[bytes]) -> list[bytes | None]: ...
    def object_meta(self, db_id: str) -> Any: ...
    def log_page(self, start: int, limit: int) -> tuple[list[bytes], int]: ...
    def stored_ids(self, db_ids: Sequence[str]) -> list[list[bytes]]: ...


class StateSumsView(Protocol):
    """The node's state sums (``dmodel.node.statesum.StateSums``)."""

    @property
    def built(self) -> bool: ...
    def build_in_background(self) -> None: ...
    def refresh(self, log_length: Callable[[], int]) -> int: ...
    def group_sums(self) -> list[bytes]: ...
    def bucket_sums(self, group: int) -> list[bytes]: ...
    def objects(self, bucket: int) -> dict[str, bytes]: ...


class PublishStats(Protocol):
    published: int


class LogSource(Protocol):
    """What replication needs from a node. ``store`` and ``stats`` are still reached
    directly: the node has no methods yet for the log reads, the cursors and the
    published counter."""

    node_id: bytes

    @property
    def store(self) -> LogStore: ...
    @property
    def stats(self) -> PublishStats: ...
    @property
    def closed(self) -> bool: ...
    @property
    def pending_count(self) -> int: ...
    @property
    def state_sums(self) -> StateSumsView: ...
    def on_accepted(self, callback: Callable[[Any, bool], None]) -> None: ...
    def ingest_many(self, raws: Iterable[Any],
                    sources: Sequence[Any] | None = None) -> list[Any]: ...
    def prepare_many(self, raws: Iterable[bytes]) -> list[Any]: ...
    def pending_needs(self) -> list[bytes | str]: ...
    def log_length(self) -> int: ...
    def missing_updates(self, uids: Sequence[bytes]) -> list[bytes]: ...


class Inbox:
    """Updates received live, from the bus I/O thread to the apply thread.

    :meth:`put` (I/O thread) is a deque append and a few int adds, with no lock: each
    counter is written by one thread only. It sets the event only when the apply thread
    may be waiting. Bounded by count and by bytes; ``put`` says False when full.
    """

    def __init__(self, size: int, max_bytes: int, window: float) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.window = window
        self._items: collections.deque[tuple[bytes, bytes, float]] = collections.deque()
        self._ready = threading.Event()
        self.bytes_in = self.put_count = 0  # written by the I/O thread
        self.bytes_out = self.done_count = 0  # written by the apply thread
        self.batches = self.largest = 0

    def put(self, payload: bytes, sender: bytes) -> bool:
        items = self._items
        queued = self.bytes_in - self.bytes_out
        if len(items) >= self.size or (queued + len(payload) > self.max_bytes and queued):
            return False
        self.bytes_in += len(payload)
        self.put_count += 1
        items.append((payload, sender, time.monotonic()))
        if not self._ready.is_set():
            self._ready.set()
        return True

    def take(self, limit: int, *, block: bool) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` items. ``block``: wait for one (until :meth:`wake`), then for
        more until ``window`` seconds after the first arrived. Apply thread only."""
        items = self._items
        if block:
            while not items:
                self._ready.clear()
                if items:
                    break
                self._ready.wait()
                if not items:
                    return []  # woken by close
            if self.window > 0 and len(items) < limit:
                delay = items[0][2] + self.window - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        batch = [items.popleft()[:2] for _ in range(min(limit, len(items)))]
        if batch:
            self.bytes_out += sum(len(payload) for payload, _ in batch)
            self.batches += 1
            self.largest = max(self.largest, len(batch))
        return batch

    def done(self, count: int) -> None:
        """``count`` taken items were applied (apply thread)."""
        self.done_count += count

    def wake(self) -> None:
        self._ready.set()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    @property
    def idle(self) -> bool:
        """Everything put was applied."""
        return self.done_count >= self.put_count


class RequestWorker:
    """One thread answering requests in arrival order from a bounded queue."""

    def __init__(self, serve: Callable[[bytes, bytes, int], bytes | None], size: int,
                 name: str, reply_bytes_per_s: float = 16 * _MiB,
                 reply_burst: float = 32 * _MiB) -> None:
        self._serve = serve
        self.budget = RateLimiter(reply_bytes_per_s, reply_burst)
        self.limited = 0
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
            now = time.monotonic()
            allowance = int(self.budget.available(sender, now))
            try:
                reply = self._serve(payload, sender, allowance)
            except Exception:
                logger.exception("serving a sync request failed")
            if reply is not None and not self.budget.allow(sender, now, len(reply)):
                self.limited += 1
                reply = None
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


class NetworkService(CatchUp):
    """The network side of one node (publish, apply queue, catch-up)."""

    bus: Bus
    node: LogSource

    def __init__(self, node: LogSource, *, listen: str | None, peers: Iterable[str] = (),
                 discovery: bool = False, curve: Any = None, broker: Any = None,
                 sync_interval: float = 2.0, queue_size: int = 10_000, page_size: int = 2000,
                 discovery_config: Any = None, request_queue_size: int = 256,
                 queue_bytes: int = 64 * _MiB, reply_bytes_per_s: float = 16 * _MiB,
                 sync_turn_seconds: float = 5.0, sync_turn_bytes: int = 64 * _MiB,
                 apply_window: float = DEFAULT_APPLY_WINDOW,
                 state_sync_after: int = STATE_SYNC_AFTER, **bus_options: Any) -> None:
        if isinstance(apply_window, bool) or not isinstance(apply_window, int | float) \
                or not 0 <= apply_window <= 1:
            raise ConfigurationError("apply_window must be between 0 and 1 second")
        self.node = node
        self.sync_interval = sync_interval
        self.page_size = page_size
        self.queue_bytes = queue_bytes
        self.sync_turn_seconds = sync_turn_seconds
        self.sync_turn_bytes = sync_turn_bytes
        if type(state_sync_after) is not int or state_sync_after < 0:
            raise ConfigurationError("state_sync_after must be a whole number of log "
                                     "entries, 0 for never")
        self.state_sync_after = state_sync_after
        self._counts = {"received": 0, "queue_dropped": 0, "pulled": 0, "served": 0,
                        "sync_errors": 0, "requests_dropped": 0, "invalid_updates": 0,
                        "sync_bad_replies": 0, "sync_turns_cut": 0,
                        "prepared_ahead": 0, "state_passes": 0, "state_objects": 0,
                        "log_ids": 0, "sync_bytes": 0}
        self._queue = Inbox(queue_size, queue_bytes, apply_window)
        self._scores: dict[bytes, int] = {}  # peer -> catch-up score (0 = clean)
        self._rotation = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress: list[ProgressCallback] = []
        self._catching_up = threading.local()  # set while the sync thread ingests
        self._relays = threading.local()  # .batch: relays collected while applying
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
        home = getattr(node, "home", None)
        if home is not None:
            options.setdefault("node_key", load_node_key(home))
            if curve is None and (Path(home) / CLUSTER_KEY_FILE).exists():
                curve = CurveConfig.load(Path(home) / CLUSTER_KEY_FILE)
        if curve is not None:
            options["curve"] = curve
        if broker is not None:
            options["broker"] = broker
        if discovery_config is not None:
            options["discovery"] = discovery_config
        short = node.node_id.hex()[:6]
        # Before the bus: a peer's first request may come before Bus() returns.
        max_size = options.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE)
        self._reply_budget = reply_budget(max_size)
        self._server = RequestWorker(self._serve, request_queue_size, f"dmodel-serve-{short}",
                                     reply_bytes_per_s, max(2 * reply_bytes_per_s,
                                                            2 * max_size))
        try:
            self.bus = Bus(node_id=node.node_id, listen=listen, peers=list(peers),
                           on_publish=self._on_publish, on_request=self._on_request,
                           on_peer_ready=self._on_peer_ready, **options)
        except BaseException:
            self._server.close()
            raise
        node.on_accepted(self._publish)
        self._verifier = (concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"dmodel-verify-{short}") if (os.cpu_count() or 1) > 1
            else None)
        self._apply_thread = threading.Thread(target=self._apply_loop, daemon=True,
                                              name=f"dmodel-apply-{short}")
        self._sync_thread = threading.Thread(target=self._sync_loop, daemon=True,
                                             name=f"dmodel-sync-{short}")
        self._apply_thread.start()
        self._sync_thread.start()
        node.state_sums.build_in_background()  # for peers that compare states with us

    def _epoch(self) -> bytes:
        epoch = self.node.store.meta("epoch")
        if not epoch:
            epoch = os.urandom(16)
            self.node.store.set_meta("epoch", epoch)
        return epoch

    # ----------------------------------------------------------------- public
    @property
    def stats(self) -> dict[str, Any]:
        """Replication counters, plus ``"guard"``: what the bus refused and why (drops by
        reason, bans, refused dials, unreached endpoints), JSON-ready."""
        out: dict[str, Any] = dict(self._counts)
        out["replies_limited"] = self._server.limited
        out["apply_batches"] = self._queue.batches
        out["apply_batch_max"] = self._queue.largest
        try:
            bus = self.bus.stats
        except NetworkError:
            return out
        guard: dict[str, Any] = dict(bus["dropped"])
        for key in ("bans", "proofs_ok", "proofs_failed", "dials_refused", "sessions",
                    "request_timeouts", "beacons_in", "beacons_failed"):
            guard[key] = bus.get(key, 0)
        guard["banned"] = [b.hex() if isinstance(b, bytes) else b for b in bus["banned"]]
        guard["unreached"] = bus["unreached"]
        guard["dials_refused_by"] = bus["dials_refused_by"]
        out["guard"] = guard
        return out

    @property
    def endpoint(self) -> str | None:
        """The endpoint peers connect to (None when not listening)."""
        return self.bus.endpoint

    def connect(self, endpoint: str) -> None:
        self.bus.connect(endpoint)

    def peers(self) -> dict[str, Any]:
        """The peers this node connects to, by hex node id (``bus.peers()``: by bytes)."""
        return {nid.hex(): info for nid, info in self.bus.peers().items()}

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
            if self._queue.idle:
                return True
            self._stop.wait(0.01)
        return False

    def close(self) -> None:
        """Stop the threads and the bus. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._queue.wake()
        self.bus.close()
        self._server.close()
        self._apply_thread.join(10)
        self._sync_thread.join(10)
        if self._verifier is not None:
            self._verifier.shutdown(wait=True)

    # --------------------------------------------------------------- I/O side
    def _publish(self, update: Any, local: bool) -> None:
        if getattr(self._catching_up, "active", False):
            return  # pulled from a peer that has it: whoever lacks it pulls it likewise
        if not local and not relay_targets(self._mesh, update.node):
            return  # every other peer hears the signing node directly: no relay needed
        relays = getattr(self._relays, "batch", None)
        if relays is not None:
            relays.append(update.raw)  # the apply thread sends a batch's relays at once
            return
        self._send([update.raw])

    def _send(self, raws: list[bytes]) -> None:
        try:
            self.bus.publish_many(raws)
            self.node.stats.published += len(raws)
        except NetworkError as exc:
            if not self._stop.is_set():
                logger.warning("publish failed: %s", exc)

    def _on_publish(self, payload: bytes, sender: bytes) -> None:
        # Runs on the bus I/O thread: enqueue only.
        self._counts["received"] += 1
        if not self._queue.put(payload, sender):
            self._counts["queue_dropped"] += 1
            self._wake.set()

    def _on_request(self, payload: bytes, sender: bytes) -> DeferredReply | None:
        # Runs on the bus I/O thread: hand over to the request worker.
        deferred = self._server.submit(payload, sender)
        if deferred is None:
            self._counts["requests_dropped"] += 1
        return deferred

    def _serve(self, payload: bytes, sender: bytes, allowance: int) -> bytes | None:
        # Runs on the request worker: answered from the store, no lock on the node.
        try:
            request = sync.decode_request(payload)
        except sync.SyncMessageError as exc:
            logger.debug("bad sync request from %s: %s", sender.hex()[:8], exc)
            return None
        store = self.node.store
        try:
            if isinstance(request, sync.SumRequest):
                return self._serve_sums(request, allowance)
            if isinstance(request, sync.LogRequest):
                start = request.start if request.epoch == self.epoch else 0
                uids, resume = store.log_page(start, request.limit)
                return sync.encode_log_page(sync.LogPage(self.epoch, start,
                                                         self.node.log_length(), tuple(uids),
                                                         resume))
            if allowance <= 0:
                return None
            if request.kind == "get":
                raws = store.raw_updates(request.ids)
            else:
                uids = []
                for db_id in request.ids:
                    meta = store.object_meta(db_id)
                    if meta is not None:
                        uids.append(merge.version_ref(meta.created)[:32])
                raws = store.raw_updates(uids)
            out = self._within_budget((r for r in raws if r is not None),
                                      min(self._reply_budget, allowance))
            self._counts["served"] += len(out)
            return sync.encode_updates(out) if out or allowance >= self._reply_budget \
                else None
        except Exception:
            logger.exception("serving a sync request failed")
            return None

    def _serve_sums(self, request: sync.SumRequest, allowance: int) -> bytes | None:
        """State sums: the top is brought up to date (and names the log length it covers);
        groups, buckets and stored ids are read as of the last top served."""
        sums = self.node.state_sums
        if request.kind == "sum":
            if not sums.built:
                sums.build_in_background()
                return sync.encode_sum_top(None)
            end = sums.refresh(self.node.log_length)
            return sync.encode_sum_top(sync.SumTop(self.epoch, end, tuple(sums.group_sums())))
        if allowance <= 0:
            return None
        budget, size = min(self._reply_budget, allowance), 0
        entries: list[Any] = []
        if not sums.built:
            pass
        elif request.kind == "sumg":
            entries = [[g, sums.bucket_sums(g)] for g in request.ids]
        elif request.kind == "sumb":
            for bucket in request.ids:
                objects = [[k, v] for k, v in sorted(sums.objects(bucket).items())]
                size += sum(len(k) + 24 for k, _ in objects)
                if size > budget and entries:
                    break
                entries.append([bucket, objects])
        else:
            stored = self.node.store.stored_ids([db_id for db_id, _ in request.ids])
            for (db_id, start), uids in zip(request.ids, stored, strict=True):
                room = min(sync.MAX_PAGE, (budget - size) // 34)
                if room <= 0:
                    break
                entries.append([db_id, start, uids[start:start + room],
                                len(uids) > start + room])
                size += 34 * min(room, max(len(uids) - start, 0)) + len(db_id) + 8
        return sync.encode_sum_reply(request.kind, entries)

    @staticmethod
    def _within_budget(raws: Iterable[bytes], budget: int) -> list[bytes]:
        """As many updates as fit in ``budget`` bytes (the reply size limit, or less when
        the requester's byte budget is low; at least one if it fits the limit); the asker
        asks again for the rest."""
        out: list[bytes] = []
        size = 0
        for raw in raws:
            size += len(raw) + 8
            if size > budget:
                break
            out.append(raw)
        return out

    # ------------------------------------------------------------ apply thread
    def _apply_loop(self) -> None:
        # ``ahead``: the next batch and its prepare_many result (a future while the verify
        # thread works on it). Only with a backlog does that thread get a batch: the one
        # taken while the previous batch is applied here.
        ahead: _Prepared | None = None
        while not (self._stop.is_set() or self.node.closed):
            items = self._queue.take(_BATCH, block=ahead is None)
            nxt: _Prepared | None = None
            if items:
                raws = [raw for raw, _ in items]
                if ahead is not None and self._verifier is not None:
                    nxt = (items, self._verifier.submit(self.node.prepare_many, raws))
                    self._counts["prepared_ahead"] += 1
                else:
                    nxt = (items, self._prepare(raws))
            if ahead is not None:
                self._apply(*ahead)
            ahead = nxt

    def _prepare(self, raws: list[bytes]) -> list[Any]:
        try:
            return self.node.prepare_many(raws)
        except Exception:
            logger.exception("preparing updates failed")
            return list(raws)

    def _apply(self, items: list[tuple[bytes, bytes]],
               prepared: list[Any] | concurrent.futures.Future[list[Any]]) -> None:
        try:
            if isinstance(prepared, concurrent.futures.Future):
                try:
                    prepared = prepared.result()
                except Exception:
                    logger.exception("preparing updates failed")
                    prepared = [raw for raw, _ in items]
            if not self._stop.is_set():
                relays: list[bytes] = []
                self._relays.batch = relays
                try:
                    decisions = self.node.ingest_many(prepared,
                                                      [sender for _, sender in items])
                finally:
                    self._relays.batch = None
                    if relays:
                        self._send(relays)
                if any(d is not None and d.verdict == "missing" for d in decisions):
                    self._wake.set()
                self._report_garbage(items, decisions)
        except Exception:
            if not self.node.closed:
                logger.exception("applying updates failed")
        finally:
            self._queue.done(len(items))

    def _report_garbage(self, items: list[tuple[bytes, bytes]], decisions: list[Any]) -> None:
        """Tell the bus who sent updates that no honest node sends."""
        bad: dict[bytes, int] = {}
        for (_, sender), decision in zip(items, decisions, strict=True):
            if decision is None or (decision.verdict == "dropped"
                                    and type(decision.error).__name__ in _GARBAGE):
                bad[sender] = bad.get(sender, 0) + 1
        for sender, count in bad.items():
            self._counts["invalid_updates"] += count
            self.bus.report(sender, "invalid_update", count)

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
