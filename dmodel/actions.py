"""Listeners: the DAction base class, change events and the per-node registry.

The node turns every applied (or vetoable) update into :class:`Change` events and
hands them to its :class:`ListenerRegistry`:

* ``registry.before(changes)`` runs the before-callbacks (``on_create``,
  ``on_update*``, ``on_delete*``, ``on_remove*``). The first exception raised is a
  veto: dispatch stops and :class:`~dmodel.errors.VetoedError` is raised from it.
* ``registry.after(changes)`` runs the after-callbacks (``on_created``,
  ``on_owned_created``, ``*_updated``, ``*_deleted``) once the change is committed.
  Their exceptions are logged and returned, never raised.
* ``registry.observe_rejected(changes)`` shows changes the policy rejected as
  unauthorized to ``on_unauthorized_update/_delete/_remove`` (observation only).

Dispatch order is deterministic: changes in the order given, then applications in
registration order, then callbacks in the fixed order of :data:`BEFORE_CALLBACKS` /
:data:`AFTER_CALLBACKS`. Pure: no threads, no I/O besides logging.
"""

from __future__ import annotations

import dataclasses
import difflib
import heapq
import inspect
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Final

from dmodel import filters
from dmodel.errors import (
    ConfigurationError,
    ModelDefinitionError,
    VetoedError,
)
from dmodel.filters import Filter
from dmodel.host import default_host

__all__ = [
    "AFTER_CALLBACKS",
    "BEFORE_CALLBACKS",
    "CALLBACKS",
    "KINDS",
    "Change",
    "Context",
    "DAction",
    "ListenerRegistry",
]

logger = logging.getLogger(__name__)

KINDS: Final = ("create", "update", "delete", "remove")

BEFORE_CALLBACKS: Final = (
    "on_create",
    "on_update",
    "on_authorized_update",
    "on_unauthorized_update",
    "on_owned_update",
    "on_delete",
    "on_authorized_delete",
    "on_unauthorized_delete",
    "on_owned_delete",
    "on_remove",
    "on_authorized_remove",
    "on_unauthorized_remove",
    "on_owned_remove",
)
AFTER_CALLBACKS: Final = (
    "on_created",
    "on_owned_created",
    "on_updated",
    "on_authorized_updated",
    "on_unauthorized_updated",
    "on_owned_updated",
    "on_deleted",
    "on_authorized_deleted",
    "on_unauthorized_deleted",
    "on_owned_deleted",
)
CALLBACKS: Final = BEFORE_CALLBACKS + AFTER_CALLBACKS
"""The 23 PyDinemic callback names."""


@dataclass(frozen=True, slots=True)
class Context:
    """Who made a change and how the node judged it; passed to callbacks that ask."""

    caller_id: str
    """db_id of the object whose key signed the update."""
    verified: bool
    """The signature was verified (always True for applied updates)."""
    authorized: bool
    """The caller is the object itself or was update-authorized as of ``timestamp``."""
    owned: bool
    """This node holds the object's private keys."""
    timestamp: int
    """Hybrid-logical-clock timestamp of the update."""
    update_id: str
    """Hex of the update id."""
    local: bool
    """The update was made on this node."""
    node_id: str
    """Hex id of the node that signed the update."""
    verdict: str = "accepted"
    """``"accepted"``, or ``"unauthorized"`` for a change the policy rejected and that
    is shown to ``on_unauthorized_*`` for observation only."""
    equivocation: bool = False
    """The caller signed conflicting updates (a forked hash chain)."""
    encrypted: bool = False
    """The field is encrypted: the values passed were decrypted with this node's keys
    (or are ``EncryptedValue`` placeholders). Ready-made listeners that log or export
    values redact them."""


@dataclass(frozen=True, slots=True)
class Change:
    """One change of one key, as listeners see it.

    ``kind`` is ``create``/``remove`` (``key == object_id``, ``field is None``) or
    ``update``/``delete`` (``key`` is ``object_id:field``; for a DDict entry
    ``field`` is ``"field:dictkey"``). A delete carries the deleted value in
    ``old_value``.
    """

    kind: str
    object_id: str
    key: str
    field: str | None
    old_value: Any = None
    new_value: Any = None
    context: Context = dataclasses.field(kw_only=True)  # `field` is the attribute here

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Change kind must be one of {KINDS}, not {self.kind!r}")

    @property
    def model(self) -> str:
        """The model name: the text of ``object_id`` before the first colon."""
        return self.object_id.partition(":")[0]


