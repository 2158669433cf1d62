"""Queries (issue 14 item 4) on real nodes: find, where/order_by/limit/count, the value
indexes following merges, removals and re-decisions, verify, encrypted fields refused.

An index is built the first time a query uses it; the tests that check it follows the
commits query first, so that what they check afterwards is the upkeep, not a rebuild.
"""

from __future__ import annotations

import operator
import re
from pathlib import Path

import pytest
from helpers import T0_MS, Clock

import dmodel
from dmodel.crypto import EncryptedValue
from dmodel.errors import ModelDefinitionError, QueryError


class QPerson(dmodel.DModel):
    name = dmodel.DField(index=True)
    age = dmodel.DField(index=True)
    city = dmodel.DField()                      # not indexed: answered by a scan
    rank = dmodel.DField(default=0)             # not indexed, with a default
    level = dmodel.DField(index=True, default=0)
    salary = dmodel.DField(encrypted=True)
    tags = dmodel.DDict()
    items = dmodel.DList()


class QChief(dmodel.DModel):
    name = dmodel.DField()


def ship(src: dmodel.Node, dst: dmodel.Node, since: int = 0) -> None:
    for raw in src.updates_since(since):
        dst.ingest(raw)


def last(node: dmodel.Node) -> bytes:
    return node.updates_since(node.log_length() - 1)[0]


@pytest.fixture
def people(make_node):
    """A node with 30 QPerson objects of mixed ages, names and cities."""
    node = make_node("q")
    cities = ["Oslo", "Rome", None]
    objs = []
    for i in range(30):
        values = {"name": f"p{i % 7}", "age": [i, i + 0.5, None][i % 3] if i % 5 else i,
                  "city": cities[i % 3], "rank": i % 4}
        if i % 6 == 0:
            values["level"] = i
        objs.append(QPerson.create(node=node, **values))
    return node, objs


def python_filter(objs, attr, op, operand):
    """The reference: same value class and the Python comparison (see dmodel/query.py)."""
    def cls(v):
        if v is None:
            return 0
        if isinstance(v, bool):
            return 1
        return 2 if isinstance(v, (int, float)) else 3

    out = []
    for o in objs:
        v = getattr(o, attr).get()
        same = cls(v) == cls(operand)
        if op == "!=":
            ok = not (same and v == operand)
        else:
            ok = same and {"==": operator.eq, "<": operator.lt, "<=": operator.le,
                           ">": operator.gt, ">=": operator.ge}[op](v, operand)
        if ok:
            out.append(o.db_id)
    return sorted(out)


def test_find_gives_model_instances_for_indexed_and_scanned_fields(people) -> None:
    node, objs = people
    bobs = QPerson.find(name="p3", node=node)
    assert [p.db_id for p in bobs] == sorted(o.db_id for o in objs if o.name.get() == "p3")
    assert all(isinstance(p, QPerson) and p.caller_id == p.db_id for p in bobs)
    assert node.store.has_index("QPerson", "name")           # built by the first query
    oslo = QPerson.find(city="Oslo", node=node)               # not indexed: a scan
    assert [p.db_id for p in oslo] == python_filter(objs, "city", "==", "Oslo")
    assert not node.store.has_index("QPerson", "city")
    both = QPerson.find(name="p3", city="Oslo", node=node)
    assert {p.db_id for p in both} == {p.db_id for p in bobs} & {p.db_id for p in oslo}
    assert QPerson.find(name="nobody", node=node) == []
    chief = QChief.create(node=node)
    as_chief = QPerson.find(name="p3", node=node, caller_id=chief)
    assert {p.caller_id for p in as_chief} == {chief.db_id}
    with pytest.raises(QueryError):
        QPerson.find(node=node)
    with pytest.raises(QueryError):
        QPerson.find(nonexistent=1, node=node)
    with pytest.raises(QueryError):
        QPerson.find(tags="x", node=node)                    # a DDict is not a plain field
    with pytest.raises(QueryError):
        QPerson.find(name=["a list"], node=node)


@pytest.mark.parametrize("op", ["==", "!=", "<", "<=", ">", ">="])
@pytest.mark.parametrize("attr,operand", [("age", 10), ("age", 10.5), ("city", "Oslo"),
                                          ("name", "p3"), ("rank", 0), ("level", 0),
                                          ("age", True)])
