"""The PyDinemic walkthrough (reference/pydinemic-walkthrough.txt), in process, two nodes.

Node ``a`` and node ``b`` each have their own embedded Redis; raw signed updates travel
between them with ``ship`` (what the network does, minus the network).
"""

from __future__ import annotations

import pytest
from helpers import ship

import dmodel
from dmodel.errors import (
    DecryptionError,
    IntegrityError,
    NodeNotRunningError,
    UnauthorizedError,
)
from dmodel.merge import Register


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)
    notes = dmodel.DDict()


# ------------------------------------------------------------------ first script


def test_plain_field_travels_encrypted_field_does_not(two_nodes) -> None:
    a, b = two_nodes
    p = Person([], node=a)
    p.name.set("Bob")
    p.salary.set("1234")
    assert p.name.get() == "Bob"
    assert p.salary.get() == "1234"
    assert p.get_db_id().startswith("Person:") and p.get_id() == p.oid
    ship(a, b)

    q = Person(p.get_db_id(), "", node=b)  # anonymous reader
    assert q.name.get() == "Bob"
    with pytest.raises(DecryptionError, match="no decryption key found"):
        q.salary.get()
    stranger = Person([], node=b)
    with pytest.raises(DecryptionError, match="no decryption key found"):
        Person(p.db_id, stranger.db_id, node=b).salary.get()
    assert not q.is_owned() and p.is_owned()


# ------------------------------------------------------------------ chief and worker


@pytest.fixture
def office(two_nodes):
    """The walkthrough's second part: chief on b, worker on a authorizing the chief."""
    a, b = two_nodes
    chief = Person([], node=b)
    ship(b, a)
    worker = Person([chief.db_id], node=a)
    worker.name.set("Bob")
    worker.salary.set("44321")
    ship(a, b)
    return a, b, chief, worker


def test_chief_reads_the_workers_salary(office) -> None:
    a, b, chief, worker = office
    my_worker = Person(worker.db_id, chief.db_id, node=b)
    assert my_worker.salary.get() == "44321"
    assert my_worker.name.get() == "Bob"
    assert worker.read_authorized() == [chief.db_id]
    assert worker.update_authorized() == [chief.db_id]
    assert Person(worker.db_id, "", node=b).is_read_authorized(chief.db_id)
    with pytest.raises(DecryptionError):
        Person(worker.db_id, "", node=b).salary.get()


def test_read_grant_and_revoke(office) -> None:
    a, b, chief, worker = office
    newcomer = Person([], node=b)
    ship(b, a)
    since = a.log_length()
    with pytest.raises(DecryptionError):
        Person(worker.db_id, newcomer.db_id, node=b).salary.get()

    worker.append_read_authorized(newcomer.db_id)
    ship(a, b, since)
    as_newcomer = Person(worker.db_id, newcomer.db_id, node=b)
    assert as_newcomer.salary.get() == "44321"  # a value sealed before the grant
    worker.salary.set("50000")
    since = ship(a, b, since)
    assert as_newcomer.salary.get() == "50000"  # and a new one

    worker.revoke_read_authorized(newcomer.db_id)
    worker.salary.set("60000")
    ship(a, b, since)
    assert not worker.is_read_authorized(newcomer.db_id)
    with pytest.raises(DecryptionError):
        as_newcomer.salary.get()  # values written after the revoke are not sealed for it
    assert Person(worker.db_id, chief.db_id, node=b).salary.get() == "60000"
    # Old values are not re-encrypted by a revoke: the newcomer held their keys once, could
    # have kept copies, and the signed updates carrying them stay in every log. A revoke
    # protects what is written after it, not what the revoked reader was already given.


