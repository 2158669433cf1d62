"""Catch-up, the client side: the sync thread's passes over the peers' logs.

``CatchUp`` is the half of :class:`~dmodel.net.replication.NetworkService` that runs on
the **sync thread** (``dmodel-sync-*``): it pulls each peer's log from where it last
stopped, in turns with a time and byte budget, checks that every page makes verifiable
progress, and fetches what pending updates wait for. The rules are in
replication.py's module docstring; the messages in sync.py. The attributes it uses
(``bus``, ``node``, the counters, events and settings) are set by ``NetworkService``.

A peer whose turn breaks the rules also waits for its next one (:class:`TurnBackoff`):
``sync_interval``, then twice as long after each further broken turn, up to
``MAX_BACKOFF``, kept by node id and by endpoint; a good turn clears it. So one lying
peer costs a pass at most one turn, and a few turns a minute after that (about log2 of
the time over ``sync_interval``, in all). Until a good turn it gets no relays either.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import msgpack

from ..buckets import bucket_of
from ..crypto import SIGNATURE_SIZE
from ..update import update_id
from . import sync

if TYPE_CHECKING:
    from .bus import Bus
    from .replication import Inbox

logger = logging.getLogger("dmodel.net.replication")

_FETCH = 500  # updates asked for in one request
_FIRST_PAGE = 64  # ids asked for in a turn's first log page
_MAX_BUSY_SKIPS = 4  # catch-up passes skipped in a row while live updates are queued
# A peer's log this far past our cursor, while we hold at least half as many updates
# ourselves, is compared by state sums first (the log from there on is read as before).
# NetworkService(state_sync_after=...) sets it per node; 0 turns state sums off.
STATE_SYNC_AFTER = 2000
MAX_BACKOFF = 60.0  # seconds a peer that keeps breaking the rules waits for a turn, at most


class _Turn:
    """One peer's share of a catch-up pass: a deadline and a byte budget."""

    __slots__ = ("deadline", "budget", "spent")

    def __init__(self, deadline: float, budget: int) -> None:
        self.deadline = deadline
        self.budget = budget
        self.spent = 0

    def over(self) -> bool:
        return self.spent >= self.budget or time.monotonic() >= self.deadline

    def timeout(self) -> float:
        """How long one request of this turn may wait (at least a little)."""
        return max(0.05, min(5.0, self.deadline - time.monotonic()))