class DAction:
    """Base class for listeners; override any of the 23 PyDinemic callbacks.

    Apply an instance to an id pattern (see :mod:`dmodel.filters`)::

        class NoRaises(DAction):
            def on_unauthorized_update(self, object_id, field, old_value, new_value):
                raise PermissionError(f"{field} is not yours")

        NoRaises().apply("Person:[id]:*")

    Callbacks get PyDinemic's positional arguments. A callback that also declares
    a parameter named ``context`` receives the :class:`Context` as that keyword.
    ``self.context`` is set to the same Context just before each call; it is
    per-call state, so when one instance is dispatched from several threads (say,
    applied on two nodes) read the ``context`` parameter instead.

    Before-callbacks (``on_create``, ``on_update*``, ``on_delete*``, ``on_remove*``)
    veto a change by raising; the first raise wins, later before-callbacks don't run,
    and a local writer gets :class:`~dmodel.errors.VetoedError` whose ``__cause__`` is
    the raised exception (a remote update is dropped as vetoed). They run before
    anything is stored, once per update and node (an update fetched again after a
    restart is decided again), so keep them free of side effects, and decide from the
    change and its context only, so every peer decides alike.
    After-callbacks run once the change is committed; their exceptions are logged
    and counted, never propagated. All callbacks run synchronously on the thread
    that applies the update.

    Callbacks are checked when the listener is applied: a method whose name starts
    with ``on_`` but is not a callback (``on_unauthorised_update``), or a callback
    that cannot take its arguments, raises ModelDefinitionError. Registries hold
    strong references, so ``MyListener().apply(...)`` on a temporary keeps working.
    """

    context: Context | None = None

    # Before-callbacks: raise to veto.
    def on_create(self, object_id: str, key: str) -> None:
        """Before an object is created (``key`` is its db_id)."""

    def on_update(self, object_id: str, field: str, old_value: Any, new_value: Any) -> None:
        """Before a field is set."""

    def on_authorized_update(
        self, object_id: str, field: str, old_value: Any, new_value: Any
    ) -> None:
        """Before a field is set by an authorized caller."""

    def on_unauthorized_update(
        self, object_id: str, field: str, old_value: Any, new_value: Any
    ) -> None:
        """Before a field is set by an unauthorized caller (raise to keep it out)."""

    def on_owned_update(self, object_id: str, field: str, old_value: Any, new_value: Any) -> None:
        """Before a field of an object owned by this node is set."""

    def on_delete(self, object_id: str, field: str, value: Any) -> None:
        """Before a field is deleted (``value`` is its current value)."""

    def on_authorized_delete(self, object_id: str, field: str, value: Any) -> None:
        """Before a field is deleted by an authorized caller."""

    def on_unauthorized_delete(self, object_id: str, field: str, value: Any) -> None:
        """Before a field is deleted by an unauthorized caller."""

    def on_owned_delete(self, object_id: str, field: str, value: Any) -> None:
        """Before a field of an owned object is deleted."""

    def on_remove(self, object_id: str) -> None:
        """Before an object is removed (removal is final)."""

    def on_authorized_remove(self, object_id: str) -> None:
        """Before an object is removed by an authorized caller."""

    def on_unauthorized_remove(self, object_id: str) -> None:
        """Before an object is removed by an unauthorized caller."""

    def on_owned_remove(self, object_id: str) -> None:
        """Before an object owned by this node is removed."""

    # After-callbacks: the change is committed; exceptions are only logged.
    def on_created(self, object_id: str, key: str) -> None:
        """After an object was created."""

    def on_owned_created(self, object_id: str, key: str) -> None:
        """After an object owned by this node was created."""

    def on_updated(self, object_id: str, field: str, old_value: Any, new_value: Any) -> None:
        """After a field was set."""

    def on_authorized_updated(
        self, object_id: str, field: str, old_value: Any, new_value: Any
    ) -> None:
        """After a field was set by an authorized caller."""

    def on_unauthorized_updated(
        self, object_id: str, field: str, old_value: Any, new_value: Any
    ) -> None:
        """After a field was set by an unauthorized caller (policy left it to listeners)."""

    def on_owned_updated(
        self, object_id: str, field: str, old_value: Any, new_value: Any
    ) -> None:
        """After a field of an owned object was set."""

    def on_deleted(self, object_id: str, field: str, value: Any) -> None:
        """After a field was deleted."""

    def on_authorized_deleted(self, object_id: str, field: str, value: Any) -> None:
        """After a field was deleted by an authorized caller."""

    def on_unauthorized_deleted(self, object_id: str, field: str, value: Any) -> None:
        """After a field was deleted by an unauthorized caller."""

    def on_owned_deleted(self, object_id: str, field: str, value: Any) -> None:
        """After a field of an owned object was deleted."""

    # Applying.
    def apply(
        self,
        filter: str | Filter,
        registry: ListenerRegistry | None = None,
        *,
        node: Any = None,
    ) -> DAction:
        """Start listening to keys matching ``filter``; returns self.

        The listener goes into ``registry``, or ``node.listeners``, or the default
        node's registry (NodeNotRunningError if none was launched). Applying the same
        filter twice makes every matching callback run twice.
        """
        _pick_registry(registry, node).add(self, filter)
        return self

    def revoke(
        self,
        filter: str | Filter,
        registry: ListenerRegistry | None = None,
        *,
        node: Any = None,
    ) -> None:
        """Undo one :meth:`apply` of ``filter`` (ConfigurationError if there is none)."""
        _pick_registry(registry, node).remove(self, filter)

    @contextmanager
    def applied(
        self,
        filter: str | Filter,
        registry: ListenerRegistry | None = None,
        *,
        node: Any = None,
    ) -> Iterator[DAction]:
        """Apply for the duration of a ``with`` block, then revoke."""
        target = _pick_registry(registry, node)
        target.add(self, filter)
        try:
            yield self
        finally:
            target.discard(self, filter)


