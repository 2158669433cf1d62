"""DList positions (dmodel.merge.between): strictly between, valid digits, short when growing."""

from __future__ import annotations

import bisect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmodel.merge import between
from dmodel.update import MAX_POSITION

TOWARDS = st.sampled_from([None, "low", "high", "middle"])


def check(position: bytes, low: bytes, high: bytes | None) -> None:
    assert low < position, (low, position)
    if high is not None:
        assert position < high, (position, high)
    assert position, "a position is never empty"
    assert all(1 <= digit <= 255 for digit in position), position
    assert position[-1] != 1, position


@given(st.lists(st.tuples(st.integers(min_value=0), TOWARDS), min_size=1, max_size=300))
def test_random_inserts_stay_strictly_between_with_valid_digits(steps) -> None:
    positions: list[bytes] = []
    for where, toward in steps:
        index = where % (len(positions) + 1)
        low = positions[index - 1] if index > 0 else b""
        high = positions[index] if index < len(positions) else None
        position = between(low, high, toward)
        check(position, low, high)
        assert position not in positions
        positions.insert(index, position)
    assert positions == sorted(positions)


@given(st.binary(min_size=1, max_size=20), st.binary(min_size=1, max_size=20), TOWARDS)
def test_between_any_two_valid_positions(a: bytes, b: bytes, toward) -> None:
    # Any two valid positions (digits 1..255, not ending in 1) have room between them.
    a = bytes(max(d, 1) for d in a)
    b = bytes(max(d, 1) for d in b)
    if a[-1] == 1:
        a += b"\x80"
    if b[-1] == 1:
        b += b"\x80"
    if a == b:
        return
    low, high = min(a, b), max(a, b)
    check(between(low, high, toward), low, high)
    check(between(low, None, toward), low, None)
    check(between(b"", low, toward), b"", low)


@given(st.lists(TOWARDS, min_size=1, max_size=600))
def test_squeezing_against_one_neighbour_always_finds_room(towards) -> None:
    # Worst case: every insert lands right after the previous one (or right before it).
    low, high = b"", b"\x02"
    for i, toward in enumerate(towards):
        position = between(low, high, toward)
        check(position, low, high)
        if i % 2:
            low = position
        else:
            high = position
    assert len(high) <= MAX_POSITION


def test_appending_ten_thousand_times_keeps_positions_short() -> None:
    position = between(b"", None)
    for _ in range(10_000):
        nxt = between(position, None)
        check(nxt, position, None)
        position = nxt
    assert len(position) < 50


def test_prepending_ten_thousand_times_keeps_positions_short() -> None:
    position = between(b"", None)
    for _ in range(10_000):
        nxt = between(b"", position)
        check(nxt, b"", position)
        position = nxt
    assert len(position) < 50


def test_typing_in_the_middle_keeps_positions_short() -> None:
    # Each insert goes right after the previous one, between it and a fixed right neighbour;
    # the model points ``toward`` at the neighbour inserted last (the low one).
    low, high = between(b"", None), None
    high = between(low, None)
    positions = [low, high]
    for _ in range(10_000):
        position = between(low, high, "low")
        check(position, low, high)
        bisect.insort(positions, position)
        low = position
    assert max(len(p) for p in positions) < 50


def test_inserting_before_the_previous_insert_keeps_positions_short() -> None:
    low = between(b"", None)
    high = between(low, None)
    for _ in range(10_000):
        position = between(low, high, "high")
        check(position, low, high)
        high = position
    assert len(high) < 50


def test_between_refuses_equal_or_reversed_positions_instead_of_looping() -> None:
    for low, high in ((b"\x05", b"\x05"), (b"\x05\x80", b"\x05"), (b"\x02", b"\x02")):
        with pytest.raises(ValueError):
            between(low, high)
