"""The pending set: updates waiting for a missing dependency (an update or an object).

Bounded by count and by bytes (the wire size of the waiting updates), in total and per
*source*: the peer an update came from, or its caller's db_id when no peer is named
(a local tool's ``Node.ingest``, a gap re-decided). Limits (``PendingLimits``, set with
``network_options={"pending_bytes": ...}``, see the README's Limits table):

    pending_size               10,000 updates in all
    pending_bytes              32 MiB in all
    pending_source_size        1,000 updates per source
    pending_source_bytes       4 MiB per source
    pending_unverified_bytes   4 MiB in all for updates whose signature could not be
                               checked before parking (their caller's key is unknown)

The applier checks an update's signature before parking it wherever the key is known
(its caller is stored, or it is a create), so a forgery never takes a place. What goes
over a limit is evicted, oldest first, from the source that holds the largest share
(over a source's own limit: from that source), so one source filling the set pushes
out its own updates before anyone else's. Every eviction is counted as
``dropped["PendingEvicted"]`` (it was ``PendingOverflow`` when only the count was
bounded); catch-up fetches an evicted update again when something still needs it.

An update that waits only for its previous update (its hash-chain link) may wait for
one that no peer has any more: retention prunes superseded updates, links and all. Such
a *gap* is released after a while (``take_gaps``) and decided without the link; the
merge rules never needed it, only the chain order did. It holds no lock of its
own: every call comes from the ``Applier``, under the node's apply lock, on whichever
thread is applying (the caller's, the apply thread or the sync thread; never two at once).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import itertools
import time
from collections.abc import Callable, Collection, Hashable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigurationError
from ..pipeline import element_insert
from ..update import Update

MAX_PENDING = 10_000
_MiB = 1024 * 1024


def pending_key(update: Update) -> bytes:
    """Identity of a waiting update: its id and signature, so that a copy with a bad
    signature cannot take the place of the genuine update while both wait."""
    return update.id + update.signature


@dataclass(frozen=True, slots=True)
class PendingLimits:
    """How much may wait; each field is the network option ``pending_<field>``."""

    size: int = MAX_PENDING
    bytes: int = 32 * _MiB
    source_size: int = 1000
    source_bytes: int = 4 * _MiB
    unverified_bytes: int = 4 * _MiB

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"pending_{f.name} must be a positive int, "
                                         f"not {value!r}")

    @classmethod
    def take(cls, options: MutableMapping[str, Any],
             base: PendingLimits | None = None) -> PendingLimits:
        """The limits named by the ``pending_*`` entries of ``options``, which are taken
        out of it (the rest are the bus's); ``base``'s (default: the defaults) for those
        not given."""
        given = {f.name: options.pop(f"pending_{f.name}") for f in fields(cls)
                 if f"pending_{f.name}" in options}
        return dataclasses.replace(base or cls(), **given)


class _Entry:
    __slots__ = ("key", "size", "source", "update", "verified")

    def __init__(self, key: bytes | str, update: Update, source: Hashable,
                 verified: bool) -> None:
        self.key, self.update, self.source, self.verified = key, update, source, verified
        self.size = len(update.raw)


class _Source:
    """What one source has waiting, oldest first."""

    __slots__ = ("bytes", "tokens", "unverified", "unverified_bytes")

    def __init__(self) -> None:
        self.tokens: dict[bytes, None] = {}
        self.unverified: dict[bytes, None] = {}
        self.bytes = 0
        self.unverified_bytes = 0


class _Largest:
    """The source with the largest weight, kept lazily: a weight is pushed when it grows,
    and a stale top (one that shrank since) is pushed again at its current weight."""

    def __init__(self, weight: Callable[[_Source], float]) -> None:
        self.weight = weight
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()

    def grew(self, name: Hashable, source: _Source) -> None:
        heapq.heappush(self._heap, (-self.weight(source), next(self._seq), name))

    def pop(self, sources: dict[Hashable, _Source]) -> Hashable | None:
        while self._heap:
            negative, _, name = self._heap[0]
            source = sources.get(name)
            weight = self.weight(source) if source is not None else 0.0
            if weight == -negative:
                return name
            heapq.heappop(self._heap)
            if weight > 0:
                self.grew(name, source)  # type: ignore[arg-type]
        return None

    def compact(self, sources: dict[Hashable, _Source]) -> None:
        if len(self._heap) > 4 * len(sources) + 64:
            self._heap = []
            for name, source in sources.items():
                if self.weight(source) > 0:
                    self.grew(name, source)


class PendingSet:
    """Waiting updates keyed by the first thing each misses (update id or db_id)."""

    def __init__(self, dropped: collections.Counter[str],
                 limits: PendingLimits | None = None) -> None:
        self._dropped = dropped
        self.limits = limits or PendingLimits()
        self._entries: dict[bytes, _Entry] = {}  # pending_key -> entry, oldest first
        self._waiting: dict[bytes | str, dict[bytes, None]] = {}  # what is missed -> tokens
        self._sources: dict[Hashable, _Source] = {}
        self._bytes = 0
        self._unverified_bytes = 0
        self._share = _Largest(lambda s: len(s.tokens) / self.limits.size
                               + s.bytes / self.limits.bytes)
        self._unverified_share = _Largest(lambda s: float(s.unverified_bytes))
        self._arriving: dict[bytes, Hashable] = {}  # token -> source, for the batch at hand
        self._carried: dict[bytes, tuple[Hashable, bool]] = {}  # token -> (source,
        # verified), while a released update is processed again
        self._releasing: list[Update] | None = None  # released updates not yet re-processed
        self._gaps: dict[bytes, float] = {}  # token -> when it began to wait for its link

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    @property
    def size_bytes(self) -> int:
        """Wire bytes of the waiting updates."""
        return self._bytes

    def bookkeeping(self) -> int:
        """Entries held in the set's indexes (for tests: no leftovers after releases)."""
        return (len(self._entries) + len(self._waiting) + len(self._sources)
                + len(self._gaps) + len(self._carried) + len(self._arriving))

    def sources(self) -> dict[Hashable, tuple[int, int]]:
        """(updates, bytes) waiting per source."""
        return {name: (len(s.tokens), s.bytes) for name, s in self._sources.items()}

    @property
    def unverified_bytes(self) -> int:
        """Wire bytes of the waiting updates whose signature is not checked yet."""
        return self._unverified_bytes

    def needs(self) -> list[bytes | str]:
        """What the pending updates wait for: update ids (bytes) and db_ids (str)."""
        return list(self._waiting)

    @contextlib.contextmanager
    def arriving(self, updates: Sequence[Update],
                 sources: Sequence[Hashable | None] | None) -> Iterator[None]:
        """While the batch ``updates`` is processed, an update of it that parks counts
        against ``sources[i]`` (the peer it came from; None: its caller)."""
        if sources is None:
            yield
            return
        self._arriving = {pending_key(u): s for u, s in zip(updates, sources, strict=True)
                          if s is not None}
        try:
            yield
        finally:
            self._arriving = {}

    def park(self, update: Update, missing: Sequence[bytes | str], *,
             verified: bool = False) -> None:
        """Let ``update`` wait for ``missing[0]``. ``verified``: its signature was checked
        (else it counts against the unverified share)."""
        token = pending_key(update)
        if token in self._entries:
            return
        carried = self._carried.get(token)
        name = carried[0] if carried else self._arriving.get(token) or update.caller
        entry = self._entries[token] = _Entry(missing[0], update, name, verified)
        if tuple(missing) == (update.prev,):
            self._gaps[token] = time.monotonic()
        self._waiting.setdefault(entry.key, {})[token] = None
        source = self._sources.get(name)
        if source is None:
            source = self._sources[name] = _Source()
        source.tokens[token] = None
        source.bytes += entry.size
        self._bytes += entry.size
        self._share.grew(name, source)
        if not verified:
            source.unverified[token] = None
            source.unverified_bytes += entry.size
            self._unverified_bytes += entry.size
            self._unverified_share.grew(name, source)
        self._enforce(name)

    def _enforce(self, name: Hashable) -> None:
        """Evict until every limit holds again."""
        limits = self.limits
        source = self._sources[name]
        while len(source.tokens) > limits.source_size or source.bytes > limits.source_bytes:
            self._evict(next(iter(source.tokens)))
        while self._unverified_bytes > limits.unverified_bytes:
            largest = self._unverified_share.pop(self._sources)
            assert largest is not None
            self._evict(next(iter(self._sources[largest].unverified)))
        while len(self._entries) > limits.size or self._bytes > limits.bytes:
            largest = self._share.pop(self._sources)
            assert largest is not None
            self._evict(next(iter(self._sources[largest].tokens)))
        self._share.compact(self._sources)
        self._unverified_share.compact(self._sources)

    def _evict(self, token: bytes) -> None:
        entry = self._remove(token)
        waiting = self._waiting[entry.key]
        del waiting[token]
        if not waiting:
            del self._waiting[entry.key]
        self._dropped["PendingEvicted"] += 1

    def _remove(self, token: bytes) -> _Entry:
        """Take ``token`` out of everything but ``_waiting`` (the caller's part)."""
        entry = self._entries.pop(token)
        self._gaps.pop(token, None)
        source = self._sources[entry.source]
        del source.tokens[token]
        source.bytes -= entry.size
        self._bytes -= entry.size
        if not entry.verified:
            del source.unverified[token]
            source.unverified_bytes -= entry.size
            self._unverified_bytes -= entry.size
        if not source.tokens:
            del self._sources[entry.source]
        return entry

    def checked(self, update: Update) -> bool:
        """``update`` is being released and its signature was checked before it parked
        (its key cannot have changed since: it is not checked twice)."""
        carried = self._carried.get(pending_key(update))
        return carried is not None and carried[1]

    @property
    def releasing(self) -> bool:
        return self._releasing is not None

    @property
    def has_gaps(self) -> bool:
        return bool(self._gaps)

    def take_gaps(self, waited: float, links: Collection[bytes] | None = None) -> list[Update]:
        """Updates that have waited ``waited`` seconds or more for their link alone (or,
        given ``links``, those that wait for one of these), taken out of the set."""
        cutoff = time.monotonic() - waited
        if links is not None:
            linked = {t for link in links for t in self._waiting.get(link, ())}
        due = [t for t, since in self._gaps.items() if since <= cutoff
               and (links is None or t in linked)]
        out = []
        for token in due:
            entry = self._remove(token)
            waiting = self._waiting[entry.key]
            del waiting[token]
            if not waiting:
                del self._waiting[entry.key]
            out.append(entry.update)
        return out

    def release(self, update: Update, process: Callable[[list[Update]], object]) -> None:
        """``update`` is in (or its link stands): re-process what waited for it, and what
        waited for those, with ``process(batch)``. A released update that parks again
        keeps its source."""
        if not self._waiting:
            return
        keys: list[bytes | str] = [update.id]
        created = update.creates()
        if created is not None:
            keys.append(update.caller)
        # A delete stands for its element: a set that waits for a pruned insert goes on.
        keys.extend(element_insert(op.register) for op in update.ops if op.op == "ldel")
        ready = []
        for key in keys:
            for token in self._waiting.pop(key, None) or ():
                entry = self._remove(token)
                self._carried[token] = (entry.source, entry.verified)
                ready.append(entry.update)
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
            self._carried = {}


__all__ = ["MAX_PENDING", "PendingLimits", "PendingSet", "pending_key"]
