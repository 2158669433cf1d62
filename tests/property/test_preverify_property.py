"""Signature checks made before the apply lock (``Applier.preverify``, what the verify
thread runs) change no decision: for any delivery order and any cut into batches, with
forged updates among them (a flipped signature bit, and a forged twin that shares a good
update's body and so its id), the prepared path decides and stores exactly what the raw
path does. Over the in-memory store, as ``unit/test_applier.py``.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from strategies import T0, create_op, db_id, ident, signed

from dmodel.clock import HybridClock
from dmodel.node.applier import Applier
from dmodel.store.base import MemoryStore
from dmodel.update import Op

NOW_NS = ((T0 >> 16) + 1000) * 1_000_000


def applier() -> tuple[Applier, MemoryStore]:
    store = MemoryStore()
    return Applier(store, HybridClock(lambda: NOW_NS), policy=lambda model: "reject",
                   skew_ms=60_000), store


def forge(raw: bytes) -> bytes:
    """The same body behind a signature with one bit flipped (raw = signature || body)."""
    return bytes([raw[0] ^ 1]) + raw[1:]


def history(writers: int, sets: int) -> list[bytes]:
    raws = []
    for w in range(writers):
        who = ident(40 + w)
        head = signed(who, (create_op(who),), ts=T0)
        raws.append(head.raw)
        for i in range(sets):
            head = signed(who, (Op(db_id(who), "set", "n", i),), ts=T0 + (i + 1 << 16),
                          prev=head.id)
            raws.append(head.raw)
    return raws


def verdicts(decisions) -> list[tuple[str, str]]:
    return [("none", "") if d is None else (d.verdict, type(d.error).__name__)
            for d in decisions]


@given(data=st.data())
def test_prepared_batches_decide_as_raw_ones(data) -> None:
    raws = history(data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6)))
    forged = data.draw(st.sets(st.integers(0, len(raws) - 1), max_size=3))
    wire = [forge(r) if i in forged else r for i, r in enumerate(raws)]
    twin = data.draw(st.integers(0, len(raws) - 1))
    wire.append(forge(raws[twin]) if twin not in forged else raws[twin])
    wire = data.draw(st.permutations(wire))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=4))) \
        if len(wire) > 1 else []
    batches = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    ahead = data.draw(st.booleans())  # the verify thread runs a batch ahead, or not

    raw_applier, raw_store = applier()
    expected = [verdicts(raw_applier.ingest_raw(batch)) for batch in batches]

    prep_applier, prep_store = applier()
    if ahead:
        prepared = [prep_applier.preverify(batch) for batch in batches]
        got = [verdicts(prep_applier.ingest_raw(p)) for p in prepared]
    else:
        got = [verdicts(prep_applier.ingest_raw(prep_applier.preverify(b))) for b in batches]

    assert got == expected
    assert prep_store.log_range() == raw_store.log_range()
    assert prep_applier.stats.dropped == raw_applier.stats.dropped
    assert prep_applier.stats.applied == raw_applier.stats.applied


def test_a_forged_twin_of_a_checked_update_is_not_taken_for_it() -> None:
    """preverify checked the good copy; the forged copy (same body, same id) prepared
    after it must still fail its own check, in the same batch or the next."""
    good = history(1, 1)
    create, update = good
    app, store = applier()
    app.ingest_raw([create])
    prepared = app.preverify([update, forge(update)])
    # The forged copy alone, first: the good copy's check must not vouch for it.
    decision = app.ingest_raw([prepared[1]])[0]
    assert decision is not None and type(decision.error).__name__ == "ForgedUpdate"
    assert app.stats.dropped["ForgedUpdate"] == 1
    assert app.ingest_raw([prepared[0]])[0].verdict == "accepted"
    assert len(store.log_range()) == 2


def test_preverify_keeps_bytes_that_are_no_update() -> None:
    app, _ = applier()
    out = app.preverify([b"\x00" * 10])
    assert out == [b"\x00" * 10]
    assert app.ingest_raw(out) == [None]
    assert app.stats.dropped["MalformedUpdate"] == 1


def test_the_pipeline_skips_the_checks_preverify_made(monkeypatch) -> None:
    from dmodel.update import Update

    calls = []
    real = Update.verify
    monkeypatch.setattr(Update, "verify", lambda self, key: calls.append(1) or real(self, key))
    raws = history(1, 3)
    app, _ = applier()
    prepared = app.preverify(raws)
    assert len(calls) == 4  # the create's own key, then the cached key of its caller
    calls.clear()
    assert [d.verdict for d in app.ingest_raw(prepared)] == ["accepted"] * 4
    assert calls == []
    raw_app, _ = applier()
    raw_app.ingest_raw(raws)
    assert len(calls) == 4
