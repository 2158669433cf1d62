"""Flood guard and rate limits: bad frames per source, bans, token buckets (pure; time
is injected).

A source is a proven node id (bytes: the remote signed our nonce with the key that node
id is bound to), or, before it proved one, the connection: the endpoint we dialled, or
``"conn:<routing id>"`` for a connection to our ROUTER (never the node id the remote
claims). One that sends more than ``threshold`` bad frames within ``window`` seconds is
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


class RateLimiter:
    """Token buckets by source (pure; time injected): ``rate`` tokens a second, up to
    ``burst``. A message costs 1 (a count limit) or its size (a byte limit).

    At most ``max_sources`` buckets are kept: full ones are forgotten first (a source
    that comes back starts full, which it would be anyway), then the oldest. Used by one
    thread at a time; not locked.
    """

    __slots__ = ("rate", "burst", "max_sources", "_buckets", "limited")

    def __init__(self, rate: float, burst: float, max_sources: int = 4096) -> None:
        self.rate = float(rate)
        self.burst = float(max(burst, 1.0))
        self.max_sources = max_sources
        self._buckets: dict[Hashable, list[float]] = {}  # source -> [tokens, last time]
        self.limited = 0

    def allow(self, src: Hashable, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``src``'s bucket; False (and counted) if it lacks them."""
        bucket = self._buckets.get(src)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._prune(now)
            bucket = self._buckets[src] = [self.burst, now]
        else:
            tokens = bucket[0] + (now - bucket[1]) * self.rate
            bucket[0] = tokens if tokens < self.burst else self.burst
            bucket[1] = now
        if bucket[0] >= cost:
            bucket[0] -= cost
            return True
        self.limited += 1
        return False

    def available(self, src: Hashable, now: float) -> float:
        """The tokens ``src`` has now (without taking any)."""
        bucket = self._buckets.get(src)
        if bucket is None:
            return self.burst
        return min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)

    def _prune(self, now: float) -> None:
        full = [src for src, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self.rate >= self.burst]
        for src in full:
            del self._buckets[src]
        while len(self._buckets) >= self.max_sources:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)
