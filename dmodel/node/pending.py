"""The pending set: updates waiting for a missing dependency (an update or an object).

Bounded: past ``MAX_PENDING`` waiting updates the oldest are forgotten and counted as
``dropped["PendingOverflow"]`` (catch-up fetches them again).

An update that waits only for its previous update (its hash-chain link) may wait for
one that no peer has any more: retention prunes superseded updates, links and all. Such
a *gap* is released after a while (``take_gaps``) and decided without the link; the
merge rules never needed it, only the chain order did. It holds no lock of its
own: every call comes from the ``Applier``, under the node's apply lock, on whichever
thread is applying (the caller's, the apply thread or the sync thread; never two at once).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence

from ..update import Update

MAX_PENDING = 10_000


def pending_key(update: Update) -> bytes:
    """Identity of a waiting update: its id and signature, so that a copy with a bad
    signature cannot take the place of the genuine update while both wait."""
    return update.id + update.signature


class PendingSet:
    """Waiting updates keyed by the first thing each misses (update id or db_id)."""

    def __init__(self, dropped: collections.Counter[str]) -> None:
        self._dropped = dropped
        self._pending: dict[bytes | str, list[Update]] = {}
        self._order: collections.deque[tuple[bytes | str, bytes]] = collections.deque()
        self._ids: set[bytes] = set()  # pending_key of every waiting update
        self._releasing: list[Update] | None = None  # released updates not yet re-processed
        self._gaps: dict[bytes, float] = {}  # token -> when it began to wait for its link

    def __len__(self) -> int:
        return len(self._ids)

    def __bool__(self) -> bool:
        return bool(self._pending)

    def needs(self) -> list[bytes | str]:
        """What the pending updates wait for: update ids (bytes) and db_ids (str)."""
        return list(self._pending)

    def park(self, update: Update, missing: Sequence[bytes | str]) -> None:
        token = pending_key(update)
        if token in self._ids:
            return
        key = missing[0]
        if tuple(missing) == (update.prev,):
            self._gaps[token] = time.monotonic()
        self._pending.setdefault(key, []).append(update)
        self._ids.add(token)
        self._order.append((key, token))
        if len(self._order) > 2 * MAX_PENDING:  # forget updates released meanwhile
            self._order = collections.deque(e for e in self._order if e[1] in self._ids)
        while len(self._ids) > MAX_PENDING:
            old_key, old_id = self._order.popleft()
            waiting = self._pending.get(old_key, [])
            self._pending[old_key] = [u for u in waiting if pending_key(u) != old_id]
            if not self._pending[old_key]:
                del self._pending[old_key]
            if old_id in self._ids:
                self._ids.discard(old_id)
                self._gaps.pop(old_id, None)
                self._dropped["PendingOverflow"] += 1

    @property
    def has_gaps(self) -> bool:
        return bool(self._gaps)

    def take_gaps(self, waited: float) -> list[Update]:
        """Updates that have waited ``waited`` seconds or more for their link alone,
        taken out of the set (oldest first)."""
        cutoff = time.monotonic() - waited
        due = {t for t, since in self._gaps.items() if since <= cutoff and t in self._ids}
        self._gaps = {t: s for t, s in self._gaps.items() if t not in due and t in self._ids}
        if not due:
            return []
        out: list[Update] = []
        for key in list(self._pending):
            keep: list[Update] = []
            for parked in self._pending[key]:
                (out if pending_key(parked) in due else keep).append(parked)
            if keep:
                self._pending[key] = keep
            else:
                del self._pending[key]
        self._ids -= due
        return out

    def release(self, update: Update, process: Callable[[list[Update]], object]) -> None:
        """``update`` is in (or its link stands): re-process what waited for it, and what
        waited for those, with ``process(batch)``."""
        if not self._pending:
            return
        keys: list[bytes | str] = [update.id]
        created = update.creates()
        if created is not None:
            keys.append(update.caller)
        ready = []
        for key in keys:
            for parked in self._pending.pop(key, None) or ():
                token = pending_key(parked)
                if token in self._ids:
                    self._ids.discard(token)
                    self._gaps.pop(token, None)
                    ready.append(parked)
        if not ready:
            return
        if self._releasing is not None:  # inside a release: the outer loop takes them
            self._releasing.extend(ready)
            return
        # A loop, not recursion: a long chain delivered backwards is released in one go.
        self._releasing = ready
        try:
            while self._releasing:
                batch, self._releasing = self._releasing, []
                process(batch)
        finally:
            self._releasing = None


__all__ = ["MAX_PENDING", "PendingSet", "pending_key"]
