"""Listeners (DAction) through real nodes: which of the 23 callbacks fire, with which
arguments and context, vetoes, after-callback errors, filters, the ready-made listeners
and the threads callbacks run on.

Two nodes, ``a`` and ``b``, each with its own embedded Redis; signed updates travel
between them with ``ship`` (what the network does, minus the network), except in the
thread tests at the end, which use real ZeroMQ on 127.0.0.1. The registry itself is
unit-tested in tests/unit/test_actions.py and the ready-made listeners in
tests/unit/test_ready_listeners.py; here everything goes through ``node.write`` /
``node.ingest``.

The world every table row starts from (``World``):

* on b: ``chief`` (owned by b); b's policy is ``'listeners'`` so that b can make (and
  send) unauthorized changes;
* on a: ``worker`` (owned by a; name 'Bob', encrypted salary '1000', tags color 'red',
  items ['x']; chief may read and update it) and ``loner`` (encrypted salary '1', which
  nobody on b may read);
* on b: ``intruder``, who may not change worker.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
from helpers import Clock, ship, wait_until

import dmodel
from dmodel.actions import BEFORE_CALLBACKS, CALLBACKS, DAction
from dmodel.errors import (
    ConfigurationError,
    ObjectNotFoundError,
    RejectedError,
    UnauthorizedError,
    VetoedError,
)
from dmodel.listeners import AuditLog, LogChanges, ReadOnlyFields, RejectUnauthorized, RunScript

pytestmark = pytest.mark.timeout(60)


class Staff(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)
    tags = dmodel.DDict()
    items = dmodel.DList()


class Other(dmodel.DModel):
    name = dmodel.DField("name", False)


class LaxStaff(dmodel.DModel):
    """A model that hands unauthorized changes to listeners on any node."""

    name = dmodel.DField("name", False)

    class Meta:
        unauthorized_policy = "listeners"


# ------------------------------------------------------------------ recording


class Ctx(NamedTuple):
    """The parts of a Context a table row states (update id and node id are checked too)."""

    caller_id: str
    authorized: bool
    owned: bool
    local: bool
    verdict: str
    encrypted: bool


class Call(NamedTuple):
    name: str
    args: tuple[Any, ...]
    ctx: Ctx


def _recording(name: str) -> Callable[..., None]:
    def callback(self: Recorder, *args: Any, context: dmodel.Context) -> None:
        self._hit(name, args, context)

    callback.__name__ = callback.__qualname__ = name
    return callback


class Recorder(DAction):
    """Overrides all 23 callbacks; records (name, args, context) and the thread."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.contexts: list[dmodel.Context] = []
        self.threads: list[str] = []

    locals().update({name: _recording(name) for name in CALLBACKS})

    def _hit(self, name: str, args: tuple[Any, ...], context: dmodel.Context) -> None:
        ctx = Ctx(context.caller_id, context.authorized, context.owned, context.local,
                  context.verdict, context.encrypted)
        self.calls.append(Call(name, args, ctx))
        self.contexts.append(context)
        self.threads.append(threading.current_thread().name)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def clear(self) -> None:
        self.calls.clear()
        self.contexts.clear()
        self.threads.clear()


class Vetoer(Recorder):
    """Records like Recorder and raises in one chosen callback."""

    def __init__(self, veto_in: str) -> None:
        super().__init__()
        self.veto_in = veto_in
        self.raised: list[Exception] = []

    def _hit(self, name: str, args: tuple[Any, ...], context: dmodel.Context) -> None:
        super()._hit(name, args, context)
        if name == self.veto_in:
            exc = PermissionError(f"{name} says no")
            self.raised.append(exc)
            raise exc


# ------------------------------------------------------------------ store dumps

# Keys that hold the state readers see (objects, registers, authorizations, wrapped
# keys, histories, lists, model sets); the others hold updates, chains and the log.
STATE_KEYS = ("o:", "r:", "a:", "w:", "h:", "l:", "lf:", "{dm:}m:", "{dm:}models")


def dump(node: dmodel.Node, *, state_only: bool = False) -> dict[str, Any]:
    """Every key of the node's store with its content (or only the state keys)."""
    client, prefix = node.store.client, node.store.prefix
    out: dict[str, Any] = {}
    for raw in client.keys(prefix + "*"):
        key = raw.decode()
        if state_only and not key[len(prefix):].startswith(STATE_KEYS):
            continue
        kind = client.type(raw).decode()
        if kind == "string":
            out[key] = client.get(raw)
        elif kind == "hash":
            out[key] = client.hgetall(raw)
        elif kind == "list":
            out[key] = client.lrange(raw, 0, -1)
        elif kind == "set":
            out[key] = client.smembers(raw)
        elif kind == "zset":
            out[key] = client.zrange(raw, 0, -1, withscores=True)
        else:  # pragma: no cover - the store uses the kinds above only
            out[key] = (kind, client.dump(raw))
    return out


def last_update_id(node: dmodel.Node) -> str:
    return node.store.log_range(-1, -1)[0].hex()


# ------------------------------------------------------------------ the world


class World:
    """Nodes a and b with chief, worker, loner and intruder (see the module docstring)."""

    def __init__(self, make_node: Callable[..., dmodel.Node], policy: str = "reject") -> None:
        # Both keep every update: ship() hands over whole logs, as a test of callbacks.
        self.a = make_node("a", unauthorized_policy=policy, retention="all")
        self.b = make_node("b", unauthorized_policy="listeners", retention="all")
        self._sent = {("a", "b"): 0, ("b", "a"): 0}
        a, b = self.a, self.b
        self.chief = Staff([], node=b)
        self.ship("b", "a")
        self.worker = Staff.create(name="Bob", salary="1000", authorized=[self.chief.db_id],
                                   node=a)
        self.worker.tags["color"] = "red"
        self.worker.items.append("x")
        self.loner = Staff.create(salary="1", node=a)
        self.ship("a", "b")
        self.intruder = Staff([], node=b)
        self.ship("b", "a")
        self.as_chief = Staff(self.worker.db_id, self.chief.db_id, node=b)
        self.as_intruder = Staff(self.worker.db_id, self.intruder.db_id, node=b)
        self.element0 = self.elements(a)[0]
        self.new: str | None = None  # an object created by a table row
        self.rec = {"a": Recorder().apply("*", node=a), "b": Recorder().apply("*", node=b)}
        self.accepted: dict[str, list[str]] = {"a": [], "b": []}
        a.on_accepted(lambda update, local: self.accepted["a"].append(update.hex_id))
        b.on_accepted(lambda update, local: self.accepted["b"].append(update.hex_id))

    def node(self, name: str) -> dmodel.Node:
        return self.a if name == "a" else self.b

    def ship(self, src: str, dst: str) -> None:
        self._sent[src, dst] = ship(self.node(src), self.node(dst), self._sent[src, dst])

    def elements(self, node: dmodel.Node) -> list[str]:
        return [e.hex() for e in node.store.list_range(self.worker.db_id, "items")]

    def new_element(self, node: dmodel.Node) -> str:
        (element,) = set(self.elements(node)) - {self.element0}
        return element

    def who(self, name: str) -> str:
        if name == "new":
            assert self.new is not None
            return self.new
        return getattr(self, name).db_id


