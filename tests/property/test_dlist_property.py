"""DList index semantics against a Python list.

On one node (real Redis), random sequences of append / insert / set / pop / remove /
del / extend, some inside transactions, must leave the DList equal to a Python list
given the same calls. Across nodes, two or three writers change one list concurrently
from a common start; their signed updates reach receivers in permuted orders: in-memory
appliers (the pure core over MemoryStore) and a real node. Every receiver must hold the
same order (the one ``merge.fold`` gives), each writer's own view must survive in it
(the merged order restricted to that writer's elements), and an insert at ``i`` made
after the merge must land at ``i``.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dmodel
from dmodel import merge
from dmodel.clock import HybridClock
from dmodel.node.applier import Applier
from dmodel.store.base import MemoryStore
from dmodel.update import decode

pytestmark = pytest.mark.timeout(300)


class PropShelf(dmodel.DModel):
    items = dmodel.DList()


_prefixes = itertools.count()


def new_node(server: tuple[str, Any], name: str) -> dmodel.Node:
    url, root = server
    n = next(_prefixes)
    # Every version kept: the writers' whole signed histories are handed around.
    return dmodel.Node(root / f"{name}{n}", redis_url=url, redis_prefix=f"dl{n}:{name}:",
                       retention="all")


# ---------------------------------------------------------------- one node


@pytest.fixture(scope="module")
def node(server):
    n = new_node(server, "single")
    yield n
    n.shutdown()


VALUES = st.sampled_from(["a", "b", "c", 1, 2, None])
INDEXES = st.integers(-8, 8)
STEP = st.one_of(
    st.tuples(st.just("append"), VALUES),
    st.tuples(st.just("insert"), INDEXES, VALUES),
    st.tuples(st.just("set"), INDEXES, VALUES),
    st.tuples(st.just("pop"), st.none() | INDEXES),
    st.tuples(st.just("remove"), VALUES),
    st.tuples(st.just("del"), INDEXES),
    st.tuples(st.just("del slice"), st.none() | INDEXES, st.none() | INDEXES,
              st.sampled_from([None, 1, 2, -1])),
    st.tuples(st.just("extend"), st.lists(VALUES, max_size=3)),
)


def apply(target: Any, step: tuple) -> Any:
    """Make the call ``step`` names on a Python list or a DList; what it returns or raises."""
    kind, *args = step
    try:
        if kind == "set":
            target[args[0]] = args[1]
        elif kind == "del":
            del target[args[0]]
        elif kind == "del slice":
            del target[slice(*args)]
        elif kind == "pop":
            return target.pop() if args[0] is None else target.pop(args[0])
        else:
            return getattr(target, kind)(*args)
    except (IndexError, ValueError) as exc:
        return type(exc)
    return None


@given(st.lists(st.tuples(st.booleans(), st.lists(STEP, min_size=1, max_size=6)),
                min_size=1, max_size=4))
def test_one_node_matches_a_python_list(node, blocks) -> None:
    shelf = PropShelf([], node=node)
    model: list[Any] = []
    for in_transaction, steps in blocks:
        with shelf.transaction() if in_transaction else contextlib.nullcontext():
            for step in steps:
                assert apply(shelf.items, step) == apply(model, step), step
                assert list(shelf.items) == model, step
                assert len(shelf.items) == len(model)
        assert list(shelf.items) == model
        assert shelf.items[::-1] == model[::-1]
    fresh = PropShelf(shelf.db_id, node=node)  # read back from the store alone
    assert list(fresh.items) == model


# ---------------------------------------------------------------- merges


@pytest.fixture(scope="module")
def writers(server):
    """Three writer nodes, each holding one member object every node knows, and the
    updates creating those."""
    nodes = [new_node(server, f"w{i}") for i in range(3)]
    members = [PropShelf([], node=n).db_id for n in nodes]
    creates = [raw for n in nodes for raw in n.updates_since(0)]
    exchange(nodes)
    yield nodes, members, creates
    for n in nodes:
        n.shutdown()


def exchange(nodes: list[dmodel.Node], since: dict[dmodel.Node, int] | None = None) -> None:
    """Every node gets what the others stored (since ``since``) and decides all of it."""
    for src in nodes:
        raws = src.updates_since(since[src] if since else 0)
        for dst in nodes:
            if dst is not src:
                dst.ingest_many(raws)
    for node in nodes:
        node.release_gaps()
        assert node.pending_count == 0


def memory_receiver() -> Applier:
    return Applier(MemoryStore(), HybridClock(time.time_ns), policy=lambda model: "reject",
                   skew_ms=60_000)


def shuffled(data: Any, raws: list[bytes], label: str) -> list[bytes]:
    order = data.draw(st.permutations(range(len(raws))), label=label)
    return [raws[i] for i in order]


def index_of(length: int, index: int) -> int:
    """Where ``list.insert(index, v)`` puts ``v`` in a list of ``length`` elements."""
    return max(0, length + index) if index < 0 else min(index, length)


LOCAL_STEP = st.one_of(
    st.tuples(st.just("append")),
    st.tuples(st.just("insert"), INDEXES),
    st.tuples(st.just("set"), INDEXES),
    st.tuples(st.just("pop"), INDEXES),
)


@given(data=st.data())
def test_concurrent_writers_merge_to_one_order_in_every_delivery_order(server, writers,
                                                                        data) -> None:
    everyone, members, creates = writers
    count = data.draw(st.integers(2, 3), label="writers")
    nodes, members = everyone[:count], members[:count]
    since = {n: n.log_length() for n in everyone}
    doc = PropShelf([], node=nodes[0])
    for member in members[1:]:
        doc.append_update_authorized(member)
    doc.items.extend(f"base{i}" for i in range(data.draw(st.integers(0, 4), label="base")))
    exchange(everyone, since)

    # Each writer changes the list without seeing the others (values name who wrote).
    handles = [doc] + [PropShelf(doc.db_id, m, node=n) for n, m in zip(nodes[1:], members[1:],
                                                                         strict=True)]
    for k, handle in enumerate(handles):
        model = list(handle.items)
        for j, step in enumerate(data.draw(st.lists(LOCAL_STEP, max_size=4), label=f"w{k}")):
            step = step + (f"w{k}.{j}",) if step[0] != "pop" else step
            assert apply(handle.items, step) == apply(model, step), step
        assert list(handle.items) == model
    own_orders = [n.list_range(doc.db_id, "items") for n in nodes]

    raws = list({decode(r).id: r for r in creates + [r for n in nodes
                                                     for r in n.updates_since(since[n])]
                 }.values())
    reference = merge.fold([decode(r) for r in raws]).list_elements(doc.db_id, "items")
    orders = []
    for i in range(2):
        receiver = memory_receiver()
        receiver.ingest_raw(shuffled(data, raws, f"order{i}"))
        receiver.release_gaps(0)  # the members' earlier updates (other examples) never come
        assert len(receiver.pending) == 0
        orders.append(receiver.store.list_range(doc.db_id, "items"))
    real = new_node(server, "r")
    try:
        real.ingest_many(shuffled(data, raws, "real order"))
        real.release_gaps()
        assert real.pending_count == 0
        orders.append(real.list_range(doc.db_id, "items"))
        assert all(order == reference for order in orders), orders
        for own in own_orders:  # each writer's order survives, less what others deleted
            assert [e for e in reference if e in own] == [e for e in own if e in reference]

        # After the merge, an insert at any index lands there, here and on the receiver.
        exchange(everyone, since)
        merged = list(doc.items)
        assert [v for v in merged if v is not None] == merged
        for index in range(-len(merged) - 1, len(merged) + 2):
            doc.items.insert(index, "probe")
            assert doc.items.index("probe") == index_of(len(merged), index), index
            doc.items.remove("probe")
        index = data.draw(st.integers(-len(merged) - 2, len(merged) + 2), label="index")
        merged.insert(index, "after")
        doc.items.insert(index, "after")
        assert list(doc.items) == merged
        real.ingest_many(nodes[0].updates_since(since[nodes[0]]))
        assert list(PropShelf(doc.db_id, node=real).items) == merged
    finally:
        real.shutdown()
