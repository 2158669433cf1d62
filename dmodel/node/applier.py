"""Applier: the one path every update takes into the store, under the node's apply lock.

    snapshot -> decide -> before-listeners -> commit -> after-listeners -> notify

Threads: a local write runs on the caller's thread (``Node.write``); live updates from
peers on the network's apply thread, updates pulled by catch-up on its sync thread
(both through ``Node.ingest_many``). Whichever it is holds the apply lock (an RLock,
shared with the listener registry) for the whole batch, so two batches never run at
once; listeners and ``on_accepted`` callbacks run on that thread, inside the lock.

"Local" is decided once, at the entry: ``apply_local`` for an update this node just
signed, ``ingest`` for anything else. The snapshot of a local update is built by the
local rule here (``_local_snapshot``), never inferred from what the store holds.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import merge, pipeline, redecide
from ..actions import Change, Context, ListenerRegistry
from ..batch import Bounded, Overlay, event_field
from ..clock import HybridClock
from ..crypto import PublicIdentity
from ..errors import InvalidUpdate, ReplayedUpdate, VetoedError
from ..retention import Retention
from ..store.base import Store
from ..update import Update, decode
from . import pending as pending_module
from .future import FutureSet
from .pending import PendingLimits, PendingSet
from .pruner import Pruner
from .root import LiveDigest
from .statesum import StateSums

logger = logging.getLogger(__name__)

_PARALLEL_VERIFY_MIN = 16
CHAIN_WAIT_S = 2.0  # how long an update waits for a chain link no peer may have any more
_RECENT = 100_000  # ids of updates stored lately: a relayed copy costs no store round trip
_CHECKED = 4096  # signature checks made ahead of their batch (a batch or two: 256 each)
_KEYS = 10_000  # callers' keys kept for those checks
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _verify_pool() -> tuple[concurrent.futures.ThreadPoolExecutor, int]:
    """A process-wide pool for signature checks, and its size (cores - 1, at least 1)."""
    global _pool
    workers = max(1, min(7, (os.cpu_count() or 2) - 1))
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                          thread_name_prefix="dmodel-verify")
        return _pool, workers


@dataclass
class Stats:
    """Counters of what the node did. ``dropped``/``rejected`` are keyed by error class name."""

    applied: int = 0
    local: int = 0
    remote: int = 0
    duplicates: int = 0
    published: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    listener_errors: int = 0
    equivocations: int = 0
    recomputed: int = 0
    held_future: int = 0
    pruned: int = 0
    chain_gaps: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "local": self.local, "remote": self.remote,
                "duplicates": self.duplicates, "published": self.published,
                "dropped": dict(self.dropped), "rejected": dict(self.rejected),
                "listener_errors": self.listener_errors, "equivocations": self.equivocations,
                "recomputed": self.recomputed, "held_future": self.held_future,
                "pruned": self.pruned, "chain_gaps": self.chain_gaps}


def _local_snapshot(snap: pipeline.Snapshot, update: Update) -> pipeline.Snapshot:
    """The local rule: an update just signed here is new and chained to this caller's
    and node's previous update (the store need not be asked)."""
    snap.seen = False
    if update.prev:
        snap.prev_chain = (update.caller, update.node)
    return snap


def _plain_value(db_id: str, name: str | None, reg: merge.Register | None) -> Any:
    """A register's value as stored (encrypted values stay sealed)."""
    return None if reg is None or reg.deleted else merge.element_value(name or "", reg)