def _created(w: World, node: str) -> None:
    w.new = Staff([], node=w.node(node)).db_id


# ------------------------------------------------------------------ the table

CREATE_OWNED = ("on_create", "on_created", "on_owned_created")
CREATE = ("on_create", "on_created")


def _family(stem: str, past: str, authorized: bool, owned: bool) -> tuple[str, ...]:
    who = "authorized" if authorized else "unauthorized"
    before = [f"on_{stem}", f"on_{who}_{stem}"] + ([f"on_owned_{stem}"] if owned else [])
    after = [f"on_{past}", f"on_{who}_{past}"] + ([f"on_owned_{past}"] if owned else [])
    return (*before, *after)


def _remove(authorized: bool, owned: bool) -> tuple[str, ...]:
    who = "authorized" if authorized else "unauthorized"
    return ("on_remove", f"on_{who}_remove") + (("on_owned_remove",) if owned else ())


UPD_OWNED = _family("update", "updated", True, True)
UPD = _family("update", "updated", True, False)
UPD_UNAUTH_OWNED = _family("update", "updated", False, True)
UPD_UNAUTH = _family("update", "updated", False, False)
DEL_OWNED = _family("delete", "deleted", True, True)
DEL_UNAUTH_OWNED = _family("delete", "deleted", False, True)
REM_OWNED = _remove(True, True)
REM_UNAUTH_OWNED = _remove(False, True)


@dataclass(frozen=True)
class Target:
    """What a row changes: the object (by World attribute), the field and the values
    passed to the callbacks: (old, new) for updates, (value,) for deletes, () else."""

    obj: str
    field: str | Callable[[World, dmodel.Node], str] | None
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Case:
    id: str
    write: Callable[[World], None]  # the change, made on ``writer``
    target: Target
    callbacks: tuple[str, ...]  # exactly what fires on ``observer``, in order
    who: str  # the caller, by World attribute
    writer: str = "a"
    observer: str = "a"
    owned: bool = True
    authorized: bool = True
    verdict: str = "accepted"
    encrypted: bool = False
    policy: str = "reject"  # node a's unauthorized_policy
    key_filter: Callable[[World], str] | None = None  # a filter that must match the key

    @property
    def local(self) -> bool:
        return self.writer == self.observer

    def __str__(self) -> str:
        return self.id


def _element(w: World, node: dmodel.Node) -> str:
    return f"items#{w.new_element(node)}"


def _element0(w: World, node: dmodel.Node) -> str:
    return f"items#{w.element0}"


W = "worker"
SEALED = object()  # stands for EncryptedValue(target object, field) in Target.values