def test_unauthorized_update_is_rejected_by_default(office, make_node) -> None:
    a, b, chief, worker = office
    intruder = Person([], node=b)
    log_before = b.log_length()
    with pytest.raises(UnauthorizedError):
        Person(worker.db_id, intruder.db_id, node=b).name.set("hacked")
    assert b.log_length() == log_before  # a refused local write leaves no trace
    assert Person(worker.db_id, "", node=b).name.get() == "Bob"

    # A peer whose policy defers to listeners accepts such a write from its own caller ...
    lax = make_node("lax", unauthorized_policy="listeners")
    ship(a, lax)
    attacker = Person([], node=lax)
    Person(worker.db_id, attacker.db_id, node=lax).name.set("hacked")
    assert Person(worker.db_id, "", node=lax).name.get() == "hacked"

    # ... node a, with the default policy, holds it back ...
    since_a = a.log_length()
    ship(lax, a)
    assert a.stats.rejected["UnauthorizedError"] == 1
    assert worker.name.get() == "Bob"
    assert a.log_length() == since_a + 2  # the attacker's create, and the held update
    held = a.history(worker.db_id, include_rejected=True)
    assert [h.verdict for h in held].count("unauthorized") == 1
    assert "unauthorized" not in [h.verdict for h in a.history(worker.db_id)]

    # ... and another node that defers to listeners (none veto here) applies it.
    c = make_node("c", unauthorized_policy="listeners")
    ship(lax, c)
    assert Person(worker.db_id, "", node=c).name.get() == "hacked"


def test_chief_updates_the_worker_from_node_b(office) -> None:
    a, b, chief, worker = office
    as_chief = Person(worker.db_id, chief.db_id, node=b)
    as_chief.name.set("Robert")
    as_chief.salary.set("99999")
    ship(b, a)
    assert a.stats.rejected["UnauthorizedError"] == 0
    assert worker.name.get() == "Robert"
    assert worker.salary.get() == "99999"  # sealed by the chief for the worker too
    assert [h.caller_id for h in worker.history("name")][-1] == chief.db_id


# ------------------------------------------------------------------ global API


def test_launch_and_shutdown(tmp_path) -> None:
    node = dmodel.launch(home=tmp_path / "g", network=False)
    assert dmodel.default_node() is node
    p = Person([])
    p.name.set("global")
    db_id = p.db_id
    with pytest.raises(dmodel.ConfigurationError):
        dmodel.launch(home=tmp_path / "other", network=False)
    dmodel.shutdown()
    with pytest.raises(NodeNotRunningError):
        Person([])
    with pytest.raises(NodeNotRunningError):
        p.name.get()
    dmodel.launch(home=tmp_path / "g", network=False)
    assert Person(db_id).name.get() == "global"
    assert Person(db_id).is_owned()
    dmodel.shutdown()


# ------------------------------------------------------------------ the rest of the API


def test_create_fields_and_dicts(two_nodes) -> None:
    a, b = two_nodes
    chief = Person([], node=b)
    ship(b, a)
    p = Person.create(name="Bob", salary="1", authorized=[chief.db_id], node=a)
    assert p.name.get() == "Bob" and p.salary.get() == "1"
    assert a.log_length() == 2  # chief's create, and one update for the create with values
    p.name = "x"
    assert p.name.get() == "x"

    p.notes.set("colour", "red")
    p.notes["size"] = 42
    assert p.notes.get("colour") == "red" and p.notes["size"] == 42
    assert p.notes.get("missing", "default") == "default"
    with pytest.raises(KeyError):
        p.notes["missing"]
    assert "colour" in p.notes and "missing" not in p.notes and 3 not in p.notes
    assert len(p.notes) == 2
    assert p.notes.keys() == ["colour", "size"]
    assert p.notes.items() == [("colour", "red"), ("size", 42)]
    p.notes.delete("colour")
    del p.notes["size"]
    with pytest.raises(KeyError):
        del p.notes["size"]
    assert len(p.notes) == 0 and p.notes.keys() == []

    p.notes["kept"] = [1, 2]
    p.delete("name")
    assert p.name.get() is None
    assert p.keys() == ["notes:kept", "salary"]

    ship(a, b)
    on_b = Person(p.db_id, chief.db_id, node=b)
    assert on_b.name.get() is None and on_b.salary.get() == "1"
    assert on_b.notes.to_dict() == {"kept": [1, 2]}
    assert on_b.keys() == p.keys()


