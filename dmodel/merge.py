"""Convergence rules: how a verified update changes object state. Pure, no I/O.

Every piece of mutable state is a *register* named ``field`` (a plain field) or
``field:key`` (a DDict entry). A register holds the value written by the update
with the greatest *version*, where a version is the byte string

    timestamp (8 bytes, big endian) || caller oid (32 ASCII bytes) || update id (32) || op index (2)

so versions compare as bytes and every update op has a distinct one. A delete is a
register with ``deleted=True`` (a tombstone), so an older set arriving late cannot
bring a deleted value back. Removing an object is final: its registers are dropped
and every later op on it is a no-op, whatever the order of arrival, except the
object's own grants and revokes, which are still recorded (the verdict of a
transaction touching the removed object and others depends on them, so they must not
depend on whether the removal arrived first).

Authorization never trusts a timestamp, a node id or a chain: a signer writes those
itself. It depends only on signed content that the object itself wrote:

* The object's grants and revokes form, per (object, kind, member), a list of events
  ordered by their versions. Only the object itself may grant or revoke; its own clock
  orders its own events (a create's ``read``/``update`` lists are grants at the
  create's version).
* An update-grant opens a *window*; further grants keep it open; the first revoke after
  them closes it, and revokes up to the next grant belong to that close. A revoke of an
  update right names its *frontier*: the ids of the member's updates on the object
  that the revoking node had accepted when it revoked.
* Every update by a member names, per object it changes, the grant it writes under
  (``Update.grants``: the grant op's ref). It is authorized on that object iff the
  named event is an update-grant of that member, and either its window is still open,
  or the update's id is in the frontier of a revoke that closed the window.

So a revoked member cannot write again, whatever timestamp, device or chain it uses:
an update the revoking node had not accepted is in no frontier; naming an older grant
leads to a closed window; naming no grant is unauthorized. Writes the owner had
accepted before the revoke stay valid everywhere (they are in the frontier, which no
one can forge: it lists ids). A node that accepted a member's update while the window
was open to it re-decides when the revoke arrives, as every node does (the node's
re-decision, ``Outcome.retroactive``). A new grant opens a new window; updates that
named the closed one stay refused.

What must be kept to judge any update, also after pruning: every grant and revoke
(events and frontiers), and the creates. Pruning a superseded update never changes a
verdict, because verdicts look at nothing but the update itself and those events.

Read rights use the same events without frontiers: readers are the members whose last
event is a grant; a revoke stops new values from being sealed for them, and removes
nothing they could already read.

``apply`` returns the writes and the events and changes nothing; callers commit the
writes to their own state (``State.commit`` in tests, the store in the node).
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from ._slots import quick_init
from .crypto import PublicIdentity
from .update import LIST_OPS, Op, Update, op_register, pack_value

Policy = Literal["reject", "listeners"]
POLICIES = ("reject", "listeners")

_TS = struct.Struct(">Q")
_IDX = struct.Struct(">H")
VERSION_SIZE = 8 + 32 + 32 + 2


def version(timestamp: int, caller_oid: str, update_id: bytes, index: int) -> bytes:
    """The total-order key of one op."""
    return _TS.pack(timestamp) + caller_oid.encode("ascii") + update_id + _IDX.pack(index)


def op_versions(update: Update) -> list[bytes]:
    """The version of each op of ``update``, in op order."""
    prefix = _TS.pack(update.timestamp) + update.caller_oid.encode("ascii") + update.id
    pack = _IDX.pack
    return [prefix + pack(index) for index in range(len(update.ops))]


def version_timestamp(ver: bytes) -> int:
    timestamp: int = _TS.unpack_from(ver)[0]
    return timestamp


def version_caller(ver: bytes) -> str:
    """The caller oid of a version."""
    return ver[8:40].decode("ascii", "replace")


def version_ref(ver: bytes) -> bytes:
    """The (update id, op index) part of a version: how grants refer to a sealed value."""
    return ver[-34:]


@quick_init
@dataclass(frozen=True, slots=True)
class Register:
    """One LWW register: the winning value and its version."""

    version: bytes
    value: Any = None
    encrypted: bool = False
    deleted: bool = False

    def pack(self) -> bytes:
        flags = (1 if self.deleted else 0) | (2 if self.encrypted else 0)
        return pack_value([self.version, flags, self.value])

    @classmethod
    def unpack(cls, data: bytes) -> Register:
        ver, flags, value = msgpack.unpackb(data, raw=False, strict_map_key=True)
        return cls(ver, value, bool(flags & 2), bool(flags & 1))


@quick_init
@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What a node knows of an object: its public keys, creation and removal."""

    keys: PublicIdentity
    created: bytes
    removed: bytes | None = None

    def pack(self) -> bytes:
        return pack_value([self.keys.verify_key, self.keys.box_key, self.created,
                           self.removed])

    @classmethod
    def unpack(cls, data: bytes) -> ObjectMeta:
        sign, box, created, removed = msgpack.unpackb(data, raw=False)
        return cls(PublicIdentity(sign, box), created, removed)


