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
never a register, so a reader never sees a half-pruned register. It runs on the
applier's thread right after the commit, under the apply lock (two batches never prune
at once), in two reads and one atomic write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from .. import merge, retention
from ..clock import HybridClock, physical_ms
from ..store.base import Store
from ..update import AUTH_OPS, Update, decode, element_id, op_register
from .root import LiveDigest

logger = logging.getLogger(__name__)

_PINNED = AUTH_OPS | {"create", "remove", "ldel"}


class Pruner:
    """Applies a node's retention policy after each commit."""

    def __init__(self, store: Store, policy: retention.Retention, clock: HybridClock,
                 is_owned: Callable[[str], bool], counters: object,
                 live: LiveDigest | None = None) -> None:
        self.live = live
        self.store = store
        self.policy = policy
        self.clock = clock
        self.is_owned = is_owned
        self.stats = counters

    @property
    def active(self) -> bool:
        return not self.policy.keeps_all

    def after_commit(self, outcomes: Sequence[merge.Outcome], removed: Sequence[str]) -> None:
        """Retire what ``outcomes`` superseded; prune ``removed`` objects' updates."""
        if not self.active:
            return
        superseded: dict[tuple[str, str], list[bytes]] = {}
        for outcome in outcomes:
            for db_id, name, ver in outcome.superseded:
                superseded.setdefault((db_id, name), []).append(ver)
        if not superseded and not removed:
            return
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
            kept[pair], gone = retention.keep(
                versions, reg.version, anchored=self._anchored(pair[0], reg.version),
                policy=self.policy, now_ms=now_ms)
            dropped.extend(gone)
        candidates = dict.fromkeys(merge.version_ref(v)[:32] for v in dropped)
        for db_id in removed:
            candidates.update(dict.fromkeys(self.store.history(db_id)))
        self._prune(list(candidates), kept, removed, dict(zip(pairs, regs, strict=True)))

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
               known: dict[tuple[str, str], merge.Register | None]) -> None:
        updates = [decode(raw) for raw in self.store.raw_updates(uids) if raw is not None]
        if not updates and not kept and not removed:
            return
        # What each candidate still holds: its registers now and the versions kept there.
        pairs = sorted({(op.obj, op_register(op, u.id, i))
                        for u in updates for i, op in enumerate(u.ops)} - kept.keys())
        chains = sorted({(u.caller, u.node) for u in updates})
        more_kept, regs, heads = self.store.retention_reads(pairs, chains)
        kept_at = dict(zip(pairs, more_kept, strict=True)) | kept
        reg_at = dict(zip(pairs, regs, strict=True)) | known
        gone = set(removed)
        prunable = [u for u in updates if not self._contributes(u, reg_at, kept_at, gone)]
        try:
            self.store.prune(kept, prunable, {h for h in heads if h}, removed)
        except BaseException:
            if self.live is not None:
                self.live.stale = True
            raise
        if self.live is not None:
            self.live.remove(u.id for u in prunable)
        if prunable:
            self.stats.pruned += len(prunable)  # type: ignore[attr-defined]
            logger.debug("pruned %d superseded updates", len(prunable))

    @staticmethod
    def _contributes(update: Update, reg_at: dict[tuple[str, str], merge.Register | None],
                     kept_at: dict[tuple[str, str], list[bytes]], removed: set[str]) -> bool:
        for index, op in enumerate(update.ops):
            if op.op in _PINNED:
                return True
            if op.obj in removed:
                continue
            name = op_register(op, update.id, index)
            reg = reg_at.get((op.obj, name))
            ver = merge.version(update.timestamp, update.caller_oid, update.id, index)
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
