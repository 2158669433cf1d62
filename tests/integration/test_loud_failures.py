"""Failures that used to be silent are loud: failing listeners, filters that cannot match."""

from __future__ import annotations

import logging

import pytest

import dmodel


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)
    tags = dmodel.DDict()


class ListenerPersonUpdated(dmodel.DAction):  # the walkthrough's own, as printed there
    def on_authorized_updated(self, object_id, field, old_value, new_value):
        print("Somebody changed field " + field + " of object " + object_id + " from "
              + old_value + " to " + new_value)


@pytest.fixture
def error_level():
    level = logging.getLogger("dmodel").level
    dmodel.set_loglevel("error")
    yield
    logging.getLogger("dmodel").setLevel(level)


def test_a_failing_listener_is_an_error_with_its_traceback_once(make_node, caplog,
                                                                error_level) -> None:
    node = make_node("n")
    ListenerPersonUpdated().apply("Person:[id]:*", node=node)
    p = Person([], node=node)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="dmodel"):
        p.name.set("Bob")  # old_value is None: the concatenation raises TypeError
        p.salary.set("1")  # the same callback fails again, on another field
    assert node.stats.listener_errors == 2
    records = [r for r in caplog.records if "ListenerPersonUpdated" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.ERROR, logging.WARNING]
    first = records[0]
    assert "on_authorized_updated" in first.getMessage() and "TypeError" in first.getMessage()
    assert first.exc_info is not None and records[1].exc_info is None
    assert logging.getLogger("dmodel").isEnabledFor(first.levelno)  # shown under 'error'


@pytest.mark.parametrize(("pattern", "needle"), [
    ("Persn:*", "no model named 'Persn'"),
    ("person:[id]", "model names are class names, e.g. 'Person'"),
    ("Person:[id]:nosuch", "Person has no field 'nosuch'"),
])
def test_filters_that_can_never_match_are_warned_about(make_node, caplog, pattern,
                                                       needle) -> None:
    node = make_node("n")
    with caplog.at_level(logging.WARNING, logger="dmodel"):
        ListenerPersonUpdated().apply(pattern, node=node)
    assert any(needle in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records), caplog.text


@pytest.mark.parametrize("pattern", ["Person:*", "Person:[id]", "Person:[id]:name",
                                     "Person:[id]:tags:k", "*"])
def test_filters_that_can_match_are_not_warned_about(make_node, caplog, pattern) -> None:
    node = make_node("n")
    with caplog.at_level(logging.WARNING, logger="dmodel"):
        ListenerPersonUpdated().apply(pattern, node=node)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
