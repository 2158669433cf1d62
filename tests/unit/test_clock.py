"""The hybrid logical clock (dmodel.clock), driven by an injected physical clock."""

from __future__ import annotations

from dmodel import clock
from dmodel.clock import HybridClock

MS = 1_000_000  # ns per ms
T = 1_700_000_000_000  # ms


def test_pack_and_physical() -> None:
    ts = clock.pack(T, 5)
    assert clock.physical_ms(ts) == T
    assert ts & clock.COUNTER_MASK == 5
    assert clock.from_seconds(T / 1000) == clock.pack(T)
    assert clock.pack(T, clock.COUNTER_MASK) < clock.pack(T + 1)


def test_first_tick_is_wall_time() -> None:
    hlc = HybridClock(lambda: T * MS + 123)
    assert hlc.tick() == clock.pack(T)
    assert hlc.last == clock.pack(T)


def test_monotonic_with_a_frozen_clock() -> None:
    hlc = HybridClock(lambda: T * MS)
    stamps = [hlc.tick() for _ in range(70_000)]  # past the 16-bit counter
    assert all(a < b for a, b in zip(stamps, stamps[1:], strict=False))
    assert clock.physical_ms(stamps[0]) == T


def test_monotonic_with_a_backwards_clock() -> None:
    readings = iter([T, T + 10, T - 5000, T - 5000, T + 3, T + 11, T + 12, 0])
    hlc = HybridClock(lambda: next(readings) * MS)
    stamps = [hlc.tick() for _ in range(8)]
    assert all(a < b for a, b in zip(stamps, stamps[1:], strict=False))
    assert clock.physical_ms(stamps[1]) == T + 10
    assert clock.physical_ms(stamps[2]) == T + 10  # the clock went back: counter moves on
    assert clock.physical_ms(stamps[6]) == T + 12  # wall time caught up again


def test_follows_wall_time_when_it_advances() -> None:
    now = [T]
    hlc = HybridClock(lambda: now[0] * MS)
    first = hlc.tick()
    now[0] += 250
    assert hlc.tick() == clock.pack(T + 250) > first


def test_observe_moves_past_remote_timestamps() -> None:
    hlc = HybridClock(lambda: T * MS)
    remote = clock.pack(T + 60_000, 7)
    hlc.observe(remote)
    assert hlc.last == remote
    nxt = hlc.tick()
    assert nxt > remote
    assert clock.physical_ms(nxt) == T + 60_000
    hlc.observe(clock.pack(T - 1000))  # an older one changes nothing
    assert hlc.tick() == nxt + 1


def test_now_does_not_advance() -> None:
    hlc = HybridClock(lambda: T * MS)
    hlc.observe(clock.pack(T + 10))
    assert hlc.now() == clock.pack(T)
    assert hlc.last == clock.pack(T + 10)


def test_restored_last_is_respected() -> None:
    # A node restarts with the greatest timestamp from its store and a clock that went back.
    saved = clock.pack(T + 5000, 9)
    hlc = HybridClock(lambda: T * MS, last=saved)
    assert hlc.tick() == saved + 1