def test_each_comparison_matches_the_python_filter(people, op, attr, operand) -> None:
    node, objs = people
    field = getattr(QPerson, attr)
    condition = {"==": field == operand, "!=": field != operand, "<": field < operand,
                 "<=": field <= operand, ">": field > operand, ">=": field >= operand}[op]
    q = QPerson.query(node=node).where(condition)
    expected = python_filter(objs, attr, op, operand)
    assert q.ids() == expected
    assert q.count() == len(expected)
    assert [p.db_id for p in q] == expected


def test_none_equality_and_its_order_refused(people) -> None:
    node, objs = people
    q = QPerson.query(node=node)
    assert q.where(QPerson.age == None).ids() == python_filter(objs, "age", "==", None)  # noqa: E711
    assert q.where(QPerson.city != None).ids() == python_filter(objs, "city", "!=", None)  # noqa: E711
    with pytest.raises(QueryError):
        q.where(QPerson.age < None)


def test_order_limit_offset_count_first(people) -> None:
    node, objs = people
    def age_of(p):
        return p.age.get()
    adults = [o for o in objs if isinstance(age_of(o), (int, float)) and age_of(o) >= 12]
    by_age = sorted(adults, key=lambda o: (age_of(o), o.db_id))
    q = QPerson.query(node=node).where(QPerson.age >= 12)
    assert [p.db_id for p in q.order_by(QPerson.age)] == [o.db_id for o in by_age]
    assert [p.db_id for p in q.order_by(QPerson.age).limit(10)] == \
        [o.db_id for o in by_age[:10]]
    assert [p.db_id for p in q.order_by(-QPerson.age).limit(5)] == \
        [o.db_id for o in by_age[::-1][:5]]
    assert q.order_by(QPerson.age, desc=True).ids() == [o.db_id for o in by_age[::-1]]
    assert q.order_by(QPerson.age).offset(3).limit(4).ids() == \
        [o.db_id for o in by_age[3:7]]
    assert q.count() == len(adults)
    assert q.limit(4).count() == 4
    assert q.order_by(-QPerson.age).first().db_id == by_age[-1].db_id
    assert q.where(QPerson.age > 10_000).first() is None
    # ordering by another field than the condition's, and by an unindexed one
    by_city = sorted(adults, key=lambda o: ({None: 0}.get(o.city.get(), 1),
                                            o.city.get() or "", o.db_id))
    assert q.order_by(QPerson.city).ids() == [o.db_id for o in by_city]
    # several where: AND
    both = q.where(QPerson.age < 20).where(QPerson.city == "Rome")
    assert both.ids() == sorted(
        o.db_id for o in adults if age_of(o) < 20 and o.city.get() == "Rome")
    assert QPerson.query(node=node).order_by(QPerson.name).limit(3).ids() == [
        o.db_id for o in sorted(objs, key=lambda o: (o.name.get(), o.db_id))[:3]]
    with pytest.raises(TypeError):
        bool(QPerson.age >= 3)          # an ordering condition has no truth value


def test_fields_still_compare_as_fields(people) -> None:
    assert QPerson._meta.fields["name"] == QPerson.name
    assert QPerson.name != QPerson.age
    assert QPerson.name in list(QPerson._meta.fields.values())
    assert QPerson.name.encrypted is False and QPerson.name.index is True
    assert not (QPerson.name == "p3")      # the truth value of before: a field is no value
    assert {QPerson.name: 1}[QPerson.name] == 1


def _activate(node: dmodel.Node) -> None:
    assert QPerson.find(name="-", node=node) == []   # builds the name index