_NOOPS: Final = {name: getattr(DAction, name) for name in CALLBACKS}

# Positional arguments each callback family receives.
_ARITY: Final = {
    **dict.fromkeys(("on_create", "on_created", "on_owned_created"), ("object_id", "key")),
    **{n: ("object_id", "field", "old_value", "new_value") for n in CALLBACKS if "updat" in n},
    **{n: ("object_id", "field", "value") for n in CALLBACKS if "delete" in n},
    **{n: ("object_id",) for n in CALLBACKS if "remove" in n},
}


def _resolve_registry() -> ListenerRegistry:
    """The default node's registry (found through ``dmodel.host``: actions never import
    the node)."""
    return default_host().listeners


def _pick_registry(registry: ListenerRegistry | None, node: Any) -> ListenerRegistry:
    if registry is not None and node is not None:
        raise ConfigurationError("pass registry= or node=, not both")
    if registry is not None:
        return registry
    if node is not None:
        return node.listeners  # type: ignore[no-any-return]
    return _resolve_registry()


@dataclass(frozen=True, slots=True)
class _Callback:
    fn: Callable[..., Any]
    wants_context: bool


@dataclass(frozen=True, slots=True, eq=False)
class _Application:
    listener: DAction
    filter: Filter
    seq: int
    callbacks: dict[str, _Callback]
    has_before: bool
    has_after: bool


def _inspect_listener(listener: DAction) -> dict[str, _Callback]:
    """The callbacks ``listener`` overrides, checked as pluggy checks hook impls."""
    if not isinstance(listener, DAction):
        raise ModelDefinitionError(
            f"listeners must be DAction instances, not {type(listener).__name__}"
        )
    cls_name = type(listener).__name__
    _reject_unknown_callbacks(listener, cls_name)

    found: dict[str, _Callback] = {}
    for name in CALLBACKS:
        attr = getattr(listener, name)
        if getattr(attr, "__func__", attr) is _NOOPS[name]:
            continue
        if not callable(attr):
            raise ModelDefinitionError(f"{cls_name}.{name} is not callable")
        found[name] = _Callback(attr, _check_signature(attr, name, cls_name))
    return found