AuthEvent = tuple[bytes, bool, frozenset[bytes]]   # (version, granted, revoke frontier)
AuthEvents = tuple[AuthEvent, ...]
NO_FRONTIER: frozenset[bytes] = frozenset()


def pack_auth(events: AuthEvents) -> bytes:
    return msgpack.packb([[ver, granted, sorted(frontier)] for ver, granted, frontier in events],
                         use_bin_type=True)


def unpack_auth(data: bytes | None) -> AuthEvents:
    if not data:
        return ()
    return tuple((e[0], bool(e[1]), frozenset(e[2]) if len(e) > 2 else NO_FRONTIER)
                 for e in msgpack.unpackb(data, raw=False))


def find_grant(events: AuthEvents, grant_ref: bytes | None) -> int | None:
    """The index of the update-grant that ``grant_ref`` names among ``events``, if any."""
    if grant_ref is None:
        return None
    return next((i for i, (ver, granted, _) in enumerate(events)
                 if granted and version_ref(ver) == grant_ref), None)


def member_authorized(events: AuthEvents, grant_ref: bytes | None, update_id: bytes) -> bool:
    """Whether a member's update, naming grant ``grant_ref``, is authorized (see above)."""
    at = find_grant(events, grant_ref)
    if at is None:
        return False
    closing = itertools.dropwhile(lambda e: e[1], events[at + 1:])
    revokes = list(itertools.takewhile(lambda e: not e[1], closing))
    return not revokes or any(update_id in frontier for _, _, frontier in revokes)


def open_grant(events: AuthEvents) -> bytes | None:
    """The ref of the grant a member writes under now: the last event, if a grant."""
    if events and events[-1][1]:
        return version_ref(events[-1][0])
    return None


def add_auth_event(events: AuthEvents, ver: bytes, granted: bool,
                   frontier: frozenset[bytes] = NO_FRONTIER) -> AuthEvents:
    """Insert an event, keeping version order; idempotent."""
    if any(v == ver for v, _, _ in events):
        return events
    return tuple(sorted((*events, (ver, granted, frontier))))


def current_members(events_by_member: dict[str, AuthEvents]) -> set[str]:
    """Members whose latest event is a grant."""
    return {m for m, ev in events_by_member.items() if ev and ev[-1][1]}


# ---------------------------------------------------------------- state and writes


@dataclass(slots=True)
class State:
    """The slice of object state an update needs (or a whole store, in tests)."""

    objects: dict[str, ObjectMeta] = field(default_factory=dict)
    registers: dict[tuple[str, str], Register] = field(default_factory=dict)
    auth: dict[tuple[str, str, str], AuthEvents] = field(default_factory=dict)
    wraps: dict[tuple[str, bytes, str], bytes] = field(default_factory=dict)
    # (object, caller) -> greatest timestamp of a stored op by that caller on that object;
    # tells whether a grant/revoke arrives "in the past" of updates already decided.
    last_write: dict[tuple[str, str], int] = field(default_factory=dict)
    # (object, list field) -> live element keys (position + 0x00 + element id), sorted on read
    lists: dict[tuple[str, str], set[bytes]] = field(default_factory=dict)

    def commit(self, writes: list[Write]) -> None:
        """Write ``writes`` into this state, in order (what the Redis store commits atomically)."""
        for w in writes:
            if w.kind == "object":
                self.objects[w.db_id] = w.data
            elif w.kind == "register":
                self.registers[(w.db_id, w.name)] = w.data
            elif w.kind == "auth":
                kind, member = w.name.split(":", 1)
                self.auth[(w.db_id, kind, member)] = w.data
            elif w.kind == "wrap":
                ref, oid = w.name[:34], w.name[34:]
                self.wraps[(w.db_id, ref, oid.decode())] = w.data
            elif w.kind == "list_add":
                self.lists.setdefault((w.db_id, w.name), set()).add(w.data)
            elif w.kind == "list_del":
                self.lists.get((w.db_id, w.name), set()).discard(w.data)
            elif w.kind == "drop":  # as the store does: registers, wrapped keys, lists
                for register in [k for k in self.registers if k[0] == w.db_id]:
                    del self.registers[register]
                for wrap in [k for k in self.wraps if k[0] == w.db_id]:
                    del self.wraps[wrap]
                for lst in [k for k in self.lists if k[0] == w.db_id]:
                    del self.lists[lst]

    def list_elements(self, db_id: str, name: str) -> list[bytes]:
        """Element ids of a list, in list order."""
        return [key[-34:] for key in sorted(self.lists.get((db_id, name), ()))]


