"""Queries on plain fields: ``Person.find(name='Bob')``, ``Person.query().where(...)``.

    Person.find(name='Bob')                                  # equality, a list
    q = Person.query().where(Person.age >= 30, Person.city == 'Oslo')
    q.order_by(-Person.age).limit(10).all(); q.count(); q.first()

What a condition means is defined on one encoding of values (``encode_value``), used
alike by the value indexes the stores keep and by the scan of unindexed fields, so an
indexed and an unindexed field answer the same query the same way:

* values fall in classes ordered None < bool < numbers < str < bytes; ``==`` and the
  ordering comparisons only match values of the operand's class (``1 == 1.0`` matches,
  ``True == 1`` does not), ``!=`` is the negation of ``==``; lists, dicts, NaN and
  encrypted values match no condition but ``!=``;
* an object with no value in the field (never set, or deleted) has the field's default;
* results come in db_id order, or in the order of ``order_by`` (by the same encoding,
  then db_id).

Index layout (the stores keep one per indexed (model, field)): a sorted set of members
``encode_value(value) + b"\\0" + oid``, all with score 0, so that a lexicographic range
(Redis ZRANGEBYLEX bounds) gives equality and ranges; and per object the member it has
in each index, so that a commit can remove the old one. An index follows the registers
(only the winning value of a register is indexed, a removed object leaves it, a
re-decision rewrites it); ``dmodel verify`` rebuilds it from them and reports each
difference. Nothing here does I/O: the stores keep the indexes, ``Query`` asks the node.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from . import merge
from .errors import QueryError

# ------------------------------------------------------------------ encoding

T_NONE, T_BOOL, T_NUMBER, T_STR, T_BYTES, T_OTHER = b"\x01", b"\x02", b"\x03", b"\x04", \
    b"\x05", b"\x06"
OTHER = T_OTHER  # the key of a value no condition but != matches
_RESIDUAL_MAX = (1 << 63) - 1


def _number(x: int | float) -> bytes:
    """16 bytes that sort like the real value: the order-preserving form of the nearest
    double, then (for an int a double cannot hold exactly) the exact difference to it."""
    residual = 0
    if isinstance(x, float):
        f = x if x != 0 else 0.0  # -0.0 == 0.0
    else:
        try:
            f = float(x)
            residual = x - int(f)
        except OverflowError:  # only an operand: every stored int fits a double
            f = math.copysign(math.inf, x)
            residual = -_RESIDUAL_MAX if x > 0 else _RESIDUAL_MAX
        residual = max(-_RESIDUAL_MAX, min(_RESIDUAL_MAX, residual))
    bits: int = struct.unpack(">Q", struct.pack(">d", f))[0]
    bits = bits ^ 0xFFFF_FFFF_FFFF_FFFF if bits >> 63 else bits | (1 << 63)
    return bits.to_bytes(8, "big") + (residual + (1 << 63)).to_bytes(8, "big")


def _escaped(data: bytes) -> bytes:
    """``data`` with 0x00 escaped and a terminator: no encoding is a prefix of another."""
    return data.replace(b"\0", b"\0\xff") + b"\0\0"


def encode_value(value: Any) -> bytes:
    """The order-preserving key of a value (see the module docstring for the order)."""
    if value is None:
        return T_NONE
    if isinstance(value, bool):
        return T_BOOL + (b"\x01" if value else b"\x00")
    if isinstance(value, int) or (isinstance(value, float) and not math.isnan(value)):
        return T_NUMBER + _number(value)
    if isinstance(value, str):
        return T_STR + _escaped(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return T_BYTES + _escaped(value)
    return OTHER


def register_key(reg: merge.Register | None) -> bytes | None:
    """The index key of a stored register; None when it holds no value (unset, deleted)."""
    if reg is None or reg.deleted:
        return None
    return OTHER if reg.encrypted else encode_value(reg.value)


def member(key: bytes, oid: str) -> bytes:
    """An index member: the value's key, 0x00, the object id."""
    return key + b"\0" + oid.encode()


def member_oid(entry: bytes) -> str:
    return entry[-32:].decode()


# ------------------------------------------------------------------ ranges
#
# A range is a pair of ZRANGEBYLEX bounds: b"-", b"+", b"[" + bytes (inclusive) or
# b"(" + bytes (exclusive). Members of one value v are key(v) + 0x00 + oid: all of them
# lie in [key(v)\0, (key(v)\x01, and no member of another value does.

