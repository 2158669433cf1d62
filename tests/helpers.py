"""Shared test helpers: bounded waits instead of sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Call ``predicate`` until it returns a truthy value, and return that value.

    Raises AssertionError after ``timeout`` seconds, quoting the last value seen,
    so a failing wait says what it was waiting on.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")
        time.sleep(interval)


def ship(src: Any, dst: Any, since: int = 0) -> int:
    """Hand every update of node ``src`` from log position ``since`` to ``dst``."""
    for raw in src.updates_since(since):
        dst.ingest(raw)
    return src.log_length()


T0_MS = 1_700_000_000_000  # where hand-driven clocks start (ms)


class Clock:
    """A physical clock (ns) the test moves by hand, in ms (``clock.ms += 1000``)."""

    def __init__(self, ms: int = T0_MS) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms * 1_000_000
