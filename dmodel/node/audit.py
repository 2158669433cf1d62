"""Audit: checking stored values against their signed updates, the state digest, history.

Everything here only reads the store. ``verify_register`` runs on the reader's thread
(``Node.read(verified=True)``); ``verify_store`` and ``history`` on the caller's; the
digest is taken under the node's apply lock, so no update is applied halfway through it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import msgpack

from .. import clock, merge, query
from ..errors import IntegrityError, InvalidUpdate
from ..pipeline import signing_key
from ..store.base import ObjectState, Store
from ..update import FIELD_OPS, LIST_OPS, Op, Update, decode, op_register

# What unpacking or checking a damaged stored register can raise (msgpack's errors are
# ValueErrors; a value of the wrong shape gives TypeError or IndexError).
_DAMAGED = (ValueError, TypeError, IndexError, KeyError)

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called after each item a long check has finished."""

_T = TypeVar("_T")


def _counted(items: Iterable[_T], progress: Progress | None, start: int,
             total: int) -> Iterator[_T]:
    """``items``, calling ``progress(start + n, total)`` once the loop body is done with
    the n-th (the generator resumes only when the next item is asked for)."""
    for done, item in enumerate(items, start + 1):
        yield item
        if progress is not None:
            progress(done, total)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One stored update of an object, as ``history()`` reports it."""

    update_id: str
    caller_id: str
    timestamp: int
    verdict: str  # "accepted" or "unauthorized"
    ops: tuple[Op, ...]

    @property
    def datetime(self) -> _dt.datetime:
        """When it was made (the wall-clock part of its HLC timestamp), timezone-aware UTC."""
        return _dt.datetime.fromtimestamp(clock.physical_ms(self.timestamp) / 1000, _dt.UTC)


def signed_op(store: Store, db_id: str, name: str, ref: bytes) -> tuple[Update, int]:
    """The verified update and op index that ``ref`` (update id + index) names."""
    uid, index = ref[:32], int.from_bytes(ref[32:], "big")
    raw = store.raw_update(uid)
    if raw is None:
        raise IntegrityError(f"{db_id}:{name}: its update {uid.hex()[:12]} is not stored")
    try:
        update = decode(raw)
        keys = signing_key(update, store.object_meta)
        if keys is None:
            raise IntegrityError(f"{db_id}:{name}: signer {update.caller} unknown")
        update.verify(keys)
    except InvalidUpdate as exc:
        raise IntegrityError(f"{db_id}:{name}: stored update does not verify: {exc}") from exc
    if update.id != uid or index >= len(update.ops):
        raise IntegrityError(f"{db_id}:{name}: value points outside its update")
    return update, index


def accepted_updates(store: Store, db_id: str) -> Iterator[Update]:
    """The accepted updates in the object's history that are stored and decode (the
    others are reported by verify_store's history and log checks)."""
    for raw in store.raw_updates(store.history(db_id)):
        if raw is None:
            continue
        try:
            yield decode(raw)
        except InvalidUpdate:
            continue


def newest_versions(store: Store, db_id: str) -> dict[str, bytes]:
    """For each plain or dict register of the object: the greatest version an accepted
    update in its history wrote (what the register must hold: last writer wins)."""
    newest: dict[str, bytes] = {}
    for update in accepted_updates(store, db_id):
        for index, op in enumerate(update.ops):
            if op.obj == db_id and op.op in FIELD_OPS and op.op not in LIST_OPS:
                ver = merge.version(update.timestamp, update.caller_oid, update.id, index)
                if ver > newest.get(op.register, b""):
                    newest[op.register] = ver
    return newest


_AUTH_OP = {("r", True): "grant_read", ("r", False): "revoke_read",
            ("u", True): "grant_update", ("u", False): "revoke_update"}