class Applier:
    """Decides and commits updates over a ``Store``; owns the apply lock and the pending set.

    ``is_owned(db_id)`` and ``display_value(db_id, name, reg)`` come from the node (the
    keyring and the encrypted-value helpers): listeners see them in their changes.
    """

    def __init__(self, store: Store, clock: HybridClock, *,
                 policy: Callable[[str], merge.Policy], skew_ms: int,
                 lock: Any = None, listeners: ListenerRegistry | None = None,
                 stats: Stats | None = None,
                 is_owned: Callable[[str], bool] = lambda db_id: False,
                 display_value: Callable[[str, str | None, merge.Register | None], Any]
                 | None = None, retention: Retention | None = None,
                 pending_limits: PendingLimits | None = None) -> None:
        self.store = store
        self.clock = clock
        self.policy = policy
        self.skew_ms = skew_ms
        self.lock = lock if lock is not None else threading.RLock()
        self.listeners = listeners if listeners is not None else ListenerRegistry(lock=self.lock)
        self.stats = stats if stats is not None else Stats()
        self.is_owned = is_owned
        self.display_value = display_value or _plain_value
        self.pending = PendingSet(self.stats.dropped, pending_limits)
        self.live = LiveDigest()  # the stored update ids (node/root.py keeps it signed)
        self.sums = StateSums(store, self.lock)  # per-object state digests (catch-up)
        self.pruner = Pruner(store, retention or Retention(), clock, is_owned, self.stats,
                             self.live, self.lock)
        self.future = FutureSet(store, clock, self.lock,
                                lambda batch: self._process_batch(batch, local=False),
                                self.stats, also=self.release_gaps)
        self._gap_ok: set[bytes] = set()
        self._commits = 0  # commits made, to tell a batch its snapshots may be stale
        self._recent = Bounded(_RECENT)  # ids of updates stored lately
        self._vetoed = Bounded(pending_module.MAX_PENDING)  # vetoed here -> their chain
        # Signature checks done before the lock (preverify): (id, signature) -> the key
        # that checked it; an oid names its key, so callers' keys are kept by db_id.
        self._checked = Bounded(_CHECKED)
        self._keys = Bounded(_KEYS)
        self._checked_lock = threading.Lock()
        self._on_accepted: list[Callable[[Update, bool], None]] = []

    def on_accepted(self, callback: Callable[[Update, bool], None]) -> None:
        """Call ``callback(update, local)`` after every stored update (the bus publishes)."""
        self._on_accepted.append(callback)

    # ------------------------------------------------------------ entries
    def apply_local(self, updates: list[Update]) -> list[pipeline.Decision]:
        """Apply updates this node just signed, as one batch (see ``node/writes.py``)."""
        with self.lock:
            return self._process_batch(updates, local=True)

    def preverify(self, raws: Iterable[bytes]) -> list[Update | bytes]:
        """Decode updates and check the signatures whose keys are known without the store
        (a create's own, or a caller's seen before), without the apply lock and on any
        thread; ``ingest_raw`` of the result then skips those checks. Bytes that are no
        update stay bytes (``ingest_raw`` counts them)."""
        out: list[Update | bytes] = []
        for raw in raws:
            try:
                update = decode(raw)
            except InvalidUpdate:
                out.append(raw)
                continue
            out.append(update)
            key = update.creates()
            if key is not None:  # decode checked that the oid names this key
                with self._checked_lock:
                    self._keys.add(update.caller, key)
            else:
                key = self._keys.get(update.caller)
                if key is None:
                    continue
            try:
                update.verify(key)
            except InvalidUpdate:
                continue  # decide checks it again, and drops it
            with self._checked_lock:
                self._checked.add((update.id, update.signature), key.verify_key)
        return out

    def ingest_raw(self, raws: Iterable[bytes | Update],
                   sources: Sequence[Hashable] | None = None) -> list[pipeline.Decision | None]:
        """Decode and apply updates from elsewhere (bytes, or what ``preverify`` gave);
        None for bytes that are no update (counted as dropped, never raised).
        ``sources[i]``: the peer ``raws[i]`` came from (what its place in the pending set
        counts against)."""
        results: list[pipeline.Decision | None] = []
        updates: list[Update] = []
        where: list[int] = []
        for raw in raws:
            try:
                updates.append(raw if isinstance(raw, Update) else decode(raw))
                where.append(len(results))
            except InvalidUpdate as exc:
                self.count_drop(exc, None)
            results.append(None)
        if updates:
            decoded_sources = None if sources is None else [sources[i] for i in where]
            for i, decision in zip(where, self.ingest(updates, decoded_sources), strict=True):
                results[i] = decision
        return results

    def missing(self, uids: Sequence[bytes]) -> list[bytes]:
        """The ids among ``uids`` that ``ingest`` would not drop as stored lately and
        the store does not hold."""
        recent = self._recent
        return self.store.missing([uid for uid in uids if uid not in recent])

    def ingest(self, updates: list[Update], sources: Sequence[Hashable] | None = None
               ) -> list[pipeline.Decision]:
        """Apply updates from elsewhere, in order, as one batch; one decision each
        (``sources``: the peer each came from, as in ``ingest_raw``).

        The one dedupe point before the store: an update stored lately is dropped as
        replayed without a round trip (the snapshot's ``seen`` catches the rest).
        """
        results: list[pipeline.Decision | None] = [None] * len(updates)
        with self.lock:
            fresh = []
            for i, update in enumerate(updates):
                if update.id in self._recent:  # a relayed copy: no store round trip
                    error = ReplayedUpdate("update already seen", update.id)
                    self.count_drop(error, update)
                    results[i] = pipeline.Decision(update, pipeline.DROPPED, error=error)
                else:
                    fresh.append((i, update))
            if fresh:
                batch = [u for _, u in fresh]
                with self.pending.arriving(batch, None if sources is None
                                           else [sources[i] for i, _ in fresh]):
                    decisions = self._process_batch(batch, local=False)
                for (i, _), decision in zip(fresh, decisions, strict=True):
                    results[i] = decision
        return results  # type: ignore[return-value]

    # ----------------------------------------------------------- pipeline
    def _process_batch(self, updates: list[Update], *, local: bool,
                       read: tuple[list[pipeline.Snapshot], Overlay] | None = None,
                       committed: list[int] | None = None) -> list[pipeline.Decision]:
        """The pipeline for a batch of updates, under the apply lock.

        Each update is decided against the store plus what earlier updates of the batch
        wrote (the overlay); the batch is committed in one atomic step before any
        after-listener or publisher sees it. ``read``: the snapshots, already read, and
        the overlay of the updates before these; ``committed`` gets a 1 per commit.
        """
        listening = bool(self.listeners) and any(
            self.listeners.wants(op.obj.partition(":")[0], event_field(op, update, i))
            for update in updates for i, op in enumerate(update.ops))
        if listening and len(updates) > 1 and read is None:
            return self._one_by_one(updates, local=local)
        if read is None:
            # Retention needs what each write supersedes, so it reads the registers too.
            snaps = self.store.snapshots(updates, local=local,
                                         registers=listening or not local or self.pruner.active)
            overlay = Overlay()
        else:
            snaps, overlay = read
        if local:
            snaps = [_local_snapshot(s, u) for s, u in zip(snaps, updates, strict=True)]
        elif self._gap_ok:
            for snap, update in zip(snaps, updates, strict=True):
                snap.gap = update.id in self._gap_ok
        verified = [local] * len(updates) if local else self._verify_batch(updates, snaps)
        if self.pending.releasing:
            verified = [v or self.pending.checked(u) for v, u in zip(verified, updates,
                                                                     strict=True)]
        staged: list[tuple[Update, list[merge.Write] | None]] = []
        done: list[tuple[pipeline.Decision, pipeline.Snapshot, list[Change]]] = []
        decisions: list[pipeline.Decision] = []
        rest: list[Update] = []
        held: list[Update] = []  # not applied, but later updates may chain to them
        has_listeners = bool(self.listeners)  # else no one hears the events: not built
        now = self.clock.now()
        if local:  # our own timestamps are never "from the future", even if the wall clock
            now = max(now, self.clock.last)  # went back since they were issued
        for index, update in enumerate(updates):
            snap = overlay.patch(snaps[index], update)
            if update.prev and snap.prev_chain is None and update.prev in self._vetoed:
                snap.prev_chain = self._vetoed[update.prev]  # chained to a vetoed update
            decision = pipeline.decide(update, snap, now=now, skew_ms=self.skew_ms,
                                       policy=self.policy, verified=verified[index],
                                       events=has_listeners)
            decisions.append(decision)
            verdict = decision.verdict
            if verdict == pipeline.DROPPED:
                self.count_drop(decision.error, update)
                continue
            if verdict == pipeline.MISSING:
                if not local:
                    self._park(decision, snap, verified[index])
                continue
            if verdict == pipeline.HELD:
                self.future.hold(update, decision.release_at)
                continue
            outcome = decision.outcome
            assert outcome is not None
            if verdict == pipeline.UNAUTHORIZED:
                if self.listeners:
                    refused = self._changes(update, outcome, snap, local, "unauthorized")
                    self.listeners.observe_rejected(refused)
                self.stats.rejected["UnauthorizedError"] += 1
                logger.debug("rejected %s: %s", update.hex_id[:12], decision.error)
                if not local:  # a local caller gets the error: nothing is stored or sent
                    staged.append((update, None))
                    overlay.add(update, None)
                    held.append(update)
                continue
            changes: list[Change] = []
            if listening and outcome.events:
                changes = self._changes(update, outcome, snap, local, "accepted")
                try:
                    self.listeners.before(changes)
                except VetoedError as exc:
                    self.stats.rejected["VetoedError"] += 1
                    logger.info("vetoed %s: %s", update.hex_id[:12], exc)
                    decision.verdict = pipeline.VETOED
                    decision.error = exc
                    if not local:
                        # Not stored, but its signed link stands: the caller's later
                        # updates are judged on their own instead of waiting for it.
                        self._vetoed.add(update.id, (update.caller, update.node))
                        held.append(update)
                    continue
            staged.append((update, outcome.writes))
            overlay.add(update, outcome.writes)
            done.append((decision, snap, changes))
            if outcome.retroactive:
                rest = updates[index + 1:]  # re-decided against the store once this is in
                break
        if staged:
            for update, writes in staged:
                if writes is not None:  # held unauthorized updates move no clock
                    self.clock.observe(update.timestamp)
            try:
                self.store.commit_many(staged, hlc=self.clock.last)
            except BaseException:
                self.live.stale = True  # it may or may not have happened
                raise
            finally:
                self._commits += 1
            if committed is not None:
                committed.append(1)
            self.live.add(update.id for update, _ in staged)
            self.sums.touch({op.obj for update, _ in staged for op in update.ops}
                            | {w.db_id for _, writes in staged for w in writes or ()})
            for update, _ in staged:
                self._recent.add(update.id)
            self.pruner.committed(update for update, _ in staged)
            outcomes = [d.outcome for d, _, _ in done if d.outcome is not None]
            self.pruner.after_commit(outcomes, [w.db_id for o in outcomes for w in o.writes
                                                if w.kind == "drop"])
        for decision, snap, changes in done:
            self._after_commit(decision, snap, changes, local)
        for update in held:
            self._release_pending(update)
        if rest:
            decisions.extend(self._process_batch(rest, local=local))
        return decisions

    def _one_by_one(self, updates: list[Update], *, local: bool) -> list[pipeline.Decision]:
        """A batch that listeners watch: each update's before- and after-callbacks run
        before the next update's, so each update is committed on its own; but the
        snapshots are read once, for all, and each update sees the ones before it
        through the overlay. A callback that made this node commit something else (a
        write of its own, a released update) makes the rest read the store again."""
        snaps = self.store.snapshots(updates, local=local, registers=True)
        overlay = Overlay()
        decisions: list[pipeline.Decision] = []
        for index, update in enumerate(updates):
            before, own = self._commits, list[int]()
            decisions += self._process_batch([update], local=local,
                                             read=([snaps[index]], overlay), committed=own)
            if self._commits - before != len(own) and index + 1 < len(updates):
                return decisions + self._process_batch(updates[index + 1:], local=local)
        return decisions

    def _after_commit(self, decision: pipeline.Decision, snap: pipeline.Snapshot,
                      changes: list[Change], local: bool) -> None:
        update, outcome = decision.update, decision.outcome
        assert outcome is not None
        if snap.equivocation:
            self.stats.equivocations += 1
            logger.warning("equivocation: %s signed two updates after %s on node %s",
                           update.caller, update.prev.hex()[:12], update.node.hex()[:8])
        if outcome.retroactive:
            self._recompute(outcome.retroactive)
        self.stats.applied += 1
        if local:
            self.stats.local += 1
        else:
            self.stats.remote += 1
        if changes:
            self.stats.listener_errors += len(self.listeners.after(changes))
        for callback in self._on_accepted:
            try:
                callback(update, local)
            except Exception:
                logger.exception("on_accepted callback failed")
        self._release_pending(update)

    def release_gaps(self, waited: float = CHAIN_WAIT_S,
                     links: Collection[bytes] | None = None) -> bool:
        """Decide the updates that waited ``waited`` s or more for a chain link alone
        (``0``: all of them, now; ``links``: only those waiting for one of these ids).
        Under the apply lock. True while gaps remain."""
        with self.lock:
            if waited and not self.pruner.active:
                # A node that keeps every version waits for links as long as it takes:
                # catch-up releases those no connected peer has (see net/catchup.py).
                return False
            gaps = self.pending.take_gaps(waited, links)
            if gaps:
                self._gap_ok = {u.id for u in gaps}
                try:
                    self.stats.chain_gaps += len(gaps)
                    self._process_batch(gaps, local=False)
                finally:
                    self._gap_ok = set()
            return self.pending.has_gaps

    def _park(self, decision: pipeline.Decision, snap: pipeline.Snapshot,
              verified: bool) -> None:
        """Let a remote update wait for what it misses, its signature checked first when
        the key is at hand (a forgery is dropped, it takes no place)."""
        update = decision.update
        if not verified:
            key = pipeline.signing_key(update, snap.state.objects.get)
            if key is not None:
                try:
                    update.verify(key)
                    verified = True
                except InvalidUpdate as exc:
                    exc.update_id = update.id
                    decision.verdict, decision.error = pipeline.DROPPED, exc
                    self.count_drop(exc, update)
                    return
        self.pending.park(update, decision.missing, verified=verified)
        if self.pruner.active and self.pending.has_gaps:  # the timer releases it
            self.future.wake()

    def _release_pending(self, update: Update) -> None:
        self.pending.release(update, lambda batch: self._process_batch(batch, local=False))

    def _verify_batch(self, updates: list[Update], snaps: list[pipeline.Snapshot]) -> list[bool]:
        """Check the signatures whose keys are at hand, on a thread pool (the Ed25519
        verify releases the GIL), except those ``preverify`` checked with the same key.
        An update left unchecked here is checked by decide."""
        keys: list[PublicIdentity | None] = []
        created: dict[str, PublicIdentity] = {}
        done: list[bool] = []
        with self._checked_lock:
            for update, snap in zip(updates, snaps, strict=True):
                if snap.seen:
                    keys.append(None)  # a duplicate: dropped without a signature check
                    done.append(False)
                    continue
                own = update.creates()
                if own is not None:
                    created.setdefault(update.caller, own)
                key = (pipeline.signing_key(update, snap.state.objects.get)
                       or created.get(update.caller))
                if key is not None and update.caller not in self._keys:
                    self._keys.add(update.caller, key)
                checked = self._checked.pop((update.id, update.signature), None)
                done.append(key is not None and checked == key.verify_key)
                keys.append(None if done[-1] else key)
        if len(updates) - sum(done) < _PARALLEL_VERIFY_MIN:
            return done

        def check(items: list[tuple[Update, PublicIdentity | None]]) -> list[bool]:
            out = []
            for update, key in items:
                try:
                    if key is not None:
                        update.verify(key)
                        out.append(True)
                        continue
                except InvalidUpdate:
                    pass
                out.append(False)
            return out

        # One chunk per pool worker plus one for this thread: a few hand-offs per batch,
        # not one per update.
        items = list(zip(updates, keys, strict=True))
        pool, workers = _verify_pool()
        size = -(-len(items) // (workers + 1))
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        futures = [pool.submit(check, chunk) for chunk in chunks[1:]]
        results = check(chunks[0])
        for future in futures:
            results.extend(future.result())
        return [a or b for a, b in zip(done, results, strict=True)]

    def _recompute(self, seeds: set[str]) -> None:
        """Re-decide the stored updates of objects whose update-authorization changed after
        a member's updates were decided (a grant or revoke that arrived late).

        Verdicts are evaluated against the complete authorization state
        (``redecide.verdict``), and every object whose set of accepted updates changes is
        rebuilt from its updates in version order
        (``redecide.rebuild``): the state ``merge.fold`` gives, whatever the arrival
        order. Listeners are not called for these corrections.
        """
        updates: dict[bytes, Update] = {}
        verdicts: dict[bytes, bool] = {}
        uids_of: dict[str, list[bytes]] = {}
        auth_cache: dict[str, dict[str, merge.AuthEvents]] = {}

        def auth_of(db_id: str) -> dict[str, merge.AuthEvents]:
            if db_id not in auth_cache:
                auth_cache[db_id] = self.store.auth_events(db_id, "u")
            return auth_cache[db_id]

        scope, todo = set(seeds), list(seeds)
        while todo:
            db_id = todo.pop()
            accepted = self.store.history(db_id)
            uids = list(dict.fromkeys(accepted + self.store.history(db_id, held=True)))
            uids_of[db_id] = uids
            was_accepted = set(accepted)
            for uid, raw in zip(uids, self.store.raw_updates(uids), strict=True):
                if raw is None or uid in verdicts:
                    continue
                update = updates[uid] = decode(raw)
                ok = verdicts[uid] = redecide.verdict(update, auth_of, self.policy)
                if ok != (uid in was_accepted):
                    for other in {op.obj for op in update.ops} - scope:
                        scope.add(other)
                        todo.append(other)
        for db_id in scope:
            uids = uids_of[db_id]
            state = redecide.rebuild(db_id, (updates[u] for u in uids if verdicts.get(u)))
            self.store.replace_object(db_id, state.meta, state.registers, state.wraps,
                                      state.lists, [u for u in uids if verdicts.get(u)],
                                      [u for u in uids if u in verdicts and not verdicts[u]])
            self.stats.recomputed += 1
            self.sums.touch((db_id,))
            self.pruner.rescan(db_id)
            logger.info("re-decided %d updates of %s after a late authorization change",
                        len(uids), db_id)

    def count_drop(self, error: Exception | None, update: Update | None) -> None:
        name = type(error).__name__ if error else "Unknown"
        if name == "ReplayedUpdate":
            self.stats.duplicates += 1
        elif name == "ConflictingCreate":
            self.stats.equivocations += 1
            logger.warning("equivocation: %s", error)
        self.stats.dropped[name] += 1
        logger.debug("dropped %s: %s", update.hex_id[:12] if update else "bytes", error)

    # ------------------------------------------------------------ listeners
    def _changes(self, update: Update, outcome: merge.Outcome, snap: pipeline.Snapshot,
                 local: bool, verdict: str) -> list[Change]:
        changes = []
        for event in outcome.events:
            model = event.db_id.partition(":")[0]
            if not self.listeners.wants(model, event.name):
                continue
            owned = self.is_owned(event.db_id)  # a dict lookup in the keyring
            encrypted = any(r is not None and r.encrypted for r in (event.old, event.new))
            ctx = Context(caller_id=update.caller, verified=True, authorized=outcome.authorized,
                          owned=owned, timestamp=update.timestamp, update_id=update.hex_id,
                          local=local, node_id=update.node.hex(), verdict=verdict,
                          equivocation=snap.equivocation, encrypted=encrypted)
            if event.kind in ("create", "remove"):
                changes.append(Change(event.kind, event.db_id, event.db_id, None, context=ctx))
                continue
            old = self.display_value(event.db_id, event.name, event.old)
            key = f"{event.db_id}:{event.name}"
            if event.kind == "delete":
                changes.append(Change("delete", event.db_id, key, event.name, old, None,
                                      context=ctx))
            else:
                new = self.display_value(event.db_id, event.name, event.new)
                changes.append(Change("update", event.db_id, key, event.name, old, new,
                                      context=ctx))
        return changes


__all__ = ["Applier", "Stats"]