@quick_init
@dataclass(frozen=True, slots=True)
class Write:
    """One state change. ``kind``: object | register | auth | wrap | drop | list_add | list_del.

    ``list_add``/``list_del`` name the list field and carry the element's order key.
    """

    kind: str
    db_id: str
    name: Any = None
    data: Any = None


@quick_init
@dataclass(frozen=True, slots=True)
class Event:
    """A change listeners hear about. ``kind``: create | update | delete | remove."""

    kind: str
    db_id: str
    name: str | None = None
    old: Register | None = None
    new: Register | None = None


@dataclass(slots=True)
class Outcome:
    """Result of merging one update: verdict, writes and events."""

    authorized: bool
    writes: list[Write] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    retroactive: set[str] = field(default_factory=set)  # objects whose verdicts may change
    # (object, register, version) of versions this update superseded, or its own when it
    # arrived superseded: what retention (retention.py) looks at. (object, register, b"")
    # retires a whole register (a deleted DList element).
    superseded: list[tuple[str, str, bytes]] = field(default_factory=list)


_AUTH_KIND = {"grant_read": ("r", True), "revoke_read": ("r", False),
              "grant_update": ("u", True), "revoke_update": ("u", False)}


def is_authorized(update: Update, state: State) -> bool:
    """Whether every op of ``update`` is made by the object itself or an authorized member."""
    caller = update.caller
    for op in update.ops:
        if op.obj == caller:
            continue
        if op.op in _AUTH_KIND or op.op == "create":
            return False
        events = state.auth.get((op.obj, "u", caller), ())
        if not member_authorized(events, update.grant_for(op.obj), update.id):
            return False
    return True


def apply(update: Update, state: State, *, authorized: bool | None = None,
          events: bool = True) -> Outcome:
    """Merge ``update`` into ``state`` (not modified); return writes and events.

    Every object the update touches must be in ``state.objects`` (or created by it).
    ``authorized`` defaults to ``is_authorized``; the caller decides by policy
    whether an unauthorized outcome is applied. ``events=False`` leaves the events out
    (for a node with no listener to hear them; the writes are the same).
    """
    if authorized is None:
        authorized = is_authorized(update, state)
    out = Outcome(authorized)
    objects = dict(state.objects)
    registers: dict[tuple[str, str], Register | None] = {}
    auth: dict[tuple[str, str, str], AuthEvents] = {}
    wraps: dict[tuple[str, bytes, str], bytes] = {}
    stored = state.registers

    def current(db_id: str, name: str) -> Register | None:
        key = (db_id, name)
        return registers[key] if key in registers else stored.get(key)

    for index, (op, ver) in enumerate(zip(update.ops, op_versions(update), strict=True)):
        op_kind = op.op
        meta = objects.get(op.obj)
        if op_kind == "create":
            keys = PublicIdentity(op.value["sign"], op.value["box"])
            if meta is not None and meta.keys != keys:
                continue  # a second create with other keys: refused (pipeline.decide counts it)
            if meta is None or ver < meta.created:
                new_meta = ObjectMeta(keys, ver, meta.removed if meta else None)
                objects[op.obj] = new_meta
                out.writes.append(Write("object", op.obj, None, new_meta))
                if meta is None and events:
                    out.events.append(Event("create", op.obj))
            for kind, name in (("r", "read"), ("u", "update")):
                for member in op.value[name]:
                    _auth_event(out, state, auth, op.obj, kind, member, ver, True)
            continue
        if (op_kind == "remove" and meta is not None and meta.removed is not None
                and meta.created <= ver < meta.removed):
            # Removed twice: keep the earliest removal, so the state is the same whichever
            # of the two arrived first.
            objects[op.obj] = ObjectMeta(meta.keys, meta.created, ver)
            out.writes.append(Write("object", op.obj, None, objects[op.obj]))
            continue
        if meta is None or ver < meta.created:
            continue  # nothing happens to an object before it exists
        if op_kind in _AUTH_KIND:
            # Counted even after a removal: other updates' verdicts depend on these events,
            # so they must not depend on whether the removal arrived first.
            kind, granted = _AUTH_KIND[op_kind]
            member = op.value["id"]
            _auth_event(out, state, auth, op.obj, kind, member, ver, granted,
                        frozenset(op.value.get("f", ())))
            if op_kind == "grant_read" and meta.removed is None:
                member_oid = member.partition(":")[2]
                for ref, wrapped in op.value["w"].items():
                    # Two grants of one value to one reader carry different (randomized)
                    # wraps; any opens it. Keep the least, whichever arrived first.
                    key = (op.obj, ref, member_oid)
                    held = wraps.get(key, state.wraps.get(key))
                    if held is None or wrapped < held:
                        wraps[key] = wrapped
                        out.writes.append(Write("wrap", op.obj, ref + member_oid.encode(),
                                                wrapped))
            continue
        if meta.removed is not None:
            continue  # removed objects are final
        if op_kind == "remove":
            objects[op.obj] = ObjectMeta(meta.keys, meta.created, ver)
            out.writes.append(Write("object", op.obj, None, objects[op.obj]))
            out.writes.append(Write("drop", op.obj))
            if events:
                out.events.append(Event("remove", op.obj))
            continue
        if op_kind in LIST_OPS:
            _list_op(out, op, index, ver, update.id, current, registers, events)
            continue
        name = op.register
        reg_key = (op.obj, name)
        old = registers[reg_key] if reg_key in registers else stored.get(reg_key)
        if old is not None and old.version >= ver:
            if old.version != ver:  # an older write: last writer already won
                out.superseded.append((op.obj, name, ver))
            continue
        if old is not None:
            out.superseded.append((op.obj, name, old.version))
        if op_kind == "del" or op_kind == "ddel":
            new = Register(ver, None, False, True)
            change = "delete"
        else:
            value = op.value[1] if op_kind == "dset" or op_kind == "dset_enc" else op.value
            new = Register(ver, value, op_kind.endswith("_enc"))
            change = "update"
        registers[reg_key] = new
        out.writes.append(Write("register", op.obj, name, new))
        if events:
            live_old = None if old is None or old.deleted else old
            if change == "update" or live_old is not None:
                out.events.append(Event(change, op.obj, name, live_old, new))
    return out