def auth_problems(store: Store, db_id: str) -> list[str]:
    """Authorization events of the object that no signed update of it made (an injected
    grant, say): each must name a grant/revoke op, or the create, naming the member."""
    problems = []
    for kind in ("r", "u"):
        for member, events in store.auth_events(db_id, kind).items():
            for ver, granted, _frontier in events:
                where = f"{db_id}: {'read' if kind == 'r' else 'update'} event of {member}"
                try:
                    update, index = signed_op(store, db_id, where, merge.version_ref(ver))
                    op = update.ops[index]
                except IntegrityError as exc:
                    problems.append(str(exc))
                    continue
                except _DAMAGED as exc:
                    problems.append(f"{where}: damaged: {exc!r}")
                    continue
                listed = op.op == "create" and granted and member in op.value.get(
                    "read" if kind == "r" else "update", ())
                named = op.op == _AUTH_OP[(kind, granted)] and op.value.get("id") == member
                if op.obj != db_id or not (listed or named) or merge.version(
                        update.timestamp, update.caller_oid, update.id, index) != ver:
                    problems.append(f"{where}: no signed update made it (injected?)")
    problems.extend(_missing_auth_events(store, db_id))
    return problems


_AUTH_KIND = {op: kind_granted for kind_granted, op in _AUTH_OP.items()}


def _missing_auth_events(store: Store, db_id: str) -> list[str]:
    """Authorization events that an accepted update of the object made but the store no
    longer holds (removed by hand). Retention never prunes such updates, so every one
    of them is still in the object's history."""
    meta = store.object_meta(db_id)
    if meta is None:
        return []
    held: dict[str, set[tuple[str, bytes]]] = {}
    problems = []
    for update in accepted_updates(store, db_id):
        for index, op in enumerate(update.ops):
            if op.obj != db_id or (op.op not in _AUTH_KIND and op.op != "create"):
                continue
            ver = merge.version(update.timestamp, update.caller_oid, update.id, index)
            if ver < meta.created:
                continue  # before the object existed: merged as nothing
            if op.op == "create":
                made = [(kind, member, True) for kind, key in (("r", "read"), ("u", "update"))
                        for member in op.value.get(key, ())]
            else:
                kind, granted = _AUTH_KIND[op.op]
                made = [(kind, op.value.get("id"), granted)]
            for kind, member, granted in made:
                if kind not in held:  # as stored (member_events may answer from a cache)
                    held[kind] = {(m, v) for m, events in store.auth_events(db_id, kind).items()
                                  for v, _, _ in events}
                if (member, ver) not in held[kind]:
                    what = "read" if kind == "r" else "update"
                    problems.append(f"{db_id}: {what} {'grant' if granted else 'revoke'} of "
                                    f"{member} by update {update.id.hex()[:12]} is missing "
                                    "from its authorization events (removed?)")
    return problems


def list_problems(store: Store, db_id: str,
                  registers: dict[str, merge.Register]) -> list[str]:
    """DList order keys that are not exactly those of the live elements' registers (a
    reordered, emptied or padded list): each key is the element's position + 0x00 + id."""
    wanted: dict[str, set[bytes]] = {}
    for name, reg in registers.items():
        field, sep, element = name.partition("#")
        if sep and isinstance(reg.value, list) and reg.value and reg.value[0] is not None:
            keys = wanted.setdefault(field, set())
            if not reg.deleted:
                keys.add(reg.value[0] + b"\0" + bytes.fromhex(element))
    problems = []
    for field, keys in sorted(wanted.items()):
        held = set(store.list_keys_range(db_id, field, 0, -1))
        if held != keys:
            problems.append(f"{db_id}:{field}: list order differs from its elements' "
                            f"signed positions ({len(held - keys)} keys not theirs, "
                            f"{len(keys - held)} missing)")
    return problems


