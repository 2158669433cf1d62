"""State sums: what two peers compare to find the objects on which they differ.

Each object's merged state has a 16-byte digest (:func:`audit.object_state_digest`:
metadata, registers, list order, authorization events, key wraps; not the unauthorized
updates held for it, which differ with retention). Objects fall into ``BUCKETS``
buckets by a hash of their db_id, buckets into ``GROUPS`` groups; a bucket's sum is the
sum of its objects' digests (mod 2**128), a group's the sum of its buckets'.
Two peers that hold the same state have the same sums whatever they received in what
order and whatever retention kept; catch-up (``dmodel.net.catchup``) compares groups,
then the buckets of groups that differ, then the objects of buckets that differ, so
its cost follows the difference, not the state.

The digests live in memory (about 300 bytes an object, measured by bench_growth). They
are built once, when the network starts, from the store, in chunks under the apply lock
(so commits go on in between), and kept current lazily: a commit marks the objects it
wrote (``touch``, under the lock), and the next ``refresh`` re-reads those (two round
trips to Redis for up to 256 objects: ``store.object_states``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import msgpack

from ..buckets import BUCKETS, BUCKETS_PER_GROUP, GROUPS, SUM_SIZE, bucket_of
from ..errors import IntegrityError, NodeNotRunningError
from . import audit

if TYPE_CHECKING:
    from ..store.base import Store

_MOD = 1 << (8 * SUM_SIZE)
_CHUNK = 256  # objects re-read under the lock at a time
logger = logging.getLogger(__name__)


def _pack(total: int) -> bytes:
    return total.to_bytes(SUM_SIZE, "big")


class StateSums:
    """Per-object state digests of one store, summed by bucket and group."""

    def __init__(self, store: Store, lock: threading.RLock) -> None:
        self._store = store
        self._lock = lock  # the apply lock: commits take it, and touch() under it
        self._digests: list[dict[str, bytes]] = [{} for _ in range(BUCKETS)]
        self._sums = [0] * BUCKETS
        self._dirty: set[str] = set()
        self._state = "new"  # -> "building" -> "built"
        self._builder: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def built(self) -> bool:
        return self._state == "built"

    def touch(self, db_ids: Iterable[str]) -> None:
        """These objects' state may have changed (call under the apply lock)."""
        if self._state != "new":
            self._dirty.update(db_ids)

    def build(self) -> None:
        """Read every object's digest (at once, in chunks under the lock)."""
        with self._lock:
            if self._state == "new":
                self._state = "building"
                self._dirty.update(self._store.object_ids())
        self._catch_up()
        with self._lock:
            self._state = "built"

    def build_in_background(self) -> None:
        """Start :meth:`build` on a thread of its own, once."""
        with self._lock:
            if self._state != "new" or self._builder is not None:
                return
            self._builder = threading.Thread(target=self._build_quietly, daemon=True,
                                             name="dmodel-statesum")
        self._builder.start()

    def _build_quietly(self) -> None:
        try:
            self.build()
        except Exception:
            if not self._closed.is_set():
                logger.exception("building the state sums failed")
            with self._lock:  # the next use builds again
                self._state, self._builder = "new", None
                self._dirty.clear()

    def close(self) -> None:
        """Stop a build under way (before the store closes)."""
        self._closed.set()
        builder = self._builder
        if builder is not None and builder is not threading.current_thread():
            builder.join(30)

    def refresh(self, log_length: Callable[[], int]) -> int:
        """Bring the sums up to date (building them first if need be); return
        ``log_length()`` read at that moment under the lock: every update logged before
        it is reflected in the sums."""
        if self._state != "built":
            self.build()
        self._catch_up(leave=_CHUNK)
        with self._lock:
            self._reread(list(self._dirty))
            self._dirty.clear()
            return log_length()

    def _catch_up(self, leave: int = 0) -> None:
        """Re-read dirty objects a chunk at a time until ``leave`` or fewer are left."""
        while True:
            if self._closed.is_set():
                raise NodeNotRunningError("the node is shut down")
            with self._lock:
                if len(self._dirty) <= leave:
                    return
                chunk = [self._dirty.pop() for _ in range(min(_CHUNK, len(self._dirty)))]
                self._reread(chunk)

    def _reread(self, db_ids: list[str]) -> None:
        for db_id, new in zip(db_ids, self._digests_of(db_ids), strict=True):
            bucket = bucket_of(db_id)
            digests = self._digests[bucket]
            old = digests.get(db_id)
            if old == new:
                continue
            total = self._sums[bucket]
            if old is not None:
                total -= int.from_bytes(old, "big")
                del digests[db_id]
            if new is not None:
                total += int.from_bytes(new, "big")
                digests[db_id] = new
            self._sums[bucket] = total % _MOD

    def _digests_of(self, db_ids: list[str]) -> list[bytes | None]:
        """Each object's state digest (None: no such object); an object whose stored
        state does not parse gets a digest of its own (``dmodel verify`` names it)."""
        try:
            states = self._store.object_states(db_ids)
        except (IntegrityError, ValueError, TypeError, IndexError, KeyError,
                msgpack.UnpackException):
            if len(db_ids) == 1:
                return [hashlib.blake2b(b"damaged:" + db_ids[0].encode(),
                                        digest_size=SUM_SIZE).digest()]
            return [d for db_id in db_ids for d in self._digests_of([db_id])]
        return [None if state.meta is None else audit.object_state_digest(db_id, state)
                for db_id, state in zip(db_ids, states, strict=True)]

    # Reads of the sums as of the last refresh (any thread).
    def group_sums(self) -> list[bytes]:
        with self._lock:
            sums = list(self._sums)
        return [_pack(sum(sums[g * BUCKETS_PER_GROUP:(g + 1) * BUCKETS_PER_GROUP]) % _MOD)
                for g in range(GROUPS)]

    def bucket_sums(self, group: int) -> list[bytes]:
        start = group * BUCKETS_PER_GROUP
        with self._lock:
            sums = self._sums[start:start + BUCKETS_PER_GROUP]
        return [_pack(s) for s in sums]

    def objects(self, bucket: int) -> dict[str, bytes]:
        """db_id -> state digest of the objects in ``bucket``."""
        with self._lock:
            return dict(self._digests[bucket])

    def __len__(self) -> int:
        with self._lock:
            return sum(len(d) for d in self._digests)


__all__ = ["StateSums"]
