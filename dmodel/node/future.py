"""Updates held for their future timestamps, and the timer thread that releases them.

An update timestamped more than the skew bound ahead of this node's clock is valid
but not due: applying it would let its signer win last-writer-wins by more than the
bound. It is held here and in the store (so a restart, or a catch-up that moved past
it, loses nothing), bounded by count and bytes; past the bound the update furthest in
the future is let go (counted as ``dropped["StaleUpdate"]``; catch-up brings it again).

Threads: ``hold`` runs inside the applier, under the apply lock. The node's timer
thread ("dmodel-timer", started when there is something to wait for, gone when there is
nothing) wakes every ``TICK_S``, takes the apply lock and hands the due updates to the
applier, so their listeners run on it, never alongside another batch. It also runs the
applier's release of chain gaps (pending.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..clock import HybridClock, physical_ms
from ..crypto import SIGNATURE_SIZE
from ..errors import DModelError
from ..store.base import Store
from ..update import Update, update_id

logger = logging.getLogger(__name__)

MAX_FUTURE = 10_000
MAX_FUTURE_BYTES = 64 << 20
TICK_S = 0.1


class FutureSet:
    """Held future-dated updates: id -> (physical ms at which it is due, update)."""

    def __init__(self, store: Store, clock: HybridClock, lock: Any,
                 process: Callable[[list[Update]], object],
                 counters: Any, also: Callable[[], bool] = lambda: False) -> None:
        self._store = store
        self._clock = clock
        self._lock = lock
        self._process = process
        self._stats = counters
        self._held: dict[bytes, tuple[int, Update]] = {}
        self._bytes = 0
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._also = also  # another timed job on this thread; True while it has work

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, update: Update, due_ms: int) -> None:
        """Keep ``update`` until this node's clock reaches ``due_ms`` (under the lock)."""
        if update.id in self._held:
            return
        self._held[update.id] = (due_ms, update)
        self._bytes += len(update.raw)
        self._store.hold_future(update.id, update.raw)
        self._stats.held_future += 1
        logger.info("holding %s: its timestamp is %.1f s ahead of this clock",
                    update.hex_id[:12], (due_ms - physical_ms(self._clock.now())) / 1000)
        while len(self._held) > MAX_FUTURE or self._bytes > MAX_FUTURE_BYTES:
            furthest = max(self._held, key=lambda uid: self._held[uid][0])
            self._take([furthest])
            self._stats.dropped["StaleUpdate"] += 1
        self.wake()

    def wake(self) -> None:
        """Make sure the timer thread runs (it stops when it has nothing to do)."""
        if not self._stopped.is_set() and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._run, name="dmodel-timer",
                                            daemon=True)
            self._thread.start()

    def stored(self) -> list[bytes]:
        """What an earlier run held, taken out of the store to be decided again."""
        raws = self._store.future_updates()
        self._store.release_future([update_id(raw[SIGNATURE_SIZE:]) for raw in raws])
        return raws

    def stop(self) -> None:
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * TICK_S + 1)

    def _take(self, uids: Iterable[bytes]) -> list[Update]:
        out = []
        for uid in uids:
            _, update = self._held.pop(uid)
            self._bytes -= len(update.raw)
            out.append(update)
        self._store.release_future([u.id for u in out])
        return out

    def _run(self) -> None:
        while not self._stopped.wait(TICK_S):
            with self._lock:
                if self._stopped.is_set():
                    return
                try:
                    busy = self._also()
                except DModelError:
                    logger.exception("a timed job failed")
                    busy = False
                if not self._held and not busy:
                    self._thread = None
                    return
                now = physical_ms(self._clock.now())
                due = sorted((uid for uid, (at, _) in self._held.items() if at <= now),
                             key=lambda uid: self._held[uid][0])
                if not due:
                    continue
                try:
                    self._process(self._take(due))
                except DModelError:
                    logger.exception("deciding held updates failed")


__all__ = ["MAX_FUTURE", "MAX_FUTURE_BYTES", "FutureSet"]