Range = tuple[bytes, bytes]
OPS = ("==", "!=", "<", "<=", ">", ">=")


def ranges(op: str, operand: Any) -> list[Range]:
    """The index ranges holding the values that satisfy ``value <op> operand``."""
    if op not in OPS:
        raise QueryError(f"unknown comparison {op!r}")
    key = encode_value(operand)
    if key == OTHER:
        raise QueryError(f"cannot compare with {type(operand).__name__} value "
                         f"{operand!r}: only None, bool, int, float, str and bytes")
    if op == "==":
        return [(b"[" + key + b"\0", b"(" + key + b"\x01")]
    if op == "!=":
        return [(b"-", b"(" + key + b"\0"), (b"[" + key + b"\x01", b"+")]
    if operand is None:
        raise QueryError(f"None has no order: use == None or != None, not {op} None")
    first, after = key[:1], bytes([key[0] + 1])
    return {"<": [(b"[" + first, b"(" + key + b"\0")],
            "<=": [(b"[" + first, b"(" + key + b"\x01")],
            ">": [(b"[" + key + b"\x01", b"(" + after)],
            ">=": [(b"[" + key + b"\0", b"(" + after)]}[op]


def above(entry: bytes, low: bytes) -> bool:
    """Whether ``entry`` is at or past the lower bound ``low``."""
    if low in (b"-", b"+"):
        return low == b"-"
    return entry >= low[1:] if low[:1] == b"[" else entry > low[1:]


def below(entry: bytes, high: bytes) -> bool:
    """Whether ``entry`` is at or before the upper bound ``high``."""
    if high in (b"-", b"+"):
        return high == b"+"
    return entry <= high[1:] if high[:1] == b"[" else entry < high[1:]


def key_matches(key: bytes, found: list[Range]) -> bool:
    """Whether a value's key lies in one of the ranges (what a scan checks)."""
    entry = key + b"\0"
    return any(above(entry, low) and below(entry, high) for low, high in found)


# ------------------------------------------------------------------ index upkeep


@dataclass(frozen=True, slots=True)
class IndexChange:
    """One object's entry in one index moves from ``old`` to ``new`` (None: no entry)."""

    model: str
    field: str
    db_id: str
    old: bytes | None
    new: bytes | None


def entry_for(db_id: str, reg: merge.Register | None) -> bytes | None:
    key = register_key(reg)
    return None if key is None else member(key, db_id.partition(":")[2])


def index_changes(writes: Iterable[merge.Write], indexed: set[tuple[str, str]],
                  current: dict[str, dict[str, bytes]]) -> list[IndexChange]:
    """The index changes ``writes`` make, in order. ``current`` holds the entries of each
    object they touch (``needs_entries`` says which: db_id -> field -> member) and is
    kept up to date, so the writes of several updates can be folded one after another."""
    out = []
    for w in writes:
        model = w.db_id.partition(":")[0]
        if w.kind == "register" and (model, w.name) in indexed:
            entries = current.setdefault(w.db_id, {})
            old, new = entries.get(w.name), entry_for(w.db_id, w.data)
            if old != new:
                out.append(IndexChange(model, w.name, w.db_id, old, new))
                if new is None:
                    del entries[w.name]
                else:
                    entries[w.name] = new
        elif w.kind == "drop":
            entries = current.pop(w.db_id, {})
            out.extend(IndexChange(model, name, w.db_id, old, None)
                       for name, old in sorted(entries.items()))
    return out


def needs_entries(writes: Iterable[merge.Write], indexed: set[tuple[str, str]]) -> list[str]:
    """The objects whose current index entries ``index_changes`` needs."""
    models = {m for m, _ in indexed}
    return sorted({w.db_id for w in writes
                   if (w.kind == "register" and (w.db_id.partition(":")[0], w.name) in indexed)
                   or (w.kind == "drop" and w.db_id.partition(":")[0] in models)})


def object_changes(db_id: str, live: bool, registers: dict[str, merge.Register],
                   indexed: set[tuple[str, str]], old: dict[str, bytes]) -> list[IndexChange]:
    """The changes that make an object's entries those of ``registers`` (none if not
    ``live``), from its entries ``old``: a re-decision or an index build."""
    model = db_id.partition(":")[0]
    names = sorted({f for m, f in indexed if m == model} | set(old))
    out = []
    for name in names:
        new = entry_for(db_id, registers.get(name)) if live and (model, name) in indexed \
            else None
        if old.get(name) != new:
            out.append(IndexChange(model, name, db_id, old.get(name), new))
    return out


