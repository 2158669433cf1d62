"""Queries against Python: the order-preserving encoding sorts and compares like Python
within each value class, and a query on a real node (indexed or scanned field, after
random sets, deletes and removals) gives what a Python filter over ``all()`` gives;
the in-memory store keeps the same index as the Redis store."""

from __future__ import annotations

import itertools
import math
import operator
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmodel
from dmodel import query
from dmodel.clock import HybridClock
from dmodel.node.applier import Applier
from dmodel.store.base import MemoryStore
from dmodel.update import decode

INT64 = st.integers(-(1 << 63), (1 << 64) - 1)       # what a field can hold
NEAR_DOUBLES = st.sampled_from([2 ** 53, 2 ** 53 + 1, 2 ** 63, 2 ** 64 - 1, -(2 ** 63)]).flatmap(
    lambda n: st.integers(n - 3, n + 3)).filter(lambda n: -(1 << 63) <= n < (1 << 64))
NUMBERS = st.one_of(INT64, NEAR_DOUBLES, st.floats(allow_nan=False),
                    st.sampled_from([0.0, -0.0, 2.0 ** 53, 2.0 ** 63, 2.0 ** 64]))
TEXT = st.text(alphabet=st.characters(codec=None), max_size=6) | st.text(alphabet="a\0b",
                                                                          max_size=4)
BYTES = st.binary(max_size=6) | st.lists(st.sampled_from([b"\0", b"a", b"\xff"]),
                                          max_size=4).map(b"".join)
OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
       ">": operator.gt, ">=": operator.ge}


def value_class(v: object) -> int:
    if v is None:
        return 0
    if isinstance(v, bool):
        return 1
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return 2
    if isinstance(v, str):
        return 3
    return 4 if isinstance(v, bytes) else 5


def reference(v: object, op: str, operand: object) -> bool:
    """What a condition means, said in Python (see dmodel/query.py)."""
    same = value_class(v) == value_class(operand) and value_class(v) != 5
    if op == "!=":
        return not (same and v == operand)
    return same and OPS[op](v, operand)


@settings(max_examples=200, deadline=None)
@given(values=st.one_of(st.lists(NUMBERS, min_size=2, max_size=12),
                        st.lists(TEXT, min_size=2, max_size=12),
                        st.lists(BYTES, min_size=2, max_size=12),
                        st.lists(st.booleans(), min_size=2, max_size=4)))
def test_the_encoding_sorts_and_compares_like_python(values) -> None:
    keys = [query.encode_value(v) for v in values]
    for (a, ka), (b, kb) in itertools.combinations(zip(values, keys, strict=True), 2):
        assert (ka < kb) == (a < b), (a, b)
        assert (ka == kb) == (a == b), (a, b)
        assert not ka.startswith(kb) or ka == kb     # prefix-free
    by_key = [v for _, v in sorted(zip(keys, values, strict=True), key=lambda kv: kv[0])]
    assert by_key == sorted(values)


@settings(max_examples=200, deadline=None)
@given(stored=st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, BYTES,
                        st.just(math.nan), st.lists(st.integers(), max_size=2)),
       op=st.sampled_from(sorted(OPS)),
       operand=st.one_of(st.booleans(), NUMBERS, TEXT, BYTES, st.just(None),
                         st.integers(-(10 ** 30), 10 ** 30)))
def test_a_condition_on_a_key_is_the_python_comparison(stored, op, operand) -> None:
    if operand is None and op not in ("==", "!="):
        with pytest.raises(dmodel.errors.QueryError):
            query.ranges(op, operand)
        return
    found = query.ranges(op, operand)
    assert query.key_matches(query.encode_value(stored), found) == reference(stored, op, operand)


def test_the_classes_are_ordered() -> None:
    keys = [query.encode_value(v) for v in (None, False, True, -math.inf, 0, 1.5, math.inf,
                                            "", "z", b"", b"z")]
    assert keys == sorted(keys)


# ------------------------------------------------------------------ on a node

_models = itertools.count()
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3),
                   st.sampled_from([0.5, -1.0, 2.0, 1e300]), st.sampled_from(["", "a", "b\0"]),
                   st.just([1]))


@pytest.fixture(scope="module")
def node(server):
    url, root = server
    n = dmodel.Node(root / "query-node", redis_url=url, redis_prefix="qp:", listen="",
                    peers=[], discovery=False)
    yield n
    n.shutdown()


def fresh_model() -> type:
    """A model of its own per example (its objects start from none)."""
    return type(f"QProp{next(_models)}", (dmodel.DModel,), {
        "v": dmodel.DField(index=True), "w": dmodel.DField(), "__module__": __name__})


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_query_results_equal_a_python_filter_over_all(node, data) -> None:
    model = fresh_model()
    start = node.log_length()
    memory = MemoryStore()
    memory.ensure_index(model.__name__, "v")
    objs = []
    for i in range(data.draw(st.integers(1, 8), label="objects")):
        value = data.draw(VALUES, label=f"value {i}")
        objs.append(model.create(node=node, v=value, w=value))
        if i == 0:  # the index exists from here on: what follows is its upkeep
            model.query(node=node).where(model.v != 0).count()
            assert node.store.has_index(model.__name__, "v")
    for _ in range(data.draw(st.integers(0, 8), label="changes")):
        live = [o for o in objs if o.exists()]
        if not live:
            break
        obj = data.draw(st.sampled_from(live), label="object")
        step = data.draw(st.sampled_from(["set", "set", "delete", "remove"]), label="step")
        if step == "set":
            value = data.draw(VALUES, label="value")
            with obj.transaction():
                obj.v = value
                obj.w = value
        elif step == "delete":
            obj.delete("v")
            obj.delete("w")
        else:
            obj.remove()
    op = data.draw(st.sampled_from(sorted(OPS)), label="op")
    operand = data.draw(VALUES.filter(lambda v: not isinstance(v, list)), label="operand")
    if operand is None and op not in ("==", "!="):
        op = "=="
    desc = data.draw(st.booleans(), label="desc")
    limit = data.draw(st.none() | st.integers(0, 5), label="limit")

    everything = model.all(node=node)
    expected = [o for o in everything if reference(o.v.get(), op, operand)]
    expected.sort(key=lambda o: (query.encode_value(o.v.get()), o.db_id), reverse=desc)
    expected_ids = [o.db_id for o in expected][:limit]
    for field in (model.v, model.w):                   # indexed, and scanned
        condition = {"==": field == operand, "!=": field != operand, "<": field < operand,
                     "<=": field <= operand, ">": field > operand,
                     ">=": field >= operand}[op]
        q = model.query(node=node).where(condition).order_by(field, desc=desc)
        if limit is not None:
            q = q.limit(limit)
        assert q.ids() == expected_ids, field
        assert q.count() == len(expected_ids), field
        unordered = model.query(node=node).where(condition).ids()
        assert unordered == sorted(o.db_id for o in expected)

    # the same updates into the in-memory store give the same index
    applier = Applier(memory, HybridClock(time.time_ns), policy=lambda m: "reject",
                      skew_ms=60_000)
    applier.ingest([decode(raw) for raw in node.updates_since(start)])
    applier.release_gaps(0)  # links retention pruned on the node: nothing more will come
    name = model.__name__
    assert memory.index_range(name, "v", b"-", b"+") == \
        node.store.index_range(name, "v", b"-", b"+")
    assert node.verify_store() == []