CASES = [
    # Local changes on the owning node a: authorized (by the object itself) and owned.
    Case("local-create", lambda w: _created(w, "a"), Target("new", None, ()), CREATE_OWNED,
         "new", key_filter=lambda w: "Staff:[id]"),
    Case("local-update", lambda w: w.worker.name.set("Robert"),
         Target(W, "name", ("Bob", "Robert")), UPD_OWNED, W,
         key_filter=lambda w: f"{w.worker.db_id}:name"),
    Case("local-update-encrypted", lambda w: w.worker.salary.set("2000"),
         Target(W, "salary", ("1000", "2000")), UPD_OWNED, W, encrypted=True,
         key_filter=lambda w: f"{w.worker.db_id}:salary"),
    Case("local-ddict-set", lambda w: w.worker.tags.set("color", "blue"),
         Target(W, "tags:color", ("red", "blue")), UPD_OWNED, W,
         key_filter=lambda w: f"Staff:{w.worker.oid}:tags:color"),
    Case("local-ddict-delete", lambda w: w.worker.tags.delete("color"),
         Target(W, "tags:color", ("red",)), DEL_OWNED, W,
         key_filter=lambda w: f"Staff:{w.worker.oid}:tags:color"),
    Case("local-dlist-insert", lambda w: w.worker.items.append("y"),
         Target(W, _element, (None, "y")), UPD_OWNED, W,
         key_filter=lambda w: f"Staff:{w.worker.oid}:items#*"),
    Case("local-dlist-set", lambda w: w.worker.items.set(0, "z"),
         Target(W, _element0, ("x", "z")), UPD_OWNED, W,
         key_filter=lambda w: f"Staff:{w.worker.oid}:items#{w.element0}"),
    Case("local-dlist-delete", lambda w: w.worker.items.delete(0),
         Target(W, _element0, ("x",)), DEL_OWNED, W,
         key_filter=lambda w: f"Staff:{w.worker.oid}:items#{w.element0}"),
    Case("local-delete", lambda w: w.worker.delete("name"),
         Target(W, "name", ("Bob",)), DEL_OWNED, W,
         key_filter=lambda w: f"{w.worker.db_id}:name"),
    Case("local-delete-encrypted", lambda w: w.worker.delete("salary"),
         Target(W, "salary", ("1000",)), DEL_OWNED, W, encrypted=True),
    Case("local-remove", lambda w: w.worker.remove(), Target(W, None, ()), REM_OWNED, W,
         key_filter=lambda w: w.worker.db_id),
    # Local changes on b to an object b does not own.
    Case("local-authorized-not-owned", lambda w: w.as_chief.name.set("Robert"),
         Target(W, "name", ("Bob", "Robert")), UPD, "chief", writer="b", observer="b",
         owned=False),
    Case("local-authorized-not-owned-encrypted", lambda w: w.as_chief.salary.set("2000"),
         Target(W, "salary", ("1000", "2000")), UPD, "chief", writer="b", observer="b",
         owned=False, encrypted=True),  # b opens the values with the chief's key
    Case("local-unauthorized-listeners-policy", lambda w: w.as_intruder.name.set("Hacked"),
         Target(W, "name", ("Bob", "Hacked")), UPD_UNAUTH, "intruder", writer="b",
         observer="b", owned=False, authorized=False),
    # Remote changes, authorized.
    Case("remote-create", lambda w: _created(w, "b"), Target("new", None, ()), CREATE, "new",
         writer="b", owned=False, key_filter=lambda w: "Staff:[id]"),
    Case("remote-encrypted-unreadable", lambda w: w.loner.salary.set("2"),
         Target("loner", "salary", (SEALED, SEALED)), UPD, "loner", writer="a",
         observer="b", owned=False, encrypted=True),
    Case("remote-authorized-update", lambda w: w.as_chief.name.set("Robert"),
         Target(W, "name", ("Bob", "Robert")), UPD_OWNED, "chief", writer="b",
         key_filter=lambda w: f"{w.worker.db_id}:name"),
    Case("remote-authorized-update-encrypted", lambda w: w.as_chief.salary.set("2000"),
         Target(W, "salary", ("1000", "2000")), UPD_OWNED, "chief", writer="b",
         encrypted=True),
    Case("remote-authorized-ddict-set", lambda w: w.as_chief.tags.set("color", "green"),
         Target(W, "tags:color", ("red", "green")), UPD_OWNED, "chief", writer="b",
         key_filter=lambda w: f"{w.worker.db_id}:tags:color"),
    Case("remote-authorized-dlist-insert", lambda w: w.as_chief.items.append("c"),
         Target(W, _element, (None, "c")), UPD_OWNED, "chief", writer="b",
         key_filter=lambda w: f"{w.worker.db_id}:items#*"),
    Case("remote-authorized-delete", lambda w: w.as_chief.delete("name"),
         Target(W, "name", ("Bob",)), DEL_OWNED, "chief", writer="b"),
    Case("remote-authorized-remove", lambda w: w.as_chief.remove(), Target(W, None, ()),
         REM_OWNED, "chief", writer="b", key_filter=lambda w: w.worker.db_id),
    # Remote changes, unauthorized, policy 'reject' on a: observed only, nothing stored.
    Case("remote-unauthorized-update-reject", lambda w: w.as_intruder.name.set("Hacked"),
         Target(W, "name", ("Bob", "Hacked")), ("on_unauthorized_update",), "intruder",
         writer="b", authorized=False, verdict="unauthorized"),
    Case("remote-unauthorized-encrypted-reject",
         lambda w: w.as_intruder.salary.set("666"),
         Target(W, "salary", ("1000", "666")), ("on_unauthorized_update",), "intruder",
         writer="b", authorized=False, verdict="unauthorized", encrypted=True),
    Case("remote-unauthorized-ddict-reject", lambda w: w.as_intruder.tags.set("color", "x"),
         Target(W, "tags:color", ("red", "x")), ("on_unauthorized_update",), "intruder",
         writer="b", authorized=False, verdict="unauthorized",
         key_filter=lambda w: f"{w.worker.db_id}:tags:color"),
    Case("remote-unauthorized-delete-reject", lambda w: w.as_intruder.delete("name"),
         Target(W, "name", ("Bob",)), ("on_unauthorized_delete",), "intruder", writer="b",
         authorized=False, verdict="unauthorized"),
    Case("remote-unauthorized-remove-reject", lambda w: w.as_intruder.remove(),
         Target(W, None, ()), ("on_unauthorized_remove",), "intruder", writer="b",
         authorized=False, verdict="unauthorized"),
    # Remote changes, unauthorized, policy 'listeners' on a: applied unless vetoed.
    Case("remote-unauthorized-update-listeners", lambda w: w.as_intruder.name.set("Hacked"),
         Target(W, "name", ("Bob", "Hacked")), UPD_UNAUTH_OWNED, "intruder", writer="b",
         authorized=False, policy="listeners"),
    Case("remote-unauthorized-encrypted-listeners",
         lambda w: w.as_intruder.salary.set("666"),
         Target(W, "salary", ("1000", "666")), UPD_UNAUTH_OWNED, "intruder", writer="b",
         authorized=False, policy="listeners", encrypted=True),
    Case("remote-unauthorized-dlist-set-listeners", lambda w: w.as_intruder.items.set(0, "!"),
         Target(W, _element0, ("x", "!")), UPD_UNAUTH_OWNED, "intruder", writer="b",
         authorized=False, policy="listeners"),
    Case("remote-unauthorized-delete-listeners", lambda w: w.as_intruder.delete("name"),
         Target(W, "name", ("Bob",)), DEL_UNAUTH_OWNED, "intruder", writer="b",
         authorized=False, policy="listeners"),
    Case("remote-unauthorized-remove-listeners", lambda w: w.as_intruder.remove(),
         Target(W, None, ()), REM_UNAUTH_OWNED, "intruder", writer="b", authorized=False,
         policy="listeners"),
]


def _args(name: str, object_id: str, fld: str | None, values: tuple[Any, ...]) -> tuple:
    if name in ("on_create", "on_created", "on_owned_created"):
        return (object_id, object_id)
    if "remove" in name:
        return (object_id,)
    return (object_id, fld, *values)


def expected_calls(w: World, case: Case, fld: str | None = None) -> list[Call]:
    """The calls ``case`` makes on its observer (``fld``: the field, if already known)."""
    observer = w.node(case.observer)
    object_id = w.who(case.target.obj)
    if fld is None:
        fld = case.target.field
        if callable(fld):
            fld = fld(w, observer)
    values = tuple(dmodel.EncryptedValue(object_id, fld) if v is SEALED else v
                   for v in case.target.values)
    ctx = Ctx(w.who(case.who), case.authorized, case.owned, case.local, case.verdict,
              case.encrypted)
    return [Call(name, _args(name, object_id, fld, values), ctx) for name in case.callbacks]


def run(w: World, case: Case) -> None:
    """Make the change of ``case`` and bring it to the observer."""
    case.write(w)
    if not case.local:
        w.ship(case.writer, case.observer)


def test_the_table_provokes_all_23_callbacks() -> None:
    fired = {name for case in CASES for name in case.callbacks}
    assert fired == set(CALLBACKS) and len(CALLBACKS) == 23


@pytest.mark.parametrize("case", CASES, ids=str)
def test_callbacks_fired(make_node, case: Case) -> None:
    w = World(make_node, case.policy)
    observer, writer = w.node(case.observer), w.node(case.writer)
    key_rec = None
    if case.key_filter is not None:
        key_rec = Recorder().apply(case.key_filter(w), node=observer)
    if not case.local:
        case.write(w)  # made on the writer; what the observer does with it is the test
    for rec in w.rec.values():
        rec.clear()
    state_before = dump(observer, state_only=True)
    unauthorized_before = observer.stats.rejected["UnauthorizedError"]

    if case.local:
        case.write(w)
    else:
        w.ship(case.writer, case.observer)

    expected = expected_calls(w, case)
    assert w.rec[case.observer].calls == expected
    if key_rec is not None:  # the change's key matches the filter made for it
        assert key_rec.calls == expected
    for context in w.rec[case.observer].contexts:
        assert context.verified
        assert context.update_id == last_update_id(writer)
        assert context.node_id == writer.node_id.hex()
        assert not context.equivocation
    if case.verdict == "unauthorized":  # held back: the state is untouched
        assert dump(observer, state_only=True) == state_before
        assert observer.stats.rejected["UnauthorizedError"] == unauthorized_before + 1
        assert observer.stats.rejected["VetoedError"] == 0
    else:
        assert dump(observer, state_only=True) != state_before
        assert w.accepted[case.observer][-1] == last_update_id(writer)
    assert observer.stats.listener_errors == 0