# ------------------------------------------------------------------ queries


class Condition:
    """``Person.age >= 30``: a field, a comparison and an operand, for ``where``.

    ``==``/``!=`` conditions keep the truth value that comparing the field gave before
    queries existed (a field is equal to no value), so fields still work in ``in`` and
    as dict keys; the ordering ones have no truth value.
    """

    __slots__ = ("field", "op", "operand")

    def __init__(self, field: Any, op: str, operand: Any) -> None:
        self.field = field
        self.op = op
        self.operand = operand

    def __bool__(self) -> bool:
        if self.op in ("==", "!="):
            return self.op == "!="
        raise TypeError(f"{self!r} is a query condition, not a truth value: "
                        "pass it to Model.query().where(...)")

    def __repr__(self) -> str:
        return f"<Condition {self.field.name} {self.op} {self.operand!r}>"


class Order:
    """``Person.age`` or ``-Person.age`` (descending) in ``order_by``."""

    __slots__ = ("field", "desc")

    def __init__(self, field: Any, desc: bool = False) -> None:
        self.field = field
        self.desc = desc

    def __neg__(self) -> Order:
        return Order(self.field, not self.desc)

    def __repr__(self) -> str:
        return f"<Order {'-' if self.desc else ''}{self.field.name}>"


@dataclass(frozen=True, slots=True)
class _Plan:
    field: Any          # the DField
    op: str
    found: list[Range]  # the index ranges (or, for a scan, the keys) that match
    default: bool       # whether objects without a value (reading the default) match