def _page_error(page: sync.LogPage, asked: int, limit: int) -> str:
    """Why a log page cannot be progress from position ``asked``, or ""."""
    if page.start != asked:
        return f"page starts at {page.start}, asked for {asked}"
    if len(page.ids) > limit:
        return "page longer than asked"
    if page.end < page.start + len(page.ids):
        return "page end before its own ids"
    if not page.start + len(page.ids) <= page.resume <= max(page.end, page.start):
        return f"page resumes at {page.resume}, outside its ids and its log of {page.end}"
    # Retention leaves gaps in a log, but a page skips them: an empty page is the end.
    if not page.ids and page.resume < page.end:
        return f"empty page claims a log of {page.end}"
    return ""


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class TurnBackoff:
    """When a peer whose catch-up replies broke the rules gets its next turn (pure; time
    injected; one thread).

    Each broken turn doubles the wait: ``base``, 2 ``base``, 4 ``base`` ... up to
    ``cap``; a good turn clears it. The wait is kept by the peer's proven node id and by
    the endpoint it is reached at, so a liar that comes back under a new node id at the
    same address waits as long (and one that moves keeps its node id's). A peer that
    lies every time thus gets about log2(T / base) turns in T seconds.
    """

    __slots__ = ("base", "cap", "max_keys", "_strikes", "_until", "_endpoints")

    def __init__(self, base: float, cap: float = MAX_BACKOFF, max_keys: int = 4096) -> None:
        self.base = max(base, 0.01)
        self.cap = cap
        self.max_keys = max_keys
        self._strikes: dict[Hashable, int] = {}
        self._until: dict[Hashable, float] = {}
        self._endpoints: dict[bytes, str] = {}  # node id -> endpoint seen last

    def seen(self, peer_id: bytes, endpoint: str) -> None:
        """``peer_id`` is reached at ``endpoint`` (from the bus's peer list)."""
        if endpoint:
            self._endpoints[peer_id] = endpoint

    def _keys(self, peer_id: bytes) -> tuple[Hashable, ...]:
        endpoint = self._endpoints.get(peer_id)
        return (peer_id,) if endpoint is None else (peer_id, ("endpoint", endpoint))

    def failed(self, peer_id: bytes, now: float) -> float:
        """A broken turn: how long until ``peer_id`` may have the next one."""
        keys = self._keys(peer_id)
        strikes = 1 + max(self._strikes.get(k, 0) for k in keys)
        wait = min(self.cap, self.base * (1 << min(strikes - 1, 30)))
        if len(self._until) >= self.max_keys:  # forget peers that have not failed for a long while
            stale = [k for k, until in self._until.items() if until < now - self.cap]
            for k in stale:
                del self._until[k]
                self._strikes.pop(k, None)
        for k in keys:
            self._strikes[k] = strikes
            self._until[k] = now + wait
        return wait

    def passed(self, peer_id: bytes) -> None:
        """A good turn: no more waiting for ``peer_id`` (nor for its endpoint)."""
        for k in self._keys(peer_id):
            self._strikes.pop(k, None)
            self._until.pop(k, None)

    def waiting(self, peer_id: bytes, now: float) -> bool:
        """True while ``peer_id`` (or its endpoint) waits for its next turn."""
        return any(self._until.get(k, 0.0) > now for k in self._keys(peer_id))

    def struck(self, peer_id: bytes) -> bool:
        """True if ``peer_id``'s last turn broke the rules (and none went well since)."""
        return any(k in self._strikes for k in self._keys(peer_id))


