"""Process-wide tuning for a long-running node: the garbage collector.

A process that imports dmodel tracks tens of thousands of container objects (modules,
classes, functions, the libraries' tables) that live as long as the process. CPython's
cyclic garbage collector walks all of them on every full (generation 2) collection,
which a busy node triggers every few seconds: a pause of tens of milliseconds on
whatever thread allocated last, in the middle of applying or relaying updates.

:func:`tune_gc`, called once after start-up (``dmodel peer`` does, right after its node
is up), moves everything alive at that moment into the collector's permanent
generation (:func:`gc.freeze`), so later full collections only walk what was created
since, and raises the collection thresholds so that they run less often. Reference
counting frees almost everything a node allocates; cycles are still collected, only
less often. A program that embeds a :class:`dmodel.Node` can call it the same way
once its own start-up is done::

    from dmodel.runtime import tune_gc

    node = dmodel.Node(home)
    ...                       # import, load, connect
    tune_gc()
"""

from __future__ import annotations

import gc

DEFAULT_THRESHOLD = (10_000, 50, 1_000)
"""Generation 0, 1 and 2 thresholds set by :func:`tune_gc` (CPython's are 700, 10, 10):
a young collection every 10,000 net allocations of tracked objects, a middle one every
50 of those, a full one at most every 1,000 middle ones (and, as always, only once the
objects that survived since the last full collection exceed a quarter of the old ones).
"""


def tune_gc(*, freeze: bool = True,
            threshold: tuple[int, ...] | None = DEFAULT_THRESHOLD) -> tuple[int, int, int]:
    """Tune the garbage collector for a long-running node; the thresholds it replaced.

    ``freeze``: collect once, then :func:`gc.freeze` every object alive now (they are
    never examined again by the collector; they are still freed by reference counting).
    ``threshold``: passed to :func:`gc.set_threshold` (``None`` leaves the thresholds as
    they are). Idempotent: calling it again freezes what was created since and sets the
    same thresholds. Call it after start-up, once the long-lived objects exist.
    """
    previous: tuple[int, int, int] = gc.get_threshold()
    if threshold is not None:
        if not 1 <= len(threshold) <= 3 or any(t < 0 for t in threshold):
            raise ValueError(f"threshold: one to three non-negative integers, not {threshold!r}")
        gc.set_threshold(*threshold)
    if freeze:
        gc.collect()
        gc.freeze()
    return previous


__all__ = ["DEFAULT_THRESHOLD", "tune_gc"]