def test_lists_ownership_and_history(two_nodes) -> None:
    a, b = two_nodes
    mine = Person.create(name="mine", node=a)
    theirs = Person.create(name="theirs", node=b)
    ship(b, a)
    assert dmodel.object_list("Person:*", node=a) == sorted([mine.db_id, theirs.db_id])
    assert dmodel.object_list("Person:[id]", node=a) == sorted([mine.db_id, theirs.db_id])
    assert dmodel.object_list(mine.db_id, node=a) == [mine.db_id]
    assert dmodel.object_list("Company:*", node=a) == []
    assert dmodel.object_list_owned("Person:*", node=a) == [mine.db_id]
    assert mine.is_owned() and not Person(theirs.db_id, node=a).is_owned()

    mine.name = "second"
    mine.name = "third"
    history = mine.history()
    assert len(history) == 3
    assert [h.timestamp for h in history] == sorted(h.timestamp for h in history)
    assert [h.ops[-1].value for h in mine.history("name")] == ["mine", "second", "third"]
    assert all(h.verdict == "accepted" and h.caller_id == mine.db_id for h in history)


def test_remove_everywhere(two_nodes) -> None:
    a, b = two_nodes
    p = Person.create(name="doomed", node=a)
    ship(a, b)
    since = a.log_length()
    p.remove()
    with pytest.raises(Person.DoesNotExist):
        Person(p.db_id, node=a)
    assert p.db_id not in dmodel.object_list("Person:*", node=a)
    ship(a, b, since)
    with pytest.raises(Person.DoesNotExist):
        Person(p.db_id, node=b)
    assert dmodel.object_list("Person:*", node=b) == []
    with pytest.raises(dmodel.ObjectNotFoundError):
        p.name.get()


def test_transaction_is_one_update(two_nodes) -> None:
    a, b = two_nodes
    p = Person.create(name="before", node=a)
    length = a.log_length()
    with p.transaction():
        p.name = "after"
        p.salary = "2"
        p.notes["k"] = "v"
        assert p.name.get() == "before"  # applied on exit, all at once
    assert a.log_length() == length + 1
    assert (p.name.get(), p.salary.get(), p.notes["k"]) == ("after", "2", "v")

    with pytest.raises(RuntimeError), p.transaction():
        p.name = "never"
        p.notes["k"] = "never"
        raise RuntimeError("abort")
    assert a.log_length() == length + 1
    assert p.name.get() == "after" and p.notes["k"] == "v"

    ship(a, b)
    assert Person(p.db_id, "", node=b).notes["k"] == "v"


def test_verified_reads_detect_tampering(two_nodes) -> None:
    a, _ = two_nodes
    p = Person.create(name="honest", node=a)
    p.notes["k"] = "v"
    assert p.name.get(verified=True) == "honest"
    assert a.verify_store() == []

    key = a.store.k_reg(p.db_id)
    genuine = Register.unpack(a.store.client.hget(key, "name"))
    assert genuine.value == "honest"
    a.store.client.hset(key, "name", Register(genuine.version, "forged").pack())
    assert p.name.get() == "forged"  # an unverified read trusts Redis
    with pytest.raises(IntegrityError):
        p.name.get(verified=True)
    problems = a.verify_store()
    assert len(problems) == 1 and "name" in problems[0]

    a.store.client.hset(key, "name", genuine.pack())
    assert a.verify_store() == []
    dict_reg = Register.unpack(a.store.client.hget(key, "notes:k"))
    uid = merge_ref_uid(dict_reg)
    a.store.client.hdel(a.store.k_updates, uid)
    problems = a.verify_store()
    assert any("not stored" in p for p in problems)
    assert any("missing update" in p for p in problems)


def merge_ref_uid(reg: Register) -> bytes:
    from dmodel.merge import version_ref

    return version_ref(reg.version)[:32]