class CatchUp:
    """The sync thread's side of a network service (mixed into ``NetworkService``)."""

    # Set by NetworkService.__init__. ``node`` is its LogSource, which catch-up also
    # asks to ``release_gaps``.
    bus: Bus
    node: Any
    sync_interval: float
    page_size: int
    sync_turn_seconds: float
    sync_turn_bytes: int
    state_sync_after: int
    _counts: dict[str, int]
    _queue: Inbox
    _scores: dict[bytes, int]
    _rotation: int
    _wake: threading.Event
    _stop: threading.Event
    _force_pull: threading.Event
    _sync_lock: threading.Lock
    _progress: list[Callable[[str, int, int], None]]
    _catching_up: threading.local
    _dropped_seen: int
    _busy_passes: int
    _mesh: dict[bytes, frozenset[bytes]]

    # Defined by NetworkService.
    def _refresh_mesh(self) -> None:
        raise NotImplementedError

    def _report_garbage(self, items: list[tuple[bytes, bytes]], decisions: list[Any]) -> None:
        raise NotImplementedError

    @functools.cached_property
    def _backoff(self) -> TurnBackoff:
        return TurnBackoff(self.sync_interval)

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
                self._counts["sync_errors"] += 1
                logger.exception("catch-up pass failed")
            self._wake.wait(self.sync_interval)
            self._wake.clear()

    def _sync_all(self, *, force: bool = False) -> int:
        self._refresh_mesh()
        self._unrelay(self._backoff.struck)
        total = 0
        dropped = self._counts["queue_dropped"]
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
            for peer_id in self._turn_order():
                if self._stop.is_set():
                    break
                total += self._pull_log(peer_id)
        if self.node.pending_count:
            total += self._fetch_missing()
        return total

    def _unrelay(self, struck: Callable[[bytes], bool]) -> None:
        """Take peers whose catch-up turns broke the rules out of the relay map: a peer
        that lies to us does not get our relays of others' updates (it still gets our
        own, and may catch up from us)."""
        if any(struck(peer_id) for peer_id in self._mesh):
            self._mesh = {p: n for p, n in self._mesh.items() if not struck(p)}

    def _turn_order(self) -> list[bytes]:
        """Connected peers not waiting out a back-off, best catch-up score first (ties
        in a rotating order)."""
        return self._turns()[0]

    def _turns(self) -> tuple[list[bytes], int]:
        """(the turn order, how many connected peers wait out a back-off)."""
        now, backoff = time.monotonic(), self._backoff
        peers, waiting = [], 0
        for nid, info in self.bus.peers().items():
            backoff.seen(nid, info.endpoint)
            if not info.connected:
                continue
            if backoff.waiting(nid, now):
                waiting += 1
            else:
                peers.append(nid)
        if peers:
            shift = self._rotation % len(peers)
            self._rotation += 1
            peers = peers[shift:] + peers[:shift]
        return sorted(peers, key=lambda nid: -self._scores.get(nid, 0)), waiting

    def _bad_reply(self, peer_id: bytes, why: str) -> None:
        """The peer's catch-up reply did not make verifiable progress: it loses its turn
        and a point of score (and gains it back with each good turn), waits out a
        back-off that doubles with each such turn, and gets no relays meanwhile."""
        self._counts["sync_bad_replies"] += 1
        self._scores[peer_id] = max(self._scores.get(peer_id, 0) - 1, -1000)
        wait = self._backoff.failed(peer_id, time.monotonic())
        self._unrelay(lambda p: p == peer_id)
        logger.info("catch-up from %s: %s; next turn in %.1f s", peer_id.hex()[:8], why,
                    wait)

    def _cursor(self, peer_id: bytes) -> tuple[bytes, int]:
        data = self.node.store.meta(f"cursor:{peer_id.hex()}")
        if not data:
            return b"", 0
        epoch, pos = msgpack.unpackb(data)
        return epoch, pos

    def _save_cursor(self, peer_id: bytes, epoch: bytes, pos: int) -> None:
        self.node.store.set_meta(f"cursor:{peer_id.hex()}", msgpack.packb([epoch, pos]))

    def _pull_log(self, peer_id: bytes) -> int:
        """One turn with one peer: pages of its log until caught up, or the turn's time
        or byte budget is spent, or a reply breaks the rules."""
        epoch, pos = self._cursor(peer_id)
        pulled, compared = 0, False
        # The first page is short: it says how far behind we are (state sums may serve
        # better) without bringing a full page of ids first.
        limit = min(self.page_size, _FIRST_PAGE) if self.state_sync_after else self.page_size
        turn = _Turn(time.monotonic() + self.sync_turn_seconds, self.sync_turn_bytes)
        while not self._stop.is_set():
            if turn.over():
                self._counts["sync_turns_cut"] += 1
                break
            reply = self.bus.request(peer_id, sync.encode_log_request(epoch, pos, limit),
                                     timeout=turn.timeout())
            if reply is None:
                break
            turn.spent += len(reply)
            self._counts["sync_bytes"] += len(reply)
            try:
                page = sync.decode_log_page(reply)
            except sync.SyncMessageError as exc:
                self._bad_reply(peer_id, f"bad log page ({exc})")
                break
            if page.epoch != epoch:
                epoch, pos = page.epoch, 0
            why = _page_error(page, pos, limit)
            limit = self.page_size
            if why:
                self._bad_reply(peer_id, why)
                break
            if not compared and self.state_sync_after \
                    and page.end - pos > self.state_sync_after \
                    and 2 * self.node.log_length() >= page.end - pos:
                compared = True
                end = self._sync_state(peer_id, page, turn)
                if end is not None and end > pos:
                    pos = end
                    self._save_cursor(peer_id, epoch, pos)
                    continue
            self._counts["log_ids"] += len(page.ids)
            missing = self.node.missing_updates(page.ids)
            while missing and not turn.over():
                got = self._fetch(peer_id, "get", missing[:_FETCH], turn)
                if got is None:  # keep the cursor, retry next pass
                    self._bad_reply(peer_id, "did not serve the ids its page lists")
                    return pulled
                if not got:
                    # Its own log lists them: an honest peer serves them.
                    self._bad_reply(peer_id, "lists ids it does not serve")
                    return pulled
                pulled += len(got)
                # A reply holds what fits under the size limit: ask again for the rest.
                missing = [uid for uid in missing if uid not in got]
            if missing:
                break  # the turn ran out mid-page: the cursor stays before it
            pos = page.resume
            self._save_cursor(peer_id, epoch, pos)
            if page.ids:  # progress through that peer's log, whether or not we lacked them
                for callback in self._progress:
                    try:
                        callback(peer_id.hex(), pos, page.end)
                    except Exception:
                        logger.exception("progress callback failed")
            if not page.ids or pos >= page.end:
                self._scores[peer_id] = min(self._scores.get(peer_id, 0) + 1, 0)
                self._backoff.passed(peer_id)
                break
        return pulled

    def _sync_state(self, peer_id: bytes, page: sync.LogPage, turn: _Turn) -> int | None:
        """Compare state sums with a peer, fetch the updates of the objects whose state
        differs, and return the log length the peer's sums covered (None: not done, so
        read the log instead). Costs follow the objects that differ, not the state."""
        try:
            return self._compare_state(peer_id, page, turn)
        except sync.SyncMessageError as exc:
            self._bad_reply(peer_id, f"bad state sums reply ({exc})")
            return None

    def _compare_state(self, peer_id: bytes, page: sync.LogPage, turn: _Turn) -> int | None:
        sums = self.node.state_sums
        if not sums.built:
            sums.build_in_background()  # for next time; the log serves this time
            return None
        top = self._ask_sums(peer_id, "sum", None, turn)
        if top is None:
            return None
        peer = sync.decode_sum_top(top)
        if peer is None or peer.epoch != page.epoch or peer.end < page.end:
            return None  # still building, or not the log just paged
        sums.refresh(self.node.log_length)
        mine = sums.group_sums()
        groups = [g for g, total in enumerate(peer.groups) if total != mine[g]]
        buckets: list[int] = []
        for chunk in _chunks(groups, sync.MAX_SUM_IDS):
            reply = self._ask_sums(peer_id, "sumg", chunk, turn)
            if reply is None:
                return None
            got = sync.decode_group_buckets(reply, chunk)
            if set(got) != set(chunk):
                self._bad_reply(peer_id, "did not answer for every group asked")
                return None
            for group in chunk:
                own = sums.bucket_sums(group)
                buckets.extend(group * len(own) + i for i, total in enumerate(got[group])
                               if total != own[i])
        while buckets:
            chunk = buckets[:sync.MAX_SUM_IDS]
            reply = self._ask_sums(peer_id, "sumb", chunk, turn)
            if reply is None:
                return None
            answered = sync.decode_bucket_objects(reply, chunk)
            if not answered:
                self._bad_reply(peer_id, "answered no bucket asked")
                return None
            objects: list[str] = []
            for bucket, theirs in answered.items():
                if any(bucket_of(db_id) != bucket for db_id in theirs):
                    self._bad_reply(peer_id, "listed objects under another bucket")
                    return None
                own = sums.objects(bucket)
                objects.extend(db_id for db_id, digest in theirs.items()
                               if own.get(db_id) != digest)
            self._counts["state_objects"] += len(objects)
            if not self._fetch_stored(peer_id, objects, turn):
                return None
            buckets = [b for b in buckets if b not in answered]
        self._counts["state_passes"] += 1
        return peer.end

    def _fetch_stored(self, peer_id: bytes, objects: list[str], turn: _Turn) -> bool:
        """Ask which updates these objects hold there, and fetch those missing here."""
        asked = {db_id: 0 for db_id in objects}
        missing: list[bytes] = []
        while asked:
            batch = dict(list(asked.items())[:sync.MAX_SUM_IDS])
            reply = self._ask_sums(peer_id, "stored", list(batch.items()), turn)
            if reply is None:
                return False
            stored = sync.decode_stored(reply, batch)
            if not stored:
                self._bad_reply(peer_id, "answered no object asked")
                return False
            uids: list[bytes] = []
            for entry in stored:
                uids.extend(entry.ids)
                if entry.more and entry.ids:
                    asked[entry.db_id] = entry.start + len(entry.ids)
                else:
                    asked.pop(entry.db_id, None)
            missing.extend(self.node.missing_updates(uids))
            if len(missing) >= _FETCH or not asked:  # fetched in batches of _FETCH
                left = self._fetch_all(peer_id, missing, turn, keep=_FETCH if asked else 0)
                if left is None:
                    return False
                missing = left
        return True

    def _fetch_all(self, peer_id: bytes, missing: list[bytes], turn: _Turn,
                   keep: int = 0) -> list[bytes] | None:
        """Fetch ``missing`` from a peer whose sums said it holds them, until fewer than
        ``keep`` are left (those are returned); None if it did not serve them."""
        while missing and len(missing) >= max(keep, 1):
            got = self._fetch(peer_id, "get", missing[:_FETCH], turn)
            if not got:
                self._bad_reply(peer_id, "did not serve the ids its objects hold"
                                if got is None else "lists ids it does not serve")
                return None
            missing = [uid for uid in missing if uid not in got]
        return missing

    def _ask_sums(self, peer_id: bytes, kind: str, ids: list[Any] | None,
                  turn: _Turn) -> bytes | None:
        if turn.over():
            return None
        reply = self.bus.request(peer_id, sync.encode_sum_request(kind, ids),
                                 timeout=turn.timeout())
        if reply is not None:
            turn.spent += len(reply)
            self._counts["sync_bytes"] += len(reply)
        return reply

    def _fetch(self, peer_id: bytes, kind: str, wanted: list[Any],
               turn: _Turn | None = None) -> set[bytes] | None:
        """Ask one peer for updates (by id) or creates (by db_id) and ingest them;
        returns the ids received (None if the peer did not answer, or sent what was not
        asked for)."""
        timeout = 5.0 if turn is None else turn.timeout()
        reply = self.bus.request(peer_id, sync.encode_fetch(kind, wanted), timeout=timeout)
        if reply is None:
            return None
        self._counts["sync_bytes"] += len(reply)
        if turn is not None:
            turn.spent += len(reply)
        try:
            raws = sync.decode_updates(reply)
        except sync.SyncMessageError as exc:
            self._bad_reply(peer_id, f"bad updates reply ({exc})")
            return None
        ids = [update_id(raw[SIGNATURE_SIZE:]) for raw in raws]
        if kind == "get" and not set(ids) <= set(wanted):
            self._bad_reply(peer_id, "sent updates that were not asked for")
            return None
        if kind == "obj" and len(raws) > len(wanted):
            self._bad_reply(peer_id, "sent more creates than asked for")
            return None
        self._catching_up.active = True
        try:
            decisions = self.node.ingest_many(raws, [peer_id] * len(raws))
        finally:
            self._catching_up.active = False
        self._report_garbage([(raw, peer_id) for raw in raws], decisions)
        self._counts["pulled"] += len(raws)
        return set(ids)

    def _fetch_missing(self) -> int:
        needs = self.node.pending_needs()
        ids = [n for n in needs if isinstance(n, bytes)][:sync.MAX_IDS]
        objs = [n for n in needs if isinstance(n, str)][:sync.MAX_IDS]
        got = 0
        unserved = set(ids)  # links no peer asked had (pruned by retention everywhere)
        peers, waiting = self._turns()
        if waiting:
            unserved.clear()  # a peer not asked may have the links
        for peer_id in peers:
            turn = _Turn(time.monotonic() + self.sync_turn_seconds, self.sync_turn_bytes)
            for kind, wanted in (("get", ids), ("obj", objs)):
                if not wanted:
                    continue
                served = None if turn.over() else self._fetch(peer_id, kind, wanted, turn)
                if served is None and kind == "get":
                    unserved.clear()  # not asked, or no answer: the link may be there
                got += len(served or ())
                unserved -= served or set()
            if not self.node.pending_count:
                break
        if peers and unserved and self.node.pending_count:
            # Every connected peer answered without these links: updates that wait only
            # for one of them are decided now, not after the chain wait.
            self.node.release_gaps(unserved)
        return got