# ---------------------------------------------------------------- lists
#
# A DList element is a register named ``field#<element id hex>`` whose value is
# ``[position, value]``. Its position comes from the insert that created it (the
# element id is that insert's update id + op index), its value is last-writer-wins
# among that insert and later ``lset`` ops, and a delete is final (any ``ldel`` seen
# hides the element, whatever arrives later, and leaves the same empty tombstone on
# every node, whatever it saw of the element before). The register's version is the version
# of the op whose value it holds. Live elements are ordered by (position, element id);
# positions are fractional digit strings chosen between the neighbours (``between``).


TOMBSTONE = Register(b"", [None, None], False, True)  # a deleted DList element


def element_value(name: str, reg: Register) -> Any:
    """The user-visible value of a register (a list element holds [position, value])."""
    return reg.value[1] if "#" in name else reg.value


def _list_op(out: Outcome, op: Op, index: int, ver: bytes, update_id: bytes, current: Any,
             registers: dict[tuple[str, str], Register | None], events: bool) -> None:
    name = op_register(op, update_id, index)
    old = current(op.obj, name)
    pos = old.value[0] if old is not None else None
    if op.op in ("lins", "lins_enc"):
        pos = op.value[0]
    if old is not None and old.deleted:
        if op.op != "ldel" and ver:  # a delete is final: nothing of the element is kept
            out.superseded.append((op.obj, name, ver))
        return
    if op.op == "ldel":
        # The tombstone is the same whatever was seen before it (the insert, sets, or
        # nothing), so a node that pruned the insert and rebuilt the object from what
        # it kept holds what every other node holds.
        new = TOMBSTONE
        out.superseded.append((op.obj, name, b""))  # a deleted element keeps no versions
        if old is not None and old.version:
            out.superseded.append((op.obj, name, old.version))
    elif old is None or ver > old.version:
        new = Register(ver, [pos, op.value[1]], op.op.endswith("_enc"), False)
        if old is not None and old.version:
            out.superseded.append((op.obj, name, old.version))
    elif old.value[0] != pos:
        new = Register(old.version, [pos, old.value[1]], old.encrypted, False)
        out.superseded.append((op.obj, name, ver))
    else:
        if ver != old.version:
            out.superseded.append((op.obj, name, ver))
        return
    registers[(op.obj, name)] = new
    out.writes.append(Write("register", op.obj, name, new))
    was_live = old is not None and old.value[0] is not None and not old.deleted
    is_live = new.value[0] is not None and not new.deleted
    element = bytes.fromhex(name.partition("#")[2])
    if was_live and not is_live:
        out.writes.append(Write("list_del", op.obj, op.field, old.value[0] + b"\0" + element))
        if events:
            out.events.append(Event("delete", op.obj, name, old, None))
    elif is_live:
        if not was_live:
            out.writes.append(Write("list_add", op.obj, op.field,
                                    new.value[0] + b"\0" + element))
        if events and (new.version != (old.version if old else None) or not was_live):
            out.events.append(Event("update", op.obj, name, old if was_live else None, new))


