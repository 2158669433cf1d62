"""The root: a signed record of the live update ids, kept in the home, outside Redis.

Everything derived in Redis can be re-checked against the signed updates, but not
whether the updates themselves are all there: a Redis restored from an older snapshot,
or one whose newer updates were deleted, holds only valid signatures. The root closes
that hole, like a client-side state in immudb: the node keeps, in ``<home>/root``
(0600), the store's epoch, its log length, the number of live updates and a digest of
their ids, signed with the node key and numbered by a counter.

The digest is a sum of ``H(id)`` mod 2**512 (``H`` = BLAKE2b-512): adding or removing
an id costs one hash whatever the size of the set, and the sum depends only on the set,
not on the order of commits and prunes. The applier adds what it commits and the pruner
removes what it prunes, under the apply lock; ``RootKeeper`` writes the file at most
once a second when something changed, and at shutdown.

At start the node compares the store with the root it recorded (``check``):
- another epoch: a different or reset store;
- a shorter log: a rollback (a restore from an older snapshot, or deleted entries);
- the same log length but other live updates: updates deleted or injected;
- a longer log: the node stopped uncleanly after committing more (not a problem; the
  updates past the root cannot be told from injected ones, which is said).
A node that found a problem keeps the old root (it never blesses a tampered store);
``verify`` reports the problem until the operator has dealt with it (and removes the
root file to accept the store as it is). While the node runs, ``verify`` also compares
the digest of the ids in Redis with the one kept in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import nacl.exceptions
import nacl.signing

from ..store.base import Store

logger = logging.getLogger(__name__)

ROOT_FILE = "root"
_MOD = 1 << 512
_PERSON = b"dmodel-live-id"


def _h(uid: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(uid, digest_size=64, person=_PERSON).digest(), "big")


class LiveDigest:
    """A set of update ids as (count, sum of H(id) mod 2**512): order-free, O(1) updates."""

    __slots__ = ("count", "total", "stale")

    def __init__(self, count: int = 0, total: int = 0) -> None:
        self.count, self.total = count, total
        self.stale = False  # a commit failed midway: recompute from the store

    @classmethod
    def of(cls, uids: Iterable[bytes]) -> LiveDigest:
        digest = cls()
        digest.add(uids)
        return digest

    def add(self, uids: Iterable[bytes]) -> None:
        for uid in uids:
            self.total = (self.total + _h(uid)) % _MOD
            self.count += 1

    def remove(self, uids: Iterable[bytes]) -> None:
        for uid in uids:
            self.total = (self.total - _h(uid)) % _MOD
            self.count -= 1

    def reset(self, other: LiveDigest) -> None:
        self.count, self.total, self.stale = other.count, other.total, False

    def same(self, other: LiveDigest) -> bool:
        return (self.count, self.total) == (other.count, other.total)


@dataclass(frozen=True, slots=True)
class Root:
    """What the node recorded of its store: epoch, log length, live updates' digest."""

    epoch: bytes
    seq: int
    count: int
    total: int
    counter: int

    def body(self) -> bytes:
        return msgpack.packb([1, self.epoch, self.seq, self.count,
                              self.total.to_bytes(64, "big"), self.counter], use_bin_type=True)

    @classmethod
    def load(cls, path: Path, verify_key: bytes) -> Root:
        """The root in ``path``; ValueError if it is damaged or not signed by the key."""
        data = path.read_bytes()
        try:
            nacl.signing.VerifyKey(verify_key).verify(data[64:], data[:64])
            version, epoch, seq, count, total, counter = msgpack.unpackb(data[64:])
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as exc:
            raise ValueError(f"{path} is damaged or not signed by this node: {exc}") from None
        if version != 1:
            raise ValueError(f"{path}: unknown root version {version!r}")
        return cls(epoch, seq, count, int.from_bytes(total, "big"), counter)


def store_digest(store: Store) -> LiveDigest:
    """The digest of the update ids the store holds now (reads them all)."""
    return LiveDigest.of(store.update_ids())


def _settled(store: Store) -> tuple[int, LiveDigest]:
    """The log length and the digest of the ids, read while no commit lands in between
    (another process may be writing: a few tries)."""
    for _ in range(5):
        seq = store.log_length()
        held = store_digest(store)
        if store.log_length() == seq:
            return seq, held
    return -1, held  # still moving: no comparison (check says nothing of it)


