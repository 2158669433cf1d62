"""Flood guard: counts bad frames per source and decides bans (pure; time is injected).

A source is a proven node id (bytes) or, before it proved one, the endpoint we dialled
(str). One that sends more than ``threshold`` bad frames within ``window`` seconds is
banned for ``ban`` seconds. Only the bus I/O thread uses a guard; it is not locked.
"""

from __future__ import annotations

from collections.abc import Hashable


class FloodGuard:
    """Bad-frame windows and bans, keyed by source."""

    def __init__(self, threshold: int, window: float, ban: float) -> None:
        self.threshold = threshold
        self.window = window
        self.ban = ban
        self._counts: dict[Hashable, list[float]] = {}  # source -> [window start, count]
        self._bans: dict[Hashable, float] = {}  # source -> banned until
        self._next_prune = 0.0

    def record(self, src: Hashable, now: float) -> bool:
        """Count one bad frame from ``src``; True if that got it banned just now."""
        window = self._counts.get(src)
        if window is None or now - window[0] > self.window:
            window = self._counts[src] = [now, 0]
        window[1] += 1
        if window[1] <= self.threshold:
            return False
        self._bans[src] = now + self.ban
        self._counts.pop(src, None)
        return True

    def banned(self, src: Hashable | None) -> bool:
        """True while ``src`` is banned (until :meth:`tick` lifts it)."""
        return src is not None and src in self._bans

    @property
    def bans(self) -> list[Hashable]:
        """The banned sources, in a stable order."""
        return sorted(self._bans, key=repr)

    def tick(self, now: float) -> tuple[list[Hashable], float]:
        """Lift the bans that ran out and forget stale windows.

        Returns the sources whose ban was lifted and when to tick again.
        """
        lifted = [src for src, until in self._bans.items() if now >= until]
        for src in lifted:
            del self._bans[src]
        if now >= self._next_prune:
            self._counts = {k: v for k, v in self._counts.items() if now - v[0] <= self.window}
            self._next_prune = now + self.window
        return lifted, min([self._next_prune, *self._bans.values()])

    def counting(self) -> int:
        """How many sources have an open window (for tests and stats)."""
        return len(self._counts)