def test_the_index_follows_last_writer_wins(make_node) -> None:
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    chief = QChief.create(node=b).db_id
    ship(b, a)
    worker = QPerson.create(node=a, authorized=[chief], name="Bob").db_id
    ship(a, b)
    _activate(a)
    _activate(b)
    cb.ms += 1000
    QPerson(worker, chief, node=b).name = "Older"            # older, remote
    older = last(b)
    ca.ms += 5000
    QPerson(worker, node=a).name = "Newer"                   # newer, local
    assert [p.db_id for p in QPerson.find(name="Newer", node=a)] == [worker]
    a.ingest(older)                                          # arrives after the newer one
    assert a.read(worker, "name") == "Newer"
    assert [p.db_id for p in QPerson.find(name="Newer", node=a)] == [worker]
    assert QPerson.find(name="Older", node=a) == []
    assert QPerson.find(name="Bob", node=a) == []
    ship(a, b)                                               # b: newer remote replaces
    assert [p.db_id for p in QPerson.find(name="Newer", node=b)] == [worker]
    assert QPerson.find(name="Older", node=b) == []
    QPerson(worker, node=a).delete("name")                   # no value: the default
    assert QPerson.find(name="Newer", node=a) == []
    assert [p.db_id for p in QPerson.find(name=None, node=a)] == [worker]
    for node in (a, b):
        assert node.verify_store() == [], node


def test_a_removed_object_leaves_the_index_and_all(make_node) -> None:
    node = make_node("r")
    keep = QPerson.create(node=node, name="Ann", age=30)
    gone = QPerson.create(node=node, name="Ann", age=40)
    _activate(node)
    q = QPerson.query(node=node).where(QPerson.age >= 30)
    assert q.count() == 2
    gone.remove()
    assert [p.db_id for p in QPerson.find(name="Ann", node=node)] == [keep.db_id]
    assert q.ids() == [keep.db_id] and q.count() == 1
    assert [p.db_id for p in QPerson.all(node=node)] == [keep.db_id]
    assert node.store.index_entries(gone.db_id) == {}
    with pytest.raises(QPerson.DoesNotExist):
        QPerson.get(gone.db_id, node=node)
    assert node.verify_store() == []


def test_a_redecision_after_a_revoke_rewrites_the_index(make_node) -> None:
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    chief = QChief.create(node=b).db_id
    ship(b, a)
    worker = QPerson.create(node=a, authorized=[chief], name="Bob", age=50).db_id
    ship(a, b)
    ca.ms += 1000
    QPerson(worker, node=a).revoke_update_authorized(chief)
    revoke = last(a)
    cb.ms += 2000                                  # b has not seen the revoke
    w = QPerson(worker, chief, node=b)
    with w.transaction():
        w.name = "Evil"
        w.age = 1
    evil = last(b)
    # c gets everything but the revoke first: the chief's write is accepted
    c = make_node("c", now=Clock(T0_MS + 60_000))
    for raw in [r for r in a.updates_since(0) if r != revoke] + [evil]:
        c.ingest(raw)
    _activate(c)
    assert QPerson.query(node=c).where(QPerson.age < 10).ids() == [worker]
    assert [p.db_id for p in QPerson.find(name="Evil", node=c)] == [worker]
    recomputed = c.stats.recomputed
    c.ingest(revoke)                               # the revoke re-decides: refused
    assert c.stats.recomputed > recomputed
    assert c.read(worker, "name") == "Bob"
    assert QPerson.find(name="Evil", node=c) == []
    assert [p.db_id for p in QPerson.find(name="Bob", node=c)] == [worker]
    assert QPerson.query(node=c).where(QPerson.age < 10).ids() == []
    assert QPerson.query(node=c).where(QPerson.age == 50).ids() == [worker]
    assert c.verify_store() == []


def test_the_index_is_built_from_existing_objects_and_kept_across_a_restart(make_node,
                                                                            tmp_path) -> None:
    node = dmodel.Node(tmp_path / "restart")
    try:
        objs = [QPerson.create(node=node, name=f"n{i % 3}", age=i) for i in range(12)]
        assert not node.store.has_index("QPerson", "age")
        assert QPerson.query(node=node).where(QPerson.age < 4).count() == 4   # built now
        objs[0].age = 100
    finally:
        node.shutdown()
    node = dmodel.Node(tmp_path / "restart")
    try:
        assert node.store.has_index("QPerson", "age")
        objs[1] = QPerson(objs[1].db_id, node=node)
        objs[1].age = 200                                    # kept up after the restart
        assert QPerson.query(node=node).where(QPerson.age >= 100).order_by(QPerson.age) \
            .ids() == [objs[0].db_id, objs[1].db_id]
        assert node.verify_store() == []
    finally:
        node.shutdown()