def verify_register(store: Store, db_id: str, name: str, reg: merge.Register,
                    newest: dict[str, bytes] | None = None) -> None:
    """Raise IntegrityError unless ``reg`` is exactly what its signed update wrote, and
    no newer accepted update in the object's history wrote it (a rollback).

    For a DList element the position is checked against its insert as well; that an
    element is deleted is not (a delete leaves no value to check). ``newest``: the
    object's ``newest_versions`` if the caller has them (read here otherwise).
    """
    if reg.deleted and "#" in name:
        return  # a deleted list element shows nothing (retention may prune its writes)
    update, index = signed_op(store, db_id, name, merge.version_ref(reg.version))
    op = update.ops[index]
    if merge.version(update.timestamp, update.caller_oid, update.id, index) != reg.version:
        raise IntegrityError(f"{db_id}:{name}: version does not match its update")
    if op.obj != db_id or op_register(op, update.id, index) != name:
        raise IntegrityError(f"{db_id}:{name}: signed update wrote another field")
    if op.op in ("del", "ddel"):
        expected = merge.Register(reg.version, None, False, True)
    elif op.op in LIST_OPS:
        element = bytes.fromhex(name.partition("#")[2])
        insert, at = signed_op(store, db_id, name, element)
        position = insert.ops[at].value[0] if insert.ops[at].op.startswith("lins") else None
        expected = merge.Register(reg.version, [position, op.value[1]],
                                  op.op.endswith("_enc"), reg.deleted)
    else:
        value = op.value[1] if op.op in ("dset", "dset_enc") else op.value
        expected = merge.Register(reg.version, value, op.op.endswith("_enc"))
    if expected != reg:
        raise IntegrityError(f"{db_id}:{name}: stored value differs from the signed one")
    if "#" not in name:
        newer = (newest_versions(store, db_id) if newest is None else newest).get(name)
        if newer is not None and newer > reg.version:
            raise IntegrityError(f"{db_id}:{name}: rolled back: update "
                                 f"{merge.version_ref(newer)[:32].hex()[:12]} wrote a newer "
                                 "value, and it is not the one stored")


def state_digest(store: Store) -> str:
    """A hash of the whole merged state (objects, registers, DList order, authorization
    events, key wraps): two nodes that hold the same state give the same digest. Call it
    under the apply lock."""
    digest = hashlib.blake2b(digest_size=32)
    ids = store.object_ids()
    for start in range(0, len(ids), 256):
        chunk = ids[start:start + 256]
        for db_id, state in zip(chunk, store.object_states(chunk), strict=True):
            digest.update(object_state_digest(db_id, state))
    return digest.hexdigest()


