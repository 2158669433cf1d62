"""Declarative models: DModel, DField, DDict (the PyDinemic surface, plus keyword creation).

    class Person(dmodel.DModel):
        name = dmodel.DField('name', False)
        salary = dmodel.DField('salary', True)      # encrypted
        tags = dmodel.DDict()                        # field name taken from the attribute

    p = Person([])                  # create an owned object (PyDinemic)
    p = Person.create(name='Bob')   # create with initial values, one signed update
    p.name.set('Bob'); p.name.get() # PyDinemic field handles
    p.name = 'Bob'                  # plain assignment does the same
    q = Person(db_id, caller_id)    # an existing object, read and written as caller_id

Declaring a class does no I/O. An instance finds its node through ``node=`` or the
default node started by ``dmodel.launch()``, and talks to it only through the
``dmodel.host.ModelHost`` protocol (never to its store). A model's
``Meta.unauthorized_policy`` is registered with ``dmodel.host`` when the class is
defined; the node reads it from there. Everything runs on the caller's thread.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar, cast, overload

from . import host, merge
from .crypto import EncryptedValue, is_oid
from .errors import (
    ConfigurationError,
    DecryptionError,
    FieldError,
    FieldTypeError,
    FieldValueError,
    MalformedUpdate,
    ModelDefinitionError,
    NodeNotRunningError,
    ObjectNotFoundError,
    OversizedUpdate,
    QueryError,
    UnauthorizedError,
)
from .query import Condition, Order, Query
from .update import (
    _FIELD_NAME,
    LIST_OPS,
    MAX_DICT_KEY,
    MAX_POSITION,
    Op,
    check_value,
    element_id,
    element_register,
)

if TYPE_CHECKING:  # a field's value type; Any where a declaration does not say (PEP 696)
    from typing_extensions import TypeVar as _TypeVarWithDefault

    T = _TypeVarWithDefault("T", default=Any)
else:
    T = TypeVar("T")
_Handle = TypeVar("_Handle")  # what a declaration gives on an instance
_D = TypeVar("_D")
_V = TypeVar("_V")  # a declaration's value type, solved from its ``type=`` argument

logger = logging.getLogger(__name__)

_models: dict[str, type[DModel]] = {}
_tx = threading.local()


def model_class(name: str) -> type[DModel] | None:
    """The DModel subclass registered under ``name`` (the latest definition)."""
    return _models.get(name)


def model_policy(name: str) -> merge.Policy | None:
    """The ``Meta.unauthorized_policy`` of a model, if it sets one."""
    return host.model_policy(name)


def _node(node: host.ModelHost | None) -> host.ModelHost:
    if node is not None:
        return node
    return host.default_host()


def _as_id(value: Any) -> str:
    """A db_id, given as a string or as the object itself (``Person([chief])``)."""
    if isinstance(value, DModel):
        return value.db_id
    if isinstance(value, str):
        return value
    raise FieldTypeError(f"a db_id (str) or a DModel object is expected, not "
                         f"{type(value).__name__}")


def _id_shape(model: str) -> str:
    return (f"a db_id looks like '{model}:' followed by 32 base32 characters (a-z, 2-7), "
            "as obj.get_db_id() prints it")


def check_db_id(db_id: str, model: str | None = None) -> tuple[str, str]:
    """Split a well-formed db_id into (model, oid); ObjectNotFoundError saying what an id
    looks like otherwise (of ``model`` if given)."""
    name, sep, oid = db_id.partition(":")
    shape = _id_shape(model or "Model")
    if not sep and is_oid(db_id):
        raise ObjectNotFoundError(f"{db_id!r} is an object id without its model: {shape} "
                                  f"(did you mean '{model or 'Model'}:{db_id}'?)")
    if not sep or not name.isidentifier() or not is_oid(oid):
        raise ObjectNotFoundError(f"{db_id!r} is not a db_id: {shape}")
    return name, oid


_WAIT = 10.0  # seconds obj.wait() and friends wait by default


class _ModelOptions:
    """Parsed ``class Meta`` of a model."""

    __slots__ = ("name", "fields", "policy")

    def __init__(self, name: str, fields: dict[str, _Declared[Any]], policy: str | None):
        self.name = name
        self.fields = fields
        self.policy: merge.Policy | None = policy  # type: ignore[assignment]


# ------------------------------------------------------------------ fields


class _Declared(Generic[_Handle]):
    """What DField, DDict and DList share: a name (default: the attribute's) and whether
    values are encrypted. Class access gives the declaration, instance access a handle
    bound to the object."""

    def __init__(self, name: str | None = None, encrypted: bool = False) -> None:
        if name is not None and not _FIELD_NAME.fullmatch(name):
            raise ModelDefinitionError(f"bad field name {name!r}: letters, digits, _ (max 64)")
        self.name: str = "" if name is None else name  # "": the attribute's, once bound
        self.encrypted = bool(encrypted)
        self.attr: str | None = None

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr
        if not self.name:
            if not _FIELD_NAME.fullmatch(attr):
                raise ModelDefinitionError(f"attribute {attr!r} cannot be a field name")
            self.name = attr

    @overload
    def __get__(self, obj: None, cls: type | None = None) -> Self: ...
    @overload
    def __get__(self, obj: DModel, cls: type | None = None) -> _Handle: ...
    def __get__(self, obj: DModel | None, cls: type | None = None) -> Self | _Handle:
        if obj is None:
            return self
        return self._bind(obj)

    def _bind(self, obj: DModel) -> _Handle:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}{' encrypted' if self.encrypted else ''}>"


class DField(_Declared["BoundField[T]"], Generic[T]):
    """A field: ``DField('name', encrypted)`` (PyDinemic) or ``DField(encrypted=True, type=int)``.

    ``type`` (a type or tuple of types) is checked on every local ``set``. For type
    checkers, ``DField(type=int)`` holds ``int | None`` (None until set),
    ``DField(type=int, default=0)`` and ``DField[int]()`` hold ``int``, and a field
    declared without a type holds ``Any``.
    ``index=True`` keeps a value index for queries (plain fields only). On the class, a
    field builds query conditions: ``Person.age >= 30``, ``Person.name == 'Bob'``,
    ``-Person.age``.
    """

    @overload
    def __init__(self, name: str | None = None, encrypted: bool = False, *,
                 type: None = None, default: Any = None) -> None: ...
    @overload
    def __init__(self: DField[_V], name: str | None = None, encrypted: bool = False, *,
                 type: type[_V], default: _V) -> None: ...
    @overload
    def __init__(self: DField[_V | None], name: str | None = None, encrypted: bool = False,
                 *, type: type[_V], default: None = None) -> None: ...
    @overload
    def __init__(self, name: str | None = None, encrypted: bool = False, *,
                 type: tuple[type, ...], default: Any = None) -> None: ...
    def __init__(self, name: str | None = None, encrypted: bool = False, *,
                 type: type | tuple[type, ...] | None = None, default: Any = None,
                 index: bool = False) -> None:
        super().__init__(name, encrypted)
        if index and self.encrypted:
            raise ModelDefinitionError(f"field {name or ''!r}: an encrypted field cannot be "
                                       "indexed (its values are sealed)")
        self.type = type
        self.default = default
        self.index = bool(index)

    # Comparing two fields stays a plain identity test (fields in lists and dicts);
    # comparing a field with a value gives a query condition.
    def __eq__(self, other: object) -> Any:
        return self is other if isinstance(other, _Declared) else Condition(self, "==", other)

    def __ne__(self, other: object) -> Any:
        return self is not other if isinstance(other, _Declared) \
            else Condition(self, "!=", other)

    def __lt__(self, other: Any) -> Condition:
        return Condition(self, "<", other)

    def __le__(self, other: Any) -> Condition:
        return Condition(self, "<=", other)

    def __gt__(self, other: Any) -> Condition:
        return Condition(self, ">", other)

    def __ge__(self, other: Any) -> Condition:
        return Condition(self, ">=", other)

    def __neg__(self) -> Order:
        return Order(self, desc=True)

    __hash__ = _Declared.__hash__

    def _bind(self, obj: DModel) -> BoundField[T]:
        return BoundField(obj, self)

    # Declared here, not only inherited: pyright sees a descriptor whose __get__ and
    # __set__ types differ only when both are on one class, and otherwise narrows
    # ``p.age`` to the int just assigned to it.
    @overload
    def __get__(self, obj: None, cls: type | None = None) -> Self: ...
    @overload
    def __get__(self, obj: DModel, cls: type | None = None) -> BoundField[T]: ...
    def __get__(self, obj: DModel | None, cls: type | None = None) -> Self | BoundField[T]:
        return self if obj is None else BoundField(obj, self)

    def __set__(self, obj: DModel, value: T) -> None:
        BoundField(obj, self).set(value)

    def __delete__(self, obj: DModel) -> None:
        BoundField(obj, self).delete()

    def check(self, value: Any) -> None:
        """Raise FieldTypeError/FieldValueError if ``value`` cannot be stored in this field."""
        if self.type is not None and value is not None:
            types = self.type if isinstance(self.type, tuple) else (self.type,)
            ok = isinstance(value, types) and not (
                isinstance(value, bool) and bool not in types and int in types)
            if not ok:
                raise FieldTypeError(f"field {self.name!r} takes {_type_names(types)}, "
                                     f"not {type(value).__name__}")
        _check_value(self.name, value)


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _check_value(name: str | None, value: Any) -> None:
    try:
        check_value(value)
    except OversizedUpdate as exc:
        raise FieldValueError(f"field {name!r}: {exc}") from None
    except MalformedUpdate as exc:
        if "cannot be stored" in str(exc) or "keys in values" in str(exc):
            raise FieldTypeError(f"field {name!r}: {exc}") from None
        raise FieldValueError(f"field {name!r}: {exc}") from None


_ANY = object()  # no value given / none there


class BoundField(Generic[T]):
    """A field of one object: ``get()``, ``set(value)``, ``delete()``."""

    __slots__ = ("obj", "field")

    def __init__(self, obj: DModel, field: DField[T]) -> None:
        self.obj = obj
        self.field = field

    def get(self, default: T | None = None, *, verified: bool = False) -> T:
        """The current value (decrypted as the object's caller if encrypted).

        ``verified=True`` re-checks the value against its signed update first.
        """
        if default is None:
            default = self.field.default
        obj = self.obj
        return cast(T, obj._read(self.field.name, verified=verified, default=default))

    def wait(self, value: object = _ANY, timeout: float = _WAIT) -> T:
        """Block until the field holds a value (equal to ``value`` if given) and return it;
        WaitTimeout (a TimeoutError) after ``timeout`` seconds. An encrypted value this
        caller cannot open raises DecryptionError once it is there (with ``value``, the
        wait goes on: a read grant may come)."""
        obj, name = self.obj, self.field.name
        seen: list[str] = []

        def arrived() -> tuple[T] | None:
            try:
                current = obj._read(name, default=_ANY)
            except DecryptionError as exc:
                if value is _ANY:
                    raise  # it arrived, and this caller cannot read it: as get() says
                seen[:] = [str(exc)]  # a grant may still come
                return None
            if current is _ANY:
                seen[:] = ["no value yet" if obj._node.exists(obj.db_id)
                           else "the object has not arrived"]
                return None
            seen[:] = [f"it is {current!r}"]
            return (current,) if value is _ANY or current == value else None

        what = f"{obj.db_id} {name}" + ("" if value is _ANY else f" = {value!r}")
        try:
            return obj._node.wait(arrived, timeout, what)[0]
        except TimeoutError as exc:
            raise type(exc)(f"{exc} ({seen[0] if seen else 'nothing arrived'})") from None

    def set(self, value: T) -> None:
        """Write a new value: one signed update (or part of the current transaction)."""
        self.field.check(value)
        obj, name = self.obj, self.field.name
        if self.field.encrypted:
            obj._submit(lambda: Op(obj.db_id, "set_enc", name,
                                   obj._node.seal_value(obj.db_id, name, value)))
        else:
            obj._submit(lambda: Op(obj.db_id, "set", name, value))

    def delete(self) -> None:
        """Delete the value (a tombstone: an older write arriving later cannot revive it)."""
        obj, name = self.obj, self.field.name
        obj._submit(lambda: Op(obj.db_id, "del", name))

    @property
    def value(self) -> T:
        return self.get()

    def __repr__(self) -> str:
        return f"<field {self.obj.db_id}:{self.field.name}>"


class DDict(_Declared["BoundDict[T]"], Generic[T]):
    """A last-writer-wins map field: ``p.tags.set('k', v)``, ``p.tags['k']``, ``p.tags.keys()``.

    ``DDict[int]()`` tells type checkers its values are ints (not checked at run time).
    """

    def _bind(self, obj: DModel) -> BoundDict[T]:
        return BoundDict(obj, self)


_MISSING = object()


class BoundDict(Generic[T]):
    """The DDict of one object. Keys are non-empty strings of at most 256 characters."""

    __slots__ = ("obj", "field")

    def __init__(self, obj: DModel, field: DDict[T]) -> None:
        self.obj = obj
        self.field = field

    def _register(self, key: str) -> str:
        if not isinstance(key, str) or not key or len(key) > MAX_DICT_KEY:
            raise FieldValueError("a dict key is a non-empty string of at most 256 characters")
        return f"{self.field.name}:{key}"

    @overload
    def get(self, key: str) -> T | None: ...
    @overload
    def get(self, key: str, default: _D) -> T | _D: ...
    def get(self, key: str, default: object = None) -> object:
        return self.obj._read(self._register(key), default=default)

    def set(self, key: str, value: T) -> None:
        self._register(key)
        _check_value(self.field.name, value)
        obj, name = self.obj, self.field.name
        if self.field.encrypted:
            obj._submit(lambda: Op(obj.db_id, "dset_enc", name,
                                   [key, obj._node.seal_value(obj.db_id, f"{name}:{key}",
                                                              value)]))
        else:
            obj._submit(lambda: Op(obj.db_id, "dset", name, [key, value]))

    def delete(self, key: str) -> None:
        self._register(key)
        obj, name = self.obj, self.field.name
        obj._submit(lambda: Op(obj.db_id, "ddel", name, key))

    # PyDinemic spelling
    def del_(self, key: str) -> None:
        self.delete(key)

    def keys(self) -> list[str]:
        prefix = f"{self.field.name}:"
        return sorted(k[len(prefix):] for k in self.obj._registers() if k.startswith(prefix))

    def items(self) -> list[tuple[str, T | None]]:
        return [(k, self.get(k)) for k in self.keys()]

    def values(self) -> list[T | None]:
        return [v for _, v in self.items()]

    def to_dict(self) -> dict[str, T | None]:
        return dict(self.items())

    def __getitem__(self, key: str) -> T:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return cast(T, value)

    def __setitem__(self, key: str, value: T) -> None:
        self.set(key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self.delete(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key, _MISSING) is not _MISSING

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"<dict field {self.obj.db_id}:{self.field.name}>"


setattr(BoundDict, "del", BoundDict.del_)


class DList(_Declared["BoundList[T]"], Generic[T]):
    """A list field (a sequence CRDT) used like a Python list: ``append``, ``extend``,
    ``insert``, ``pop``, ``remove``, ``clear``, ``index``, ``count``, ``lst[i]``,
    ``lst[a:b]``, ``lst[i] = v``, ``del lst[i]``, ``del lst[a:b]``, ``len``, ``in``,
    iteration (also ``at``, ``set``, ``delete``, ``length``, ``to_list``).

    Indexes refer to the list as this node sees it when called; concurrent inserts at one
    place from several nodes all survive, in the same order on every node. Inside a
    transaction the list reads as the block leaves it (its own inserts, sets and deletes
    show), so a series of changes gives what it gives on a Python list.

    ``DList[str]()`` tells type checkers its values are strs (not checked at run time).
    """

    def _bind(self, obj: DModel) -> BoundList[T]:
        return BoundList(obj, self)


class BoundList(Generic[T]):
    """The DList of one object."""

    __slots__ = ("obj", "field")

    def __init__(self, obj: DModel, field: DList[T]) -> None:
        self.obj = obj
        self.field = field

    def _view(self) -> _ListView:
        return _ListView(self.obj, self.field.name)

    def length(self) -> int:
        return len(self._view())

    __len__ = length

    def _key(self, view: _ListView, index: int, message: str = "list index out of range"
             ) -> bytes:
        """The order key of the element at ``index`` (negative: from the end)."""
        if not isinstance(index, int) or isinstance(index, bool):
            raise FieldTypeError("list indexes are integers")
        n = len(view)
        if index < 0:
            index += n
        keys = view.keys(index, index) if 0 <= index < n else []
        if not keys:
            raise IndexError(message)
        return keys[0]

    def at(self, index: int) -> T:
        """The value at ``index``."""
        view = self._view()
        return cast(T, view.value(self._key(view, index)))  # a stored (msgpack) value

    def __getitem__(self, index: int | slice) -> Any:
        """``lst[i]``, or a Python list for ``lst[a:b:step]``."""
        if isinstance(index, slice):
            view = self._view()
            return [view.value(key) for key in view.keys()[index]]
        return self.at(index)

    def __iter__(self) -> Iterator[Any]:
        view = self._view()
        return iter([view.value(key) for key in view.keys()])

    def to_list(self) -> list[T]:
        return list(self)

    def index(self, value: Any, start: int = 0, stop: int = sys.maxsize) -> int:
        """Position of the first element equal to ``value`` in ``[start:stop]`` (ValueError
        if none)."""
        try:
            return self.to_list().index(value, start, stop)
        except ValueError:
            raise ValueError(f"{value!r} is not in the list") from None

    def count(self, value: Any) -> int:
        """How many elements equal ``value``."""
        return self.to_list().count(value)

    def __contains__(self, value: object) -> bool:
        return value in self.to_list()

    def _op(self, kind: str, first: bytes, value: T) -> Op:
        obj = self.obj
        if self.field.encrypted:
            return Op(obj.db_id, f"{kind}_enc", self.field.name,
                      [first, obj._node.seal_value(obj.db_id, f"{self.field.name}#", value)])
        return Op(obj.db_id, kind, self.field.name, [first, value])

    def _submit(self, build: Callable[[], Op], value: Any = None) -> None:
        """Submit the op ``build`` makes; an open transaction keeps ``value`` for its reads."""
        obj = self.obj

        def build_and_keep() -> Op:
            op = build()
            tx = _open_transaction(obj)
            if tx is not None:
                tx.list_values[id(op)] = value
            return op

        obj._submit(build_and_keep)

    def _together(self, count: int) -> contextlib.AbstractContextManager[Any]:
        """One signed update for ``count`` changes (one transaction if there are several;
        an anonymous handle's first change raises UnauthorizedError as any would)."""
        if count > 1 and self.obj._caller:
            return self.obj.transaction()
        return contextlib.nullcontext()

    def insert(self, index: int, value: Any) -> None:
        """Insert ``value`` before position ``index``, as ``list.insert`` does (at the end if
        ``index >= len``, at the start if ``index < -len``)."""
        _check_value(self.field.name, value)
        if not isinstance(index, int) or isinstance(index, bool):
            raise FieldTypeError("list indexes are integers")

        def build() -> Op:
            view = self._view()
            return self._op("lins", _new_position(view, *_neighbours(view, index)), value)

        self._submit(build, value)

    def append(self, value: T) -> None:
        """Add ``value`` at the end."""
        self.insert(_END, value)

    def extend(self, values: Iterable[Any]) -> None:
        """Append every value, in one signed update."""
        items = list(values)
        for item in items:
            _check_value(self.field.name, item)
        with self._together(len(items)):
            for item in items:
                self.append(item)

    def set(self, index: int, value: Any) -> None:
        """Replace the value at ``index`` (last writer wins)."""
        _check_value(self.field.name, value)
        view = self._view()
        key = self._key(view, index)
        inserted = view.inserts.get(key)
        if inserted is not None:  # inserted by the open transaction: insert the new value
            view.replace(inserted, self._op("lins", inserted.value[0], value), value)
            return
        self._submit(lambda: self._op("lset", key[-_ID:], value), value)

    __setitem__ = set

    def _remove(self, view: _ListView, keys: list[bytes]) -> None:
        """Delete the elements of these order keys, in one signed update."""
        obj, name = self.obj, self.field.name
        with self._together(len(keys)):
            for key in keys:
                inserted = view.inserts.get(key)
                if inserted is not None:
                    view.replace(inserted, None, None)
                else:
                    obj._submit(functools.partial(Op, obj.db_id, "ldel", name, key[-_ID:]))

    def delete(self, index: int) -> None:
        """Remove the element at ``index`` (final: a concurrent set does not bring it back)."""
        view = self._view()
        self._remove(view, [self._key(view, index)])

    def __delitem__(self, index: int | slice) -> None:
        """``del lst[i]``, or ``del lst[a:b:step]`` in one signed update."""
        if not isinstance(index, slice):
            self.delete(index)
            return
        view = self._view()
        self._remove(view, view.keys()[index])

    def pop(self, index: int = -1) -> Any:
        """Remove the element at ``index`` (default: the last) and return its value."""
        view = self._view()
        if not len(view):
            raise IndexError("pop from empty list")
        key = self._key(view, index, "pop index out of range")
        value = view.value(key)
        self._remove(view, [key])
        return value

    def remove(self, value: Any) -> None:
        """Remove the first element equal to ``value`` (ValueError if none)."""
        view = self._view()
        for key in view.keys():
            if view.value(key) == value:
                self._remove(view, [key])
                return
        raise ValueError(f"{value!r} is not in the list")

    def clear(self) -> None:
        """Remove every element, in one signed update."""
        del self[:]

    def __repr__(self) -> str:
        return f"<list field {self.obj.db_id}:{self.field.name}>"


_END = 1 << 62  # an insert index past any list: append
_ID = 34  # bytes of an element id, the tail of an order key (position + 0x00 + id)
_NEW = bytes(32)  # the update id the open transaction's own inserts have in a _ListView
_UNIQUE_DIGITS = 4  # random digits ending each new position (see _new_position)


def _open_transaction(obj: DModel) -> _Transaction | None:
    tx: _Transaction | None = getattr(_tx, "current", None)
    return tx if tx is not None and tx.node is obj._node else None


class _ListView:
    """One DList as indexes address it: order keys in list order, and their values.

    Outside a transaction that is the stored list. Inside one it is the stored list with
    the block's own changes applied: its inserts (with element ids ``element_id(_NEW,
    op number)``, as they have none before signing), sets and deletes.
    """

    __slots__ = ("obj", "name", "tx", "sorted_keys", "inserts", "values")

    def __init__(self, obj: DModel, name: str) -> None:
        self.obj, self.name = obj, name
        self.tx = _open_transaction(obj)
        self.sorted_keys: list[bytes] | None = None  # None: read the stored list
        self.inserts: dict[bytes, Op] = {}  # order key -> the block's op inserting it
        self.values: dict[bytes, Any] = {}  # element id -> value the block gave it
        ops = [(i, op) for i, op in enumerate(self.tx.ops if self.tx else ())
               if op.obj == obj.db_id and op.field == name and op.op in LIST_OPS]
        if not ops:
            return
        assert self.tx is not None
        keys = {key[-_ID:]: key for key in obj._node.list_keys_range(obj.db_id, name, 0, -1)}
        for i, op in ops:
            if op.op.startswith("lins"):
                ref = element_id(_NEW, i & 0xFFFF)
                keys[ref] = op.value[0] + b"\0" + ref
                self.inserts[keys[ref]] = op
            elif op.op == "ldel":
                keys.pop(op.value, None)
                continue
            else:
                ref = op.value[0]
            self.values[ref] = self.tx.list_values.get(id(op), op.value[1])
        self.sorted_keys = sorted(keys.values())

    def __len__(self) -> int:
        if self.sorted_keys is None:
            return self.obj._node.list_length(self.obj.db_id, self.name)
        return len(self.sorted_keys)

    def keys(self, start: int = 0, stop: int = -1) -> list[bytes]:
        """Order keys ``start``..``stop``, both included (negative: from the end)."""
        if self.sorted_keys is None:
            return self.obj._node.list_keys_range(self.obj.db_id, self.name, start, stop)
        n = len(self.sorted_keys)
        start, stop = max(start + n if start < 0 else start, 0), stop + n if stop < 0 else stop
        return self.sorted_keys[start:stop + 1]

    def key_below(self, position: bytes) -> bytes | None:
        """The order key of the last element whose position is below ``position``."""
        if self.sorted_keys is None:
            return self.obj._node.list_key_below(self.obj.db_id, self.name, position)
        i = bisect.bisect_left(self.sorted_keys, position + b"\0")
        return self.sorted_keys[i - 1] if i else None

    def value(self, key: bytes) -> Any:
        ref = key[-_ID:]
        if ref in self.values:
            return self.values[ref]
        return self.obj._read(element_register(self.name, ref))

    def replace(self, op: Op, new: Op | None, value: Any) -> None:
        """Put ``new`` in the open transaction in place of ``op`` (None: drop ``op``)."""
        assert self.tx is not None
        ops = self.tx.ops
        at = next(i for i, candidate in enumerate(ops) if candidate is op)
        if new is None:
            del ops[at]
        else:
            ops[at] = new
            self.tx.list_values[id(new)] = value

    def inserted_later(self, key: bytes) -> tuple[bool, bytes]:
        """Sorts elements by when they were last written (the block's own last of all)."""
        if key in self.inserts:
            return True, b""
        reg = self.obj._node.raw_register(self.obj.db_id, element_register(self.name, key[-_ID:]))
        return False, reg.version if reg is not None else b""


def _neighbours(view: _ListView, index: int) -> tuple[bytes | None, bytes | None]:
    """Order keys of the elements a new one inserted at ``index`` goes between."""
    n = len(view)
    index = max(0, n + index) if index < 0 else min(index, n)
    if index == 0:
        first = view.keys(0, 0)
        return None, (first[0] if first else None)
    keys = view.keys(index - 1, index)
    if not keys:  # the list shrank meanwhile: append after the last element
        last = view.keys(-1, -1)
        return (last[0] if last else None), None
    return keys[0], (keys[1] if len(keys) > 1 else None)


def _position(key: bytes | None) -> bytes:
    return key[:-_ID - 1] if key else b""


def _new_position(view: _ListView, low: bytes | None, high: bytes | None) -> bytes:
    """A position for an element between order keys ``low`` and ``high`` (None: an end).

    It ends in digits drawn from this node's id and the place (a hash: reproducible, and
    different on each node): two nodes inserting at one place at once (two appends, say)
    pick different positions, so a later insert between those two elements has room and
    lands at its index. Two elements can still share a position if an older or hostile
    writer gave them one; nothing fits between those, so the new element goes just before
    the pair.
    """
    low_pos, high_pos = _position(low), (_position(high) if high else None)
    if high_pos is not None and low_pos == high_pos:
        low = view.key_below(high_pos)
        low_pos = _position(low)
    toward = _toward(view, low, high)
    try:
        position = merge.between(low_pos, high_pos, toward)
    except ValueError as exc:  # pragma: no cover - the cases above leave room
        raise FieldValueError(f"list {view.name!r}: {exc}") from None
    seed = hashlib.blake2b(b"\0".join([view.obj._node.node_id, view.obj._caller.encode(),
                                        view.obj.db_id.encode(), view.name.encode(),
                                        position, low or b"", high or b""]),
                           digest_size=_UNIQUE_DIGITS).digest()
    position += bytes(2 + digit % 254 for digit in seed)
    if len(position) > MAX_POSITION:
        raise FieldValueError(f"list {view.name!r}: no room left between these elements")
    return position


def _toward(view: _ListView, low: bytes | None, high: bytes | None) -> str | None:
    """Which neighbour was inserted last: new positions hug it (see merge.between)."""
    if low is None or high is None:
        return None
    return "low" if view.inserted_later(low) > view.inserted_later(high) else "high"


# ------------------------------------------------------------------ models


class _Transaction:
    """Operations collected by ``with obj.transaction():``, signed as one update on exit."""

    def __init__(self, node: host.ModelHost, caller: str) -> None:
        self.node = node
        self.caller = caller
        self.ops: list[Op] = []
        self.list_values: dict[int, Any] = {}  # id(DList op) -> its plain value (_ListView)


class DModel:
    """Base class of models. The model name is the class name.

    ``Person([])`` or ``Person([chief_id, ...])`` creates an owned object (the listed
    objects may read its encrypted fields and update it); ``Person(db_id, caller_id)``
    opens an existing one, read and written as ``caller_id`` (``''``: anonymous reader;
    default: the object itself).
    """

    _meta: ClassVar[_ModelOptions]
    DoesNotExist: ClassVar[type[ObjectNotFoundError]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__name__
        if not name.isidentifier() or len(name) > 64:
            raise ModelDefinitionError(f"model name {name!r} must be an identifier (max 64)")
        fields: dict[str, _Declared[Any]] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                if isinstance(value, _Declared):
                    fields[attr] = value
        names = [f.name for f in fields.values()]
        if len(set(names)) != len(names):
            raise ModelDefinitionError(f"model {name}: two fields share a name")
        meta = getattr(cls, "Meta", None)
        policy = getattr(meta, "unauthorized_policy", None)
        if policy is not None and policy not in merge.POLICIES:
            raise ModelDefinitionError(f"model {name}: Meta.unauthorized_policy must be "
                                       f"'reject' or 'listeners', not {policy!r}")
        cls._meta = _ModelOptions(name, fields, policy)
        cls.DoesNotExist = type("DoesNotExist", (ObjectNotFoundError,),
                                {"__module__": cls.__module__,
                                 "__qualname__": f"{cls.__qualname__}.DoesNotExist"})
        if name in _models and _models[name] is not cls:
            logger.debug("model %s redefined; the latest definition is used", name)
        _models[name] = cls
        host.register_model_policy(name, cls._meta.policy)

    def __init__(self, authorized_or_id: Iterable[str | DModel] | str | None = None,
                 caller_id: str | DModel | None = None, *,
                 node: host.ModelHost | None = None) -> None:
        self._host_node = _node(node)
        caller = None if caller_id is None else _as_id(caller_id)
        if isinstance(authorized_or_id, str):
            self._open(authorized_or_id, caller)
        else:
            if isinstance(authorized_or_id, DModel):
                raise FieldTypeError(f"{self._meta.name}({authorized_or_id!r}): to open an "
                                     f"object pass its db_id; to create one authorizing it, "
                                     f"pass a list: {self._meta.name}([...])")
            authorized = [_as_id(a) for a in authorized_or_id or ()]
            db_id = self._node.create(self._meta.name, read=authorized, update=authorized)
            self._bind(db_id, caller if caller is not None else db_id)

    def _open(self, db_id: str, caller_id: str | None) -> None:
        """A handle on ``db_id``, arrived here or not (reads give defaults until it does);
        DoesNotExist for a malformed id, one of another model, or one removed here."""
        try:
            model, _ = check_db_id(db_id, self._meta.name)
        except ObjectNotFoundError as exc:
            raise self.DoesNotExist(str(exc)) from None
        if model != self._meta.name:
            raise self.DoesNotExist(f"{db_id} is not a {self._meta.name} (its model is {model})")
        if self._node.object_state(db_id) == "removed":
            raise self.DoesNotExist(self._removed_message(db_id))
        self._bind(db_id, db_id if caller_id is None else caller_id)

    @staticmethod
    def _removed_message(db_id: str) -> str:
        return f"{db_id} was removed on this node (removal is final)"

    def _bind(self, db_id: str, caller: str) -> None:
        self.db_id = db_id
        self._caller = caller

    @property
    def _node(self) -> host.ModelHost:
        node = self._host_node
        if getattr(node, "closed", False):
            home = str(getattr(node, "home", "HOME"))
            raise NodeNotRunningError(
                f"the node of {self.db_id} was shut down; reopen it: node = "
                f"dmodel.Node({home!r}) (or dmodel.launch({home!r})), then "
                f"{self._meta.name}({self.db_id!r}, {self._caller!r}, node=node)")
        return node

    def _read(self, name: str, *, verified: bool = False, default: Any = None) -> Any:
        """Register ``name`` read as this handle's caller; ``default`` while the object
        has not arrived here, DoesNotExist once it was removed here."""
        node = self._node
        try:
            return node.read(self.db_id, name, reader=self._caller or None,
                             verified=verified, default=default)
        except ObjectNotFoundError:
            if node.object_state(self.db_id) == "removed":
                raise self.DoesNotExist(self._removed_message(self.db_id)) from None
            return default

    def _registers(self) -> dict[str, merge.Register]:
        node = self._node
        regs = node.read_all(self.db_id)
        if not regs and node.object_state(self.db_id) == "removed":
            raise self.DoesNotExist(self._removed_message(self.db_id))
        return regs

    @classmethod
    def create(cls, *, authorized: Iterable[str | DModel] = (),
               read: Iterable[str | DModel] = (), update: Iterable[str | DModel] = (),
               node: host.ModelHost | None = None, **values: Any) -> Self:
        """Create an owned object with initial values, in one signed update.

        ``authorized`` ids may read and update it; ``read``/``update`` grant one of the two.
        """
        fields = {f.attr: f for f in cls._meta.fields.values()}
        unknown = set(values) - set(fields)
        if unknown:
            raise FieldValueError(f"{cls.__name__} has no field {sorted(unknown)[0]!r}")
        for attr, value in values.items():
            field = fields[attr]
            if not isinstance(field, DField):
                raise FieldValueError(f"{attr!r} is a dict field: set its entries after create")
            field.check(value)
        n = _node(node)
        authorized_ids = [_as_id(a) for a in authorized]
        read_ids, update_ids = [_as_id(a) for a in read], [_as_id(a) for a in update]

        def initial(db_id: str, readers: dict[str, bytes]) -> list[Op]:
            ops = []
            for attr, value in values.items():
                field = fields[attr]
                if field.encrypted:
                    ops.append(Op(db_id, "set_enc", field.name,
                                  n.seal_value(db_id, field.name, value, readers)))
                else:
                    ops.append(Op(db_id, "set", field.name, value))
            return ops

        db_id = n.create(cls._meta.name, read=[*authorized_ids, *read_ids],
                         update=[*authorized_ids, *update_ids], fields=initial)
        obj = cls.__new__(cls)
        obj._host_node = n
        obj._bind(db_id, db_id)
        return obj

    @classmethod
    def _handle(cls, db_id: str, caller_id: str | DModel | None, node: Any) -> Self:
        """A handle on a live object of this model (the id is known good)."""
        obj = cls.__new__(cls)
        obj._host_node = node
        obj._bind(db_id, db_id if caller_id is None else _as_id(caller_id))
        return obj

    @classmethod
    def get(cls, db_id: str, caller_id: str | DModel | None = None, *,
            node: Any = None) -> Any:
        """An object of this node, by db_id or by its oid alone: ``Person.get(oid)``.

        Person.DoesNotExist (an ObjectNotFoundError) if it has not arrived here, was
        removed, or is of another model; unlike ``Person(db_id)``, which gives a handle
        on an object still to arrive.
        """
        if isinstance(db_id, str) and is_oid(db_id):
            db_id = f"{cls._meta.name}:{db_id}"
        obj = cls(db_id, caller_id, node=node)
        if not obj._node.exists(obj.db_id):
            raise cls.DoesNotExist(f"{obj.db_id} is not known on this node (it has not "
                                   "arrived here, or was never created)")
        return obj

    @classmethod
    def all(cls, *, node: Any = None, owned: bool = False,
            caller_id: str | DModel | None = None) -> list[Self]:
        """Every live object of this model known to the node (removed ones excluded),
        in db_id order; ``owned=True``: only those this node holds the keys of."""
        n = _node(node)
        return [cls._handle(i, caller_id, n) for i in n.object_ids(cls._meta.name, owned=owned)]

    @classmethod
    def query(cls, *, node: Any = None, caller_id: str | DModel | None = None) -> Query:
        """A query on this model's live objects: ``Person.query().where(Person.age >= 30)
        .order_by(-Person.age).limit(10)``, run by ``all()``, iteration, ``count()``,
        ``first()`` or ``ids()``. See dmodel/query.py for what a condition matches."""
        return Query(cls, _node(node), None if caller_id is None else _as_id(caller_id))

    @classmethod
    def find(cls, *, node: Any = None, caller_id: str | DModel | None = None,
             **equal: Any) -> list[Any]:
        """The live objects whose plain fields equal the values given:
        ``Person.find(name='Bob', city='Oslo')``, in db_id order. An indexed field
        (``DField(index=True)``) is looked up in its index, any other by a scan of the
        model's objects; an encrypted field raises QueryError."""
        if not equal:
            raise QueryError(f"{cls.__name__}.find() takes field=value pairs; "
                             f"{cls.__name__}.all() gives every object")
        return cls.query(node=node, caller_id=caller_id).where(**equal).all()

    @classmethod
    def _query_field(cls, field: Any) -> DField:
        """The plain field of this model that ``field`` (a DField or an attribute name) is;
        QueryError for anything else, or for an encrypted field."""
        fields = cls._meta.fields
        if isinstance(field, str):
            if field not in fields:
                raise QueryError(f"{cls.__name__} has no field {field!r}")
            field = fields[field]
        if not isinstance(field, DField) or not any(f is field for f in fields.values()):
            raise QueryError(f"{field!r} is not a plain field of {cls.__name__} "
                             "(queries take its DField attributes)")
        if field.encrypted:
            raise QueryError(f"{cls.__name__}.{field.attr} is encrypted: its values are "
                             "sealed, so no query can compare them")
        return field

    def to_dict(self) -> dict[str, Any]:
        """Every field by attribute name: plain values, encrypted ones this handle's caller
        can open, DList fields as lists and DDict fields as dicts. An encrypted field the
        caller cannot open is an ``EncryptedValue`` placeholder (``<encrypted>``)."""
        out: dict[str, Any] = {}
        for attr, field in self._meta.fields.items():
            bound = field._bind(self)
            try:
                if isinstance(field, DField):
                    out[attr] = bound.get()
                elif isinstance(field, DDict):
                    out[attr] = bound.to_dict()
                else:
                    out[attr] = bound.to_list()
            except DecryptionError:
                out[attr] = EncryptedValue(self.db_id, field.name)
        return out

    # ------------------------------------------------------------- identity
    @property
    def oid(self) -> str:
        return self.db_id.partition(":")[2]

    @property
    def model(self) -> str:
        return self._meta.name

    @property
    def caller_id(self) -> str:
        return self._caller

    def get_id(self) -> str:
        """The object id (without the model name)."""
        return self.oid

    def get_db_id(self) -> str:
        """``Model:oid``."""
        return self.db_id

    def get_model(self) -> str:
        return self._meta.name

    def is_owned(self) -> bool:
        """Whether this node holds the object's private keys."""
        return self._node.is_owned(self.db_id)

    def keys(self) -> list[str]:
        """Names of the fields (and dict entries, as ``field:key``) that hold a value."""
        return sorted(self._registers())

    def exists(self) -> bool:
        """Whether the object is here and not removed (False before its create arrives)."""
        return self._node.exists(self.db_id)

    def is_removed(self) -> bool:
        """Whether the object was removed on this node (final; not the same as not
        arrived yet, where ``exists()`` is False too)."""
        return self._node.object_state(self.db_id) == "removed"

    def wait(self, timeout: float = _WAIT) -> DModel:
        """Block until the object's create has arrived here; returns self. WaitTimeout (a
        TimeoutError) after ``timeout`` seconds, DoesNotExist if it was removed."""
        node, db_id = self._node, self.db_id

        def arrived() -> str | None:
            state = node.object_state(db_id)
            return None if state == "unknown" else state

        if node.wait(arrived, timeout, f"{db_id} (its create)") == "removed":
            raise self.DoesNotExist(self._removed_message(db_id))
        return self

    # -------------------------------------------------------------- changes
    def _submit(self, build: Callable[[], Op]) -> None:
        tx: _Transaction | None = getattr(_tx, "current", None)
        if tx is not None and tx.node is self._node:
            if tx.caller != self._caller:
                raise ConfigurationError(f"this transaction is signed by {tx.caller}; "
                                         f"{self.db_id} is used as {self._caller}")
            tx.ops.append(build())
            return
        if not self._caller:
            raise UnauthorizedError(f"{self.db_id} is open anonymously (caller ''), so it "
                                    "cannot be changed: open it with a caller_id this node "
                                    "owns", db_id=self.db_id)
        self._node.write(self._caller, lambda: [build()])

    def delete(self, field: str) -> None:
        """Delete a field by name (PyDinemic ``delete(field)``)."""
        for f in self._meta.fields.values():
            if field in (f.name, f.attr) and isinstance(f, DField):
                BoundField(self, f).delete()
                return
        _check_name(field)
        declared = ", ".join(f.name for f in self._meta.fields.values()
                             if isinstance(f, DField) and f.name) or "none"
        raise FieldError(f"{self._meta.name} has no field {field!r} to delete "
                         f"(its fields: {declared})")

    def remove(self) -> None:
        """Remove the object for good, on every node."""
        self._submit(lambda: Op(self.db_id, "remove"))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[DModel]:
        """Collect changes (to this and other objects used as the same caller) into one update.

        All of them are applied, on every node, or none. Reads inside the block see the
        values from before it (a DList reads as the block leaves it).
        """
        with transaction(self._caller, node=self._node):
            yield self

    # ------------------------------------------------------- authorization
    def is_read_authorized(self, object_id: str | DModel) -> bool:
        object_id = _as_id(object_id)
        return object_id == self.db_id or object_id in self._node.members(self.db_id, "r")

    def is_update_authorized(self, object_id: str | DModel) -> bool:
        object_id = _as_id(object_id)
        return object_id == self.db_id or object_id in self._node.members(self.db_id, "u")

    def read_authorized(self) -> list[str]:
        return sorted(self._node.members(self.db_id, "r"))

    def update_authorized(self) -> list[str]:
        return sorted(self._node.members(self.db_id, "u"))

    def append_read_authorized(self, object_id: str | DModel) -> None:
        """Let ``object_id`` read encrypted fields, including the current values."""
        object_id = _as_id(object_id)
        self._submit(lambda: self._node.grant_read_op(self.db_id, object_id, self._caller))

    def revoke_read_authorized(self, object_id: str | DModel) -> None:
        """Stop sealing new values for ``object_id`` (values it could read stay readable)."""
        object_id = _as_id(object_id)
        self._submit(lambda: Op(self.db_id, "revoke_read", "", {"id": object_id}))

    def append_update_authorized(self, object_id: str | DModel) -> None:
        """Let ``object_id`` change this object."""
        object_id = _as_id(object_id)
        self._submit(lambda: Op(self.db_id, "grant_update", "", {"id": object_id}))

    def revoke_update_authorized(self, object_id: str | DModel) -> None:
        """Stop ``object_id`` from changing this object: only its updates accepted here so
        far stay valid, on every node (see the security model in README)."""
        object_id = _as_id(object_id)
        self._submit(lambda: self._node.revoke_update_op(self.db_id, object_id))

    # --------------------------------------------------------------- misc
    def history(self, field: str | None = None,
                include_rejected: bool = False) -> list[Any]:  # the node's HistoryEntry
        """Accepted updates of this object in merge order (and rejected ones if asked)."""
        return self._node.history(self.db_id, field, include_rejected=include_rejected)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DModel) and other.db_id == self.db_id

    def __hash__(self) -> int:
        return hash(self.db_id)

    def __repr__(self) -> str:
        return f"<{self._meta.name} {self.oid}>"


def _check_name(field: str) -> None:
    if not isinstance(field, str) or not _FIELD_NAME.fullmatch(field):
        raise FieldValueError(f"bad field name {field!r}")


@contextlib.contextmanager
def transaction(caller: str | DModel, *,
                node: host.ModelHost | None = None) -> Iterator[_Transaction]:
    """``with dmodel.transaction(caller_id):`` signs every change made inside as one update.

    Changes to several objects may be collected, all used as the same caller.
    Nested blocks join the outer one.
    """
    n = _node(node)
    caller = _as_id(caller)
    outer: _Transaction | None = getattr(_tx, "current", None)
    if outer is not None:
        if outer.caller != caller or outer.node is not n:
            raise ConfigurationError("a nested transaction must use the same caller and node")
        yield outer
        return
    tx = _Transaction(n, caller)
    _tx.current = tx
    try:
        yield tx
    except BaseException:
        _tx.current = None
        raise
    _tx.current = None
    if tx.ops:
        n.write(caller, tx.ops)


def object_list(filter: str = "*", *, node: host.ModelHost | None = None) -> list[str]:
    """db_ids of live objects matching an id filter such as ``Person:*`` or ``Person:[id]``."""
    from .filters import compile as compile_filter

    n = _node(node)
    matcher = compile_filter(filter)
    return [i for i in n.object_ids(matcher.model) if matcher.match(i)]


def wait_for(db_id: str | DModel, timeout: float = _WAIT, *,
             node: host.ModelHost | None = None) -> None:
    """Block until the create of ``db_id`` has arrived on the node (default: the one
    ``dmodel.launch()`` started). WaitTimeout (a TimeoutError) after ``timeout`` seconds;
    ObjectNotFoundError at once for a malformed id or one removed here."""
    db_id = _as_id(db_id)
    check_db_id(db_id)
    n = _node(node)

    def arrived() -> str | None:
        state = n.object_state(db_id)
        return None if state == "unknown" else state

    if n.wait(arrived, timeout, f"{db_id} (its create)") == "removed":
        raise ObjectNotFoundError(DModel._removed_message(db_id))


def object_list_owned(filter: str = "*", *, node: host.ModelHost | None = None) -> list[str]:
    """Like ``object_list``, only objects this node owns."""
    n = _node(node)
    return [i for i in object_list(filter, node=n) if n.is_owned(i)]


__all__ = ["BoundDict", "BoundField", "BoundList", "DDict", "DField", "DList", "DModel",
           "model_class",
           "object_list", "object_list_owned", "transaction", "wait_for"]