class Query:
    """A query on one model, built by chaining; nothing is read until it is run
    (``all()``, iteration, ``count()``, ``first()``, ``ids()``). Each method returns a
    new query. Conditions on an indexed field (``DField(index=True)``) read its index;
    the others scan the model's objects (one round trip for all of them)."""

    def __init__(self, model: Any, host: Any, caller_id: str | None = None) -> None:
        self._model = model
        self._host = host
        self._caller = caller_id
        self._plans: tuple[_Plan, ...] = ()
        self._order: Order | None = None
        self._limit: int | None = None
        self._offset = 0

    def _copy(self, **changes: Any) -> Query:
        q = object.__new__(Query)
        q.__dict__.update(self.__dict__, **changes)
        return q

    def _field(self, field: Any) -> Any:
        """The plain field of this model that ``field`` (a field or an attribute name) is;
        QueryError for any other, or an encrypted one."""
        return self._model._query_field(field)

    def where(self, *conditions: Condition, **equal: Any) -> Query:
        """Only objects matching every condition (``Person.age >= 30``) and every
        ``field=value`` equality."""
        plans = list(self._plans)
        wanted = [(c.field, c.op, c.operand) for c in conditions if _is_condition(c)]
        if len(wanted) != len(conditions):
            raise QueryError("where() takes conditions such as Person.age >= 30")
        wanted += [(attr, "==", value) for attr, value in equal.items()]
        for field, op, operand in wanted:
            field = self._field(field)
            found = ranges(op, operand)
            plans.append(_Plan(field, op, found,
                               key_matches(encode_value(field.default), found)))
        return self._copy(_plans=tuple(plans))

    filter = where

    def order_by(self, field: Any, desc: bool = False) -> Query:
        """Sort by a field (``-Person.age`` or ``desc=True``: descending), then db_id."""
        order = field if isinstance(field, Order) else Order(field)
        return self._copy(_order=Order(self._field(order.field), order.desc != desc))

    def limit(self, n: int) -> Query:
        if not isinstance(n, int) or n < 0:
            raise QueryError("limit() takes an integer >= 0")
        return self._copy(_limit=n)

    def offset(self, n: int) -> Query:
        if not isinstance(n, int) or n < 0:
            raise QueryError("offset() takes an integer >= 0")
        return self._copy(_offset=n)

    # ------------------------------------------------------------ running
    def ids(self) -> list[str]:
        """db_ids of the matching objects, in the query's order."""
        fast = self._index_only()
        if fast is not None:
            plan, reverse = fast
            (low, high), = plan.found
            count = -1 if self._limit is None else self._limit
            if count == 0:
                return []
            entries = self._host.index_range(self._name, plan.field.name, low, high,
                                             reverse=reverse, offset=self._offset, count=count)
            return [f"{self._name}:{member_oid(e)}" for e in entries]
        ordered = sorted(self._matching())
        if self._order is not None:
            keys = self._keys(ordered, self._order.field)
            ordered = [oid for _, oid in sorted(zip(keys, ordered, strict=True),
                                                reverse=self._order.desc)]
        stop = None if self._limit is None else self._offset + self._limit
        return [f"{self._name}:{oid}" for oid in ordered[self._offset:stop]]

    def all(self) -> list[Any]:
        """The matching objects, as ``Model(db_id, caller_id)`` gives them."""
        make = self._model._handle
        return [make(db_id, self._caller, self._host) for db_id in self.ids()]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.all())

    def first(self) -> Any:
        """The first matching object, or None."""
        found = self.limit(1).all() if self._limit is None or self._limit > 1 else self.all()
        return found[0] if found else None

    def count(self) -> int:
        """How many objects match (after offset and limit)."""
        plan = self._one_range()
        if plan is not None and self._limit is None and self._offset == 0:
            (low, high), = plan.found
            return int(self._host.index_count(self._name, plan.field.name, low, high))
        return len(self.ids())

    def __repr__(self) -> str:
        return (f"<Query {self._name} where={[(p.field.name, p.op) for p in self._plans]} "
                f"order={self._order!r} limit={self._limit}>")

    # ------------------------------------------------------------ internals
    @property
    def _name(self) -> str:
        return str(self._model._meta.name)

    def _one_range(self) -> _Plan | None:
        """The query's one condition, if it is one range of an index that holds every
        match (the default does not match)."""
        if len(self._plans) != 1:
            return None
        plan = self._plans[0]
        if not plan.field.index or plan.default or len(plan.found) != 1:
            return None
        return plan

    def _index_only(self) -> tuple[_Plan, bool] | None:
        """The one indexed condition that answers the query straight from its index, in
        the query's order and with its offset and limit (and whether backwards)."""
        plan = self._one_range()
        if plan is None:
            return None
        order = self._order
        if order is None:
            return (plan, False) if plan.op == "==" else None  # equal values: oid order
        return (plan, order.desc) if order.field is plan.field else None

    def _matching(self) -> set[str]:
        """Oids of the objects matching every condition: indexed ones first, then a scan
        of what they left (of every live object when no condition is indexed)."""
        found: set[str] | None = None
        plans = sorted(self._plans, key=lambda p: not p.field.index)
        for plan in plans:
            if plan.field.index:
                matched = self._from_index(plan, found)
            else:
                if found is None:
                    found = self._live()
                candidates = sorted(found)
                keys = self._keys(candidates, plan.field)
                matched = {oid for oid, key in zip(candidates, keys, strict=True)
                           if key_matches(key, plan.found)}
            found = matched if found is None else found & matched
            if not found:
                return set()
        return self._live() if found is None else found

    def _from_index(self, plan: _Plan, within: set[str] | None) -> set[str]:
        host, name = self._host, plan.field.name
        matched = {member_oid(e) for low, high in plan.found
                   for e in host.index_range(self._name, name, low, high)}
        if plan.default:  # objects with no entry read the default, which matches
            live = within if within is not None else self._live()
            entered = {member_oid(e) for e in host.index_range(self._name, name, b"-", b"+")}
            matched |= live - entered
        return matched

    def _live(self) -> set[str]:
        return {db_id.partition(":")[2] for db_id in self._host.object_ids(self._name)}

    def _keys(self, oids: list[str], field: Any) -> list[bytes]:
        """Each object's key for ``field``: its value's, or its default's if it has none."""
        default = encode_value(field.default)
        regs = self._host.field_registers([f"{self._name}:{o}" for o in oids], field.name)
        keys = []
        for reg in regs:
            key = register_key(reg)
            keys.append(default if key is None else key)
        return keys


def _is_condition(value: Any) -> bool:
    return isinstance(value, Condition)


__all__ = ["Condition", "IndexChange", "Order", "Query", "encode_value", "index_changes",
           "key_matches", "needs_entries", "object_changes", "ranges", "register_key"]