def check(root: Root | None, epoch: bytes, seq: int, live: LiveDigest) -> tuple[list[str], str]:
    """(problems, note) from comparing the store now with the recorded root."""
    if root is None or seq < 0:
        return [], ""
    if root.epoch != epoch:
        return [f"root: the store is not the one this home recorded (epoch {epoch.hex()[:12]}"
                f", recorded {root.epoch.hex()[:12]}): a different or reset Redis"], ""
    if seq < root.seq:
        return [f"root: rolled back: the store's log ends at {seq}, the root recorded "
                f"{root.seq} (a restore from an older snapshot, or deleted log entries)"], ""
    if seq == root.seq and (live.count, live.total) != (root.count, root.total):
        return [f"root: the live updates differ from those recorded ({live.count} held, "
                f"{root.count} recorded): updates deleted or injected"], ""
    if seq > root.seq:
        return [], (f"root: the store holds {seq - root.seq} log positions past the root "
                    "(an unclean stop); those are checked against their signatures only")
    return [], ""


class RootKeeper:
    """Keeps ``<home>/root`` up to date with the node's live digest (see module doc)."""

    def __init__(self, home: Path, sign: Callable[[bytes], bytes], verify_key: bytes,
                 store: Store, lock: threading.RLock | threading.Lock, live: LiveDigest, *,
                 write: bool = True, interval: float = 1.0) -> None:
        self.path = home / ROOT_FILE
        self._verify_key = verify_key
        self._sign = sign
        self._writes = write
        self._store = store
        self._lock = lock
        self._interval = interval
        self.recorded: Root | None = None
        self.problems: list[str] = []
        try:
            if self.path.exists():
                self.recorded = Root.load(self.path, verify_key)
        except (OSError, ValueError) as exc:
            self.problems.append(f"root: {exc}")
        epoch = store.meta("epoch")
        if not epoch:
            epoch = os.urandom(16)
            store.set_meta("epoch", epoch)
        self.epoch = epoch
        self.live = live
        seq, held = _settled(store)
        live.reset(held)
        problems, note = check(self.recorded, epoch, seq, held)
        self.problems += problems
        if self.problems:
            logger.error("TAMPERING DETECTED at start: %s (the root in %s is kept; "
                         "`dmodel verify` reports it)", "; ".join(self.problems), self.path)
        elif note:
            logger.warning("%s", note)
        self._written: tuple[int, int, int] | None = None
        if self.recorded is not None and not problems and not note and seq >= 0:
            self._written = (seq, held.count, held.total)  # unchanged: nothing to write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def frozen(self) -> bool:
        """True when this node does not write the root: it found a problem at start (the
        old root stays), or it shares a store that another node keeps."""
        return bool(self.problems) or not self._writes

    def start(self) -> None:
        if self.frozen or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="dmodel-root", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.write()
            except Exception:  # never let the root stop the node; logged, retried
                logger.exception("writing the root failed")

    def current(self) -> Root:
        """The root of the store now (under the apply lock, so digest and log agree)."""
        with self._lock:
            if self.live.stale:
                self.live.reset(store_digest(self._store))
            seq = self._store.log_length()
            counter = (self.recorded.counter + 1) if self.recorded else 1
            return Root(self.epoch, seq, self.live.count, self.live.total, counter)

    def write(self) -> None:
        """Write the root if the live set changed since the last write (atomic, 0600)."""
        if self.frozen:
            return
        root = self.current()
        key = (root.seq, root.count, root.total)
        if key == self._written:
            return
        from ..keyring import write_private  # the one 0600 writer

        body = root.body()
        # Not synced: a root lost in a crash is only older than the store (a note).
        write_private(self.path, self._sign(body) + body, sync=False)
        self.recorded, self._written = root, key

    def verify(self) -> list[str]:
        """Problems found at start, and whether the ids in Redis are the live set kept in
        memory (under the apply lock)."""
        problems = list(self.problems)
        if not self._writes:  # another node commits to this store: check against its root
            try:
                recorded = Root.load(self.path, self._verify_key) if self.path.exists() \
                    else None
            except (OSError, ValueError) as exc:
                return [*problems, f"root: {exc}"]
            seq, held = _settled(self._store)
            return sorted(set(problems + check(recorded, self.epoch, seq, held)[0]))
        with self._lock:
            held = store_digest(self._store)
            if not self.live.stale and not held.same(self.live):
                problems.append(f"root: the update ids in Redis ({held.count}) are not the "
                                f"ones this node committed ({self.live.count}): updates "
                                "deleted or injected while it runs")
        return problems

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.write()
        except Exception:
            logger.exception("writing the root at shutdown failed")


__all__ = ["LiveDigest", "ROOT_FILE", "Root", "RootKeeper", "check", "store_digest"]