def test_the_writer_sees_its_own_change_as_local(make_node) -> None:
    w = World(make_node)
    for rec in w.rec.values():
        rec.clear()
    w.as_chief.name.set("Robert")
    case = next(c for c in CASES if c.id == "local-authorized-not-owned")
    assert w.rec["b"].calls == expected_calls(w, case)
    assert w.rec["a"].calls == []  # nothing travelled yet
    w.ship("b", "a")
    assert [c.name for c in w.rec["a"].calls] == list(UPD_OWNED)


def test_create_with_values_runs_every_before_callback_first(make_node) -> None:
    """One update with several changes: before-callbacks of all of them, then afters."""
    a = make_node("a")
    rec = Recorder().apply("*", node=a)
    p = Staff.create(name="Bob", salary="1000", node=a)
    ctx = Ctx(p.db_id, True, True, True, "accepted", False)
    enc = ctx._replace(encrypted=True)
    i = p.db_id
    assert rec.calls == [
        Call("on_create", (i, i), ctx),
        Call("on_update", (i, "name", None, "Bob"), ctx),
        Call("on_authorized_update", (i, "name", None, "Bob"), ctx),
        Call("on_owned_update", (i, "name", None, "Bob"), ctx),
        Call("on_update", (i, "salary", None, "1000"), enc),
        Call("on_authorized_update", (i, "salary", None, "1000"), enc),
        Call("on_owned_update", (i, "salary", None, "1000"), enc),
        Call("on_created", (i, i), ctx),
        Call("on_owned_created", (i, i), ctx),
        Call("on_updated", (i, "name", None, "Bob"), ctx),
        Call("on_authorized_updated", (i, "name", None, "Bob"), ctx),
        Call("on_owned_updated", (i, "name", None, "Bob"), ctx),
        Call("on_updated", (i, "salary", None, "1000"), enc),
        Call("on_authorized_updated", (i, "salary", None, "1000"), enc),
        Call("on_owned_updated", (i, "salary", None, "1000"), enc),
    ]


def test_model_meta_policy_hands_unauthorized_changes_to_listeners(make_node) -> None:
    a, b = make_node("a"), make_node("b")  # both with the default 'reject'
    rec = Recorder().apply("*", node=a)
    p = LaxStaff.create(name="Bob", node=a)
    ship(a, b)
    intruder = Staff([], node=b)
    since = ship(a, b)
    LaxStaff(p.db_id, intruder.db_id, node=b).name.set("Hacked")  # b's Meta allows it
    rec.clear()
    ship(b, a, since)
    assert [c.name for c in rec.calls if c.args[0] == p.db_id] == list(UPD_UNAUTH_OWNED)
    assert p.name.get() == "Hacked"


# ------------------------------------------------------------------ vetoes


VARIANTS = ("encrypted", "ddict", "dlist", "not-owned")


def _veto_cases() -> list[Any]:
    """Every before-callback of every accepted row; for the rows that vary a plain one
    (encrypted values, DDict entries, DList elements) only the first before-callback."""
    params = []
    for case in CASES:
        if case.verdict != "accepted":
            continue
        names = [n for n in case.callbacks if n in BEFORE_CALLBACKS]
        if any(v in case.id for v in VARIANTS):
            names = names[:1]
        params += [pytest.param(case, name, id=f"{case.id}-{name}") for name in names]
    return params


VETO_CASES = _veto_cases()


def test_every_before_callback_is_vetoed_somewhere() -> None:
    vetoed = {p.values[1] for p in VETO_CASES}
    assert vetoed == set(BEFORE_CALLBACKS)
    local = {p.values[1] for p in VETO_CASES if p.values[0].local}
    remote = {p.values[1] for p in VETO_CASES if not p.values[0].local}
    assert remote == set(BEFORE_CALLBACKS)
    assert local == set(BEFORE_CALLBACKS) - {"on_unauthorized_delete", "on_unauthorized_remove"}


@pytest.mark.parametrize(("case", "callback"), VETO_CASES)
def test_veto(make_node, case: Case, callback: str) -> None:
    w = World(make_node, case.policy)
    observer = w.node(case.observer)
    observer.listeners.remove(w.rec[case.observer], "*")  # the vetoer comes first
    vetoer = Vetoer(callback).apply("*", node=observer)
    after = Recorder().apply("*", node=observer)  # applied later: never reached
    if not case.local:
        case.write(w)
    vetoer.clear()
    before = dump(observer)
    log_length = observer.log_length()
    stats = observer.stats.as_dict()
    accepted = list(w.accepted[case.observer])

    if case.local:
        with pytest.raises(VetoedError) as info:
            case.write(w)
        error = info.value
        assert error.__cause__ is vetoer.raised[0]
        assert error.listener is vetoer
        assert error.callback == callback
        assert "says no" in str(error)
        assert isinstance(error, RejectedError)
        if case.target.obj == "new":  # the create raised: its id is in the error
            w.new = error.db_id
            assert not observer.is_owned(w.new)  # no private key left behind
            assert w.new not in observer.keyring.owned()
        assert error.db_id == w.who(case.target.obj)
    else:
        w.ship(case.writer, case.observer)
        assert observer.stats.rejected["VetoedError"] == stats["rejected"].get(
            "VetoedError", 0) + 1

    fld = None
    if case.target.field is _element:  # a vetoed insert: its element id is nowhere else
        fld = vetoer.calls[0].args[1]
        assert re.fullmatch(r"items#[0-9a-f]{68}", fld) and fld != f"items#{w.element0}"
        assert w.elements(observer) == [w.element0]
    full = expected_calls(w, case, fld)
    upto = [c.name for c in full].index(callback) + 1
    assert vetoer.calls == full[:upto]  # the before-callbacks up to the veto, no after
    assert after.calls == []
    assert dump(observer) == before
    assert observer.log_length() == log_length
    assert w.accepted[case.observer] == accepted  # never handed to the publisher
    assert observer.stats.applied == stats["applied"]
    assert observer.stats.listener_errors == 0