_DIGIT_MIN, _DIGIT_MAX = 1, 255


def between(low: bytes, high: bytes | None, toward: str | None = None) -> bytes:
    """A position strictly between ``low`` and ``high`` (``b""`` = start, None = end).

    Positions are digit strings (bytes 1..255) read as base-256 fractions; none ends in
    digit 1, so there is always room below any position. The new position sits one
    digit above ``low`` (``toward="low"``, the default when appending), one below
    ``high`` (``"high"``, the default when prepending) or in the middle of the gap.
    Callers point it at the neighbour inserted last, so runs of inserts at one place
    (typing, or adding before the previous insert) grow positions by a byte only about
    every 250 inserts.
    """
    if high is not None and low >= high:
        raise ValueError("no position lies between equal or reversed positions")
    if high is None:
        toward = "low"
    elif not low:
        toward = "high"
    out = bytearray()
    i = 0
    while True:
        a = low[i] if i < len(low) else 0
        b = (high[i] if i < len(high) else 0) if high is not None else 256
        if b - a > 1:
            digit = a + 1 if toward == "low" else b - 1 if toward == "high" else (a + b) // 2
            if a < digit < b and digit > _DIGIT_MIN:
                out.append(digit)
            else:  # a == 0 and b is 2 or 3: digit 1, then a digit on the side of ``toward``
                out.extend((1, 2 if toward == "low" else 255 if toward == "high" else 128))
            return bytes(out)
        if b == a or a == 0:  # same digit, or (b == 1) follow high one digit deeper
            out.append(b)
        else:  # b == a + 1: take a's digit; anything after it is below high
            out.append(a)
            high = None
        i += 1


def _auth_event(out: Outcome, state: State,
                pending: dict[tuple[str, str, str], AuthEvents], db_id: str, kind: str, member: str,
                ver: bytes, granted: bool, frontier: frozenset[bytes] = NO_FRONTIER) -> None:
    key = (db_id, kind, member)
    events = pending.get(key, state.auth.get(key, ()))
    new_events = add_auth_event(events, ver, granted, frontier)
    if new_events is events:
        return
    pending[key] = new_events
    out.writes.append(Write("auth", db_id, f"{kind}:{member}", new_events))
    if kind == "u" and (db_id, member) in state.last_write:
        out.retroactive.add(db_id)  # the member wrote here already: re-decide those updates


def order_key(update: Update) -> tuple[int, str, bytes]:
    """The merge order of updates: (timestamp, caller oid, update id)."""
    return update.timestamp, update.caller_oid, update.id


def fold(updates: list[Update], *, policy: Policy = "reject") -> State:
    """State from a set of updates applied in version order: the reference every node matches.

    Verdicts are taken against the authorization events of the whole set (a revoke
    decides about updates with any timestamp), found as a fixed point: fold with the
    events of the previous round until they no longer change. Updates whose object is
    unknown (no create among ``updates``) are skipped.
    """
    ordered = sorted({u.id: u for u in updates}.values(), key=order_key)
    auth: dict[tuple[str, str, str], AuthEvents] = {}
    for _ in range(8):  # a round changes events only through creates inside member updates
        judge = State(auth=auth)
        state = State()
        for update in ordered:
            created = {op.obj for op in update.ops if op.op == "create"}
            if not all(op.obj in state.objects or op.obj in created for op in update.ops):
                continue
            outcome = apply(update, state, authorized=is_authorized(update, judge))
            if outcome.authorized or unauthorized_is_applied(update, policy):
                state.commit(outcome.writes)
        if state.auth == auth:
            break
        auth = state.auth
    return state


def unauthorized_is_applied(update: Update, policy: Policy) -> bool:
    """Whether an unauthorized update is applied (and shown to listeners) under ``policy``.

    Grants and revokes by anyone but the object itself are never applied.
    """
    return policy == "listeners" and not any(op.op in _AUTH_KIND for op in update.ops)


__all__ = [
    "TOMBSTONE", "Event", "ObjectMeta", "Op", "Outcome", "Register", "State", "Write",
    "add_auth_event", "apply", "fold", "is_authorized", "member_authorized", "open_grant",
    "unauthorized_is_applied", "version",
]
