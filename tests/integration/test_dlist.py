"""DList on real nodes (embedded Redis each): Python list semantics, method by method,
after concurrent appends from two nodes, and inside transactions."""

from __future__ import annotations

import pytest
from helpers import wait_until

import dmodel

pytestmark = pytest.mark.timeout(60)


class Shelf(dmodel.DModel):
    items = dmodel.DList()
    sealed = dmodel.DList(encrypted=True)


def exchange(a: dmodel.Node, b: dmodel.Node) -> None:
    b.ingest_many(a.updates_since(0))
    a.ingest_many(b.updates_since(0))


def shared_shelf(a: dmodel.Node, b: dmodel.Node) -> tuple[Shelf, Shelf]:
    """A shelf owned on ``a`` and the same shelf on ``b``, written there by a member."""
    member = Shelf([], node=b)
    exchange(a, b)
    shelf = Shelf([], node=a)
    shelf.append_update_authorized(member.db_id)
    exchange(a, b)
    return shelf, Shelf(shelf.db_id, member.db_id, node=b)


@pytest.fixture
def shelf(make_node) -> Shelf:
    return Shelf([], node=make_node("a"))


def updates(obj: dmodel.DModel) -> int:
    return obj._node.log_length()


# ---------------------------------------------------------------- concurrent appends


def test_insert_after_concurrent_appends_lands_at_its_index(make_node) -> None:
    a, b = make_node("a"), make_node("b")
    on_a, on_b = shared_shelf(a, b)
    on_a.items.append("x0")
    exchange(a, b)
    on_a.items.append("from-a")    # neither node has seen the other's append
    on_b.items.append("from-b")
    exchange(a, b)
    merged = list(on_a.items)
    assert merged == list(on_b.items) and sorted(merged) == ["from-a", "from-b", "x0"]
    assert merged[0] == "x0"
    on_a.items.insert(2, "between")
    assert list(on_a.items) == [merged[0], merged[1], "between", merged[2]]
    on_b.items.insert(1, "first-gap")   # concurrently, on the other node
    exchange(a, b)
    expected = [merged[0], "first-gap", merged[1], "between", merged[2]]
    assert list(on_a.items) == list(on_b.items) == expected


def test_insert_after_concurrent_appends_over_loopback(make_node) -> None:
    a = make_node("a", listen="tcp://127.0.0.1:*", discovery=False,
                  network_options={"sync_interval": 0.2})
    b = make_node("b", listen="tcp://127.0.0.1:*", discovery=False,
                  peers=[a.network.endpoint], network_options={"sync_interval": 0.2})
    assert a.network.wait_for_peers(1, timeout=10) and b.network.wait_for_peers(1, timeout=10)
    member = Shelf([], node=b)
    wait_until(lambda: a.exists(member.db_id))
    on_a = Shelf([], node=a)
    on_a.append_update_authorized(member.db_id)
    on_a.items.append("x0")
    wait_until(lambda: b.exists(on_a.db_id) and b.list_length(on_a.db_id, "items") == 1)
    on_b = Shelf(on_a.db_id, member.db_id, node=b)
    on_a.items.append("from-a")
    on_b.items.append("from-b")
    wait_until(lambda: len(on_a.items) == len(on_b.items) == 3)
    merged = list(on_a.items)
    assert merged == list(on_b.items)
    on_a.items.insert(2, "between")
    assert list(on_a.items) == [merged[0], merged[1], "between", merged[2]]
    wait_until(lambda: list(on_b.items) == list(on_a.items))


def test_three_way_concurrent_appends_then_inserts_at_every_index(make_node) -> None:
    a, b = make_node("a"), make_node("b")
    on_a, on_b = shared_shelf(a, b)
    on_a.items.extend(["p", "q"])
    on_b.items.extend(["r", "s"])
    on_a.items.append("t")
    exchange(a, b)
    model = list(on_a.items)
    assert model == list(on_b.items) and sorted(model) == ["p", "q", "r", "s", "t"]
    for i in range(-len(model) - 2, len(model) + 2):
        model.insert(i, f"at{i}")
        on_a.items.insert(i, f"at{i}")
        assert list(on_a.items) == model, i
    exchange(a, b)
    assert list(on_b.items) == model


# ---------------------------------------------------------------- insert


def test_insert_follows_list_insert_at_both_ends_and_negative_indexes(shelf) -> None:
    model: list[str] = []
    for index, value in [(0, "a"), (0, "b"), (5, "c"), (-1, "d"), (-2, "e"), (-99, "f"),
                         (1, "g"), (6, "h"), (-6, "i")]:
        model.insert(index, value)
        shelf.items.insert(index, value)
        assert list(shelf.items) == model, (index, value)
    shelf.items.insert(len(shelf.items), "end")
    shelf.items.append("after end")
    assert list(shelf.items) == [*model, "end", "after end"]
    with pytest.raises(dmodel.FieldTypeError):
        shelf.items.insert("0", "x")
    with pytest.raises(dmodel.FieldTypeError):
        shelf.items.insert(True, "x")


# ---------------------------------------------------------------- the new methods


def test_extend_appends_in_one_update(shelf) -> None:
    shelf.items.append("a")
    before = updates(shelf)
    shelf.items.extend(iter(["b", "c", "d"]))
    assert list(shelf.items) == ["a", "b", "c", "d"]
    assert updates(shelf) == before + 1
    shelf.items.extend([])
    assert updates(shelf) == before + 1
    with pytest.raises(dmodel.FieldTypeError):
        shelf.items.extend(["e", object()])
    assert list(shelf.items) == ["a", "b", "c", "d"]  # checked first: nothing written