@pytest.mark.parametrize("case", [c for c in CASES if c.verdict == "unauthorized"], ids=str)
def test_raising_while_observing_a_rejected_change_is_ignored(make_node, case: Case) -> None:
    w = World(make_node, case.policy)
    callback = case.callbacks[0]
    vetoer = Vetoer(callback).apply("*", node=w.a)
    case.write(w)
    state = dump(w.a, state_only=True)
    w.ship("b", "a")
    assert vetoer.names == [callback] and vetoer.raised
    assert vetoer.contexts[0].verdict == "unauthorized"
    assert w.a.stats.rejected == {"UnauthorizedError": 1}
    assert w.a.stats.listener_errors == 0
    assert dump(w.a, state_only=True) == state


def test_veto_on_one_node_only(make_node) -> None:
    """A veto keeps the change out of the vetoing node; a node without it applies it."""
    w = World(make_node, "listeners")
    RejectUnauthorized().apply("Staff:*", node=w.a)
    w.as_intruder.name.set("Hacked")
    w.ship("b", "a")
    assert w.worker.name.get() == "Bob"
    assert Staff(w.worker.db_id, "", node=w.b).name.get() == "Hacked"


# ------------------------------------------------------------------ after-callback errors


class Broken(DAction):
    def on_created(self, object_id, key):
        raise RuntimeError("on_created broke")

    def on_updated(self, object_id, field, old_value, new_value):
        raise RuntimeError(f"on_updated broke on {field}")

    def on_owned_deleted(self, object_id, field, value):
        raise RuntimeError("on_owned_deleted broke")


def test_after_callback_errors_are_logged_counted_and_undo_nothing(make_node, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="dmodel.actions")
    w = World(make_node)
    Broken().apply("*", node=w.a)
    later = Recorder().apply("*", node=w.a)  # registered after the broken one
    before = w.a.log_length()

    w.worker.name.set("Robert")  # local: no exception reaches the writer
    assert w.worker.name.get() == "Robert"
    assert w.a.stats.listener_errors == 1
    assert later.names == list(UPD_OWNED)  # the later listener still ran
    assert w.accepted["a"][-1] == last_update_id(w.a)  # handed on as usual

    w.as_chief.salary.set("2000")  # remote
    w.ship("b", "a")
    assert w.worker.salary.get() == "2000"
    assert w.a.stats.listener_errors == 2

    w.worker.delete("name")
    p = Staff([], node=w.a)
    assert w.a.stats.listener_errors == 4
    assert w.worker.name.get() is None and p.exists()
    assert w.a.log_length() == before + 4
    assert w.a.stats.rejected == {}

    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("Broken.on_updated failed" in m and "on_updated broke on name" in m
               for m in messages)
    assert any("on_updated broke on salary" in m for m in messages)
    assert any("Broken.on_owned_deleted failed" in m for m in messages)
    assert any("Broken.on_created failed" in m for m in messages)
    assert all(r.exc_info for r in caplog.records  # each first failure has its traceback
               if "failed on" in r.getMessage() and r.levelno == logging.ERROR)


# ------------------------------------------------------------------ the walkthrough


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)


pydinemic = dmodel  # the walkthrough's module name: its listener code runs unchanged


# --- copied from reference/pydinemic-walkthrough.txt ("Using listeners") ---
class ListenerPersonCreate(pydinemic.DAction):
    def on_create(self, object_id, key):
        print("Hey! New object was created. Its ID is: " + object_id)


class ListenerPersonUpdated(pydinemic.DAction):
    def on_authorized_updated(self, object_id, field, old_value, new_value):
        print("Somebody changed field " + field + " of object " + object_id + " from " + old_value + " to " + new_value)  # noqa: E501


class ListenerPersonPreventUnauthorized(pydinemic.DAction):
    def on_unauthorized_update(self, object_id, field, old_value, new_value):
        print("Ops! Somebody wanted to make unauthorized change")
        raise Exception('Update of field ' + field + ' was blocked')
# --- end of the copy ---


def test_walkthrough_listeners(tmp_path, make_node, capsys) -> None:
    node = dmodel.launch(home=tmp_path / "default", unauthorized_policy="listeners",
                         network=False)

    listener = ListenerPersonCreate()
    listener.apply('Person:[id]')
    p = Person([])
    assert capsys.readouterr().out == (
        f"Hey! New object was created. Its ID is: {p.get_db_id()}\n")

    p.name.set("Bob")  # before update_listener is applied: None + str would not print
    update_listener = ListenerPersonUpdated()
    update_listener.apply('Person:[id]:*')
    p.name.set("Robert")
    assert capsys.readouterr().out == (
        f"Somebody changed field name of object {p.get_db_id()} from Bob to Robert\n")

    unauthorized_listener = ListenerPersonPreventUnauthorized()
    unauthorized_listener.apply('Person:*')

    # Another host that lets its own callers through makes an unauthorized change ...
    other = make_node("other", unauthorized_policy="listeners")
    ship(node, other)
    intruder = Person([], node=other)
    Person(p.get_db_id(), intruder.get_db_id(), node=other).name.set("Hacked")
    assert Person(p.get_db_id(), "", node=other).name.get() == "Hacked"
    capsys.readouterr()
    # ... and the listener on the default node blocks it.
    ship(other, node)
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"Hey! New object was created. Its ID is: {intruder.get_db_id()}",
        "Ops! Somebody wanted to make unauthorized change",
    ]
    assert p.name.get() == "Robert"
    assert node.stats.rejected["VetoedError"] == 1
    assert node.stats.listener_errors == 0

    # An authorized change still goes through (and ListenerPersonUpdated prints it).
    p.name.set("Bobby")
    assert capsys.readouterr().out == (
        f"Somebody changed field name of object {p.get_db_id()} from Robert to Bobby\n")
    # Without the listener, the 'listeners' policy lets the same change in.
    unauthorized_listener.revoke('Person:*')
    c = make_node("c", unauthorized_policy="listeners")
    ship(other, c)
    assert Person(p.get_db_id(), "", node=c).name.get() == "Hacked"


# ------------------------------------------------------------------ filters through a node


def _names_and_fields(rec: Recorder) -> list[tuple[str, Any]]:
    return [(c.name, c.args[1] if len(c.args) > 2 else None) for c in rec.calls]