def _reject_unknown_callbacks(listener: DAction, cls_name: str) -> None:
    namespaces: list[Mapping[str, Any]] = [vars(k) for k in type(listener).__mro__
                                           if k not in (DAction, object)]
    namespaces.append(getattr(listener, "__dict__", {}))
    for namespace in namespaces:
        for name, value in namespace.items():
            if not name.startswith("on_") or name in _NOOPS:
                continue
            if callable(value) or isinstance(value, staticmethod | classmethod):
                close = difflib.get_close_matches(name, CALLBACKS, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ModelDefinitionError(
                    f"{cls_name}.{name} is not a DAction callback{hint}; "
                    f"the callbacks are: {', '.join(CALLBACKS)}"
                )


def _check_signature(fn: Callable[..., Any], name: str, cls_name: str) -> bool:
    """Check ``fn`` takes the PyDinemic arguments; return whether it wants ``context``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False  # builtins without a signature: trust them with the positional args
    param = sig.parameters.get("context")
    wants_context = param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )
    expected = _ARITY[name]
    try:
        if wants_context:
            sig.bind(*expected, context=None)
        else:
            sig.bind(*expected)
    except TypeError as exc:
        wanted = ", ".join(expected)
        raise ModelDefinitionError(
            f"{cls_name}.{name}{sig} cannot be called as {name}({wanted}"
            f"[, context]): {exc}"
        ) from None
    return wants_context


def _warn_if_never_matching(listener: DAction, flt: Filter) -> None:
    """Warn about a filter that names a model or field no class declares: it cannot match
    a change of any model this program defines (a typo, or a lowercase model name)."""
    from dmodel.model import model_class

    model = flt.model
    if model is None:
        return
    who = f"{type(listener).__name__} applied to {flt.pattern!r}"
    cls = model_class(model)
    if cls is None:
        hint = ""
        if model[:1].islower():
            hint = f" (model names are class names, e.g. {model[:1].upper() + model[1:]!r})"
        logger.warning("%s: no model named %r is defined, so it matches nothing of the "
                       "models this program declares%s", who, model, hint)
        return
    field_name = flt.field_name
    if field_name is None:
        return
    declared = {f.name for f in cls._meta.fields.values()}
    base = field_name.partition(":")[0].partition("#")[0]
    if base not in declared:
        logger.warning("%s: %s has no field %r, so it matches nothing (its fields: %s)",
                       who, model, base, ", ".join(sorted(n for n in declared if n)) or "none")


def _family(stem: str) -> tuple[str, str, str, str]:
    return (f"on_{stem}", f"on_authorized_{stem}", f"on_unauthorized_{stem}", f"on_owned_{stem}")


def _table(
    families: dict[str, tuple[str | None, str | None, str | None, str | None]],
) -> dict[tuple[str, bool, bool], tuple[str, ...]]:
    """{(kind, authorized, owned): callback names in call order} from
    {kind: (every, if authorized, if unauthorized, if owned)}."""
    table = {}
    for kind in KINDS:
        every, auth, unauth, own = families.get(kind, (None, None, None, None))
        for authorized in (True, False):
            for owned in (True, False):
                picked = (every, auth if authorized else unauth, own if owned else None)
                table[kind, authorized, owned] = tuple(n for n in picked if n)
    return table


_BEFORE: Final = _table(
    {
        "create": ("on_create", None, None, None),
        "update": _family("update"),
        "delete": _family("delete"),
        "remove": _family("remove"),
    }
)
_AFTER: Final = _table(
    {
        "create": ("on_created", None, None, "on_owned_created"),
        "update": _family("updated"),
        "delete": _family("deleted"),
    }
)
_OBSERVE: Final = {
    "create": (),
    "update": ("on_unauthorized_update",),
    "delete": ("on_unauthorized_delete",),
    "remove": ("on_unauthorized_remove",),
}
_BEFORE_SET: Final = frozenset(BEFORE_CALLBACKS)
_AFTER_SET: Final = frozenset(AFTER_CALLBACKS)


def _args(change: Change) -> tuple[Any, ...]:
    kind = change.kind
    if kind == "update":
        return (change.object_id, change.field, change.old_value, change.new_value)
    if kind == "delete":
        return (change.object_id, change.field, change.old_value)
    if kind == "create":
        return (change.object_id, change.key)
    return (change.object_id,)


def _call(app: _Application, name: str, args: tuple[Any, ...], context: Context) -> None:
    cb = app.callbacks[name]
    app.listener.context = context
    if cb.wants_context:
        cb.fn(*args, context=context)
    else:
        cb.fn(*args)


def _veto_message(change: Change, listener: DAction, name: str, exc: BaseException) -> str:
    what = {
        "create": "creation",
        "update": f"change to {change.field!r}",
        "delete": f"deletion of {change.field!r}",
        "remove": "removal",
    }[change.kind]
    text = str(exc) or type(exc).__name__
    return f"{change.object_id} {what} vetoed by {type(listener).__name__}.{name}: {text}"


def _before_names(change: Change) -> Sequence[str]:
    return _BEFORE[change.kind, change.context.authorized, change.context.owned]


def _after_names(change: Change) -> Sequence[str]:
    if change.kind == "remove":
        return ()
    return _AFTER[change.kind, change.context.authorized, change.context.owned]


def _observe_names(change: Change) -> Sequence[str]:
    return _OBSERVE[change.kind][:1]


class ListenerRegistry:
    """The listeners applied on one node, indexed by model name and field.

    Holds strong references. Dispatch touches only the applications whose filter
    names the change's model (or, for ``Model:<id>:field`` filters, exactly its field)
    plus those whose filter starts with a wildcard, so its cost does not grow with
    listeners on other models or other fields. The lists are replaced, not
    mutated, on add/remove, so a callback may apply or revoke listeners while a
    dispatch is running (the running dispatch keeps the snapshot it started with).

    ``lock`` (for instance the node's apply ``RLock``) serializes add/remove/clear
    when listeners are applied from several threads; it must be reentrant if
    callbacks apply listeners while the lock is held by the dispatching thread.
    """

    def __init__(self, lock: AbstractContextManager[Any] | None = None) -> None:
        self._lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        self._seq = itertools.count()
        self._by_model: dict[str, list[_Application]] = {}
        self._by_field: dict[tuple[str, str], list[_Application]] = {}
        self._wildcard: list[_Application] = []
        self._reported: set[tuple[int, str]] = set()  # (application, callback) that failed

    # Registration.
    def add(self, listener: DAction, pattern: str | Filter) -> None:
        """Apply ``listener`` to ``pattern``.

        Raises ConfigurationError for a bad pattern and ModelDefinitionError for a
        listener with a misnamed or ill-fitting callback.
        """
        flt = filters.compile(pattern)
        callbacks = _inspect_listener(listener)
        _warn_if_never_matching(listener, flt)
        with self._lock:
            app = _Application(
                listener,
                flt,
                next(self._seq),
                callbacks,
                has_before=not _BEFORE_SET.isdisjoint(callbacks),
                has_after=not _AFTER_SET.isdisjoint(callbacks),
            )
            if flt.model is None:
                self._wildcard = [*self._wildcard, app]
            elif flt.field_name is not None:
                key = (flt.model, flt.field_name)
                self._by_field[key] = [*self._by_field.get(key, ()), app]
            else:
                self._by_model[flt.model] = [*self._by_model.get(flt.model, ()), app]

    def remove(self, listener: DAction, pattern: str | Filter) -> None:
        """Undo the latest application of ``listener`` to ``pattern``.

        Raises ConfigurationError if ``listener`` is not applied to ``pattern``.
        """
        if not self.discard(listener, pattern):
            raise ConfigurationError(
                f"{type(listener).__name__} is not applied to {str(pattern)!r}"
            )

    def discard(self, listener: DAction, pattern: str | Filter) -> bool:
        """Like :meth:`remove`, but return False instead of raising."""
        flt = filters.compile(pattern)
        with self._lock:
            if flt.model is None:
                index: dict[Any, list[_Application]] | None = None
                key: Any = None
                apps = self._wildcard
            elif flt.field_name is not None:
                index, key = self._by_field, (flt.model, flt.field_name)
                apps = index.get(key, [])
            else:
                index, key = self._by_model, flt.model
                apps = index.get(key, [])
            for i in range(len(apps) - 1, -1, -1):
                app = apps[i]
                if app.listener is listener and app.filter.pattern == flt.pattern:
                    rest = apps[:i] + apps[i + 1 :]
                    if index is None:
                        self._wildcard = rest
                    elif rest:
                        index[key] = rest
                    else:
                        del index[key]
                    return True
            return False

    def clear(self) -> None:
        """Revoke every listener."""
        with self._lock:
            self._by_model = {}
            self._by_field = {}
            self._wildcard = []

    def __bool__(self) -> bool:
        return bool(self._wildcard) or bool(self._by_model) or bool(self._by_field)

    def __len__(self) -> int:
        return sum(1 for _ in self._all())

    def _all(self) -> Iterator[_Application]:
        return itertools.chain(self._wildcard,
                               itertools.chain.from_iterable(list(self._by_model.values())),
                               itertools.chain.from_iterable(list(self._by_field.values())))

    def __iter__(self) -> Iterator[tuple[DAction, Filter]]:
        """(listener, filter) for every application, in registration order."""
        apps = sorted(self._all(), key=lambda app: app.seq)
        return iter([(app.listener, app.filter) for app in apps])

    def has_listeners(self, model: str) -> bool:
        """True if some applied filter could match a key of ``model``."""
        return (bool(self._wildcard) or model in self._by_model
                or any(m == model for m, _ in self._by_field))

    def wants(self, model: str, field: str | None) -> bool:
        """True if some applied filter could match a change of ``field`` of a ``model``
        object (``field=None``: the object's own key, as creates and removes have)."""
        if self._wildcard or model in self._by_model:
            return True
        return field is not None and (model, field) in self._by_field

    def matching(self, key: str) -> list[tuple[DAction, Filter]]:
        """(listener, filter) applications whose filter matches ``key``, in order."""
        model, _, rest = key.partition(":")
        field = rest.partition(":")[2] or None
        apps = self._candidates(model, field)
        return [(app.listener, app.filter) for app in apps if app.filter.match(key)]

    # Dispatch.
    def before(self, changes: Iterable[Change]) -> None:
        """Run before-callbacks; the first exception raises VetoedError from it."""
        for change, app, name, args in self._due(changes, _before_names, "has_before"):
            try:
                _call(app, name, args, change.context)
            except Exception as exc:
                raise VetoedError(
                    _veto_message(change, app.listener, name, exc),
                    db_id=change.object_id,
                    listener=app.listener,
                    callback=name,
                ) from exc

    def after(self, changes: Iterable[Change]) -> list[tuple[DAction, str, BaseException]]:
        """Run after-callbacks; return (listener, callback name, exception) for failures."""
        errors: list[tuple[DAction, str, BaseException]] = []
        for change, app, name, args in self._due(changes, _after_names, "has_after"):
            try:
                _call(app, name, args, change.context)
            except Exception as exc:
                # The first failure of a callback is an ERROR with its traceback (seen even
                # under set_loglevel('error')); repeats are one WARNING line each.
                first = (app.seq, name) not in self._reported
                self._reported.add((app.seq, name))
                logger.log(logging.ERROR if first else logging.WARNING,
                           "listener %s.%s failed on %s: %s: %s%s", type(app.listener).__name__,
                           name, change.key, type(exc).__name__, exc,
                           "" if first else " (again)", exc_info=exc if first else None)
                errors.append((app.listener, name, exc))
        return errors

    def observe_rejected(self, changes: Iterable[Change]) -> None:
        """Show policy-rejected changes to ``on_unauthorized_*``; exceptions are ignored."""
        for change, app, name, args in self._due(changes, _observe_names, None):
            try:
                _call(app, name, args, change.context)
            except Exception as exc:
                logger.debug("%s.%s raised while observing rejected %s: %s",
                             type(app.listener).__name__, name, change.key, exc, exc_info=exc)

    def _due(self, changes: Iterable[Change], names_for: Callable[[Change], Sequence[str]],
             flag: str | None) -> Iterator[tuple[Change, _Application, str, tuple[Any, ...]]]:
        """Each (change, application, callback name, arguments) to call, in dispatch order:
        changes in order, applications in registration order, callbacks in table order."""
        for change in changes:
            names = names_for(change)
            if not names:
                continue
            apps = self._candidates(change.model, change.field)
            if not apps:
                continue
            args = _args(change)
            key = change.key
            for app in apps:
                if (flag is not None and not getattr(app, flag)) or not app.filter.match(key):
                    continue
                callbacks = app.callbacks
                for name in names:
                    if name in callbacks:
                        yield change, app, name, args

    def _candidates(self, model: str, field: str | None) -> Sequence[_Application]:
        """Applications that may match keys of ``model`` (and ``field``), in registration
        order: those naming the model, those naming exactly this field, and wildcards."""
        groups = [g for g in (self._by_model.get(model),
                              self._by_field.get((model, field)) if field else None,
                              self._wildcard) if g]
        if len(groups) <= 1:
            return groups[0] if groups else ()
        return list(heapq.merge(*groups, key=lambda app: app.seq))
