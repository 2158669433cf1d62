"""Pruning keeps everything that contributes (real Redis, real nodes).

A writer that keeps every version makes random changes: field sets and deletes, DList
appends, sets and deletes, some in transactions, some on a second object. Its signed
updates reach a node that prunes hard (retention 1, a pass every few superseded
versions) and a node that keeps all. After the pruning node's passes, a late joiner
that gets only what the pruning node still holds must reach the state the keep-all node
has: had a pass dropped an update that still contributes (a winner, a kept version, the
insert of a live DList element), the joiner would miss it.
"""

from __future__ import annotations

import itertools
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dmodel
from dmodel.node import pruner

pytestmark = pytest.mark.timeout(300)


class PrunedDoc(dmodel.DModel):
    title = dmodel.DField()
    note = dmodel.DField()
    items = dmodel.DList()


_prefixes = itertools.count()

VALUES = st.sampled_from(["a", "b", "c", 1, 2])
STEP = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["title", "note"]), VALUES),
    st.tuples(st.just("del"), st.sampled_from(["title", "note"])),
    st.tuples(st.just("append"), VALUES),
    st.tuples(st.just("lset"), st.integers(0, 5), VALUES),
    st.tuples(st.just("ldel"), st.integers(0, 5)),
)


def _node(server: tuple[str, Any], name: str, retention: str | int) -> dmodel.Node:
    url, root = server
    n = next(_prefixes)
    return dmodel.Node(root / f"{name}{n}", redis_url=url, redis_prefix=f"pp{n}:{name}:",
                       retention=retention)


def _change(doc: PrunedDoc, step: tuple[Any, ...]) -> None:
    kind, *args = step
    if kind == "set":
        setattr(doc, args[0], args[1])
    elif kind == "del":
        if getattr(doc, args[0]).get() is not None:
            delattr(doc, args[0])
    elif kind == "append":
        doc.items.append(args[0])
    elif kind == "lset" and args[0] < len(doc.items):
        doc.items[args[0]] = args[1]
    elif kind == "ldel" and args[0] < len(doc.items):
        del doc.items[args[0]]


def _state(node: dmodel.Node, ids: list[str]) -> list[Any]:
    docs = [PrunedDoc(db_id, node=node) for db_id in ids]
    return [(d.title.get(), d.note.get(), list(d.items)) for d in docs]


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 1), st.booleans(), st.lists(STEP, min_size=1,
                                                                          max_size=4)),
                      min_size=1, max_size=30))
def test_what_a_pruning_node_keeps_rebuilds_the_whole_state(server, steps) -> None:
    writer = _node(server, "w", "all")
    pruning, keep_all = _node(server, "p", 1), _node(server, "k", "all")
    joiner = None
    try:
        docs = [PrunedDoc.create(title="t", node=writer) for _ in range(2)]
        for which, in_tx, changes in steps:
            doc = docs[which]
            if in_tx:
                with doc.transaction():
                    for step in changes:
                        _change(doc, step)
            else:
                for step in changes:
                    _change(doc, step)
        raws = list(writer.updates_since(0))
        with mock.patch.object(pruner, "PRUNE_BATCH", 3):
            for at in range(0, len(raws), 5):  # batches, as from the network
                pruning.ingest_many(raws[at:at + 5])
                keep_all.ingest_many(raws[at:at + 5])
            assert pruning.verify_store() == []  # (after the last pass)
        ids = [d.db_id for d in docs]
        assert _state(pruning, ids) == _state(keep_all, ids) == _state(writer, ids)
        joiner = _node(server, "j", "all")
        for raw in pruning.updates_since(0):
            joiner.ingest(raw)
        joiner.applier.release_gaps(0)  # links the pruning node dropped: nothing more comes
        assert _state(joiner, ids) == _state(keep_all, ids)
    finally:
        for node in (writer, pruning, keep_all, joiner):
            if node is not None:
                node.shutdown()