def test_field_filter_fires_only_for_that_field(make_node) -> None:
    a = make_node("a")
    p = Staff.create(name="Bob", node=a)
    rec = Recorder().apply("Staff:[id]:salary", node=a)
    p.name.set("Robert")
    p.tags["salary"] = 1  # the key Staff:oid:tags:salary is not Staff:oid:salary
    q = Staff([], node=a)
    assert rec.calls == []
    p.salary.set("10")
    q.salary.set("20")
    p.delete("salary")
    assert _names_and_fields(rec) == [(n, "salary") for n in UPD_OWNED * 2 + DEL_OWNED]
    assert [c.args[0] for c in rec.calls] == [p.db_id] * 6 + [q.db_id] * 6 + [p.db_id] * 6
    p.remove()  # an object key: not a field of it
    assert len(rec.calls) == 18


def test_exact_and_object_filters(make_node) -> None:
    a = make_node("a")
    p, q = Staff([], node=a), Staff([], node=a)
    exact = Recorder().apply(f"{p.db_id}:name", node=a)
    objects = Recorder().apply("Staff:[id]", node=a)
    whole_dict = Recorder().apply(f"{p.db_id}:tags", node=a)
    entries = Recorder().apply(f"{p.db_id}:tags:*", node=a)
    q.name.set("Q")
    p.name.set("P")
    p.tags["color"] = "red"
    assert exact.names == list(UPD_OWNED)
    assert whole_dict.calls == []  # DDict entries have keys of their own
    assert [c.args[1] for c in entries.calls] == ["tags:color"] * 6
    assert objects.calls == []  # fields are not objects
    r = Staff([], node=a)
    r.remove()
    assert objects.names == list(CREATE_OWNED + REM_OWNED)


def test_revoke_removes_exactly_one_application(make_node) -> None:
    a = make_node("a")
    p = Staff([], node=a)
    rec = Recorder()
    rec.apply("Staff:[id]:name", node=a)
    rec.apply("Staff:[id]:name", node=a)
    rec.apply("Staff:*", node=a)
    p.name.set(1)
    assert len(rec.calls) == 3 * len(UPD_OWNED)
    rec.revoke("Staff:[id]:name", node=a)
    rec.clear()
    p.name.set(2)
    assert len(rec.calls) == 2 * len(UPD_OWNED)
    rec.revoke("Staff:[id]:name", node=a)
    rec.clear()
    p.name.set(3)
    assert rec.names == list(UPD_OWNED)  # only Staff:* is left
    with pytest.raises(ConfigurationError):
        rec.revoke("Staff:[id]:name", node=a)
    rec.revoke("Staff:*", node=a)
    rec.clear()
    p.name.set(4)
    assert rec.calls == [] and len(a.listeners) == 0


def test_applied_context_manager(make_node) -> None:
    a = make_node("a")
    p = Staff([], node=a)
    rec = Recorder()
    with rec.applied("Staff:[id]:*", node=a) as same:
        assert same is rec
        p.name.set("in")
    p.name.set("out")
    assert [c.args[3] for c in rec.calls] == ["in"] * len(UPD_OWNED)
    assert len(a.listeners) == 0
    with pytest.raises(KeyError), rec.applied("Staff:[id]:*", node=a):
        raise KeyError("the block failed")
    assert len(a.listeners) == 0


def test_listeners_on_another_model_are_not_called(make_node) -> None:
    a = make_node("a")
    other = Recorder()
    for pattern in ("Other:*", "Other:[id]", "Other:[id]:name", "Other", "Staffx:*"):
        other.apply(pattern, node=a)
    p = Staff.create(name="Bob", node=a)
    p.name.set("Robert")
    p.remove()
    assert other.calls == []
    o = Other.create(name="O", node=a)
    assert {c.args[0] for c in other.calls} == {o.db_id}
    # Other:* matches the create and the field, Other:[id] the create, Other:[id]:name the field
    assert other.names.count("on_create") == 2 and other.names.count("on_update") == 2


def _normalized(rec: Recorder, ids: list[str]) -> list[tuple]:
    out = []
    for call in rec.calls:
        text = repr((call.name, call.args, call.ctx))
        for n, db_id in enumerate(ids):
            text = text.replace(db_id, f"<obj{n}>")
        out.append(text)
    return out


def _scenario(a: dmodel.Node) -> list[str]:
    p = Staff.create(name="Bob", node=a)
    p.name.set("Robert")
    p.salary.set("1")
    p.tags["color"] = "red"
    p.delete("name")
    p.remove()
    return [p.db_id]


def test_a_thousand_non_matching_filters_change_nothing(make_node) -> None:
    a = make_node("a")
    rec = Recorder().apply("*", node=a)
    ids = _scenario(a)
    plain = _normalized(rec, ids)
    assert len(plain) > 20

    noise = Recorder()
    for i in range(500):
        noise.apply(f"Other{i}:*", node=a)
        noise.apply(f"Staff:[id]:field{i}", node=a)
    assert len(a.listeners) == 1001
    rec.clear()
    ids = _scenario(a)
    assert _normalized(rec, ids) == plain
    assert noise.calls == []


def test_registration_order_through_a_node(make_node) -> None:
    a = make_node("a")
    log: list[tuple[str, str]] = []

    class Tagged(DAction):
        def __init__(self, tag: str) -> None:
            self.tag = tag

        def on_update(self, object_id, field, old_value, new_value):
            log.append((self.tag, "on_update"))

        def on_updated(self, object_id, field, old_value, new_value):
            log.append((self.tag, "on_updated"))

    p = Staff([], node=a)
    Tagged("model").apply("Staff:*", node=a)
    Tagged("any").apply("*", node=a)
    Tagged("field").apply("Staff:[id]:name", node=a)
    Tagged("other-field").apply("Staff:[id]:salary", node=a)
    p.name.set("Bob")
    assert log == [("model", "on_update"), ("any", "on_update"), ("field", "on_update"),
                   ("model", "on_updated"), ("any", "on_updated"), ("field", "on_updated")]


# ------------------------------------------------------------------ ready-made listeners


def test_reject_unauthorized_under_the_listeners_policy(make_node) -> None:
    w = World(make_node, "listeners")
    guard = RejectUnauthorized().apply("Staff:*", node=w.a)
    w.as_intruder.name.set("Hacked")
    w.as_intruder.tags["color"] = "black"
    w.as_intruder.remove()
    state = dump(w.a, state_only=True)
    w.ship("b", "a")
    assert dump(w.a, state_only=True) == state
    assert w.worker.name.get() == "Bob" and w.worker.exists()
    # All three are vetoed: the later two name the first as their previous update (its
    # hash chain), and a vetoed update still counts as a link, so nothing waits for it.
    assert w.a.stats.rejected == {"VetoedError": 3}
    assert w.a.pending_count == 0
    names = w.rec["a"].names  # the recorder was applied before the guard: it sees all three
    assert names[:3] == list(UPD_UNAUTH_OWNED[:3])
    assert names[3:6] == list(UPD_UNAUTH_OWNED[:3])  # the DDict entry
    assert names[6:] == ["on_remove", "on_unauthorized_remove", "on_owned_remove"]
    # b applied the intruder's remove (its policy is 'listeners' and nothing guards it
    # there), so b signs nothing more for the worker, even for the authorized chief.
    with pytest.raises(ObjectNotFoundError, match="removed"):
        w.as_chief.name.set("Robert")
    assert w.worker.name.get() == "Bob"
    # A local unauthorized write on a node whose policy is 'listeners' is vetoed too.
    RejectUnauthorized().apply("Staff:*", node=w.b)
    with pytest.raises(VetoedError) as info:
        Staff(w.loner.db_id, w.intruder.db_id, node=w.b).name.set("mine")
    assert isinstance(info.value.__cause__, UnauthorizedError)
    assert info.value.listener is not guard and info.value.callback == "on_unauthorized_update"


