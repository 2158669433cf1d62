"""Hybrid logical clock (HLC).

A timestamp is one integer: ``physical_ms << 16 | counter``. It is close to wall-clock
time, strictly increases for every local event, and after ``observe(ts)`` every new
local timestamp is greater than ``ts``. Physical time is injected (``now`` returns
nanoseconds), so the clock is pure and testable.
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

    __slots__ = ("_now", "_last")

    def __init__(self, now: Callable[[], int], last: int = 0) -> None:
        self._now = now
        self._last = last

    @property
    def last(self) -> int:
        """The greatest timestamp issued or observed."""
        return self._last

    def tick(self) -> int:
        """A new timestamp for a local event, greater than every earlier one."""
        wall = pack(self._now() // 1_000_000)
        self._last = wall if wall > self._last else self._last + 1
        return self._last

    def observe(self, timestamp: int) -> None:
        """Account for a timestamp seen on a remote update."""
        if timestamp > self._last:
            self._last = timestamp

    def now(self) -> int:
        """The current physical time as a timestamp (counter 0); does not advance the clock."""
        return pack(self._now() // 1_000_000)