def object_state_digest(db_id: str, state: ObjectState) -> bytes:
    """A 16-byte hash of one object's merged state (its part of :func:`state_digest`)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(msgpack.packb([db_id, state.meta.pack() if state.meta else None]))
    for name in sorted(state.registers):
        reg = state.registers[name]
        if reg.deleted and "#" in name:  # a deleted element is a plain tombstone (stores
            reg = merge.TOMBSTONE        # written before it kept the element's last value)
        digest.update(msgpack.packb([name, reg.pack()]))
    for name in sorted(state.lists):
        digest.update(msgpack.packb([name, state.lists[name]]))
    for kind in ("r", "u"):
        events = state.auth.get(kind, {})
        digest.update(msgpack.packb(sorted(
            [m, merge.pack_auth(e)] for m, e in events.items() if e)))
    digest.update(msgpack.packb(sorted(state.wraps.items())))
    return digest.digest()


def verify_store(store: Store, progress: Progress | None = None) -> list[str]:
    """Re-check every stored value and log entry; return a list of problems (empty = ok).

    ``progress(done, total)`` counts objects, then log entries, as they are checked.
    """
    problems: list[str] = []
    objects, log = store.object_ids(), store.log_range()
    total = len(objects) + len(log)
    for db_id in _counted(objects, progress, 0, total):
        newest = newest_versions(store, db_id)
        try:
            problems.extend(auth_problems(store, db_id))
        except _DAMAGED as exc:
            problems.append(f"{db_id}: authorization events are damaged: {exc!r}")
        registers = _stored_registers(store, db_id, problems)
        meta = store.object_meta(db_id)
        if meta is not None and meta.removed is None:  # a removal drops the registers
            problems.extend(f"{db_id}:{name}: missing: update "
                            f"{merge.version_ref(ver)[:32].hex()[:12]} wrote it"
                            for name, ver in sorted(newest.items()) if name not in registers)
        try:
            problems.extend(list_problems(store, db_id, registers))
        except _DAMAGED as exc:
            problems.append(f"{db_id}: list order keys are damaged: {exc!r}")
        in_history = set(store.history(db_id))
        for name, reg in registers.items():
            try:
                verify_register(store, db_id, name, reg, newest)
                ref = merge.version_ref(reg.version)[:32] if reg.version else b""
                if ref and ref not in in_history and not (reg.deleted and "#" in name):
                    problems.append(f"{db_id}:{name}: its update {ref.hex()[:12]} is not in "
                                    "the object's history")
            except IntegrityError as exc:
                problems.append(str(exc))
            except _DAMAGED as exc:
                problems.append(f"{db_id}:{name}: stored register is damaged: {exc!r}")
        for uid in store.history(db_id):
            if not store.has_update(uid):
                problems.append(f"{db_id}: history names missing update {uid.hex()[:12]}")
    logged = set(log)
    problems.extend(f"update {uid.hex()[:12]} is stored but not in the log"
                    for uid in sorted(set(store.update_ids()) - logged))
    chained: dict[bytes, tuple[str, bytes, int]] = {}  # stored update -> caller, node, ts
    for uid in _counted(log, progress, len(objects), total):
        raw = store.raw_update(uid)
        if raw is None:
            problems.append(f"log names missing update {uid.hex()[:12]}")
            continue
        try:
            update = decode(raw)
        except InvalidUpdate as exc:
            problems.append(f"update {uid.hex()[:12]} is damaged: {exc}")
            continue
        if update.id != uid:
            problems.append(f"update {uid.hex()[:12]} is stored under the wrong id")
            continue
        chained[uid] = (update.caller, update.node, update.timestamp)
        keys = signing_key(update, store.object_meta)
        if keys is None:
            problems.append(f"update {uid.hex()[:12]}: signer {update.caller} unknown")
            continue
        try:
            update.verify(keys)
        except InvalidUpdate:
            problems.append(f"update {uid.hex()[:12]}: signature does not verify")
    problems.extend(chain_problems(store, chained))
    problems.extend(index_problems(store))
    return problems


def chain_problems(store: Store, chained: dict[bytes, tuple[str, bytes, int]]) -> list[str]:
    """The chain links and heads re-derived from the stored updates (``chained``: each
    one's caller, node and timestamp) and compared with what the store keeps.

    Every stored update has its link; a link whose update retention pruned belongs to
    a chain head (a head keeps its link while it is the head). Every chain with stored
    updates has a head, no older than its newest stored update; a head is a stored
    update of its chain or a pruned one whose link names its chain. What cannot be
    re-derived: the id and timestamp of a pruned head, which only its link vouches for.
    """
    problems: list[str] = []
    links, heads = store.chain_links(), store.chain_heads()
    for uid, (caller, node, _) in sorted(chained.items()):
        link = links.get(uid)
        if link is None:
            problems.append(f"update {uid.hex()[:12]}: its chain link is missing")
        elif link != node + caller.encode():
            problems.append(f"update {uid.hex()[:12]}: its chain link names another chain")
    newest: dict[str, tuple[int, bytes]] = {}
    for uid, (caller, node, ts) in chained.items():
        chain = f"{caller}|{node.hex()}"
        newest[chain] = max(newest.get(chain, (-1, b"")), (ts, uid))
    head_ids = set()
    for chain, value in sorted(heads.items()):
        if len(value) != 40:
            problems.append(f"chain {chain}: its head is damaged ({len(value)} bytes)")
            continue
        uid, ts = value[:32], int.from_bytes(value[32:], "big")
        head_ids.add(uid)
        caller, _, node_hex = chain.rpartition("|")
        if uid in chained:
            if chained[uid][2] != ts or f"{chained[uid][0]}|{chained[uid][1].hex()}" != chain:
                problems.append(f"chain {chain}: its head names update {uid.hex()[:12]} "
                                "with another chain or timestamp")
        elif (link := links.get(uid)) is None or link[16:].decode(errors="replace") != caller \
                or link[:16].hex() != node_hex:
            problems.append(f"chain {chain}: its head {uid.hex()[:12]} is neither a stored "
                            "update nor a pruned one of this chain")
        if chain in newest and newest[chain][0] > ts:
            problems.append(f"chain {chain}: its head is older than its update "
                            f"{newest[chain][1].hex()[:12]} (rolled back)")
    problems.extend(f"chain {chain}: it has stored updates but no head"
                    for chain in sorted(newest.keys() - heads.keys()))
    problems.extend(f"chain link of update {uid.hex()[:12]}: neither a stored update nor "
                    "a chain head (injected, or left behind)"
                    for uid in sorted(links.keys() - set(store.update_ids()) - head_ids))
    return problems


def index_problems(store: Store) -> list[str]:
    """Every difference between the value indexes and what the registers give: a missing
    or stale entry in an index, a wrong per-object record of it."""
    problems: list[str] = []
    for model, field in sorted(store.indexes()):
        want: dict[bytes, str] = {}  # member -> db_id
        for db_id in store.object_ids(model):
            meta = store.object_meta(db_id)
            try:
                reg = store.register(db_id, field)
            except _DAMAGED:
                continue  # reported as a damaged register
            entry = query.entry_for(db_id, reg) if meta and meta.removed is None else None
            if entry is not None:
                want[entry] = db_id
            if store.index_entries(db_id).get(field) != entry:
                problems.append(f"index {model}.{field}: the entry recorded for {db_id} "
                                "differs from its register")
        held = set(store.index_range(model, field, b"-", b"+"))
        for entry in sorted(held - want.keys()):
            problems.append(f"index {model}.{field}: a stale entry for "
                            f"{model}:{query.member_oid(entry)} (no register gives it)")
        for entry in sorted(want.keys() - held):
            problems.append(f"index {model}.{field}: the entry of {want[entry]} is missing")
    return problems


def _stored_registers(store: Store, db_id: str, problems: list[str]) -> dict[str, merge.Register]:
    """The object's registers. If one does not unpack, those that do, found by the names
    its updates wrote, and a problem naming each damaged one (or the object, when the
    damaged register has a name no stored update wrote)."""
    try:
        return store.registers(db_id)
    except _DAMAGED as exc:
        whole = exc
    names: set[str] = set()
    for raw in store.raw_updates([*store.history(db_id), *store.history(db_id, held=True)]):
        if raw is None:
            continue  # reported as missing below
        try:
            update = decode(raw)
        except InvalidUpdate:
            continue  # reported by the log check
        names.update(op_register(op, update.id, index) for index, op in enumerate(update.ops)
                     if op.obj == db_id and op.op in FIELD_OPS)
    out: dict[str, merge.Register] = {}
    damaged = []
    for name in sorted(names):
        try:
            reg = store.register(db_id, name)
        except _DAMAGED:
            damaged.append(name)
            continue
        if reg is not None:
            out[name] = reg
    problems.extend(f"{db_id}:{name}: stored register is damaged (not a register)"
                    for name in damaged)
    if not damaged:
        problems.append(f"{db_id}: a stored register no update wrote is damaged: {whole!r}")
    return out


def history(store: Store, db_id: str, field: str | None = None, *,
            include_rejected: bool = False,
            progress: Progress | None = None) -> list[HistoryEntry]:
    """Stored updates of an object in merge order (timestamp, caller, id).

    ``progress(done, total)`` counts the stored updates read.
    """
    entries = []
    sources = [("accepted", store.history(db_id))]
    if include_rejected:
        sources.append(("unauthorized", store.history(db_id, held=True)))
    total = sum(len(uids) for _, uids in sources)
    done = 0
    for verdict, uids in sources:
        for raw in _counted(store.raw_updates(uids), progress, done, total):
            if raw is None:
                continue
            update = decode(raw)
            ops = tuple(o for o in update.ops if o.obj == db_id and (
                field is None or o.field == field))
            if ops:
                entries.append((update, HistoryEntry(update.hex_id, update.caller,
                                                     update.timestamp, verdict, ops)))
        done += len(uids)
    entries.sort(key=lambda e: merge.order_key(e[0]))
    return [e for _, e in entries]


__all__ = ["HistoryEntry", "Progress", "history", "index_problems", "signed_op", "state_digest",
           "verify_register", "verify_store"]