def test_read_only_fields(make_node) -> None:
    a = make_node("a")
    ReadOnlyFields(["name"]).apply("Staff:[id]:*", node=a)
    p = Staff.create(name="Bob", node=a)  # the first value is allowed
    log_length = a.log_length()
    with pytest.raises(VetoedError) as info:
        p.name.set("Robert")
    assert isinstance(info.value.__cause__, RejectedError)
    assert "read-only" in str(info.value.__cause__)
    assert info.value.callback == "on_update"
    with pytest.raises(VetoedError):
        p.delete("name")
    assert p.name.get() == "Bob" and a.log_length() == log_length
    p.salary.set("1")
    p.salary.set("2")  # other fields are free
    q = Staff([], node=a)
    q.name.set("Q")  # a first value, later
    with pytest.raises(VetoedError):
        q.name.set("Q2")


def _records(path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_audit_log_records_verdicts_and_redacts(make_node, tmp_path) -> None:
    w = World(make_node)
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path).apply("*", node=w.a)
    w.worker.name.set("Robert")
    w.worker.salary.set("TOPSECRET-4242")
    w.as_intruder.name.set("Hacked")
    w.as_intruder.salary.set("INTRUDER-SECRET-77")
    w.ship("b", "a")
    audit.close()

    records = _records(path)
    by = {(r["verdict"], r["field"], r["caller_id"]) for r in records}
    worker, intruder = w.worker.db_id, w.intruder.db_id
    assert ("accepted", "name", worker) in by and ("attempted", "name", worker) in by
    assert ("accepted", "salary", worker) in by
    assert ("unauthorized", "name", intruder) in by
    assert ("unauthorized", "salary", intruder) in by
    assert not any(r["verdict"] == "accepted" and r["caller_id"] == intruder
                   and r["object_id"] == worker for r in records)
    name = next(r for r in records if r["verdict"] == "accepted" and r["field"] == "name")
    assert (name["old_value"], name["new_value"]) == ("Bob", "Robert")
    assert name["update_id"] and name["owned"] and name["local"] and name["authorized"]
    for r in records:
        if r["field"] == "salary":
            assert r["new_value"] == "<encrypted>"
            assert r["old_value"] == "<encrypted>"
    unauthorized = next(r for r in records if r["verdict"] == "unauthorized")
    assert unauthorized["authorized"] is False and unauthorized["local"] is False
    data = path.read_bytes()
    assert b"TOPSECRET" not in data and b"INTRUDER-SECRET" not in data
    assert w.a.stats.listener_errors == 0


def test_audit_log_shows_vetoed_attempts(make_node, tmp_path) -> None:
    w = World(make_node, "listeners")
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as audit:
        audit.apply("*", node=w.a)  # before the guard: it sees the attempt
        RejectUnauthorized().apply("Staff:*", node=w.a)
        w.as_intruder.name.set("Hacked")
        w.ship("b", "a")
    records = [r for r in _records(path) if r["caller_id"] == w.intruder.db_id
               and r["object_id"] == w.worker.db_id]
    assert [r["verdict"] for r in records] == ["attempted"]
    assert records[0]["new_value"] == "Hacked" and records[0]["authorized"] is False
    assert w.a.stats.rejected["VetoedError"] == 1


def test_log_changes(make_node, caplog) -> None:
    caplog.set_level(logging.INFO, logger="dmodel.listeners.log")
    w = World(make_node)
    LogChanges().apply("*", node=w.a)
    w.worker.name.set("Robert")
    w.worker.salary.set("TOPSECRET-4242")
    w.as_chief.tags["color"] = "green"
    w.ship("b", "a")
    w.worker.remove()
    lines = [r.getMessage() for r in caplog.records if r.name == "dmodel.listeners.log"]
    worker, chief = w.worker.db_id, w.chief.db_id
    assert lines[0].startswith(f"{worker}.name updated 'Bob' -> 'Robert' by {worker} "
                               "(authorized, local, update ")
    assert lines[1].startswith(f"{worker}.salary updated <encrypted> -> <encrypted> by")
    assert "'<encrypted>'" not in caplog.text
    assert lines[2].startswith(f"{worker}.tags:color updated 'red' -> 'green' by {chief} "
                               f"(authorized, node {w.b.node_id.hex()[:12]}")
    assert lines[3].startswith(f"{worker} removing by {worker}")
    assert len(lines) == 4
    assert "TOPSECRET" not in caplog.text


ENV_WRITER = (
    "import json, os, sys\n"
    "env = {k: v for k, v in os.environ.items() if k.startswith('DMODEL_')}\n"
    "with open(sys.argv[1], 'a') as fh:\n"
    "    fh.write(json.dumps(env) + '\\n')\n"
)


def test_run_script(make_node, tmp_path) -> None:
    w = World(make_node)
    out = tmp_path / "env.jsonl"
    RunScript([sys.executable, "-c", ENV_WRITER, str(out)]).apply("Staff:[id]:name",
                                                                  node=w.a)
    w.worker.name.set("Robert")
    local_update = last_update_id(w.a)
    w.worker.salary.set("2")  # not matched
    w.as_chief.name.set("Bobby")
    w.ship("b", "a")
    envs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(envs) == 2
    first, second = envs
    change_keys = ("EVENT", "OBJECT_ID", "FIELD", "OLD_VALUE", "NEW_VALUE", "CALLER_ID",
                   "UPDATE_ID")
    assert {k: v for k, v in first.items() if k[7:] in change_keys} == {
        "DMODEL_EVENT": "updated",
        "DMODEL_OBJECT_ID": w.worker.db_id,
        "DMODEL_FIELD": "name",
        "DMODEL_OLD_VALUE": '"Bob"',
        "DMODEL_NEW_VALUE": '"Robert"',
        "DMODEL_CALLER_ID": w.worker.db_id,
        "DMODEL_UPDATE_ID": local_update,
    }
    assert second["DMODEL_CALLER_ID"] == w.chief.db_id
    assert second["DMODEL_NEW_VALUE"] == '"Bobby"'
    assert second["DMODEL_UPDATE_ID"] == last_update_id(w.b)
    assert w.a.stats.listener_errors == 0


