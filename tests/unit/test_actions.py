"""DAction callbacks, validation at apply(), and ListenerRegistry dispatch."""

import logging
import sys
import types
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dmodel
from dmodel import filters
from dmodel.actions import (
    AFTER_CALLBACKS,
    BEFORE_CALLBACKS,
    CALLBACKS,
    Change,
    Context,
    DAction,
    ListenerRegistry,
)
from dmodel.errors import (
    ConfigurationError,
    ModelDefinitionError,
    NodeNotRunningError,
    RejectedError,
    VetoedError,
)

OBJ = "Person:3xk2abcdefghijklmnopqrstuvwxyz23"


def make_context(authorized: bool = True, owned: bool = False, **kw: Any) -> Context:
    base: dict[str, Any] = dict(
        caller_id="Person:caller",
        verified=True,
        authorized=authorized,
        owned=owned,
        timestamp=1234,
        update_id="ab" * 20,
        local=True,
        node_id="cd" * 16,
    )
    base.update(kw)
    return Context(**base)


def make_change(
    kind: str,
    authorized: bool = True,
    owned: bool = False,
    object_id: str = OBJ,
    field: str | None = "salary",
    old_value: Any = 1,
    new_value: Any = 2,
    **ctx: Any,
) -> Change:
    if kind in ("create", "remove"):
        field, key = None, object_id
    else:
        key = f"{object_id}:{field}"
    if kind == "delete":
        new_value = None
    return Change(
        kind,
        object_id,
        key,
        field,
        old_value,
        new_value,
        context=make_context(authorized, owned, **ctx),
    )


def _recording(name: str) -> Any:
    def callback(self: "Recorder", *args: Any) -> None:
        self.calls.append((name, args))

    callback.__name__ = name
    return callback


