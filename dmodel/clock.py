"""Hybrid logical clock (HLC).

A timestamp is one integer: ``physical_ms << 16 | counter``. It is close to wall-clock
time, strictly increases for every local event, and after ``observe(ts)`` every new
local timestamp is greater than ``ts`` (up to a bound: a clock built with
``max_ahead_ms`` never runs more than that ahead of its wall clock). Physical time is
injected (``now`` returns nanoseconds), so the clock is pure and testable.
"""

from __future__ import annotations

from collections.abc import Callable

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
MAX_TIMESTAMP = (1 << 63) - 1


def pack(physical_ms: int, counter: int = 0) -> int:
    """Build a timestamp from milliseconds and a logical counter."""
    return (physical_ms << COUNTER_BITS) | counter


def physical_ms(timestamp: int) -> int:
    """The wall-clock part of a timestamp, in milliseconds since the epoch."""
    return timestamp >> COUNTER_BITS


def from_seconds(seconds: float) -> int:
    """The smallest timestamp at ``seconds`` since the epoch."""
    return pack(int(seconds * 1000))


class HybridClock:
    """A hybrid logical clock over an injected physical clock (``now() -> ns``)."""

    __slots__ = ("_now", "_last", "_max_ahead")

    def __init__(self, now: Callable[[], int], last: int = 0,
                 max_ahead_ms: int | None = None) -> None:
        self._now = now
        self._max_ahead = max_ahead_ms
        self._last = last  # this node's own record: kept, so its timestamps never go back

    @property
    def last(self) -> int:
        """The greatest timestamp issued or observed."""
        return self._last

    def tick(self) -> int:
        """A new timestamp for a local event, greater than every earlier one."""
        wall = pack(self._now() // 1_000_000)
        self._last = wall if wall > self._last else self._last + 1
        return self._last

    def ahead_ms(self) -> int:
        """How far the clock runs ahead of the wall clock (0 when it does not)."""
        return max(0, physical_ms(self._last) - self._now() // 1_000_000)

    def observe(self, timestamp: int) -> None:
        """Account for a timestamp seen on a remote update.

        With ``max_ahead_ms`` the clock never runs further than that ahead of the wall
        clock, whatever it is shown: a timestamp beyond counts as the bound.
        """
        if self._max_ahead is not None:
            timestamp = min(timestamp, pack(self._now() // 1_000_000 + self._max_ahead))
        if timestamp > self._last:
            self._last = timestamp

    def now(self) -> int:
        """The current physical time as a timestamp (counter 0); does not advance the clock."""
        return pack(self._now() // 1_000_000)