# ------------------------------------------------------------------ threads

LOOPBACK = "tcp://127.0.0.1:*"
NO_CATCH_UP = 3600.0  # only the catch-up pass at start (and on connect) runs


def _net(make_node, name: str, peers=(), **options) -> dmodel.Node:
    return make_node(name, listen=LOOPBACK, discovery=False,
                     peers=[p.network.endpoint for p in peers],
                     network_options={"sync_interval": NO_CATCH_UP, **options})


def test_listener_threads(make_node) -> None:
    a = _net(make_node, "a")
    b = _net(make_node, "b", peers=[a])
    assert a.network.wait_for_peers(1, timeout=10) and b.network.wait_for_peers(1, timeout=10)
    warm = Staff([], node=a)  # let the catch-up passes at connect time finish first
    wait_until(lambda: b.exists(warm.db_id))
    b.network.sync_now()
    assert b.network.wait_idle(10)

    rec = Recorder().apply("Staff:*", node=b)
    p = Staff.create(name="Bob", node=a)
    p.name.set("Robert")
    wait_until(lambda: len(rec.calls) >= 10)
    assert rec.names == ["on_create", "on_update", "on_authorized_update", "on_created",
                         "on_updated", "on_authorized_updated", *UPD]
    assert rec.calls[-1].args[2:] == ("Bob", "Robert")
    remote_threads = set(rec.threads)
    assert len(remote_threads) == 1, remote_threads
    assert remote_threads.pop().startswith("dmodel-apply"), rec.threads
    assert all(not c.ctx.local for c in rec.calls)

    rec.clear()
    q = Staff([], node=b)  # local: on this thread
    assert set(rec.threads) == {threading.current_thread().name}
    rec.clear()
    worker = threading.Thread(target=lambda: q.name.set("from a thread"), name="writer-7")
    worker.start()
    worker.join(10)
    assert rec.threads == ["writer-7"] * len(UPD_OWNED)


def test_vetoed_local_write_is_not_published(make_node) -> None:
    a = _net(make_node, "a")
    b = _net(make_node, "b", peers=[a])
    assert a.network.wait_for_peers(1, timeout=10) and b.network.wait_for_peers(1, timeout=10)
    p = Staff.create(name="Bob", node=a)
    wait_until(lambda: b.exists(p.db_id))

    class NoBad(DAction):
        def on_update(self, object_id, field, old_value, new_value):
            if new_value == "bad":
                raise ValueError("bad value")

    NoBad().apply("Staff:*", node=a)
    seen = Recorder().apply("Staff:*", node=b)
    published = a.stats.published
    with pytest.raises(VetoedError):
        p.name.set("bad")
    assert a.stats.published == published
    p.name.set("good")
    assert a.stats.published == published + 1
    wait_until(lambda: Staff(p.db_id, "", node=b).name.get() == "good")
    assert [c.args[2:] for c in seen.calls if c.name == "on_updated"] == [("Bob", "good")]
    assert b.stats.rejected == {}


def test_catch_up_runs_listeners_on_the_sync_thread(make_node) -> None:
    """README: updates fetched by catch-up run listeners on the node's sync thread."""
    a = _net(make_node, "a")
    p = Staff.create(name="Bob", node=a)  # written before b connects: b catches up
    b = _net(make_node, "b", sync_interval=0.2)
    rec = Recorder().apply("Staff:*", node=b)
    b.network.connect(a.network.endpoint)
    wait_until(lambda: b.exists(p.db_id))
    assert b.network.wait_idle(10)
    assert rec.threads and all(t.startswith("dmodel-sync") for t in rec.threads), rec.threads


# ------------------------------------------------------------------ odds and ends


def test_field_and_key_shapes_agree(make_node) -> None:
    """The field passed to callbacks is the key minus ``object_id:`` for every kind."""
    w = World(make_node)
    keys = {}

    class Keys(DAction):
        def on_update(self, object_id, field, old_value, new_value):
            keys.setdefault(field, object_id)

    Keys().apply("*", node=w.a)
    w.worker.tags["size"] = "L"
    w.worker.items.insert(0, "first")
    w.worker.name.set("N")
    element = w.new_element(w.a)
    assert set(keys) == {"tags:size", f"items#{element}", "name"}
    for fld in keys:
        assert w.a.listeners.matching(f"{w.worker.db_id}:{fld}")
    assert re.fullmatch(r"[0-9a-f]{68}", element)
    assert w.worker.items.to_list() == ["first", "x"]


def test_unknown_pattern_and_bad_listener_fail_at_apply(make_node) -> None:
    a = make_node("a")
    with pytest.raises(ConfigurationError):
        Recorder().apply("Staff:[oid]", node=a)
    assert len(a.listeners) == 0


class _Task(dmodel.DModel):
    note = dmodel.DField()
    motto = dmodel.DField()


class _Boss(dmodel.DModel):
    name = dmodel.DField()


def test_a_batch_watched_by_listeners_reads_again_after_a_listener_writes(make_node) -> None:
    """Updates of one batch that listeners watch are committed one by one from snapshots
    read once; a listener's own write in between must not be overwritten by a later
    update of the batch decided against the snapshot from before it."""
    ca, cb = Clock(), Clock()
    a, b = make_node("a", now=ca), make_node("b", now=cb)
    boss = _Boss.create(node=a).db_id
    ship(a, b)
    task = _Task.create(node=b, authorized=[boss], note="first").db_id
    ship(b, a)
    ca.ms += 1_000
    mark = a.log_length()
    as_boss = _Task(task, boss, node=a)
    as_boss.motto = "go"                 # t0 + 1 s: the listener on b writes on seeing it
    ca.ms += 1_000
    as_boss.note = "from the boss"       # t0 + 2 s
    cb.ms += 3_000                       # b's write, t0 + 3 s, is the newest

    class WriteNote(DAction):
        def on_updated(self, object_id: str, field: str, old: Any, new: Any) -> None:
            if field == "motto":
                _Task(task, node=b).note = "from the listener"

    with WriteNote().applied("_Task:*", node=b):
        b.ingest_many(a.updates_since(mark))  # one batch: motto, then note
    assert _Task(task, node=b).note.get() == "from the listener"
    ship(b, a)
    assert a.state_digest() == b.state_digest()