class Recorder(DAction):
    """Overrides all 23 callbacks and records (name, args)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    locals().update({name: _recording(name) for name in CALLBACKS})

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def reg() -> ListenerRegistry:
    return ListenerRegistry()


BEFORE_TABLE = [
    ("create", True, True, ["on_create"]),
    ("create", True, False, ["on_create"]),
    ("create", False, True, ["on_create"]),
    ("create", False, False, ["on_create"]),
    ("update", True, True, ["on_update", "on_authorized_update", "on_owned_update"]),
    ("update", True, False, ["on_update", "on_authorized_update"]),
    ("update", False, True, ["on_update", "on_unauthorized_update", "on_owned_update"]),
    ("update", False, False, ["on_update", "on_unauthorized_update"]),
    ("delete", True, True, ["on_delete", "on_authorized_delete", "on_owned_delete"]),
    ("delete", True, False, ["on_delete", "on_authorized_delete"]),
    ("delete", False, True, ["on_delete", "on_unauthorized_delete", "on_owned_delete"]),
    ("delete", False, False, ["on_delete", "on_unauthorized_delete"]),
    ("remove", True, True, ["on_remove", "on_authorized_remove", "on_owned_remove"]),
    ("remove", True, False, ["on_remove", "on_authorized_remove"]),
    ("remove", False, True, ["on_remove", "on_unauthorized_remove", "on_owned_remove"]),
    ("remove", False, False, ["on_remove", "on_unauthorized_remove"]),
]

AFTER_TABLE = [
    ("create", True, True, ["on_created", "on_owned_created"]),
    ("create", True, False, ["on_created"]),
    ("create", False, True, ["on_created", "on_owned_created"]),
    ("create", False, False, ["on_created"]),
    ("update", True, True, ["on_updated", "on_authorized_updated", "on_owned_updated"]),
    ("update", True, False, ["on_updated", "on_authorized_updated"]),
    ("update", False, True, ["on_updated", "on_unauthorized_updated", "on_owned_updated"]),
    ("update", False, False, ["on_updated", "on_unauthorized_updated"]),
    ("delete", True, True, ["on_deleted", "on_authorized_deleted", "on_owned_deleted"]),
    ("delete", True, False, ["on_deleted", "on_authorized_deleted"]),
    ("delete", False, True, ["on_deleted", "on_unauthorized_deleted", "on_owned_deleted"]),
    ("delete", False, False, ["on_deleted", "on_unauthorized_deleted"]),
    ("remove", True, True, []),
    ("remove", True, False, []),
    ("remove", False, True, []),
    ("remove", False, False, []),
]

OBSERVE_TABLE = [
    ("create", []),
    ("update", ["on_unauthorized_update"]),
    ("delete", ["on_unauthorized_delete"]),
    ("remove", ["on_unauthorized_remove"]),
]


def test_callback_names() -> None:
    assert len(CALLBACKS) == 23 == len(set(CALLBACKS))
    assert set(BEFORE_CALLBACKS) | set(AFTER_CALLBACKS) == set(CALLBACKS)
    assert all(callable(getattr(DAction, name)) for name in CALLBACKS)


@pytest.mark.parametrize(("kind", "authorized", "owned", "expected"), BEFORE_TABLE)
def test_before_selects_callbacks(
    reg: ListenerRegistry, kind: str, authorized: bool, owned: bool, expected: list[str]
) -> None:
    rec = Recorder().apply("*", registry=reg)
    reg.before([make_change(kind, authorized, owned)])
    assert rec.names == expected


@pytest.mark.parametrize(("kind", "authorized", "owned", "expected"), AFTER_TABLE)
def test_after_selects_callbacks(
    reg: ListenerRegistry, kind: str, authorized: bool, owned: bool, expected: list[str]
) -> None:
    rec = Recorder().apply("*", registry=reg)
    assert reg.after([make_change(kind, authorized, owned)]) == []
    assert rec.names == expected


@pytest.mark.parametrize(("kind", "expected"), OBSERVE_TABLE)
@pytest.mark.parametrize("owned", [True, False])
def test_observe_rejected_selects_only_unauthorized_callbacks(
    reg: ListenerRegistry, kind: str, expected: list[str], owned: bool
) -> None:
    rec = Recorder().apply("*", registry=reg)
    reg.observe_rejected([make_change(kind, False, owned, verdict="unauthorized")])
    assert rec.names == expected


@pytest.mark.parametrize(
    ("kind", "expected_args"),
    [
        ("create", (OBJ, OBJ)),
        ("update", (OBJ, "salary", 1, 2)),
        ("delete", (OBJ, "salary", 1)),
        ("remove", (OBJ,)),
    ],
)
def test_pydinemic_arguments(
    reg: ListenerRegistry, kind: str, expected_args: tuple[Any, ...]
) -> None:
    rec = Recorder().apply("*", registry=reg)
    change = make_change(kind)
    reg.before([change])
    reg.after([change])
    assert rec.calls and all(args == expected_args for _, args in rec.calls)


def test_dict_entry_field_and_key(reg: ListenerRegistry) -> None:
    rec = Recorder().apply("Person:[id]:tags:*", registry=reg)
    reg.after([make_change("update", field="tags:color", old_value=None, new_value="red")])
    assert rec.calls[0] == ("on_updated", (OBJ, "tags:color", None, "red"))


def test_filters_select_changes(reg: ListenerRegistry) -> None:
    objects, fields, salary = Recorder(), Recorder(), Recorder()
    objects.apply("Person:[id]", registry=reg)
    fields.apply("Person:[id]:*", registry=reg)
    salary.apply("Person:[id]:salary", registry=reg)
    reg.before([make_change("create"), make_change("update", field="name")])
    reg.before([make_change("update", field="salary"), make_change("remove")])
    assert objects.names == ["on_create", "on_remove", "on_authorized_remove"]
    assert [a[1] for _, a in fields.calls if _ == "on_update"] == ["name", "salary"]
    assert salary.names == ["on_update", "on_authorized_update"]


def test_only_overridden_callbacks_are_called(reg: ListenerRegistry) -> None:
    class OnlyUpdated(DAction):
        def __init__(self) -> None:
            self.seen: list[str] = []

        def on_updated(self, object_id: str, field: str, old: Any, new: Any) -> None:
            self.seen.append(field)

    listener = OnlyUpdated().apply("*", registry=reg)
    for kind in ("create", "update", "delete", "remove"):
        reg.before([make_change(kind)])
        reg.after([make_change(kind)])
    assert listener.seen == ["salary"]


def test_plain_daction_applies_and_does_nothing(reg: ListenerRegistry) -> None:
    DAction().apply("*", registry=reg)
    reg.before([make_change("update")])
    assert reg.after([make_change("update")]) == []


# Veto semantics.


class Vetoer(DAction):
    def __init__(self, log: list[str], name: str, veto_on: str | None = None) -> None:
        self.log, self.name, self.veto_on = log, name, veto_on

    def _hit(self, callback: str) -> None:
        self.log.append(f"{self.name}.{callback}")
        if callback == self.veto_on:
            raise PermissionError(f"{self.name} says no")

    def on_update(self, object_id: str, field: str, old: Any, new: Any) -> None:
        self._hit("on_update")

    def on_unauthorized_update(self, object_id: str, field: str, old: Any, new: Any) -> None:
        self._hit("on_unauthorized_update")

    def on_owned_update(self, object_id: str, field: str, old: Any, new: Any) -> None:
        self._hit("on_owned_update")

    def on_updated(self, object_id: str, field: str, old: Any, new: Any) -> None:
        self._hit("on_updated")


def test_first_raise_vetoes_and_stops_dispatch(reg: ListenerRegistry) -> None:
    log: list[str] = []
    a = Vetoer(log, "a").apply("*", registry=reg)
    b = Vetoer(log, "b", veto_on="on_unauthorized_update").apply("Person:*", registry=reg)
    Vetoer(log, "c", veto_on="on_update").apply("Person:[id]:*", registry=reg)
    first = make_change("update", authorized=False, owned=True)
    second = make_change("update", authorized=False, owned=True, field="name")

    with pytest.raises(VetoedError) as info:
        reg.before([first, second])

    assert log == [
        "a.on_update",
        "a.on_unauthorized_update",
        "a.on_owned_update",
        "b.on_update",
        "b.on_unauthorized_update",
    ]
    err = info.value
    assert err.listener is b and err.listener is not a
    assert err.callback == "on_unauthorized_update"
    assert err.db_id == OBJ
    assert isinstance(err.__cause__, PermissionError)
    assert isinstance(err, RejectedError)
    assert str(err) == (
        f"{OBJ} change to 'salary' vetoed by Vetoer.on_unauthorized_update: b says no"
    )


@pytest.mark.parametrize(
    ("kind", "callback", "what"),
    [
        ("create", "on_create", "creation"),
        ("delete", "on_delete", "deletion of 'salary'"),
        ("remove", "on_remove", "removal"),
    ],
)
def test_veto_messages(reg: ListenerRegistry, kind: str, callback: str, what: str) -> None:
    class No(DAction):
        pass

    def refuse(*args: Any) -> None:
        raise ValueError()

    listener = No()
    setattr(listener, callback, refuse)
    listener.apply("*", registry=reg)
    with pytest.raises(VetoedError, match=f"vetoed by No.{callback}: ValueError$") as info:
        reg.before([make_change(kind)])
    assert str(info.value).startswith(f"{OBJ} {what} vetoed")


def test_after_exceptions_are_logged_and_returned(
    reg: ListenerRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []
    a = Vetoer(log, "a", veto_on="on_updated").apply("*", registry=reg)
    Vetoer(log, "b").apply("*", registry=reg)
    with caplog.at_level(logging.WARNING, logger="dmodel.actions"):
        errors = reg.after([make_change("update"), make_change("update", field="name")])
    assert log == ["a.on_updated", "b.on_updated"] * 2
    assert [(listener, name) for listener, name, _ in errors] == [(a, "on_updated")] * 2
    assert all(isinstance(exc, PermissionError) for _, _, exc in errors)
    records = [r for r in caplog.records if r.name == "dmodel.actions"]
    assert len(records) == 2
    # The first failure of a callback is an ERROR with its traceback, repeats one line.
    assert records[0].levelno == logging.ERROR and records[0].exc_info is not None
    assert records[1].levelno == logging.WARNING and records[1].exc_info is None
    assert "Vetoer.on_updated" in records[0].getMessage()
    assert "(again)" in records[1].getMessage()


def test_observe_rejected_swallows_exceptions(
    reg: ListenerRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []
    Vetoer(log, "a", veto_on="on_unauthorized_update").apply("*", registry=reg)
    Vetoer(log, "b").apply("*", registry=reg)
    with caplog.at_level(logging.DEBUG, logger="dmodel.actions"):
        reg.observe_rejected([make_change("update", authorized=False, verdict="unauthorized")])
    assert log == ["a.on_unauthorized_update", "b.on_unauthorized_update"]
    assert [r.levelno for r in caplog.records if r.name == "dmodel.actions"] == [logging.DEBUG]


def test_base_exceptions_are_not_vetoes(reg: ListenerRegistry) -> None:
    class Interrupt(DAction):
        def on_update(self, *args: Any) -> None:
            raise KeyboardInterrupt

    Interrupt().apply("*", registry=reg)
    with pytest.raises(KeyboardInterrupt):
        reg.before([make_change("update")])


# Context delivery.


def test_context_parameter_and_attribute(reg: ListenerRegistry) -> None:
    seen: list[Any] = []

    class WithContext(DAction):
        def on_update(self, object_id: str, field: str, old: Any, new: Any, context: Context):
            seen.append(("param", context, self.context))

        def on_updated(self, object_id: str, field: str, old: Any, new: Any, *, context: Any):
            seen.append(("kwonly", context, self.context))

        def on_authorized_update(self, object_id: str, field: str, old: Any, new: Any):
            seen.append(("attribute", self.context))

        def on_deleted(self, object_id: str, field: str, value: Any, context: Any = None):
            seen.append(("default", context))

    WithContext().apply("*", registry=reg)
    update, delete = make_change("update"), make_change("delete", timestamp=99)
    reg.before([update])
    reg.after([update, delete])
    assert seen == [
        ("param", update.context, update.context),
        ("attribute", update.context),
        ("kwonly", update.context, update.context),
        ("default", delete.context),
    ]


def test_context_and_change_are_frozen() -> None:
    change = make_change("update")
    with pytest.raises(AttributeError):
        change.context.authorized = False  # type: ignore[misc]
    with pytest.raises(AttributeError):
        change.field = "x"  # type: ignore[misc]
    assert change.context.verdict == "accepted" and change.context.equivocation is False
    assert change.model == "Person"


def test_change_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        Change("set", OBJ, OBJ, None, context=make_context())


def test_change_needs_a_context() -> None:
    with pytest.raises(TypeError):
        Change("create", OBJ, OBJ, None)  # type: ignore[call-arg]


# Validation at apply().


def test_typo_callback_is_rejected(reg: ListenerRegistry) -> None:
    class Typo(DAction):
        def on_unauthorised_update(self, object_id: str, field: str, old: Any, new: Any):
            raise PermissionError

    with pytest.raises(ModelDefinitionError, match="did you mean on_unauthorized_update"):
        Typo().apply("*", registry=reg)
    assert len(reg) == 0


def test_typo_in_a_base_class_or_instance_is_rejected(reg: ListenerRegistry) -> None:
    class Base(DAction):
        @staticmethod
        def on_updatd(*args: Any) -> None:
            pass

    class Child(Base):
        pass

    with pytest.raises(ModelDefinitionError, match="on_updatd"):
        Child().apply("*", registry=reg)

    listener = DAction()
    listener.on_remov = lambda object_id: None  # type: ignore[attr-defined]
    with pytest.raises(ModelDefinitionError, match="on_remov"):
        listener.apply("*", registry=reg)


def test_non_callable_on_attribute_is_allowed(reg: ListenerRegistry) -> None:
    class Counter(DAction):
        on_error_count = 0

    Counter().apply("*", registry=reg)
    assert len(reg) == 1


@pytest.mark.parametrize(
    "source",
    [
        "def on_update(self, object_id, field): pass",
        "def on_update(self, object_id, field, old_value, new_value, extra): pass",
        "def on_update(self, **kwargs): pass",
        "def on_delete(self, object_id, field, value, context, extra): pass",
        "def on_remove(self, context, object_id): pass",
        "def on_created(self): pass",
        "on_remove = None",
    ],
)
def test_bad_signature_is_rejected(reg: ListenerRegistry, source: str) -> None:
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    cls = type("Bad", (DAction,), {k: v for k, v in namespace.items() if k.startswith("on_")})
    with pytest.raises(ModelDefinitionError):
        cls().apply("*", registry=reg)
    assert len(reg) == 0


@pytest.mark.parametrize(
    "source",
    [
        "def on_update(self, *args): pass",
        "def on_update(self, *args, context): pass",
        "def on_update(self, a, b, c, d, e=None): pass",
        "def on_update(self, object_id, *rest, **kw): pass",
        "@staticmethod\ndef on_update(object_id, field, old, new): pass",
        "@classmethod\ndef on_remove(cls, object_id, context=None): pass",
    ],
)
def test_good_signatures_are_accepted(reg: ListenerRegistry, source: str) -> None:
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    cls = type("Good", (DAction,), {k: v for k, v in namespace.items() if k.startswith("on_")})
    listener = cls().apply("*", registry=reg)
    update = make_change("update")
    assert [app for app, _ in reg.matching(update.key)] == [listener]
    reg.before([update, make_change("remove")])


def test_non_daction_is_rejected(reg: ListenerRegistry) -> None:
    with pytest.raises(ModelDefinitionError, match="DAction"):
        reg.add(object(), "*")  # type: ignore[arg-type]


def test_bad_pattern_is_rejected_at_apply(reg: ListenerRegistry) -> None:
    with pytest.raises(ConfigurationError, match="placeholder"):
        Recorder().apply("Person:[oid]", registry=reg)


def test_instance_override_is_called(reg: ListenerRegistry) -> None:
    seen: list[str] = []
    listener = DAction()
    listener.on_created = lambda object_id, key: seen.append(key)  # type: ignore[method-assign]
    listener.apply("*", registry=reg)
    reg.after([make_change("create")])
    assert seen == [OBJ]


# Registration.


def test_registration_order_across_model_and_wildcard_filters(reg: ListenerRegistry) -> None:
    order: list[str] = []

    class Named(DAction):
        def __init__(self, name: str) -> None:
            self.name = name

        def on_update(self, *args: Any) -> None:
            order.append(self.name)

    for name, pattern in [
        ("a", "Person:*"),
        ("b", "*"),
        ("c", "Person:[id]:*"),
        ("d", "[id]:[id]:*"),
        ("e", "Person:[id]:salary"),
        ("f", "*:salary"),
        ("x", "Company:*"),
    ]:
        Named(name).apply(pattern, registry=reg)
    reg.before([make_change("update")])
    assert order == ["a", "b", "c", "d", "e", "f"]


def test_apply_twice_revoke_once(reg: ListenerRegistry) -> None:
    rec = Recorder()
    rec.apply("Person:*", registry=reg)
    rec.apply("Person:*", registry=reg)
    reg.after([make_change("create")])
    assert rec.names == ["on_created", "on_created"]
    rec.revoke("Person:*", registry=reg)
    reg.after([make_change("create")])
    assert rec.names == ["on_created"] * 3
    rec.revoke("Person:*", registry=reg)
    assert len(reg) == 0 and not reg.has_listeners("Person")
    with pytest.raises(ConfigurationError, match="not applied"):
        rec.revoke("Person:*", registry=reg)


def test_one_listener_on_several_filters(reg: ListenerRegistry) -> None:
    rec = Recorder()
    rec.apply("Person:[id]", registry=reg)
    rec.apply("*", registry=reg)
    reg.after([make_change("create")])
    assert rec.names == ["on_created", "on_created"]
    rec.revoke("*", registry=reg)
    reg.after([make_change("create")])
    assert rec.names == ["on_created"] * 3


def test_revoke_needs_the_same_listener(reg: ListenerRegistry) -> None:
    Recorder().apply("*", registry=reg)
    with pytest.raises(ConfigurationError):
        Recorder().revoke("*", registry=reg)
    assert len(reg) == 1


def test_applied_context_manager(reg: ListenerRegistry) -> None:
    rec = Recorder()
    with rec.applied("Person:*", registry=reg) as listener:
        assert listener is rec and len(reg) == 1
        reg.after([make_change("create")])
    assert len(reg) == 0
    with pytest.raises(RuntimeError), rec.applied("Person:*", registry=reg):
        raise RuntimeError
    assert len(reg) == 0
    with rec.applied("Person:*", registry=reg):
        rec.revoke("Person:*", registry=reg)
    assert len(reg) == 0
    assert rec.names == ["on_created"]


def test_strong_references(reg: ListenerRegistry) -> None:
    import gc

    seen: list[str] = []

    class Temp(DAction):
        def on_created(self, object_id: str, key: str) -> None:
            seen.append(object_id)

    Temp().apply("*", registry=reg)
    gc.collect()
    reg.after([make_change("create")])
    assert seen == [OBJ]


def test_len_iter_clear_has_listeners_matching(reg: ListenerRegistry) -> None:
    a, b = Recorder(), Recorder()
    a.apply("Person:*", registry=reg)
    b.apply("Company:[id]", registry=reg)
    a.apply("Company:*", registry=reg)
    assert len(reg) == 3
    assert [(l_, f.pattern) for l_, f in reg] == [
        (a, "Person:*"),
        (b, "Company:[id]"),
        (a, "Company:*"),
    ]
    assert reg.has_listeners("Person") and not reg.has_listeners("Robot")
    assert [(l_, f.pattern) for l_, f in reg.matching("Company:x")] == [
        (b, "Company:[id]"),
        (a, "Company:*"),
    ]
    b.apply("*", registry=reg)
    assert reg.has_listeners("Robot")
    reg.clear()
    assert len(reg) == 0 and list(reg) == [] and not reg.has_listeners("Person")


def test_apply_and_revoke_during_dispatch(reg: ListenerRegistry) -> None:
    late = Recorder()

    class SelfRevoking(DAction):
        def __init__(self) -> None:
            self.count = 0

        def on_update(self, *args: Any) -> None:
            self.count += 1
            self.revoke("*", registry=reg)
            late.apply("*", registry=reg)

    first = SelfRevoking().apply("*", registry=reg)
    other = Recorder().apply("*", registry=reg)
    reg.before([make_change("update")])
    # The running dispatch keeps its snapshot: "other" still runs, "late" not yet.
    assert first.count == 1 and "on_update" in other.names and late.calls == []
    reg.before([make_change("update")])
    assert first.count == 1 and late.names == ["on_update", "on_authorized_update"]


def test_registry_uses_the_given_lock() -> None:
    entered: list[str] = []

    class Lock:
        def __enter__(self) -> None:
            entered.append("enter")

        def __exit__(self, *exc: object) -> None:
            entered.append("exit")

    reg = ListenerRegistry(lock=Lock())
    rec = Recorder().apply("*", registry=reg)
    rec.revoke("*", registry=reg)
    reg.clear()
    assert entered == ["enter", "exit"] * 3


# Choosing the registry.


def test_node_keyword_uses_node_listeners(reg: ListenerRegistry) -> None:
    node = types.SimpleNamespace(listeners=reg)
    rec = Recorder().apply("*", node=node)
    assert len(reg) == 1
    with rec.applied("Person:*", node=node):
        assert len(reg) == 2
    rec.revoke("*", node=node)
    assert len(reg) == 0
    with pytest.raises(ConfigurationError, match="not both"):
        rec.apply("*", registry=reg, node=node)


def _install_node_module(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType) -> None:
    monkeypatch.setitem(sys.modules, "dmodel.node", module)
    monkeypatch.setattr(dmodel, "node", module, raising=False)


def test_default_node_is_looked_up_late(
    monkeypatch: pytest.MonkeyPatch, reg: ListenerRegistry
) -> None:
    module = types.ModuleType("dmodel.node")
    module.default_node = lambda: types.SimpleNamespace(listeners=reg)  # type: ignore[attr-defined]
    _install_node_module(monkeypatch, module)
    rec = Recorder().apply("*")
    assert list(reg) == [(rec, filters.compile("*"))]
    rec.revoke("*")
    assert len(reg) == 0


def test_no_default_node(monkeypatch: pytest.MonkeyPatch) -> None:
    _install_node_module(monkeypatch, types.ModuleType("dmodel.node"))
    with pytest.raises(NodeNotRunningError, match=r"dmodel.launch\(\)"):
        Recorder().apply("*")


# The model index gives the same answers as scanning every application.

MODELS = ["Person", "Company", "Robot"]
PATTERNS = [
    "*",
    "Person:*",
    "Person:[id]",
    "Person:[id]:*",
    "Person:[id]:salary",
    "Company:[id]",
    "Company:*",
    "[id]:[id]",
    "[id]:[id]:*",
    "*:salary",
    "Robot:x:name",
    "Per*",
]

operations = st.lists(
    st.tuples(st.booleans(), st.integers(0, 2), st.sampled_from(PATTERNS)), max_size=30
)
changes = st.lists(
    st.builds(
        make_change,
        kind=st.sampled_from(["create", "update", "delete", "remove"]),
        authorized=st.booleans(),
        owned=st.booleans(),
        object_id=st.sampled_from(MODELS).map(lambda m: f"{m}:x"),
        field=st.sampled_from(["name", "salary", "tags:color"]),
    ),
    max_size=6,
)


@given(operations, changes)
def test_index_agrees_with_linear_scan(
    ops: list[tuple[bool, int, str]], batch: list[Change]
) -> None:
    reg = ListenerRegistry()

    class Tagged(Recorder):
        def __init__(self, tag: int) -> None:
            super().__init__()
            self.tag = tag

    listeners = [Tagged(i) for i in range(3)]
    applied: list[tuple[Tagged, filters.Filter]] = []
    for is_apply, which, pattern in ops:
        listener = listeners[which]
        if is_apply:
            listener.apply(pattern, registry=reg)
            applied.append((listener, filters.compile(pattern)))
        else:
            for i in range(len(applied) - 1, -1, -1):
                if applied[i][0] is listener and applied[i][1].pattern == pattern:
                    del applied[i]
                    listener.revoke(pattern, registry=reg)
                    break

    assert list(reg) == applied
    for change in batch:
        expected = [(lst, flt) for lst, flt in applied if flt.match(change.key)]
        assert reg.matching(change.key) == expected
        assert reg.has_listeners(change.model) or not expected

        for lst in listeners:
            lst.calls.clear()
        reg.after([change])
        got = [(lst.tag, name) for lst in listeners for name in lst.names]
        names = AFTER_NAMES[change.kind, change.context.authorized, change.context.owned]
        want = [(lst.tag, name) for lst, _ in expected for name in names]
        assert sorted(got) == sorted(want)


AFTER_NAMES = {(kind, auth, owned): names for kind, auth, owned, names in AFTER_TABLE}


@given(operations, changes)
def test_dispatch_order_agrees_with_linear_scan(
    ops: list[tuple[bool, int, str]], batch: list[Change]
) -> None:
    reg = ListenerRegistry()
    order: list[tuple[int, str, str]] = []

    class Ordered(DAction):
        def __init__(self, tag: int) -> None:
            self.tag = tag

        def on_update(self, object_id: str, field: str, *rest: Any) -> None:
            order.append((self.tag, object_id, field))

    listeners = [Ordered(i) for i in range(3)]
    applied: list[tuple[Ordered, filters.Filter]] = []
    for is_apply, which, pattern in ops:
        if is_apply:
            listeners[which].apply(pattern, registry=reg)
            applied.append((listeners[which], filters.compile(pattern)))
    reg.before(batch)
    expected = [
        (lst.tag, c.object_id, c.field)
        for c in batch
        if c.kind == "update"
        for lst, flt in applied
        if flt.match(c.key)
    ]
    assert order == expected


def test_truthiness_tracks_applications(reg: ListenerRegistry) -> None:
    assert not reg
    rec = Recorder().apply("Person:*", registry=reg)
    assert reg
    rec.revoke("Person:*", registry=reg)
    assert not reg
    rec.apply("*", registry=reg)
    assert reg


def test_field_filters_are_indexed_and_dispatch_like_a_linear_scan() -> None:
    """``Model:[id]:field`` filters sit in a per-field index: a change of another field of
    the same model does not look at them, and results equal a scan of every filter."""
    reg = ListenerRegistry()

    class Seen(DAction):
        def __init__(self) -> None:
            self.fields: list[str] = []

        def on_update(self, object_id, field, old_value, new_value):
            self.fields.append(field)

    listeners = []
    for i in range(200):
        listener = Seen()
        listener.apply(f"Person:[id]:field{i}", registry=reg)
        listeners.append(listener)
    broad = Seen().apply("Person:[id]:*", registry=reg)
    exact = Seen().apply("Person:abc:field7", registry=reg)
    assert reg.wants("Person", "field3") and reg.wants("Person", "other")  # broad filter
    reg.remove(broad, "Person:[id]:*")
    assert reg.wants("Person", "field3") and not reg.wants("Person", "other")
    assert not reg.wants("Person", None) and not reg.wants("Car", "field3")
    assert reg.has_listeners("Person") and not reg.has_listeners("Car")
    for key in ("Person:abc:field7", "Person:abc:field7:x", "Person:abc:other", "Person:abc"):
        linear = [(app_listener, flt) for app_listener, flt in reg if flt.match(key)]
        assert reg.matching(key) == linear
    ctx = Context("Person:abc", True, True, True, 1, "00", True, "00")
    reg.before([Change("update", "Person:abc", "Person:abc:field7", "field7", 1, 2,
                       context=ctx)])
    assert listeners[7].fields == ["field7"] and exact.fields == ["field7"]
    assert all(not listener.fields for i, listener in enumerate(listeners) if i != 7)
    assert broad.fields == []
    reg.remove(exact, "Person:abc:field7")
    assert [flt.pattern for _, flt in reg if flt.pattern.startswith("Person:abc")] == []