def test_pop_returns_the_value_like_list_pop(shelf) -> None:
    with pytest.raises(IndexError, match="pop from empty list"):
        shelf.items.pop()
    shelf.items.extend(["a", "b", "c", "d", "e"])
    assert shelf.items.pop() == "e"
    assert shelf.items.pop(0) == "a"
    assert shelf.items.pop(-2) == "c"
    assert list(shelf.items) == ["b", "d"]
    with pytest.raises(IndexError, match="pop index out of range"):
        shelf.items.pop(2)
    with pytest.raises(IndexError):
        shelf.items.pop(-3)
    assert list(shelf.items) == ["b", "d"]


def test_remove_deletes_the_first_equal_element(shelf) -> None:
    shelf.items.extend([1, 2, 1, 3])
    shelf.items.remove(1)
    assert list(shelf.items) == [2, 1, 3]
    with pytest.raises(ValueError):
        shelf.items.remove(9)
    assert list(shelf.items) == [2, 1, 3]


def test_slices_read_like_list_slices(shelf) -> None:
    model = ["a", "b", "c", "d", "e"]
    shelf.items.extend(model)
    for cut in [slice(1, 3), slice(None, None, -1), slice(None, None, 2), slice(-2, None),
                slice(3, 1), slice(10, 20), slice(-10, 2), slice(4, 0, -2)]:
        assert shelf.items[cut] == model[cut], cut
    assert shelf.items[::-1] == ["e", "d", "c", "b", "a"]


def test_del_of_an_index_or_a_slice(shelf) -> None:
    model = list(range(8))
    shelf.items.extend(model)
    del model[-1]
    del shelf.items[-1]
    before = updates(shelf)
    del model[1:4]
    del shelf.items[1:4]
    assert list(shelf.items) == model
    assert updates(shelf) == before + 1  # one signed update for the slice
    del model[::2]
    del shelf.items[::2]
    assert list(shelf.items) == model
    with pytest.raises(IndexError):
        del shelf.items[len(model)]
    del shelf.items[5:9]  # nothing there: nothing to do, as on a list
    assert list(shelf.items) == model


def test_index_count_contains_and_clear(shelf) -> None:
    shelf.items.extend(["a", "b", "a", "c"])
    assert shelf.items.index("a") == 0
    assert shelf.items.index("a", 1) == 2
    with pytest.raises(ValueError):
        shelf.items.index("a", 1, 2)
    with pytest.raises(ValueError):
        shelf.items.index("z")
    assert shelf.items.count("a") == 2 and shelf.items.count("z") == 0
    assert "c" in shelf.items and "z" not in shelf.items
    shelf.items.clear()
    assert list(shelf.items) == [] and len(shelf.items) == 0


def test_out_of_range_indexes_raise_index_error(shelf) -> None:
    shelf.items.extend(["a", "b"])
    for index in (2, -3, 100):
        with pytest.raises(IndexError):
            shelf.items[index]
        with pytest.raises(IndexError):
            shelf.items[index] = "x"
        with pytest.raises(IndexError):
            del shelf.items[index]
    assert list(shelf.items) == ["a", "b"]


def test_encrypted_list_methods_read_the_plain_values(make_node) -> None:
    a, b = make_node("a"), make_node("b")
    shelf = Shelf([], node=a)
    shelf.sealed.extend(["s1", "s2", "s3"])
    assert shelf.sealed[::-1] == ["s3", "s2", "s1"]
    assert shelf.sealed.pop(1) == "s2"
    shelf.sealed.remove("s1")
    assert list(shelf.sealed) == ["s3"]
    b.ingest_many(a.updates_since(0))
    with pytest.raises(dmodel.DecryptionError):
        Shelf(shelf.db_id, "", node=b).sealed.pop()


def test_an_anonymous_handle_cannot_change_the_list(shelf) -> None:
    shelf.items.append("a")
    anonymous = Shelf(shelf.db_id, "", node=shelf._node)
    with pytest.raises(dmodel.UnauthorizedError):
        anonymous.items.extend(["b", "c"])
    with pytest.raises(dmodel.UnauthorizedError):
        anonymous.items.pop()
    assert list(shelf.items) == ["a"]


# ---------------------------------------------------------------- transactions


def test_a_transaction_reads_and_indexes_the_list_it_builds(make_node) -> None:
    a, b = make_node("a"), make_node("b")
    for name in ("items", "sealed"):
        shelf = Shelf([], node=a)
        lst = getattr(shelf, name)
        lst.extend(["x", "y"])
        model = ["x", "y"]
        before = updates(shelf)
        with shelf.transaction():
            for index, value in [(0, "a"), (0, "b"), (1, "c"), (-1, "d"), (99, "e")]:
                model.insert(index, value)
                lst.insert(index, value)
                assert list(lst) == model and len(lst) == len(model)
            lst[1] = "C"                  # an element inserted in this block
            model[1] = "C"
            lst[-2] = "Y"                 # one from before it
            model[-2] = "Y"
            assert lst.pop(0) == model.pop(0)
            del lst[-1]
            del model[-1]
            lst.remove("x")
            model.remove("x")
            lst.extend(["f", "g"])
            model.extend(["f", "g"])
            del lst[1:3]
            del model[1:3]
            assert list(lst) == model and lst[::-1] == model[::-1]
            assert lst.index("g") == model.index("g")
        assert updates(shelf) == before + 1
        assert list(lst) == model, name
        b.ingest_many(a.updates_since(0))
        assert b.list_range(shelf.db_id, name) == a.list_range(shelf.db_id, name)
        if name == "items":  # b cannot open the sealed one
            assert list(Shelf(shelf.db_id, node=b).items) == model
        lst.insert(1, "later")
        model.insert(1, "later")
        assert list(lst) == model
