"""Handles before data: opening an id whose create has not arrived, and waiting for it."""

from __future__ import annotations

import threading

import pytest
from helpers import ship

import dmodel
from dmodel.crypto import Identity
from dmodel.errors import WaitTimeout


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)
    tags = dmodel.DDict()
    items = dmodel.DList()


def _later(seconds: float, action) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def test_a_handle_on_an_id_not_arrived_yet_reads_defaults(two_nodes) -> None:
    a, b = two_nodes
    p = Person.create(name="Bob", node=a)
    q = Person(p.db_id, "", node=b)  # no DoesNotExist: the create is on its way
    assert not q.exists() and not q.is_removed()
    assert q.name.get() is None and q.name.get("nobody") == "nobody"
    assert q.tags.get("k") is None and q.tags.keys() == [] and q.keys() == []
    assert len(q.items) == 0 and q.items.to_list() == []
    ship(a, b)
    assert q.exists() and q.name.get() == "Bob"


def test_wait_blocks_until_the_create_arrives(two_nodes) -> None:
    a, b = two_nodes
    p = Person.create(name="Bob", node=a)
    q = Person(p.db_id, "", node=b)
    timer = _later(0.2, lambda: ship(a, b))
    try:
        assert q.wait(timeout=10) is q
        assert q.name.get() == "Bob"
    finally:
        timer.join()


def test_field_wait_for_a_value(two_nodes) -> None:
    a, b = two_nodes
    p = Person.create(name="Bob", node=a)
    ship(a, b)
    q = Person(p.db_id, "", node=b)
    assert q.name.wait(timeout=1) == "Bob"  # already there
    since = a.log_length()
    p.name.set("Robert")
    timer = _later(0.2, lambda: ship(a, b, since))
    try:
        assert q.name.wait(value="Robert", timeout=10) == "Robert"
    finally:
        timer.join()


def test_waits_time_out_with_a_timeout_error(two_nodes) -> None:
    a, b = two_nodes
    p = Person.create(name="Bob", salary="1", node=a)
    q = Person(p.db_id, "", node=b)
    with pytest.raises(WaitTimeout, match="not there after 0.1 s") as info:
        q.wait(timeout=0.1)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, dmodel.DModelError)
    with pytest.raises(TimeoutError, match="has not arrived"):
        q.name.wait(timeout=0.1)
    ship(a, b)
    with pytest.raises(TimeoutError, match="it is 'Bob'"):
        q.name.wait(value="Robert", timeout=0.1)
    with pytest.raises(dmodel.DecryptionError):  # it is there, and q cannot open it
        q.salary.wait(timeout=5)
    with pytest.raises(TimeoutError, match="no decryption key"):
        q.salary.wait(value="1", timeout=0.1)


def test_wait_for_from_outside(two_nodes) -> None:
    a, b = two_nodes
    p = Person.create(name="Bob", node=a)
    with pytest.raises(WaitTimeout):
        dmodel.wait_for(p.db_id, 0.1, node=b)
    timer = _later(0.2, lambda: ship(a, b))
    try:
        dmodel.wait_for(p.db_id, 10, node=b)
    finally:
        timer.join()
    assert Person(p.db_id, node=b).name.get() == "Bob"
    dmodel.wait_for(p, 0.1, node=a)  # an object does for its id


def test_wait_for_on_the_default_node(tmp_path) -> None:
    node = dmodel.launch(tmp_path / "home", network=False)
    p = Person.create(name="x")
    dmodel.wait_for(p.db_id, 1)
    with pytest.raises(WaitTimeout):
        dmodel.wait_for(f"Person:{Identity.generate().oid}", 0.05)
    assert node.network is None


def test_a_shutdown_wakes_a_waiter(make_node) -> None:
    node = make_node("n")
    q = Person(f"Person:{Identity.generate().oid}", "", node=node)
    timer = _later(0.2, node.shutdown)
    try:
        with pytest.raises(dmodel.NodeNotRunningError, match="reopen"):
            q.wait(timeout=10)
    finally:
        timer.join()


