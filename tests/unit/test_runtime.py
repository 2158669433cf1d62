"""dmodel.runtime.tune_gc: freezes the objects alive at the call, sets the thresholds."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from dmodel.runtime import DEFAULT_THRESHOLD, tune_gc


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_freezes_and_sets_thresholds() -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    previous = tune_gc()
    assert previous == (700, 10, 10)
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == DEFAULT_THRESHOLD


def test_idempotent() -> None:
    tune_gc()
    frozen = gc.get_freeze_count()
    assert tune_gc() == DEFAULT_THRESHOLD
    assert gc.get_threshold() == DEFAULT_THRESHOLD
    assert gc.get_freeze_count() >= frozen
    assert gc.isenabled()


def test_options() -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    tune_gc(freeze=False, threshold=(5_000, 20, 30))
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == (5_000, 20, 30)
    tune_gc(threshold=None)
    assert gc.get_threshold() == (5_000, 20, 30)
    assert gc.get_freeze_count() > 0


def test_bad_threshold() -> None:
    with pytest.raises(ValueError):
        tune_gc(threshold=(-1,))
    with pytest.raises(ValueError):
        tune_gc(threshold=(1, 2, 3, 4))
