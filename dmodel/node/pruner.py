"""The pruner: after each commit, drop the signed updates that no longer contribute.

The applier hands it what each committed update superseded (``merge.Outcome.superseded``)
and which objects were removed. For each register it keeps the superseded versions that
retention (``dmodel.retention``) still wants, in the store (``kv:{db_id}``), and the
updates whose versions all fell out are pruned, unless they still contribute elsewhere:

* an op that is the current version of its register (a tombstone too);
* a create, remove, grant or revoke, or a DList delete (pinned: verdicts and tombstones
  need them, whatever happens later);
* a DList insert whose element is alive (its position lives there);
* a version still kept by retention in some register.

Pruning deletes only the update's bytes, log position, history entries and chain links,
never a register, so a reader never sees a half-pruned register. It runs in batches, on
the applier's thread under the apply lock (two batches never prune at once), in two
reads and one atomic write: what commits supersede is gathered until ``PRUNE_BATCH``
versions (or a removal) are waiting, or ``PRUNE_IDLE_S`` passed since the first; so the
store holds at most that many superseded versions beyond the policy, and the pruning
round trips are shared by the writes of a batch. ``flush()`` prunes what waits at once
(history, verify and shutdown call it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .. import merge, retention
from ..clock import HybridClock, physical_ms
from ..store.base import Store
from ..update import AUTH_OPS, Update, decode, element_id, op_register
from .root import LiveDigest

logger = logging.getLogger(__name__)

_PINNED = AUTH_OPS | {"create", "remove", "ldel"}
_HOLDS_MORE = _PINNED | {"lins", "lins_enc"}  # what a dropped version does not tell

# Superseded versions gathered before a pruning pass. A pass costs a read and a write
# per register it touches, so a register overwritten often is best passed over rarely:
# with 64, a transaction of 100 fields cost a pass of 100 registers on every commit.
PRUNE_BATCH = 1024
PRUNE_IDLE_S = 0.25  # ... or this long after the first of them
_COMMITTED = 4096  # recently committed updates kept decoded: a pass rarely reads them back


class Pruner:
    """Applies a node's retention policy after each commit."""

    def __init__(self, store: Store, policy: retention.Retention, clock: HybridClock,
                 is_owned: Callable[[str], bool], counters: object,
                 live: LiveDigest | None = None, lock: Any = None) -> None:
        self.live = live
        self.store = store
        self.policy = policy
        self.clock = clock
        self.is_owned = is_owned
        self.stats = counters
        self.lock = lock if lock is not None else threading.RLock()  # the apply lock
        self._superseded: dict[tuple[str, str], list[bytes]] = {}
        self._removed: list[str] = []
        self._waiting = 0
        self._timer: threading.Timer | None = None
        self._committed: dict[bytes, Update] = {}

    @property
    def active(self) -> bool:
        return not self.policy.keeps_all

    def committed(self, updates: Iterable[Update]) -> None:
        """Remember updates just committed (a pruning pass then needs not read them)."""
        if not self.active:
            return
        cache = self._committed
        for update in updates:
            cache[update.id] = update
        while len(cache) > _COMMITTED:
            del cache[next(iter(cache))]

    def after_commit(self, outcomes: Sequence[merge.Outcome], removed: Sequence[str]) -> None:
        """Gather what ``outcomes`` superseded and the ``removed`` objects; prune them when
        a batch is full (at once for a removal), else soon (the caller holds the lock)."""
        if not self.active:
            return
        for outcome in outcomes:
            for db_id, name, ver in outcome.superseded:
                self._superseded.setdefault((db_id, name), []).append(ver)
                self._waiting += 1
        self._removed.extend(removed)
        if self._waiting >= PRUNE_BATCH or self._removed:
            self.flush()
        elif self._waiting and self._timer is None:
            self._timer = threading.Timer(PRUNE_IDLE_S, self._on_timer)
            self._timer.daemon = True
            self._timer.start()

    def _on_timer(self) -> None:
        with self.lock:
            self._timer = None
            try:
                self.flush()
            except Exception:  # the store went away (shut down, unreachable): the
                logger.debug("deferred pruning failed", exc_info=True)  # next pass retries

    def stop(self) -> None:
        """Cancel the idle timer (the node shuts down; call flush() first)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def flush(self) -> None:
        """Prune what the gathered commits superseded (the caller holds the lock)."""
        superseded, removed = self._superseded, self._removed
        if not superseded and not removed:
            return
        self._superseded, self._removed, self._waiting = {}, [], 0
        try:
            self._retire(superseded, removed)
        except BaseException:
            for pair, versions in superseded.items():  # tried again by the next pass
                self._superseded.setdefault(pair, []).extend(versions)
                self._waiting += len(versions)
            self._removed.extend(removed)
            raise

    def _retire(self, superseded: dict[tuple[str, str], list[bytes]],
                removed: list[str]) -> None:
        removed = list(dict.fromkeys(removed))
        pairs = list(superseded)
        kept_now, regs, _ = self.store.retention_reads(pairs)
        now_ms = physical_ms(self.clock.now())
        kept: dict[tuple[str, str], list[bytes]] = {}
        dropped: list[bytes] = []
        for pair, old, reg in zip(pairs, kept_now, regs, strict=True):
            versions = sorted(set(old) | {v for v in superseded[pair] if v})
            if b"" in superseded[pair] or reg is None or (reg.deleted and "#" in pair[1]):
                kept[pair] = []  # a deleted element (or a dropped register) keeps nothing
                dropped.extend(versions)
                if reg is not None and reg.version:
                    dropped.append(reg.version)
                continue
            versions = [v for v in versions if v != reg.version]
            kept[pair], out = retention.keep(
                versions, reg.version, anchored=self._anchored(pair[0], reg.version),
                policy=self.policy, now_ms=now_ms)
            dropped.extend(out)
        candidates = dict.fromkeys(merge.version_ref(v)[:32] for v in dropped)
        for db_id in removed:
            candidates.update(dict.fromkeys(self.store.history(db_id)))
        self._prune(list(candidates), kept, removed, dict(zip(pairs, regs, strict=True)),
                    set(dropped))

    def rescan(self, db_id: str) -> None:
        """Retire the superseded versions of one object from its history (after its
        updates were re-decided, which rewrote its registers)."""
        if not self.active:
            return
        uids = self.store.history(db_id)
        updates = [decode(raw) for raw in self.store.raw_updates(uids) if raw is not None]
        names = sorted({op_register(op, u.id, i) for u in updates
                        for i, op in enumerate(u.ops) if op.obj == db_id})
        _, regs, _ = self.store.retention_reads([(db_id, n) for n in names])
        current = {n: r.version for n, r in zip(names, regs, strict=True) if r is not None}
        outcome = merge.Outcome(True)
        for u in updates:
            for i, op in enumerate(u.ops):
                name = op_register(op, u.id, i)
                ver = merge.version(u.timestamp, u.caller_oid, u.id, i)
                if op.obj == db_id and name in current and current[name] != ver:
                    outcome.superseded.append((db_id, name, ver))
        self.after_commit([outcome], ())
        self.flush()

    def _anchored(self, db_id: str, ver: bytes) -> bool:
        """Whether the write at version ``ver`` can no longer be retracted by a revoke."""
        caller_oid = merge.version_caller(ver)
        if caller_oid == db_id.partition(":")[2] or self.is_owned(db_id):
            return True
        uid = merge.version_ref(ver)[:32]
        for member, events in self.store.auth_events(db_id, "u").items():
            if member.partition(":")[2] == caller_oid:
                return any(uid in frontier for _, granted, frontier in events if not granted)
        return False

    def _prune(self, uids: list[bytes], kept: dict[tuple[str, str], list[bytes]],
               removed: Sequence[str],
               known: dict[tuple[str, str], merge.Register | None],
               dropped: set[bytes]) -> None:
        cache = self._committed
        unread = [uid for uid in uids if uid not in cache]
        read = dict(zip(unread, self.store.raw_updates(unread), strict=True)) if unread else {}
        updates = []
        for uid in uids:
            if uid in cache:
                updates.append(cache[uid])
            elif (raw := read.get(uid)) is not None:
                updates.append(decode(raw))
        if not updates and not kept and not removed:
            return
        # An update whose every version this pass dropped contributes nothing (a dropped
        # version is neither a register's winner nor kept), unless it is pinned or
        # inserts a DList element (its position lives on): no read needed for it.
        sure, unsure = [], []
        for u in updates:
            if all(op.op not in _HOLDS_MORE for op in u.ops) \
                    and dropped.issuperset(merge.op_versions(u)):
                sure.append(u)
            else:
                unsure.append(u)
        names = [[op_register(op, u.id, i) for i, op in enumerate(u.ops)] for u in unsure]
        # What each other candidate still holds: its registers now and the versions kept.
        pairs = sorted({(op.obj, name) for u, of_u in zip(unsure, names, strict=True)
                        for op, name in zip(u.ops, of_u, strict=True)} - kept.keys())
        chains = sorted({(u.caller, u.node) for u in updates})
        more_kept, regs, heads = self.store.retention_reads(pairs, chains)
        kept_at = dict(zip(pairs, more_kept, strict=True)) | kept
        reg_at = dict(zip(pairs, regs, strict=True)) | known
        gone = set(removed)
        prunable = sure + [u for u, of_u in zip(unsure, names, strict=True)
                           if not self._contributes(u, of_u, reg_at, kept_at, gone)]
        try:
            self.store.prune(kept, prunable, {h for h in heads if h}, removed)
        except BaseException:
            if self.live is not None:
                self.live.stale = True
            raise
        for u in prunable:
            cache.pop(u.id, None)
        if self.live is not None:
            self.live.remove(u.id for u in prunable)
        if prunable:
            self.stats.pruned += len(prunable)  # type: ignore[attr-defined]
            logger.debug("pruned %d superseded updates", len(prunable))

    @staticmethod
    def _contributes(update: Update, names: list[str],
                     reg_at: dict[tuple[str, str], merge.Register | None],
                     kept_at: dict[tuple[str, str], list[bytes]], removed: set[str]) -> bool:
        for index, (op, name, ver) in enumerate(zip(update.ops, names,
                                                    merge.op_versions(update), strict=True)):
            if op.op in _PINNED:
                return True
            if op.obj in removed:
                continue
            reg = reg_at.get((op.obj, name))
            element = "#" in name
            if op.op in ("lins", "lins_enc"):
                if reg is not None and not reg.deleted \
                        and name.endswith(element_id(update.id, index).hex()):
                    return True  # the position of a live element
                continue
            if reg is not None and reg.version == ver and not (element and reg.deleted):
                return True
            if ver in kept_at.get((op.obj, name), ()):
                return True
        return False


__all__ = ["Pruner"]