@pytest.mark.parametrize("bad", ["Person:", "Person:NOT-BASE32!!", "Person",
                                 "Person:" + "a" * 31, ":" + "a" * 32])
def test_a_malformed_id_raises_at_once_saying_what_an_id_looks_like(make_node, bad) -> None:
    node = make_node("n")
    with pytest.raises(Person.DoesNotExist, match="a db_id looks like 'Person:' followed by 32"):
        Person(bad, "", node=node)
    with pytest.raises(dmodel.ObjectNotFoundError, match="a db_id looks like"):
        dmodel.wait_for(bad, 1, node=node)


def test_a_bare_oid_gets_a_hint(make_node) -> None:
    node = make_node("n")
    oid = Identity.generate().oid
    with pytest.raises(Person.DoesNotExist, match=f"did you mean 'Person:{oid}'"):
        Person(oid, "", node=node)


def test_removed_here_is_told_apart_from_not_arrived(two_nodes) -> None:
    a, b = two_nodes
    p = Person.create(name="doomed", node=a)
    handle = Person(p.db_id, node=a)
    p.remove()
    assert handle.is_removed() and not handle.exists()
    with pytest.raises(Person.DoesNotExist, match="removed on this node"):
        Person(p.db_id, node=a)
    with pytest.raises(Person.DoesNotExist, match="removed"):
        handle.name.get()
    with pytest.raises(Person.DoesNotExist, match="removed"):
        handle.wait(timeout=5)
    with pytest.raises(dmodel.ObjectNotFoundError, match="removed"):
        dmodel.wait_for(p.db_id, 5, node=a)
    with pytest.raises(dmodel.ObjectNotFoundError, match="removed"):
        handle.name.set("again")  # set() after remove() raises
    unknown = Person(p.db_id, node=b)  # b has not heard of it at all
    assert not unknown.is_removed() and unknown.name.get() is None


def test_objects_where_ids_are_expected(make_node) -> None:
    node = make_node("n")
    chief = Person([], node=node)
    worker = Person([chief], node=node)
    worker.salary.set("100")
    assert worker.is_read_authorized(chief) and worker.is_update_authorized(chief)
    assert Person(worker.db_id, chief, node=node).salary.get() == "100"
    other = Person([], node=node)
    worker.append_read_authorized(other)
    assert Person(worker.db_id, other, node=node).salary.get() == "100"
    worker.revoke_read_authorized(other)
    worker.append_update_authorized(other)
    assert worker.is_update_authorized(other)
    bob = Person.create(name="Bob", authorized=[chief], node=node)
    assert bob.is_read_authorized(chief.db_id)
    with dmodel.transaction(chief, node=node):
        chief.name.set("Chief")
    assert chief.name.get() == "Chief"
    with pytest.raises(dmodel.FieldTypeError, match="pass its db_id"):
        Person(chief, node=node)


def test_an_object_of_a_shut_down_node_says_how_to_reopen_it(tmp_path) -> None:
    node = dmodel.Node(tmp_path / "home")
    p = Person.create(name="Bob", node=node)
    node.shutdown()
    with pytest.raises(dmodel.NodeNotRunningError, match=r"reopen it: node = dmodel.Node\(") \
            as info:
        p.name.get()
    assert str(tmp_path / "home") in str(info.value) and p.db_id in str(info.value)
    with dmodel.Node(tmp_path / "home") as again:
        assert Person(p.db_id, node=again).name.get() == "Bob"


def test_delete_of_an_undeclared_field_raises(make_node) -> None:
    p = Person.create(name="Bob", node=make_node("n"))
    with pytest.raises(dmodel.FieldError, match="no field 'nosuch'"):
        p.delete("nosuch")
    p.delete("name")
    assert p.name.get() is None
