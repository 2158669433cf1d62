"""The flood guard: counting bad frames per source and banning (pure, time injected)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dmodel.net.flood import FloodGuard

A, B = b"a" * 16, "tcp://10.0.0.1:5000"


def test_more_than_threshold_within_window_bans() -> None:
    guard = FloodGuard(threshold=3, window=10.0, ban=60.0)
    assert [guard.record(A, t) for t in (0.0, 1.0, 2.0)] == [False] * 3
    assert not guard.banned(A)
    assert guard.record(A, 3.0)  # the fourth, over the threshold
    assert guard.banned(A) and guard.bans == [A]
    assert not guard.banned(B) and not guard.banned(None)


def test_a_new_window_starts_the_count_again() -> None:
    guard = FloodGuard(threshold=2, window=10.0, ban=60.0)
    guard.record(A, 0.0)
    guard.record(A, 1.0)
    assert not guard.record(A, 11.5)  # the old window is over
    assert not guard.banned(A)


def test_sources_are_counted_apart() -> None:
    guard = FloodGuard(threshold=1, window=10.0, ban=5.0)
    guard.record(A, 0.0)
    guard.record(B, 0.0)
    assert guard.record(B, 0.5) and not guard.banned(A)
    assert guard.bans == [B]


def test_tick_lifts_bans_and_prunes_windows() -> None:
    guard = FloodGuard(threshold=1, window=10.0, ban=5.0)
    guard.record(A, 0.0)
    guard.record(A, 0.0)
    guard.record(B, 0.0)
    lifted, nxt = guard.tick(1.0)
    assert lifted == [] and nxt == 5.0  # the ban ends before the next prune
    assert guard.counting() == 1  # B's window is still open
    lifted, nxt = guard.tick(11.0)
    assert lifted == [A] and not guard.banned(A)
    assert guard.counting() == 0 and nxt == 21.0


@given(st.lists(st.tuples(st.sampled_from([A, B]), st.floats(0, 100)), max_size=60),
       st.integers(1, 10))
def test_never_banned_below_threshold(events, threshold) -> None:
    guard = FloodGuard(threshold=threshold, window=1000.0, ban=1.0)
    counts: dict[object, int] = {}
    for src, now in sorted(events, key=lambda e: e[1]):
        counts[src] = counts.get(src, 0) + 1
        banned_now = guard.record(src, now)
        assert banned_now == (counts[src] == threshold + 1)
        if banned_now:
            counts[src] = 0


def test_rate_limiter_refills_at_its_rate_up_to_the_burst() -> None:
    from dmodel.net.flood import RateLimiter

    limiter = RateLimiter(rate=10.0, burst=5.0)
    assert [limiter.allow(A, 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert limiter.limited == 1
    assert limiter.allow(A, 0.1) and not limiter.allow(A, 0.1)  # one token in 0.1 s
    assert limiter.available(A, 100.0) == 5.0  # never above the burst
    assert limiter.allow(B, 0.0, cost=5.0) and not limiter.allow(B, 0.0, cost=1.0)  # bytes


def test_rate_limiter_keeps_a_bounded_number_of_sources() -> None:
    from dmodel.net.flood import RateLimiter

    limiter = RateLimiter(rate=1.0, burst=2.0, max_sources=10)
    for i in range(100):
        limiter.allow(i, 0.0)
    assert len(limiter) <= 10