def test_pruning_leaves_the_index_as_it_is(make_node) -> None:
    node = make_node("p", retention=1)
    p = QPerson.create(node=node, name="v0", age=0)
    _activate(node)
    for i in range(1, 6):
        p.name = f"v{i}"
    node.settle()                                  # retention prunes in batches
    assert node.stats.pruned > 0                   # superseded versions went
    assert [o.db_id for o in QPerson.find(name="v5", node=node)] == [p.db_id]
    assert QPerson.find(name="v4", node=node) == []
    assert node.verify_store() == []


def test_verify_reports_every_tampered_index_entry(make_node) -> None:
    node = make_node("v")
    ann = QPerson.create(node=node, name="Ann")
    bob = QPerson.create(node=node, name="Bob")
    _activate(node)
    assert node.verify_store() == []
    store, client = node.store, node.store.client
    key = store.k_index("QPerson", "name")
    members = client.zrange(key, 0, -1)
    ann_entry = next(m for m in members if m.endswith(ann.oid.encode()))
    bob_entry = next(m for m in members if m.endswith(bob.oid.encode()))
    forged = ann_entry.replace(b"Ann", b"Zed")
    client.zrem(key, ann_entry)
    client.zadd(key, {forged: 0})                  # Ann now looks like Zed
    client.zrem(key, bob_entry)                    # Bob is missing
    client.hset(store.k_entries(bob.db_id), "name", forged)
    problems = node.verify_store()
    assert any("stale entry" in p and ann.db_id in p for p in problems), problems
    assert any("missing" in p and ann.db_id in p for p in problems), problems
    assert any("missing" in p and bob.db_id in p for p in problems), problems
    assert any("recorded" in p and bob.db_id in p for p in problems), problems
    assert len(problems) == 4, problems


def test_encrypted_fields_are_refused(people) -> None:
    node, _ = people
    with pytest.raises(ModelDefinitionError, match="encrypted"):
        dmodel.DField(encrypted=True, index=True)
    with pytest.raises(QueryError, match="encrypted"):
        QPerson.find(salary=5000, node=node)
    with pytest.raises(QueryError, match="encrypted"):
        QPerson.query(node=node).where(QPerson.salary >= 1)
    with pytest.raises(QueryError, match="encrypted"):
        QPerson.query(node=node).order_by(QPerson.salary)
    assert issubclass(QueryError, dmodel.FieldError)


def test_get_all_and_to_dict(make_node) -> None:
    node = make_node("g")
    p = QPerson.create(node=node, name="Ann", age=3, salary=900)
    p.tags["k"] = "v"
    p.items.append(1)
    p.items.append("two")
    assert QPerson.get(p.db_id, node=node) == p
    assert QPerson.get(p.oid, node=node).db_id == p.db_id
    with pytest.raises(QPerson.DoesNotExist):
        QPerson.get("QPerson:" + "a" * 32, node=node)     # well formed, unknown here
    with pytest.raises(QPerson.DoesNotExist):
        QPerson.get("not an id", node=node)
    assert p.to_dict() == {"name": "Ann", "age": 3, "city": None, "rank": 0, "level": 0,
                           "salary": 900, "tags": {"k": "v"}, "items": [1, "two"]}
    anonymous = QPerson(p.db_id, "", node=node).to_dict()
    assert anonymous["salary"] == EncryptedValue(p.db_id, "salary")
    assert anonymous["name"] == "Ann"
    assert [o.db_id for o in QPerson.all(node=node)] == [p.db_id]


def test_the_readme_queries_section_runs(tmp_path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Queries", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("node.shutdown()", "")
    scope: dict = {"home": tmp_path / "readme"}
    exec(compile(code, "README Queries", "exec"), scope)
    node, member = scope["node"], scope["Member"]
    try:
        assert [m.name.get() for m in member.find(name="Bob", node=node)] == ["Bob"]
        assert scope["q"].count() == 1
        assert [m.name.get() for m in scope["older"]] == ["Bob", "Ann"]
        assert scope["bob"].to_dict() == {"name": "Bob", "age": 42, "city": "Oslo",
                                          "salary": None}
        assert len(member.all(node=node)) == 3
    finally:
        node.shutdown()
